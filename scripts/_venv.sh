# Sourced by the set-up scripts: makes ./.venv, with an up-to-date pip when it creates it.
python=${PYTHON:-python3}
if ! "$python" -c "import venv, ensurepip" 2>/dev/null; then
    scripts/apt-install.sh python3-venv  # Debian ships venv/ensurepip separately
fi
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
fi
