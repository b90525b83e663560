#!/usr/bin/env bash
# Installs ksw1fast into ./.venv and serves the gateway (defaults: ws://127.0.0.1:8088/ws).
# Usage: ./scripts/serve.sh [ksw1fast serve flags...]
# Builds and installs only when the sources differ from those last installed: a hash of
# them is kept in .venv, so a new .venv installs afresh.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
stamp=.venv/ksw1fast-sources.sha256
sources=$({ sha256sum pyproject.toml setup.py
            find ksw1fast -type f \( -name '*.py' -o -name '*.pyx' -o -name '*.pxd' \
                 -o -name '*.pyi' -o -name py.typed \) -print0 \
                | LC_ALL=C sort -z | xargs -0 sha256sum; } | sha256sum)
if [ ! -x .venv/bin/ksw1fast ] || [ "$(cat "$stamp" 2>/dev/null)" != "$sources" ]; then
    .venv/bin/python -m pip install -q .
    echo "$sources" >"$stamp"
fi
exec .venv/bin/ksw1fast serve "$@"
