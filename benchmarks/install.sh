#!/usr/bin/env bash
# Installs Debian's socat (the benchmarks' plain TCP relay, the throughput ceiling) when
# it is missing. Idempotent and quiet (apt output goes to stderr only on failure); runs
# as root with no stdin. websockify and matplotlib come from PyPI (the `bench` extra).
set -euo pipefail
command -v socat >/dev/null 2>&1 && exit 0
"$(dirname "$0")/../scripts/apt-install.sh" socat
