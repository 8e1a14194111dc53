#!/usr/bin/env bash
# The README's first command: set up, then run `staging-cli serve` on the embedded default
# (SQLite coordinator, a worker in the same process with the demo backend, no PostgreSQL) with a
# generated 512 MiB sample model in its models dir. Your first request for "sample" triggers a
# real cold load: hashing, staging over tus, loading, then the demo backend's answer.
# Everything lives under ./.quickstart. Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q -e . 2>&1 | grep -v "^WARNING: Location" || true

HERE=$PWD/.quickstart
export STAGING_CLI_STATE_DIR=$HERE/state STAGING_CLI_CACHE_DIR=$HERE/cache \
       STAGING_CLI_CONFIG_DIR=$HERE/config STAGING_CLI_DATA_DIR=$HERE/data
mkdir -p "$HERE/data/models"
[ -f "$HERE/data/models/sample.gguf" ] || .venv/bin/python -m staging_cli.sample "$HERE/data/models/sample.gguf" 512MiB

echo "In a second terminal, ask for the cold model (the first answer waits for the cold load):"
echo "  curl -s localhost:${PORT:-8080}/v1/chat/completions -H 'content-type: application/json' \\"
echo "       -d '{\"model\": \"sample\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}'"
echo "  curl -s localhost:${PORT:-8080}/staging/jobs"
exec .venv/bin/staging-cli serve --port "${PORT:-8080}"
