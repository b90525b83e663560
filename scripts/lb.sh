#!/usr/bin/env bash
# Installs Debian's nginx and HAProxy when either is missing, for the load-balancer tests
# (tests/test_load_balancers.py). Idempotent and quiet (apt output goes to stderr only on
# failure); runs as root with no stdin.
#
# The tests never use the system services: they run their own nginx and haproxy in the
# foreground with configs in a temp dir. Debian's postinst starts both services (nginx
# on :80); we stop them again so nothing is left listening, but only when this script did
# the install - a machine that already ran them keeps them.
set -euo pipefail
missing=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
[ ${#missing[@]} -eq 0 ] && exit 0

"$(dirname "$0")/apt-install.sh" "${missing[@]}"
for service in "${missing[@]}"; do
    # without systemd (containers) invoke-rc.d may or may not have started it
    if command -v systemctl >/dev/null 2>&1 && systemctl is-system-running >/dev/null 2>&1; then
        systemctl disable --now "$service" >/dev/null 2>&1 || true
    else
        service "$service" stop >/dev/null 2>&1 </dev/null || true
    fi
done
