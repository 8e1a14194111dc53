#!/usr/bin/env bash
# The README's first command: set up, start a local worker, stage a generated sample model into it
# with live progress, stage it again (nothing is sent), then leave the worker running for you to
# try `staging-cli status` in another terminal. Ctrl-C stops the worker.
# Everything lives under ./.quickstart (worker store, sample model, client state).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q -e . 2>&1 | grep -v "^WARNING: Location" || true

HERE=$PWD/.quickstart
PORT=${PORT:-8081}
mkdir -p "$HERE"
export STAGING_CLI_STATE_DIR=$HERE/state STAGING_CLI_CACHE_DIR=$HERE/cache STAGING_CLI_CONFIG_DIR=$HERE/config
[ -f "$HERE/sample-model.gguf" ] || .venv/bin/python -m staging_cli.sample "$HERE/sample-model.gguf" 512MiB

.venv/bin/staging-cli worker --dir "$HERE/worker" --port "$PORT" > "$HERE/worker.log" 2>&1 &
worker=$!
trap 'kill $worker 2>/dev/null; wait $worker 2>/dev/null || true' EXIT
for _ in $(seq 50); do grep -q "listening on" "$HERE/worker.log" 2>/dev/null && break; sleep 0.1; done
URL=$(awk '/listening on/ {print $3}' "$HERE/worker.log")
[ -n "$URL" ] || { cat "$HERE/worker.log"; exit 1; }
echo "worker listening on $URL (store: $HERE/worker)"

.venv/bin/staging-cli stage "$HERE/sample-model.gguf" --model demo/sample:latest --worker "$URL"
echo "--- staging the same file again sends nothing:"
.venv/bin/staging-cli stage "$HERE/sample-model.gguf" --model demo/sample:latest --worker "$URL"
echo
echo "The worker keeps running. In another terminal:"
echo "  .venv/bin/staging-cli status --worker $URL"
echo "  curl -s $URL/status"
echo "Ctrl-C to stop."
wait $worker
