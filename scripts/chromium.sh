#!/usr/bin/env bash
# Installs what the browser tests drive, when it is missing: Debian's chromium (Playwright's
# own browser download cannot run here) and certutil from libnss3-tools (the wss:// test
# adds its CA to a throwaway NSS database, where Chromium on Linux looks for local roots).
# Idempotent and quiet: apt's output is shown only on failure. Runs as root with no stdin.
set -euo pipefail
[ -x /usr/bin/chromium ] && command -v certutil >/dev/null && exit 0
"$(dirname "$0")/apt-install.sh" --no-install-recommends chromium libnss3-tools
