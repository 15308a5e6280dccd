#!/usr/bin/env bash
# The test command: starts what the tests need, runs every test in the workspace, then checks the
# Helm chart (scripts/test-helm.sh). Works on a fresh machine with only Rust installed: Redis, Python 3
# (with venv and pip) and Node.js (with npm) are installed with apt-get if missing; the client tests'
# and chart checks' own packages come from PyPI and npm into target/.
set -euo pipefail
cd "$(dirname "$0")/.."

ensure_redis() {
  if command -v redis-cli >/dev/null 2>&1 && redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; then
    return
  fi
  if ! command -v redis-server >/dev/null 2>&1; then
    echo "test.sh: installing redis-server" >&2
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server redis-tools >/dev/null
  fi
  echo "test.sh: starting redis-server on 127.0.0.1:6379" >&2
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
  for _ in $(seq 1 100); do
    redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG && return
    sleep 0.1 # polling a readiness probe, bounded to 10 s
  done
  echo "test.sh: redis-server did not answer PING" >&2
  exit 1
}

apt_install() {
  echo "test.sh: installing $* with apt-get" >&2
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "$@" >/dev/null
}

# tests/clients.rs runs the Python and Node clients; scripts/test-helm.sh uses a Python venv.
ensure_python_and_node() {
  if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    apt_install python3 python3-venv python3-pip
  fi
  if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    apt_install nodejs npm
  fi
}

ensure_redis
ensure_python_and_node
export VLM_TEST_REDIS_URL="${VLM_TEST_REDIS_URL:-redis://127.0.0.1:6379}"
cargo test --workspace --locked "$@"

# The Helm chart, after cargo test so that the binary it built can run the rendered pods.
VLM_HELM_REQUIRE_BIN=1 ./scripts/test-helm.sh
