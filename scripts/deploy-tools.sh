#!/usr/bin/env bash
# Installs what tests/test_deploy.py runs, from Debian, when missing: kubectl (its built-in
# kustomize renders deploy/k8s; package kubernetes-client) and systemd-analyze (verifies
# deploy/ksw1fast.service; package systemd). Idempotent and quiet (apt output goes to
# stderr only on failure); runs as root with no stdin. Under CI=true the tests fail
# rather than skip when either is missing.
#
# Nothing here runs a cluster or a service: kubectl only renders files offline, and
# systemd-analyze only reads the unit (a machine without systemd as PID 1 will do).
set -euo pipefail
missing=()
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
command -v kubectl >/dev/null 2>&1 || missing+=(kubernetes-client)
[ ${#missing[@]} -eq 0 ] && exit 0

if [[ " ${missing[*]} " == *" kubernetes-client "* ]] \
        && ! apt-cache show kubernetes-client >/dev/null 2>&1; then
    apt-get update -qq </dev/null >/dev/null 2>&1 || true
    if ! apt-cache show kubernetes-client >/dev/null 2>&1; then
        echo "deploy-tools.sh: kubectl is missing and this Debian release has no" \
             "kubernetes-client package; tests/test_deploy.py needs a kubectl" >&2
        exit 1
    fi
fi
"$(dirname "$0")/apt-install.sh" --no-install-recommends "${missing[@]}"
