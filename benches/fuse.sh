#!/usr/bin/env bash
# benches/fuse.sh: btfuse (`blocktree mount`, issue #4) against gocryptfs, the same
# fio jobs on both, on the same file system, in one run.
#
# Both are encrypted FUSE file systems over the disk under BENCH_DIR: gocryptfs
# (AES-256-GCM, its defaults) over a cipher directory, btfuse with a fresh local
# store (AES-256-GCM sealing and Merkle verification on, 4 KiB sectors, the
# default of `blocktree mount`). Targets (ratio = btfuse / gocryptfs):
#   1 MiB sequential write, BENCH_SIZE file, end_fsync=1      bandwidth ≥ 1.5×
#   1 MiB sequential read of it (caches dropped, remounted)   bandwidth ≥ 1.0×
#   4 KiB random write, RAND_SIZE file, BENCH_SECONDS s        IOPS      ≥ 1.0×
#   4 KiB random read of it (caches dropped, remounted)        IOPS      ≥ 1.0×
#   create + stat + unlink of META_FILES files                files/s   ≥ 1.0×
#   btfuse daemon peak RSS (VmHWM) over the fio runs           ≤ 256 MiB
#     (reset with clear_refs once mounted; the peak of opening the store before
#     the workload is reported apart)
#
# fio runs with --ioengine=psync (one job, one request at a time: what a program
# doing plain read(2)/write(2) sees), buffered, as FUSE file systems are used. The
# random jobs are time based; the random read job reads the file the random write
# job left. Caches are dropped (echo 3 > /proc/sys/vm/drop_caches, root only)
# and both file systems remounted between writing and reading, so reads come
# from the disk through each file system, not from the page cache of its mount.
# The metadata case times a python3 loop: create (O_CREAT|O_EXCL, close) every
# file, then stat every file, then unlink every file, in one directory.
#
# Each side runs REPS times, gocryptfs immediately before btfuse in every
# repetition; the table reports the ratio of the best of each side and the range
# of the per-repetition ratios, because other jobs share the machine.
#
# Output: a markdown table on stdout and in target/bench-results/fuse.md. Exits 0
# whether targets pass or fail (a benchmark reports; it is not a test); a missed
# target is printed as FAIL. Needs root (mounts, drop_caches), cargo, python3,
# fio, gocryptfs and fuse3 (installed with apt-get when missing).
#
# Knobs (environment): BENCH_DIR (default target/bench-results/fuse-data, which
# must be on the file system to measure), BENCH_SIZE (sequential file, default
# 1G), RAND_SIZE (random file, default 256M), BENCH_SECONDS (random jobs, default
# 20), META_FILES (default 10000), REPS (default 1), BT_OPTS (extra arguments
# of `blocktree mount`, e.g. "--sector-size 64K").

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

SIZE=${BENCH_SIZE:-1G}
RAND_SIZE=${RAND_SIZE:-256M}
SECONDS_PER_CASE=${BENCH_SECONDS:-20}
META_FILES=${META_FILES:-10000}
REPS=${REPS:-1}
BT_OPTS=${BT_OPTS:-}
BENCH_DIR=${BENCH_DIR:-$ROOT/target/bench-results/fuse-data}

OUT="$ROOT/target/bench-results"
WORK="$OUT/fuse"
RESULTS="$WORK/results.tsv"
PASSWORD="$WORK/password"
rm -rf "$WORK"
mkdir -p "$WORK" "$BENCH_DIR"
: >"$RESULTS"
printf 'benchmark password, not a secret\n' >"$PASSWORD"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing=()
command -v fio >/dev/null 2>&1 || missing+=(fio)
command -v gocryptfs >/dev/null 2>&1 || missing+=(gocryptfs)
command -v fusermount3 >/dev/null 2>&1 || missing+=(fuse3)
if [ ${#missing[@]} -gt 0 ]; then
    echo "== installing ${missing[*]}" >&2
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
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

echo "== file system under test:" >&2
df -T "$BENCH_DIR" | tee "$WORK/df.txt" >&2

GC_CIPHER="$BENCH_DIR/gocryptfs-cipher"
GC_MNT="$BENCH_DIR/gocryptfs-mnt"
BT_DATA="$BENCH_DIR/btfuse-data"
BT_MNT="$BENCH_DIR/btfuse-mnt"
BT_PID=""

is_mounted() { grep -q " $1 " /proc/self/mountinfo; }

drop_caches() {
    sync
    if [ "$(id -u)" -eq 0 ]; then echo 3 >/proc/sys/vm/drop_caches; fi
}

gc_fresh() {
    rm -rf "$GC_CIPHER" "$GC_MNT"
    mkdir -p "$GC_CIPHER" "$GC_MNT"
    gocryptfs -init -quiet -passfile "$PASSWORD" "$GC_CIPHER" >/dev/null
}
gc_mount() { gocryptfs -quiet -nosyslog -passfile "$PASSWORD" "$GC_CIPHER" "$GC_MNT"; }
gc_unmount() {
    fusermount3 -u "$GC_MNT" 2>/dev/null || true
    while is_mounted "$GC_MNT"; do sleep 0.1; done
}

bt_fresh() {
    rm -rf "$BT_DATA" "$BT_MNT"
    mkdir -p "$BT_MNT"
}
bt_mount() {
    # shellcheck disable=SC2086 # BT_OPTS is a list of arguments
    "$BIN" mount "$BT_MNT" --data "$BT_DATA" --root-password-file "$PASSWORD" $BT_OPTS \
        >>"$WORK/btfuse.log" 2>&1 &
    BT_PID=$!
    local waited=0
    until is_mounted "$BT_MNT"; do
        if ! kill -0 "$BT_PID" 2>/dev/null || [ "$waited" -gt 600 ]; then
            echo "blocktree mount did not come up; see $WORK/btfuse.log" >&2
            exit 1
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    # The peak so far is opening the store (the engine's recovery): recorded
    # apart, then reset (clear_refs 5), so VmHWM at unmount is the workload's.
    local hwm
    hwm=$(awk '/^VmHWM:/ { print $2 * 1024 }' "/proc/$BT_PID/status" 2>/dev/null || echo nan)
    printf 'btfuse\tstartup-rss\t%s\t%s\n' "$1" "$hwm" >>"$RESULTS"
    echo 5 >"/proc/$BT_PID/clear_refs" 2>/dev/null || true
}
# bt_unmount REP: records the daemon's peak RSS since it mounted (not for the
# metadata case, REP "meta"), then SIGTERM (unmount, sync, exit).
bt_unmount() {
    local hwm
    hwm=$(awk '/^VmHWM:/ { print $2 * 1024 }' "/proc/$BT_PID/status" 2>/dev/null || echo nan)
    if [ "$1" != meta ]; then printf 'btfuse\trss\t%s\t%s\n' "$1" "$hwm" >>"$RESULTS"; fi
    kill -TERM "$BT_PID"
    wait "$BT_PID" || echo "blocktree mount exited with an error; see $WORK/btfuse.log" >&2
    BT_PID=""
}
cleanup() {
    if [ -n "$BT_PID" ]; then kill -TERM "$BT_PID" 2>/dev/null || true; wait "$BT_PID" 2>/dev/null || true; fi
    gc_unmount
    for mnt in "$BT_MNT" "$GC_MNT"; do
        if is_mounted "$mnt"; then fusermount3 -u -z "$mnt" 2>/dev/null || true; fi
    done
}
trap cleanup EXIT

# fio_run SIDE KEY REP DIR ARGS...: one fio job in DIR; records its JSON report.
fio_run() {
    local side=$1 key=$2 rep=$3 dir=$4
    shift 4
    local json="$WORK/$side-$key-$rep.json"
    echo "== rep $rep: $side $key ($*)" >&2
    fio --name="$key" --directory="$dir" --ioengine=psync --group_reporting \
        --output-format=json --output="$json" "$@" >/dev/null 2>>"$WORK/fio.log" ||
        echo "fio $side $key failed; see $WORK/fio.log" >&2
    printf '%s\t%s\t%s\t%s\n' "$side" "$key" "$rep" "$json" >>"$RESULTS"
}

# meta_run SIDE REP DIR: create, stat and unlink META_FILES files; records seconds.
meta_run() {
    local side=$1 rep=$2 dir=$3
    echo "== rep $rep: $side create+stat+unlink of $META_FILES files" >&2
    local took
    took=$(python3 - "$dir/meta" "$META_FILES" <<'PY'
import os, sys, time
directory, count = sys.argv[1], int(sys.argv[2])
os.makedirs(directory, exist_ok=True)
names = [os.path.join(directory, f"file{i:06d}") for i in range(count)]
started = time.monotonic()
for name in names:
    os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
for name in names:
    os.stat(name)
for name in names:
    os.unlink(name)
print(f"{time.monotonic() - started:.6f}")
PY
    ) || took=nan
    printf '%s\tmeta\t%s\t%s\n' "$side" "$rep" "$took" >>"$RESULTS"
}

SEQ=(--rw=write --bs=1M --size="$SIZE" --filename=seq.bin --end_fsync=1)
SEQ_READ=(--rw=read --bs=1M --size="$SIZE" --filename=seq.bin)
RAND_W=(--rw=randwrite --bs=4k --size="$RAND_SIZE" --filename=rand.bin --time_based
    --runtime="$SECONDS_PER_CASE" --end_fsync=1)
RAND_R=(--rw=randread --bs=4k --size="$RAND_SIZE" --filename=rand.bin --time_based
    --runtime="$SECONDS_PER_CASE")

for rep in $(seq 1 "$REPS"); do
    # Writes on fresh file systems, then reads after caches are dropped.
    gc_fresh
    gc_mount
    fio_run gocryptfs seqwrite "$rep" "$GC_MNT" "${SEQ[@]}"
    fio_run gocryptfs randwrite "$rep" "$GC_MNT" "${RAND_W[@]}"
    gc_unmount
    drop_caches
    gc_mount
    fio_run gocryptfs seqread "$rep" "$GC_MNT" "${SEQ_READ[@]}"
    fio_run gocryptfs randread "$rep" "$GC_MNT" "${RAND_R[@]}"
    meta_run gocryptfs "$rep" "$GC_MNT"
    gc_unmount
    rm -rf "$GC_CIPHER"

    bt_fresh
    bt_mount "$rep-write"
    fio_run btfuse seqwrite "$rep" "$BT_MNT" "${SEQ[@]}"
    fio_run btfuse randwrite "$rep" "$BT_MNT" "${RAND_W[@]}"
    bt_unmount "$rep-write"
    drop_caches
    bt_mount "$rep-read"
    fio_run btfuse seqread "$rep" "$BT_MNT" "${SEQ_READ[@]}"
    fio_run btfuse randread "$rep" "$BT_MNT" "${RAND_R[@]}"
    bt_unmount "$rep-read"
    bt_mount "$rep-meta"
    meta_run btfuse "$rep" "$BT_MNT"
    bt_unmount meta
    rm -rf "$BT_DATA"
done

finished=$(date +%s)
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

cpu_field() { grep -m1 "^$1" /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'; }
cpu="$(cpu_field 'model name') (family $(cpu_field 'cpu family'), model $(cpu_field 'model\s'))"
fs_line=$(tail -n1 "$WORK/df.txt" | awk '{ print $2 " on " $1 ", mounted on " $7 }')
gc_version=$(gocryptfs -version 2>/dev/null | head -n1)

python3 - "$RESULTS" "$REPS" "$META_FILES" >"$OUT/fuse.md" <<'PY'
import json, math, sys

results, reps, meta_files = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
values = {}  # (side, key) -> {rep: value}
rss, startup = [], []
for line in open(results):
    side, key, rep, value = line.rstrip("\n").split("\t")
    if key in ("rss", "startup-rss"):
        (rss if key == "rss" else startup).append(float(value) if value != "nan" else math.nan)
        continue
    if key == "meta":
        seconds = float(value) if value != "nan" else math.nan
        values.setdefault((side, key), {})[rep] = meta_files / seconds if seconds else math.nan
        continue
    try:
        with open(value) as f:
            job = json.load(f)["jobs"][0]
        half = job["read"] if job["read"]["io_bytes"] > 0 else job["write"]
        metric = half["bw_bytes"] if key.startswith("seq") else half["iops"]
    except (OSError, ValueError, KeyError, IndexError):
        metric = math.nan
    values.setdefault((side, key), {})[rep] = metric

def best(series):
    good = [v for v in series.values() if not math.isnan(v)]
    return max(good) if good else math.nan

def show(value, unit):
    if math.isnan(value):
        return "n/a"
    if unit == "bw":
        return f"{value / 1e6:,.0f} MB/s"
    if unit == "iops":
        return f"{value:,.0f} IOPS"
    return f"{value:,.0f} files/s"

rows, verdicts = [], []
def row(name, key, unit, target):
    mine, anchor = values.get(("btfuse", key), {}), values.get(("gocryptfs", key), {})
    b_mine, b_anchor = best(mine), best(anchor)
    ratio = b_mine / b_anchor if b_anchor and not math.isnan(b_anchor) else math.nan
    ratios = [mine[r] / anchor[r] for r in mine if r in anchor and anchor[r]]
    spread = f"{min(ratios):.2f}–{max(ratios):.2f}" if len(ratios) > 1 else ""
    verdict = "**PASS**" if ratio >= target else "**FAIL**"
    verdicts.append(verdict)
    rows.append((name, show(b_anchor, unit), show(b_mine, unit),
                 "n/a" if math.isnan(ratio) else f"{ratio:.2f}×", spread, f"≥ {target:g}×", verdict))

row("1 MiB sequential write (end_fsync)", "seqwrite", "bw", 1.5)
row("1 MiB sequential read (cold)", "seqread", "bw", 1.0)
row("4 KiB random write", "randwrite", "iops", 1.0)
row("4 KiB random read (cold)", "randread", "iops", 1.0)
row(f"create + stat + unlink of {meta_files:,} files", "meta", "files", 1.0)

print(f"Best of {reps} repetition(s) per side; ratio = btfuse / gocryptfs; 'per-rep ratios' is the "
      "range of the ratios within each repetition, where both sides ran back to back.\n")
print("| test | gocryptfs | btfuse | ratio | per-rep ratios | target | result |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    print("| " + " | ".join(r) + " |")
peak = max((v for v in rss if not math.isnan(v)), default=math.nan)
verdict = "**PASS**" if peak <= 256 * 2**20 else "**FAIL**"
verdicts.append(verdict)
shown = "n/a" if math.isnan(peak) else f"{peak / 2**20:,.0f} MiB"
print(f"| btfuse daemon peak RSS (VmHWM) during the fio runs | — | {shown} | — | | ≤ 256 MiB | {verdict} |")
opening = max((v for v in startup if not math.isnan(v)), default=math.nan)
shown = "n/a" if math.isnan(opening) else f"{opening / 2**20:,.0f} MiB"
print(f"| btfuse daemon peak RSS while mounting (opening the store, before fio) | — | {shown} | — | | — | report only |")
print()
print(f"{verdicts.count('**PASS**')} of {len(verdicts)} targets met.")
PY

{
    cat "$OUT/fuse.md"
    echo
    echo "Machine: $(nproc) cores, $cpu; $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo) RAM; kernel $(uname -r)."
    echo "Disk: $fs_line. Anchor: $gc_version."
    echo "Load average before: $load_before; after: $load_after. Took $((finished - started)) s."
    echo "Settings: BENCH_SIZE=$SIZE RAND_SIZE=$RAND_SIZE BENCH_SECONDS=$SECONDS_PER_CASE META_FILES=$META_FILES REPS=$REPS BT_OPTS='$BT_OPTS'."
} | tee "$OUT/fuse.md.tmp"
mv "$OUT/fuse.md.tmp" "$OUT/fuse.md"
