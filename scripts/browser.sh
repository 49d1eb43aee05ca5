#!/usr/bin/env bash
# Ensure Debian's headless browser for the browser tests: `chromium` and `chromium-driver`.
# Idempotent; `make test` runs it. Nothing else needs a browser.
set -euo pipefail

log() { printf 'browser: %s\n' "$*" >&2; }

have() { command -v chromium >/dev/null && command -v chromedriver >/dev/null; }
have && exit 0

if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || { log "error: must run as root to install chromium (sudo not available)"; exit 1; }
    exec sudo bash "$(readlink -f "${BASH_SOURCE[0]}")" "$@"
fi
log "installing chromium and chromium-driver"
apt-get update -qq || { log "error: apt-get update failed"; exit 1; }
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null \
    || { log "error: apt-get install chromium chromium-driver failed"; exit 1; }
have || { log "error: chromium or chromedriver still missing after install"; exit 1; }
