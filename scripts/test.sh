#!/usr/bin/env bash
# Installs everything the test suite needs into ./.venv and runs the whole suite.
# Usage: ./scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if ! "$python" -c "import venv, ensurepip" 2>/dev/null; then
    # Debian splits venv/ensurepip into python3-venv
    apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# editable: builds the Cython extensions in place, so the tests run the compiled code
.venv/bin/python -m pip install -q -e '.[test]'
exec .venv/bin/python -m pytest "$@"
