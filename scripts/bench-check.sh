#!/usr/bin/env bash
# Measure `kho check` on a large sparse arena against `cat ARENA > /dev/null`
# in the same run (issue: target <= 1.5x the time of cat).
#
#   scripts/bench-check.sh [--dense] [SIZE_GIB [PRESERVED_GIB]]   # default 8 and 1
#
# The arena is written by `gen-fixtures --bench-arena`: PRESERVED_GIB of
# order-9 folios, each with one 4 KiB extent of data, so the checker reads
# every other byte of preserved memory looking for stale data. The file is
# sparse (only the data pages use disk) unless --dense, which writes every
# preserved byte, so the checker reads real, resident pages rather than
# holes. Uses hyperfine when installed
# (apt-get install hyperfine), /usr/bin/time-style timing otherwise.
set -euo pipefail
dense=()
if [ "${1:-}" = "--dense" ]; then
    dense=(--dense)
    shift
fi
size=${1:-8}
preserved=${2:-1}
root=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
cargo build --release -p kho-cli --bins --manifest-path "$root/Cargo.toml"
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
arena=$dir/bench.arena
"$target/release/gen-fixtures" --bench-arena "$arena" "$size" "$preserved" "${dense[@]}"
echo "arena: $(du -h --apparent-size "$arena" | cut -f1) apparent, $(du -h "$arena" | cut -f1) on disk"
kho=$target/release/kho
set +e
"$kho" check "$arena" > /dev/null
rc=$?
set -e
if [ "$rc" -ne 0 ]; then
    echo "kho check exited $rc on the bench arena (expected 0)" >&2
    exit 1
fi
if command -v hyperfine > /dev/null; then
    hyperfine --warmup 1 --runs 5 --export-json "$dir/h.json" \
        "cat $arena > /dev/null" "$kho check $arena > /dev/null"
    python3 - "$dir/h.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["results"]
cat, chk = r[0]["mean"], r[1]["mean"]
print(f"cat {cat:.3f}s  kho check {chk:.3f}s  ratio {chk / cat:.2f}x (target <= 1.5x)")
PY
else
    t() { local s e; s=$(date +%s.%N); "$@" > /dev/null; e=$(date +%s.%N); echo "$e - $s" | bc; }
    cat "$arena" > /dev/null
    c=$(t cat "$arena"); k=$(t "$kho" check "$arena")
    echo "cat ${c}s  kho check ${k}s  ratio $(echo "scale=2; $k / $c" | bc)x (target <= 1.5x)"
fi
