# Sourced by the set-up scripts: makes ./.venv with an up-to-date pip.
python=${PYTHON:-python3}
if ! "$python" -c "import venv, ensurepip" 2>/dev/null; then
    scripts/apt-install.sh python3-venv  # Debian ships venv/ensurepip separately
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
