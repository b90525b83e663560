#!/usr/bin/env bash
# Installs Debian packages quietly: apt's output is shown only when it fails. Runs as root
# with no stdin; the caller decides what is missing.
# Usage: scripts/apt-install.sh [apt-get install options] PACKAGE...
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! { apt-get update -qq && apt-get install -y -qq "$@"; } >"$log" 2>&1 </dev/null; then
    cat "$log" >&2
    exit 1
fi
