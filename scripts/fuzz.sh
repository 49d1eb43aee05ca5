#!/usr/bin/env bash
# make fuzz: every cargo-fuzz target in fuzz/ for a bounded time each, from the committed seeds
# (fuzz/seeds/<target>) plus what earlier runs found (fuzz/corpus/<target>, not committed).
# cargo-fuzz wants nightly flags; the stable toolchain gives them with RUSTC_BOOTSTRAP=1.
#
#   FUZZ_SECONDS    time per target (default 60)
#   FUZZ_SANITIZER  none (default: panics and aborts are what we look for) or address
#   FUZZ_TARGETS    a space-separated subset (default: all)
#
# A crash is saved under fuzz/artifacts/<target>/; turn it into a regression test before fixing.
set -euo pipefail
cd "$(dirname "$0")/.."
export RUSTC_BOOTSTRAP=1
seconds=${FUZZ_SECONDS:-60}
sanitizer=${FUZZ_SANITIZER:-none}
target_dir="${CARGO_TARGET_DIR:-$PWD/target}/fuzz"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --version 0.13.1 --locked
fi
targets=${FUZZ_TARGETS:-$(cargo fuzz list --fuzz-dir fuzz)}
cargo fuzz build --fuzz-dir fuzz --sanitizer "$sanitizer" --target-dir "$target_dir" 2>&1 | grep -E "^(error|warning: unused)|Finished" >&2 || true
status=0
for t in $targets; do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    echo "fuzz: $t for ${seconds}s" >&2
    if ! cargo fuzz run --fuzz-dir fuzz --sanitizer "$sanitizer" --target-dir "$target_dir" "$t" \
        "fuzz/corpus/$t" "fuzz/seeds/$t" -- -max_total_time="$seconds" -max_len=16384 -timeout=10 \
        -artifact_prefix="fuzz/artifacts/$t/" -print_final_stats=1 2>"fuzz/artifacts/$t.log"; then
        status=1
        echo "fuzz: $t FAILED; see fuzz/artifacts/$t.log and fuzz/artifacts/$t/" >&2
    fi
    grep -E "stat::number_of_executed_units|stat::peak_rss_mb|Done [0-9]+ runs" "fuzz/artifacts/$t.log" | sed "s/^/fuzz: $t: /" >&2 || true
done
exit $status
