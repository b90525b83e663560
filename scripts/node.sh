#!/usr/bin/env bash
# Installs what the Node client test (tests/test_node_client.py) runs: Debian's nodejs and
# npm when either is missing, then the `ws` package pinned by tests/node/package-lock.json
# with `npm ci`. Idempotent and quiet: output only on failure; npm runs again only when
# the lock changed since its last install. Runs as root with no stdin.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
[ ${#missing[@]} -eq 0 ] || scripts/apt-install.sh --no-install-recommends "${missing[@]}"

dir=tests/node
stamp=$dir/node_modules/.installed-lock.json  # the lock node_modules was installed from
cmp -s "$dir/package-lock.json" "$stamp" 2>/dev/null && exit 0
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# --ignore-scripts: nothing but the locked packages is fetched or run
if ! npm ci --prefix "$dir" --ignore-scripts --no-audit --no-fund >"$log" 2>&1 </dev/null; then
    cat "$log" >&2
    exit 1
fi
cp "$dir/package-lock.json" "$stamp"
