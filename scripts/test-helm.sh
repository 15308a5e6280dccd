#!/usr/bin/env bash
# Chart checks: renders helm/vlm-mesh with Helm's own library for the default and the production
# values, validates every manifest against the Kubernetes API schemas, and asserts the chart's
# properties (helm/tests/test_chart.py); then runs the rendered pods' commands with the real
# binary and probes them as the kubelet would (helm/tests/test_chart_runtime.py). Needs only Python 3 with venv/pip: the tools are
# installed, at the versions pinned in helm/tests/requirements.txt, into a virtualenv outside the
# source tree (under the cargo target directory, which is ignored), reused while the pins match.
set -euo pipefail
cd "$(dirname "$0")/.."

target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
venv="${VLM_HELM_VENV:-$target_dir/helm-venv}"
requirements=helm/tests/requirements.txt
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$requirements" | cut -d' ' -f1)"

if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "test-helm.sh: installing the chart tools into $venv" >&2
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  pip_args=(--quiet --disable-pip-version-check --no-input --requirement "$requirements")
  if python3 -m venv "$venv" 2>/dev/null; then
    "$venv/bin/python" -m pip install "${pip_args[@]}"
  else
    # No venv module (Debian without python3-venv): a plain target directory does the same job.
    rm -rf "$venv"
    python3 -m pip install "${pip_args[@]}" --target "$venv/site-packages"
  fi
  echo "$want" >"$stamp"
fi

if [ -x "$venv/bin/python" ]; then
  python="$venv/bin/python"
else
  python=python3
  export PYTHONPATH="$venv/site-packages${PYTHONPATH:+:$PYTHONPATH}"
fi

# test_chart_runtime.py runs the rendered pods with the real binary: the debug build that
# `cargo test` (scripts/test.sh) leaves behind, unless VLM_MESH_BIN names another.
if [ -z "${VLM_MESH_BIN:-}" ] && [ -x "$target_dir/debug/vlm-mesh" ]; then
  export VLM_MESH_BIN="$target_dir/debug/vlm-mesh"
fi

echo "test-helm.sh: chart checks (helm/tests)" >&2
exec "$python" helm/tests/run.py "$@"
