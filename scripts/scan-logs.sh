#!/usr/bin/env bash
# make test, after the tests: no secret a test recorded (tests/api/helpers: record_secret) appears
# in any log of the run ($CARGO_TARGET_DIR/test-logs/*.log, every instance the tests started), as
# itself or without its recognisable prefix. Prints what leaked where, never the secret.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${CARGO_TARGET_DIR:-$PWD/target}/test-logs"
secrets="$dir/secrets.txt"
if [[ ! -s "$secrets" ]]; then
    echo "scan-logs: no recorded secrets in $secrets (did the tests run?)" >&2
    exit 1
fi
shopt -s nullglob
logs=("$dir"/*.log)
if (( ${#logs[@]} == 0 )); then
    echo "scan-logs: no logs in $dir" >&2
    exit 1
fi
patterns=$(mktemp)
trap 'rm -f "$patterns"' EXIT
# The secret, and its part after the last '_' or '.' (a prefix dropped, a JWT's signature) when
# that part is long enough to mean something.
awk -F'\t' 'NF >= 2 && length($2) >= 12 {
    print $2
    n = split($2, parts, /[_.]/)
    if (n > 1 && length(parts[n]) >= 16) print parts[n]
}' "$secrets" | sort -u > "$patterns"
count=$(wc -l < "$patterns")
bytes=$(cat "${logs[@]}" | wc -c)
if matches=$(grep -F -o -h -f "$patterns" "${logs[@]}" | sort -u) && [[ -n "$matches" ]]; then
    echo "scan-logs: recorded secrets found in the test logs:" >&2
    while IFS= read -r m; do
        kind=$(awk -F'\t' -v m="$m" 'index($2, m) { print $1; exit }' "$secrets")
        files=$(grep -F -l -- "$m" "${logs[@]}" | xargs -n1 basename | tr '\n' ' ')
        echo "  a ${kind:-secret} in: $files" >&2
    done <<< "$matches"
    exit 1
fi
echo "scan-logs: $count secret forms, ${#logs[@]} logs ($bytes bytes): none found" >&2
