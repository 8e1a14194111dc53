#!/usr/bin/env bash
# Sets up everything the test suite needs and runs it: the README's test command.
#   a virtualenv with the package and its test extras; PostgreSQL server binaries (initdb,
#   pg_ctl) for the coordinator tests and Node.js packages for the tus interop tests, installed
#   with apt-get / npm when missing and running as root. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e '.[test]' 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import staging_cli, tusclient, respx" # fail here if the install failed

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else echo "skipping (not root): $*" >&2; return 1; fi; }
apt_updated=""
apt_install() {
  if [ -z "$apt_updated" ]; then as_root apt-get update -qq || return 1; apt_updated=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

if ! command -v initdb >/dev/null 2>&1 && ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
  echo "installing PostgreSQL server binaries (coordinator tests)" >&2
  apt_install postgresql || echo "PostgreSQL is missing: the coordinator tests will fail in CI, skip elsewhere" >&2
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "installing Node.js and npm (tus interop tests)" >&2
  apt_install nodejs npm || echo "npm is missing: interop tests will fail in CI, skip elsewhere" >&2
fi
if command -v npm >/dev/null 2>&1 && [ -f .ci/install-interop.sh ]; then
  bash .ci/install-interop.sh
fi

.venv/bin/python -m ruff check --quiet staging_cli tests bench
.venv/bin/python -m mypy --no-error-summary staging_cli
exec .venv/bin/python -m pytest -q "$@"
