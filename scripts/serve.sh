#!/usr/bin/env bash
# Installs ksw1fast into ./.venv and serves the gateway (defaults: ws://127.0.0.1:8088/ws).
# Usage: ./scripts/serve.sh [ksw1fast serve flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
.venv/bin/python -m pip install -q .
exec .venv/bin/ksw1fast serve "$@"
