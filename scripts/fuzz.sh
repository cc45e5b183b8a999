#!/usr/bin/env bash
# Builds the cargo-fuzz targets in contrib/fuzz (AddressSanitizer) and runs each for
# FUZZ_SECONDS (default 20) from the committed seeds. New corpus entries go to a temporary
# directory; crashes to contrib/fuzz/artifacts/<target>/. FUZZ_SEED (default 1) fixes the
# random seed. Usage: scripts/fuzz.sh [target...]
# Only stable Rust is needed: RUSTC_BOOTSTRAP=1 unlocks the sanitizer flags cargo-fuzz passes.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${FUZZ_SECONDS:-20}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(request_parse qcow2_ops vhost_user_stream inflight_region)

if ! command -v c++ >/dev/null; then
    if [ "$(id -u)" -eq 0 ]; then as_root=(); else as_root=(sudo); fi
    "${as_root[@]}" apt-get update -qq
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends g++
fi
cargo fuzz --version >/dev/null 2>&1 || cargo install cargo-fuzz --locked --quiet

export RUSTC_BOOTSTRAP=1
cargo fuzz build --fuzz-dir contrib/fuzz
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for t in "${targets[@]}"; do
    mkdir -p "$work/$t"
    echo "fuzz: $t for ${seconds}s"
    # -timeout: an input that takes 10 s is a hang; -rss_limit_mb: bounded memory.
    if ! cargo fuzz run --fuzz-dir contrib/fuzz "$t" "$work/$t" "contrib/fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -seed="${FUZZ_SEED:-1}" \
        -print_final_stats=1 \
        >"$work/$t.log" 2>&1; then
        tail -n 60 "$work/$t.log"
        echo "fuzz: $t failed (input saved under contrib/fuzz/artifacts/$t/)"
        exit 1
    fi
    grep -E '^stat::number_of_executed_units|^Done' "$work/$t.log" || true
done
echo "fuzz: every target ran clean (${targets[*]})"
