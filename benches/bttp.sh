#!/usr/bin/env bash
# benches/bttp.sh: bttp (issue #6) against a minimal raw-quinn echo, side by side
# in one process and one run, over 127.0.0.1.
#
# What it measures, against what (the anchor is plain quinn with the same rustls
# provider, TLS 1.3, certificate and transport parameters, and nothing of bttp:
# no framing, no writecap verification, no routing; see benches/benches/bttp.rs):
#   call round trip, 32 B, one in flight   p50 latency   ≤ 1.3× raw quinn's
#   64 KiB one-way messages                throughput    ≥ 0.8× raw quinn's
#   1 KiB one-way messages                 messages/s    report only
#
# The servers run on one thread, the client on another (a core each). In every
# repetition the anchor runs immediately before bttp. The table reports the ratio
# of the best of each side and the range of the per-repetition ratios, because
# other jobs share the machine and absolute numbers drift.
#
# Output: a markdown table on stdout and in target/bench-results/bttp.md. Exits 0
# whether targets pass or fail (a benchmark reports; it is not a test); a missed
# target is printed as FAIL. Needs cargo and python3.
#
# Knobs (environment): REPS (default 3), CALLS (sequential calls per latency run,
# default 20000), BIG (64 KiB messages per run, default 10000), SMALL (1 KiB
# messages per run, default 100000).

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

export REPS=${REPS:-3}
export CALLS=${CALLS:-20000}
export BIG=${BIG:-10000}
export SMALL=${SMALL:-100000}

OUT="$ROOT/target/bench-results"
mkdir -p "$OUT"
export BLOCKTREE_BENCH_OUT="$OUT"
rm -f "$OUT/bttp.json"

started=$(date +%s)
load_before=$(cut -d' ' -f1-3 /proc/loadavg)

echo "== building the benchmark (cargo bench -p blocktree-benches --bench bttp --no-run)" >&2
BIN=$(cargo bench -p blocktree-benches --bench bttp --no-run --message-format=json 2>/dev/null |
    grep -o '"executable":"[^"]*/bttp-[^"]*"' | tail -n1 | cut -d'"' -f4)
if [[ -z "$BIN" || ! -x "$BIN" ]]; then
    echo "could not build the bttp benchmark; run: cargo bench -p blocktree-benches --bench bttp --no-run" >&2
    exit 1
fi
built=$(date +%s)

echo "== running $BIN (REPS=$REPS CALLS=$CALLS BIG=$BIG SMALL=$SMALL)" >&2
"$BIN" --bench >&2 || echo "the bttp benchmark failed" >&2

finished=$(date +%s)
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

cpu_field() { grep -m1 "^$1" /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'; }
cpu="$(cpu_field 'model name') (family $(cpu_field 'cpu family'), model $(cpu_field 'model\s'))"
versions=$(grep -A1 -E '^name = "(quinn|rustls)"$' Cargo.lock | grep version | cut -d'"' -f2 | paste -sd' ' -)

python3 - "$OUT/bttp.json" "$REPS" >"$OUT/bttp.md" <<'PY'
import json, math, sys

path, reps = sys.argv[1], int(sys.argv[2])
try:
    with open(path) as f:
        records = json.load(f)
except (OSError, ValueError):
    records = []

def series(side, case, key):
    return {r["rep"]: r[key] for r in records if r["side"] == side and r["case"] == case}

def best(values, lower_is_better):
    values = [v for v in values.values() if not math.isnan(v)]
    if not values:
        return math.nan
    return min(values) if lower_is_better else max(values)

def ratio_range(mine, anchor):
    ratios = [mine[r] / anchor[r] for r in mine if r in anchor and anchor[r]]
    if len(ratios) < 2:
        return ""
    return f"{min(ratios):.2f}–{max(ratios):.2f}"

rows = []
def row(name, case, key, unit, lower_is_better, target):
    mine, anchor = series("bttp", case, key), series("raw", case, key)
    b_mine, b_anchor = best(mine, lower_is_better), best(anchor, lower_is_better)
    ratio = b_mine / b_anchor if b_anchor and not math.isnan(b_anchor) else math.nan
    if target is None:
        target_text, verdict = "—", "report only"
    elif lower_is_better:
        target_text = f"≤ {target:g}×"
        verdict = "**PASS**" if ratio <= target else "**FAIL**"
    else:
        target_text = f"≥ {target:g}×"
        verdict = "**PASS**" if ratio >= target else "**FAIL**"
    if math.isnan(ratio):
        verdict = "**FAIL**" if target is not None else verdict
    rows.append((name, unit(b_mine), unit(b_anchor), "n/a" if math.isnan(ratio) else f"{ratio:.2f}×",
                 ratio_range(mine, anchor), target_text, verdict))

us = lambda v: "n/a" if math.isnan(v) else f"{v:,.1f} µs"
mbs = lambda v: "n/a" if math.isnan(v) else f"{v / 1e6:,.0f} MB/s"
mps = lambda v: "n/a" if math.isnan(v) else f"{v:,.0f} msg/s"

row("call round trip, 32 B, p50", "latency", "p50_us", us, True, 1.3)
row("call round trip, 32 B, p99", "latency", "p99_us", us, True, None)
row("64 KiB one-way messages", "big", "bytes_per_s", mbs, False, 0.8)
row("64 KiB one-way messages", "big", "messages_per_s", mps, False, None)
row("1 KiB one-way messages", "small", "messages_per_s", mps, False, None)

print(f"Best of {reps} repetitions per side (lowest latency, highest rate); ratio = bttp / raw quinn; "
      "'per-rep ratios' is the range of the ratios within each repetition, where both sides ran back to back.\n")
print("| case | bttp | raw quinn | ratio | per-rep ratios | target | result |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    print("| " + " | ".join(r) + " |")
PY

{
    echo "Command: \`benches/bttp.sh\` (REPS=$REPS CALLS=$CALLS BIG=$BIG SMALL=$SMALL)"
    echo "Date: $(date -u '+%Y-%m-%d %H:%M UTC'); CPU: $cpu, $(nproc) cores; quinn/rustls: $versions"
    echo "Load average before/after: $load_before / $load_after; build $((built - started)) s, benchmark $((finished - built)) s"
    echo
    cat "$OUT/bttp.md"
} >"$OUT/bttp.md.tmp"
mv "$OUT/bttp.md.tmp" "$OUT/bttp.md"
cat "$OUT/bttp.md"
if grep -q 'FAIL' "$OUT/bttp.md"; then
    echo >&2
    echo "FAIL: a bttp speed target was missed (see the table above)." >&2
fi
exit 0
