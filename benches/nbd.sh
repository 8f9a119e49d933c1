#!/usr/bin/env bash
# benches/nbd.sh: Blocktree's NBD export (`blocktree up`, issue #5) against
# qemu-nbd serving a raw file, with nbdkit's file plugin in the same table, the
# same fio jobs (--ioengine=nbd, libnbd) on all three, on the same disk, in one run.
#
# The three servers:
#   qemu-nbd  a raw file of BENCH_SIZE, --cache=none --aio=io_uring (O_DIRECT),
#             --shared=8 so several connections may attach           (the anchor)
#   nbdkit    its file plugin on another raw file of BENCH_SIZE, default options
#             (the page cache; report only)
#   blocktree `blocktree up` on a fresh data directory with one volume of
#             BENCH_SIZE: encryption (AES-256-GCM) and Merkle verification on,
#             4 KiB blocks, the defaults
# Targets (ratio = Blocktree / qemu-nbd):
#   1 MiB sequential write, QD 16, 1 connection                    bandwidth ≥ 1.0×
#   1 MiB sequential read, QD 16, 1 connection                     bandwidth ≥ 1.0×
#   4 KiB random write, QD 32 over 4 connections (4 jobs × QD 8)   IOPS      ≥ 1.0×
#   4 KiB random read, QD 32 over 4 connections (4 jobs × QD 8)    IOPS      ≥ 1.0×
#   blocktree's peak RSS (VmHWM) over those jobs                    ≤ 256 MiB
#     (reset with clear_refs once the export is ready; the peak of opening the
#     store and creating the volume is reported apart)
#
# Every export is laid out (written whole with 1 MiB writes) before the first
# case, so reads read data, not holes. Each case is time based (BENCH_SECONDS,
# after RAMP seconds of unmeasured warm-up), over the whole export. Each side runs
# REPS times, qemu-nbd, nbdkit and Blocktree back to back in every repetition;
# the table reports the ratio of the best of each side and the range of the
# per-repetition ratios, because other jobs share the machine.
#
# Output: a markdown table on stdout and in target/bench-results/nbd.md. Exits 0
# whether targets pass or fail (a benchmark reports; it is not a test); a missed
# target is printed as FAIL. Needs cargo, python3, fio (with its nbd engine),
# qemu-nbd (qemu-utils) and nbdkit (installed with apt-get when missing).
#
# Knobs (environment): BENCH_DIR (default target/bench-results/nbd-data, which
# must be on the file system to measure), BENCH_SIZE (each export, default 1G),
# BENCH_SECONDS (per case, default 10), RAMP (default 1), REPS (default 2),
# BASE_PORT (default 21809; three ports from it).

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

SECONDS_PER_CASE=${BENCH_SECONDS:-10}
RAMP=${RAMP:-1}
REPS=${REPS:-2}
SIZE=${BENCH_SIZE:-1G}
BENCH_DIR=${BENCH_DIR:-$ROOT/target/bench-results/nbd-data}
BASE_PORT=${BASE_PORT:-21809}
QEMU_PORT=$BASE_PORT
NBDKIT_PORT=$((BASE_PORT + 1))
BT_PORT=$((BASE_PORT + 2))

OUT="$ROOT/target/bench-results"
WORK="$OUT/nbd"
RESULTS="$WORK/results.tsv"
rm -rf "$WORK" "$BENCH_DIR"
mkdir -p "$WORK" "$BENCH_DIR"
: >"$RESULTS"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing=()
command -v fio >/dev/null 2>&1 || missing+=(fio)
command -v qemu-nbd >/dev/null 2>&1 || missing+=(qemu-utils)
command -v nbdkit >/dev/null 2>&1 || missing+=(nbdkit)
if [ ${#missing[@]} -gt 0 ]; then
    echo "== installing ${missing[*]}" >&2
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
if ! fio --enghelp 2>/dev/null | grep -qx '[[:space:]]*nbd'; then
    echo "this fio has no nbd engine" >&2
    exit 1
fi

started=$(date +%s)
load_before=$(cut -d' ' -f1-3 /proc/loadavg)

echo "== building the release binary (cargo build --release -p blocktree)" >&2
BIN=$(cargo build --release -p blocktree --message-format=json 2>/dev/null |
    grep -o '"executable":"[^"]*/blocktree"' | tail -n1 | cut -d'"' -f4)
if [[ -z "$BIN" || ! -x "$BIN" ]]; then
    echo "could not build blocktree; run: cargo build --release -p blocktree" >&2
    exit 1
fi
built=$(date +%s)

echo "== file system under test:" >&2
df -T "$BENCH_DIR" | tee "$WORK/df.txt" >&2

PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
}
trap cleanup EXIT

# wait_port PORT: until something accepts connections on 127.0.0.1:PORT.
wait_port() {
    for _ in $(seq 1 300); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "nothing listens on port $1" >&2
    exit 1
}

QEMU_RAW="$BENCH_DIR/qemu.raw"
NBDKIT_RAW="$BENCH_DIR/nbdkit.raw"
echo "== laying out the raw files ($SIZE each)" >&2
for raw in "$QEMU_RAW" "$NBDKIT_RAW"; do
    fio --name=layout --filename="$raw" --size="$SIZE" --ioengine=io_uring --direct=1 --rw=write \
        --bs=1M --iodepth=8 >/dev/null 2>>"$WORK/fio.log"
done

qemu-nbd -f raw --cache=none --aio=io_uring --discard=unmap --shared=8 --persistent \
    -x bench -b 127.0.0.1 -p "$QEMU_PORT" "$QEMU_RAW" >"$WORK/qemu-nbd.log" 2>&1 &
PIDS+=($!)
nbdkit -f -i 127.0.0.1 -p "$NBDKIT_PORT" -e bench file "$NBDKIT_RAW" >"$WORK/nbdkit.log" 2>&1 &
PIDS+=($!)

echo "== blocktree volume create bench --size $SIZE; blocktree up" >&2
export BLOCKTREE_ROOT_PASSWORD=${BLOCKTREE_ROOT_PASSWORD:-benchmark-password}
"$BIN" volume create bench --size "$SIZE" --data "$BENCH_DIR/blocktree" >"$WORK/volume.log" 2>&1
"$BIN" up --data "$BENCH_DIR/blocktree" --nbd "127.0.0.1:$BT_PORT" >"$WORK/up.log" 2>"$WORK/up.err" &
BT_PID=$!
PIDS+=("$BT_PID")
for _ in $(seq 1 600); do
    grep -q '^ready:' "$WORK/up.log" 2>/dev/null && break
    sleep 0.1
done
grep -q '^ready:' "$WORK/up.log" || { cat "$WORK/up.err" >&2; exit 1; }
wait_port "$QEMU_PORT"
wait_port "$NBDKIT_PORT"

uri() {
    case $1 in
    qemu-nbd) echo "nbd://127.0.0.1:$QEMU_PORT/bench" ;;
    nbdkit) echo "nbd://127.0.0.1:$NBDKIT_PORT/bench" ;;
    blocktree) echo "nbd://127.0.0.1:$BT_PORT/bench" ;;
    esac
}

echo "== laying out the Blocktree volume through NBD" >&2
fio --name=layout --ioengine=nbd --uri="$(uri blocktree)" --size="$SIZE" --rw=write --bs=1M \
    --iodepth=16 >/dev/null 2>>"$WORK/fio.log"
startup_hwm=$(awk '/^VmHWM:/ { print $2 * 1024 }' "/proc/$BT_PID/status")
# From here on VmHWM is the workload's peak.
echo 5 >"/proc/$BT_PID/clear_refs" 2>/dev/null || true

# run SIDE KEY REP ARGS...: one fio job on SIDE's export; records its JSON report.
run() {
    local side=$1 key=$2 rep=$3
    shift 3
    local json="$WORK/$side-$key-$rep.json"
    echo "== rep $rep: $side $key ($*)" >&2
    fio --name="$key" --ioengine=nbd --uri="$(uri "$side")" --size="$SIZE" --time_based \
        --runtime="$SECONDS_PER_CASE" --ramp_time="$RAMP" --group_reporting --lat_percentiles=1 \
        --output-format=json --output="$json" "$@" >/dev/null 2>>"$WORK/fio.log" ||
        echo "fio $side $key failed; see $WORK/fio.log" >&2
    printf '%s\t%s\t%s\t%s\n' "$side" "$key" "$rep" "$json" >>"$RESULTS"
}

for rep in $(seq 1 "$REPS"); do
    for side in qemu-nbd nbdkit blocktree; do
        run "$side" seqwrite "$rep" --rw=write --bs=1M --iodepth=16
    done
    for side in qemu-nbd nbdkit blocktree; do
        run "$side" seqread "$rep" --rw=read --bs=1M --iodepth=16
    done
    for side in qemu-nbd nbdkit blocktree; do
        run "$side" randwrite "$rep" --rw=randwrite --bs=4k --numjobs=4 --iodepth=8
    done
    for side in qemu-nbd nbdkit blocktree; do
        run "$side" randread "$rep" --rw=randread --bs=4k --numjobs=4 --iodepth=8
    done
done
hwm=$(awk '/^VmHWM:/ { print $2 * 1024 }' "/proc/$BT_PID/status")
printf 'blocktree\trss\t1\t%s\n' "$hwm" >>"$RESULTS"
printf 'blocktree\tstartup-rss\t1\t%s\n' "$startup_hwm" >>"$RESULTS"

kill -TERM "$BT_PID"
wait "$BT_PID" || echo "blocktree up exited with $? after SIGTERM" >&2
finished=$(date +%s)
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

cpu_field() { grep -m1 "^$1" /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'; }
cpu="$(cpu_field 'model name')"
fs_line=$(tail -n1 "$WORK/df.txt" | awk '{ print $2 " on " $1 ", mounted on " $7 }')

python3 - "$RESULTS" "$REPS" >"$OUT/nbd.md" <<'PY'
import json, math, sys

results, reps = sys.argv[1], int(sys.argv[2])
reports, values = {}, {}
for line in open(results):
    side, key, rep, value = line.rstrip("\n").split("\t")
    if key in ("rss", "startup-rss"):
        try:
            values[key] = float(value)
        except ValueError:
            values[key] = math.nan
        continue
    try:
        with open(value) as f:
            reports.setdefault((side, key), {})[int(rep)] = json.load(f)
    except (OSError, ValueError):
        pass

def half(report):
    job = report["jobs"][0]
    return job["read"] if job["read"]["io_bytes"] > 0 else job["write"]

def metric(report, kind):
    part = half(report)
    return part["bw_bytes"] if kind == "bw" else part["iops"]

def series(side, key, kind):
    out = {}
    for rep, report in reports.get((side, key), {}).items():
        try:
            out[rep] = metric(report, kind)
        except (KeyError, IndexError, TypeError):
            out[rep] = math.nan
    return out

def best(series):
    good = [v for v in series.values() if not math.isnan(v)]
    return max(good) if good else math.nan

def show(value, kind):
    if math.isnan(value):
        return "n/a"
    return f"{value / 1e6:,.0f} MB/s" if kind == "bw" else f"{value:,.0f} IOPS"

def ratio_range(mine, anchor):
    ratios = [mine[r] / anchor[r] for r in mine if r in anchor and anchor[r] and not math.isnan(mine[r])]
    return f"{min(ratios):.2f}–{max(ratios):.2f}" if len(ratios) >= 2 else ""

def latency(side, key):
    runs = reports.get((side, key), {})
    if not runs:
        return "n/a"
    kind = "bw" if key.startswith("seq") else "iops"
    report = runs[max(runs, key=lambda r: metric(runs[r], kind))]
    pct = half(report)["clat_ns"].get("percentile", {})
    def us(q):
        v = pct.get(q)
        return "n/a" if v is None else f"{v / 1e3:,.0f}"
    return f"{us('50.000000')} / {us('99.000000')}"

cases = [
    ("1 MiB sequential write, QD 16", "seqwrite", "bw"),
    ("1 MiB sequential read, QD 16", "seqread", "bw"),
    ("4 KiB random write, 4 connections × QD 8", "randwrite", "iops"),
    ("4 KiB random read, 4 connections × QD 8", "randread", "iops"),
]
out = [f"Best of {reps} repetitions per side; ratio = Blocktree / qemu-nbd; 'per-rep' is the range "
       "of the ratios within each repetition, where the sides ran back to back.\n",
       "| case | Blocktree | qemu-nbd | ratio | per-rep | target | result | nbdkit file (report only) |",
       "|---|---|---|---|---|---|---|---|"]
for name, key, kind in cases:
    mine, anchor, kit = (series(s, key, kind) for s in ("blocktree", "qemu-nbd", "nbdkit"))
    b, a = best(mine), best(anchor)
    ratio = b / a if a and not math.isnan(a) else math.nan
    verdict = "**PASS**" if ratio >= 1.0 else "**FAIL**"
    out.append(f"| {name} | {show(b, kind)} | {show(a, kind)} | "
               f"{'n/a' if math.isnan(ratio) else f'{ratio:.2f}×'} | {ratio_range(mine, anchor)} | ≥ 1.0× | "
               f"{verdict} | {show(best(kit), kind)} |")
rss = values.get("rss", math.nan)
verdict = "**PASS**" if rss <= 256 * 2**20 else "**FAIL**"
out.append(f"| Blocktree peak RSS over these jobs (VmHWM) | {rss / 2**20:,.0f} MiB | | | | ≤ 256 MiB | {verdict} | |")
startup = values.get("startup-rss", math.nan)
out.append(f"| Blocktree peak RSS of start-up and the layout pass | {startup / 2**20:,.0f} MiB | | | | — | report only | |")
out.append("")
out.append("Completion latency, µs, p50 / p99, of the best repetition of each side:\n")
out.append("| case | Blocktree | qemu-nbd | nbdkit file |")
out.append("|---|---|---|---|")
for name, key, _ in cases:
    out.append(f"| {name} | {latency('blocktree', key)} | {latency('qemu-nbd', key)} | {latency('nbdkit', key)} |")
print("\n".join(out))
PY

{
    echo "Command: \`benches/nbd.sh\` (BENCH_SECONDS=$SECONDS_PER_CASE REPS=$REPS RAMP=$RAMP BENCH_SIZE=$SIZE)"
    echo "Date: $(date -u '+%Y-%m-%d %H:%M UTC'); CPU: $cpu, $(nproc) cores; $(grep MemTotal /proc/meminfo | awk '{ printf "%.0f GiB", $2 / 1048576 }') RAM"
    echo "File system: $fs_line (BENCH_DIR=$BENCH_DIR); kernel $(uname -r)"
    echo "Anchors: $(qemu-nbd --version | head -n1), $(nbdkit --version), $(fio --version) (--ioengine=nbd)"
    echo "Load average before/after: $load_before / $load_after; build $((built - started)) s, benchmarks $((finished - built)) s"
    echo
    cat "$OUT/nbd.md"
} >"$OUT/nbd.md.tmp"
mv "$OUT/nbd.md.tmp" "$OUT/nbd.md"
rm -rf "$BENCH_DIR"
cat "$OUT/nbd.md"
if grep -q 'FAIL' "$OUT/nbd.md"; then
    echo >&2
    echo "FAIL: an NBD target was missed (see the table above)." >&2
fi
exit 0
