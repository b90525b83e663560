#!/usr/bin/env bash
# The whole test suite, run against the INSTALLED package: builds the sdist and a wheel
# from it, checks and repairs the wheel with auditwheel, installs it into a fresh
# virtual environment and runs pytest from outside the source tree, so a file missing
# from the wheel or a build step missing from the sdist fails here. Before the tests,
# mypy checks the package's types.
# Usage: ./scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

. scripts/_venv.sh  # .venv: the build tools
# auditwheel after 6.5 wants a newer patchelf than Debian 12's 0.14.3
.venv/bin/python -m pip install -q build "auditwheel>=6.4,<6.6"
command -v patchelf >/dev/null || scripts/apt-install.sh patchelf

rm -rf dist wheelhouse
.venv/bin/python -m build --outdir dist . >/dev/null   # the sdist, then a wheel built from it
.venv/bin/auditwheel show dist/*.whl
.venv/bin/auditwheel repair --wheel-dir wheelhouse dist/*.whl >/dev/null

rm -rf .venv-test
"$python" -m venv .venv-test
.venv-test/bin/python -m pip install -q --upgrade pip
.venv-test/bin/python -m pip install -q "$(ls wheelhouse/*.whl)[test,pkcs11]"

# the real components the tests use, installed from Debian when missing
scripts/softhsm.sh >/dev/null
scripts/lb.sh
scripts/chromium.sh
scripts/node.sh
scripts/deploy-tools.sh

# the package's types, as pyproject.toml's [tool.mypy] configures the check
.venv-test/bin/python -m mypy

cd "$(mktemp -d)"  # where the source tree's ksw1fast/ is not importable
"$root/.venv-test/bin/python" -c 'import ksw1fast, sys; f = ksw1fast.__file__; \
    sys.exit(0 if "site-packages" in f else f"testing {f}, not the installed wheel")'
exec "$root/.venv-test/bin/python" -m pytest "$root/tests" -p no:cacheprovider "$@"
