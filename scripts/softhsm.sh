#!/usr/bin/env bash
# Installs Debian's SoftHSM2 when it is missing and prints the path of its PKCS#11 module.
# Idempotent and quiet (apt output goes to stderr only on failure); runs as root with no stdin.
set -euo pipefail
command -v softhsm2-util >/dev/null 2>&1 || "$(dirname "$0")/apt-install.sh" softhsm2
for lib in /usr/lib/softhsm/libsofthsm2.so /usr/lib/*/softhsm/libsofthsm2.so; do
    if [ -f "$lib" ]; then
        echo "$lib"
        exit 0
    fi
done
lib=$(find /usr/lib /usr/local/lib -name libsofthsm2.so -print -quit 2>/dev/null || true)
if [ -z "$lib" ]; then
    echo "softhsm.sh: libsofthsm2.so not found" >&2
    exit 1
fi
echo "$lib"
