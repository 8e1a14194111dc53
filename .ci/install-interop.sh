#!/usr/bin/env bash
# Install the third-party tus peers the interoperability tests (tests/interop) run against:
# @tus/server + @tus/file-store (npm) under tests/interop/node/node_modules.
# Idempotent: `npm ci` from the committed lock file (falls back to `npm install` without one).
# The Python peer (tuspy) comes with the project's `test` extra.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
node_dir="$root/tests/interop/node"

for tool in node npm; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "install-interop: '$tool' is not on PATH; the interop tests need Node.js >= 20.19 and npm" >&2
    exit 1
  fi
done

if [[ ! -f "$node_dir/package.json" ]]; then
  echo "install-interop: $node_dir/package.json is missing" >&2
  exit 1
fi

cd "$node_dir"
if [[ -f package-lock.json ]]; then
  npm ci --no-audit --no-fund --loglevel=error >/dev/null
else
  npm install --no-audit --no-fund --loglevel=error >/dev/null
fi

node --input-type=module -e '
  await import("@tus/server");
  await import("@tus/file-store");
' || {
  echo "install-interop: @tus/server or @tus/file-store does not load after installing (node $(node --version))" >&2
  exit 1
}
echo "install-interop: @tus/server and @tus/file-store ready in $node_dir/node_modules (node $(node --version))"
