#!/usr/bin/env bash
# Installs everything the test suite needs into ./.venv and runs the whole suite.
# Usage: ./scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
# editable: builds the Cython extensions in place, so the tests run the compiled code
.venv/bin/python -m pip install -q -e '.[test]'
exec .venv/bin/python -m pytest "$@"
