#!/usr/bin/env bash
# The test command: starts what the tests need, runs every test in the workspace, then checks the
# Helm chart (scripts/test-helm.sh), and stops the Redis it started, if it started one. Works on a
# fresh machine with only Rust installed: Redis, Python 3
# (with venv and pip) and Node.js (with npm) are installed with apt-get if missing; the client tests'
# and chart checks' own packages come from PyPI and npm into target/.
set -euo pipefail
cd "$(dirname "$0")/.."

# The Redis the tests use: 127.0.0.1:$VLM_TEST_REDIS_PORT (6379 by default). One that is already
# running is used and left alone; one that test.sh starts is stopped when test.sh exits, whatever
# the outcome (the EXIT trap below), and only that one: it is stopped by the process id its
# pidfile recorded.
redis_port="${VLM_TEST_REDIS_PORT:-6379}"
redis_dir="" # set once test.sh has started a redis-server: holds its pidfile

ensure_redis() {
  if command -v redis-cli >/dev/null 2>&1 && redis-cli -h 127.0.0.1 -p "$redis_port" ping 2>/dev/null | grep -q PONG; then
    return
  fi
  if ! command -v redis-server >/dev/null 2>&1; then
    echo "test.sh: installing redis-server" >&2
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server redis-tools >/dev/null
  fi
  echo "test.sh: starting redis-server on 127.0.0.1:$redis_port" >&2
  redis_dir="$(mktemp -d)"
  redis-server --daemonize yes --bind 127.0.0.1 --port "$redis_port" --save "" --appendonly no \
    --dir "$redis_dir" --pidfile "$redis_dir/redis.pid" >/dev/null
  for _ in $(seq 1 100); do
    redis-cli -h 127.0.0.1 -p "$redis_port" ping 2>/dev/null | grep -q PONG && return
    sleep 0.1 # polling a readiness probe, bounded to 10 s
  done
  echo "test.sh: redis-server did not answer PING" >&2
  exit 1
}

# EXIT trap: stops the redis-server that ensure_redis started, if it did. The script's exit status
# stays that of the tests (the trap calls no `exit`).
stop_started_redis() {
  [ -n "$redis_dir" ] || return 0
  local pid
  pid="$(cat "$redis_dir/redis.pid" 2>/dev/null || true)"
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    echo "test.sh: stopping the redis-server it started (pid $pid, 127.0.0.1:$redis_port)" >&2
    kill -TERM "$pid" 2>/dev/null || true # Redis shuts down on SIGTERM; --save "" writes nothing
    for _ in $(seq 1 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1 # waiting for it to exit, bounded to 10 s
    done
    if kill -0 "$pid" 2>/dev/null; then
      echo "test.sh: redis-server (pid $pid) still running after 10 s; killing it" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -rf "$redis_dir"
}
trap stop_started_redis EXIT
# On Ctrl-C or SIGTERM, exit (running the EXIT trap) with the conventional status.
trap 'exit 130' INT
trap 'exit 143' TERM

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
export VLM_TEST_REDIS_URL="${VLM_TEST_REDIS_URL:-redis://127.0.0.1:$redis_port}"
cargo test --workspace --locked "$@"

# The Helm chart, after cargo test so that the binary it built can run the rendered pods.
VLM_HELM_REQUIRE_BIN=1 ./scripts/test-helm.sh
