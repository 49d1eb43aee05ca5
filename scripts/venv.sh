#!/usr/bin/env bash
# A Python virtual environment for the tests that drive us with libraries we did not write
# (an OAuth client, an API fuzzer). Made under the build directory, never committed; packages
# pinned in scripts/requirements.txt. Idempotent: prints the venv's directory.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
target="${CARGO_TARGET_DIR:-$here/../target}"
venv="$target/venv"
req="$here/requirements.txt"

log() { printf 'venv: %s\n' "$*" >&2; }

stamp="$venv/.requirements"
if [[ -x $venv/bin/python ]] && cmp -s "$req" "$stamp" 2>/dev/null; then
    echo "$venv"
    exit 0
fi

if ! command -v python3 >/dev/null || ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null || { log "error: python3-venv missing and not root"; exit 1; }
        sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >/dev/null
    else
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >/dev/null
    fi
fi
mkdir -p "$target"
log "making $venv"
python3 -m venv "$venv" >&2
"$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$req" >&2
cp "$req" "$stamp"
echo "$venv"
