#!/usr/bin/env bash
# benches/crypto.sh: Blocktree's crypto speed (issue #2) against `openssl speed`,
# side by side in one run.
#
# What it measures, against what:
#   seal/open 16 KiB (SectorSealer::seal, SectorOpener::open)
#                     vs openssl speed -evp aes-256-gcm [-decrypt] -bytes 16384
#   SHA-256 leaf 16 KiB (MerkleTree::leaf_hash) vs openssl speed -evp sha256 -bytes 16384
#   SHA-512 leaf 16 KiB                         vs openssl speed -evp sha512 -bytes 16384
#   SHA-256 leaves, 8 x 16 KiB hashed together (HashAlgorithm::hash_many, SHA-NI
#                     rounds of four records interleaved) vs openssl speed -evp sha256
#   Merkle: 1,024 random leaves of a 2^20-leaf tree, batched vs single updates.
#
# Both sides run on this machine, in this run: each anchor immediately before its
# Blocktree counterpart, REPS times over, and the table reports the ratio of the
# best of each side (plus the range of the per-repetition ratios), because other
# jobs share the machine and absolute numbers drift. openssl runs with -elapsed
# so that both sides divide by wall-clock time, as criterion does.
#
# Hardware acceleration is shown, not assumed: the same anchors and benchmarks
# run again with OPENSSL_ia32cap masking AES-NI/VAES/PCLMULQDQ/VPCLMULQDQ or
# SHA-NI. OpenSSL and AWS-LC (aws-lc-rs, Blocktree's backend) both read that
# variable, with the same bit layout (man 3 OPENSSL_ia32cap):
#   first value  (CPUID.1:EDX|ECX<<32):   bit 33 PCLMULQDQ, bit 57 AES-NI
#   second value (CPUID.7:EBX|ECX<<32):   bit 29 SHA, bit 41 VAES, bit 42 VPCLMULQDQ
#
# The criterion benchmarks are those of `cargo bench -p blocktree-benches --bench
# crypto -- --noplot`: the script builds that binary once and runs it directly with
# a filter per step (criterion's `--bench` mode), each repetition writing to its own
# CRITERION_HOME under target/bench-results/crypto/, and reads the median point
# estimate from <group>/<bench>/new/estimates.json.
#
# Output: a markdown table on stdout and in target/bench-results/crypto.md. Exits 0
# whether targets pass or fail (a benchmark reports; it is not a test); a missed
# target is printed as FAIL. Needs openssl, cargo and python3.
#
# Knobs (environment): REPS (default 3), OPENSSL_SECONDS (default 3),
# MEASUREMENT_TIME (criterion seconds per benchmark, default 2).

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

REPS=${REPS:-3}
OPENSSL_SECONDS=${OPENSSL_SECONDS:-3}
MEASUREMENT_TIME=${MEASUREMENT_TIME:-2}
BYTES=16384

OUT="$ROOT/target/bench-results"
WORK="$OUT/crypto"
RESULTS="$WORK/results.tsv"
rm -rf "$WORK"
mkdir -p "$WORK"
: >"$RESULTS"

# OPENSSL_ia32cap masks (see the header). "~0x0" leaves the first vector alone.
NO_VAES='~0x0:~0x60000000000'                    # VAES, VPCLMULQDQ off: AES-NI + PCLMULQDQ left
NO_AESNI='~0x200000200000000:~0x60000000000'     # also AES-NI, PCLMULQDQ off: software AES-GCM
NO_SHANI='~0x0:~0x20000000'                      # SHA extensions off

started=$(date +%s)
load_before=$(cut -d' ' -f1-3 /proc/loadavg)

echo "== building the criterion benchmark (cargo bench --no-run)" >&2
BIN=$(cargo bench -p blocktree-benches --bench crypto --no-run --message-format=json 2>/dev/null |
    grep -o '"executable":"[^"]*/crypto-[^"]*"' | tail -n1 | cut -d'"' -f4)
if [[ -z "$BIN" || ! -x "$BIN" ]]; then
    echo "could not build the crypto benchmark; run: cargo bench -p blocktree-benches --bench crypto --no-run" >&2
    exit 1
fi
built=$(date +%s)

# Runs a command with OPENSSL_ia32cap set to $1, or unset when $1 is empty.
with_mask() {
    local mask=$1
    shift
    if [[ -n "$mask" ]]; then
        env OPENSSL_ia32cap="$mask" "$@"
    else
        env -u OPENSSL_ia32cap "$@"
    fi
}

# ossl KEY REP MASK ARGS...: openssl speed on 16 KiB buffers (unless ARGS has its
# own -bytes); records bytes/s.
ossl() {
    local key=$1 rep=$2 mask=$3
    shift 3
    echo "== rep $rep: openssl speed $* (${mask:-no mask})" >&2
    local value
    value=$(with_mask "$mask" openssl speed -mr -elapsed -bytes "$BYTES" -seconds "$OPENSSL_SECONDS" "$@" 2>/dev/null |
        awk -F: '/^\+F:/ { print $NF; exit }' || true)
    printf 'openssl\t%s\t%s\t%s\n' "$key" "$rep" "${value:-nan}" >>"$RESULTS"
}

# ours TAG REP MASK FILTER: the criterion benchmarks matching FILTER, with their
# results under $WORK/TAG-REP.
ours() {
    local tag=$1 rep=$2 mask=$3 filter=$4
    local home="$WORK/$tag-$rep"
    echo "== rep $rep: criterion '$filter' (${mask:-no mask})" >&2
    with_mask "$mask" env CRITERION_HOME="$home" BLOCKTREE_BENCH_OUT="$WORK" \
        "$BIN" --bench --noplot --warm-up-time 0.5 --measurement-time "$MEASUREMENT_TIME" \
        "$filter" >>"$WORK/criterion.log" 2>&1 ||
        echo "criterion run '$filter' failed; see $WORK/criterion.log" >&2
    printf 'criterion\t%s\t%s\t%s\n' "$tag" "$rep" "$home" >>"$RESULTS"
}

for rep in $(seq 1 "$REPS"); do
    ossl aes-gcm "$rep" "" -evp aes-256-gcm
    ours hw "$rep" "" '^(seal|open)/16KiB$'
    ossl aes-gcm-decrypt "$rep" "" -decrypt -evp aes-256-gcm
    ossl aes-gcm-aead "$rep" "" -aead -evp aes-256-gcm
    ossl sha256 "$rep" "" -evp sha256
    ours hw "$rep" "" '^sha256_leaf/16KiB$'
    ours hw "$rep" "" '^sha256_many/'
    ossl sha512 "$rep" "" -evp sha512
    ours hw "$rep" "" '^sha512_leaf/16KiB$'
done

# Once each: hardware paths masked, the per-seal cost split, the Merkle updates.
ossl aes-gcm-novaes 1 "$NO_VAES" -evp aes-256-gcm
ours novaes 1 "$NO_VAES" '^seal/16KiB$'
ossl aes-gcm-noaesni 1 "$NO_AESNI" -evp aes-256-gcm
ours noaesni 1 "$NO_AESNI" '^seal/16KiB$'
ossl sha256-noshani 1 "$NO_SHANI" -evp sha256
ours noshani 1 "$NO_SHANI" '^sha256_leaf/16KiB$'
ours parts 1 "" '^seal_parts/'
ossl sha256-node 1 "" -evp sha256 -bytes 65
ours parts 1 "" '^hash_parts/'
ours merkle 1 "" '^merkle/'

finished=$(date +%s)
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

flags=$(grep -o -w 'aes\|vaes\|pclmulqdq\|vpclmulqdq\|sha_ni\|avx512f' /proc/cpuinfo | sort -u | tr '\n' ' ')
cpu_field() { grep -m1 "^$1" /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'; }
cpu="$(cpu_field 'model name') (family $(cpu_field 'cpu family'), model $(cpu_field 'model\s'))"
awslc=$(awk '/^name = "aws-lc-sys"/ { getline; print $3 }' Cargo.lock | tr -d '"' | head -n1)

python3 - "$RESULTS" "$WORK" "$REPS" "$BYTES" >"$OUT/crypto.md" <<'PY'
import json, math, os, sys

results, work, reps, BYTES = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

openssl = {}   # key -> {rep: bytes/s}
homes = {}     # tag -> {rep: criterion home}
for line in open(results):
    kind, key, rep, value = line.rstrip("\n").split("\t")
    if kind == "openssl":
        openssl.setdefault(key, {})[int(rep)] = float(value)
    else:
        homes.setdefault(key, {})[int(rep)] = value

def median_ns(home, group, bench):
    path = os.path.join(home, group, bench, "new", "estimates.json")
    try:
        with open(path) as f:
            return json.load(f)["median"]["point_estimate"]
    except (OSError, KeyError, ValueError):
        return math.nan

def ours(tag, group, bench="16KiB"):
    """rep -> bytes/s of a 16 KiB criterion benchmark."""
    return {rep: BYTES / median_ns(home, group, bench) * 1e9 for rep, home in homes.get(tag, {}).items()}

def best(series):
    values = [v for v in series.values() if not math.isnan(v)]
    return max(values) if values else math.nan

def gbs(x):
    return "n/a" if math.isnan(x) else f"{x / 1e9:.2f} GB/s"

def paired(a, b):
    ratios = [a[r] / b[r] for r in a if r in b and not math.isnan(a[r] / b[r])]
    if len(ratios) < 2:
        return ""
    return f"{min(ratios):.2f}–{max(ratios):.2f}"

rows = []
def row(name, mine, anchor_name, anchor, target=None):
    b_mine, b_anchor = best(mine), best(anchor)
    ratio = b_mine / b_anchor if b_anchor else math.nan
    if target is None:
        verdict, target_text = "report only", "—"
    else:
        target_text = f"≥ {target:.2f}×"
        verdict = "**PASS**" if ratio >= target else "**FAIL**"
    rows.append((name, gbs(b_mine), f"{anchor_name}: {gbs(b_anchor)}",
                 "n/a" if math.isnan(ratio) else f"{ratio:.2f}×", paired(mine, anchor), target_text, verdict))
    return verdict

seal, opened = ours("hw", "seal"), ours("hw", "open")
sha256, sha512 = ours("hw", "sha256_leaf"), ours("hw", "sha512_leaf")
row("seal 16 KiB (AES-256-GCM, random nonce)", seal, "openssl aes-256-gcm", openssl.get("aes-gcm", {}), 0.8)
row("seal 16 KiB, vs a per-message anchor", seal, "openssl aes-256-gcm -aead (init+AAD+tag per op)", openssl.get("aes-gcm-aead", {}))
row("open 16 KiB", opened, "openssl aes-256-gcm -decrypt", openssl.get("aes-gcm-decrypt", {}))
row("SHA-256 leaf 16 KiB", sha256, "openssl sha256", openssl.get("sha256", {}), 0.8)
row("SHA-512 leaf 16 KiB", sha512, "openssl sha512", openssl.get("sha512", {}))
# Eight 16 KiB leaves hashed together (SHA-NI rounds of four interleaved) against
# one after another through aws-lc's single stream, which openssl's figure is.
many = {rep: 8 * BYTES / median_ns(home, "sha256_many", "interleaved_8x16KiB") * 1e9
        for rep, home in homes.get("hw", {}).items()}
row("SHA-256 leaves, 8 × 16 KiB hashed together", many, "openssl sha256", openssl.get("sha256", {}))

masked = []
def mrow(name, mine, theirs):
    masked.append((name, gbs(best(mine)), gbs(best(theirs))))
mrow("AES-256-GCM 16 KiB, all paths (VAES/AVX-512 where the library has it)", seal, openssl.get("aes-gcm", {}))
mrow("… without VAES/VPCLMULQDQ (AES-NI + PCLMULQDQ)", ours("novaes", "seal"), openssl.get("aes-gcm-novaes", {}))
mrow("… without AES-NI/PCLMULQDQ/VAES/VPCLMULQDQ (software)", ours("noaesni", "seal"), openssl.get("aes-gcm-noaesni", {}))
mrow("SHA-256 16 KiB, all paths (SHA-NI)", sha256, openssl.get("sha256", {}))
mrow("… without SHA-NI", ours("noshani", "sha256_leaf"), openssl.get("sha256-noshani", {}))

parts_home = homes.get("parts", {}).get(1, "")
aead_ns = median_ns(parts_home, "seal_parts", "aws_lc_aead_16KiB")
nonce_ns = median_ns(parts_home, "seal_parts", "random_nonce_12B")
seal_ns = BYTES / best(seal) * 1e9 if not math.isnan(best(seal)) else math.nan

node_ns = median_ns(parts_home, "hash_parts", "sha256_node_65B")
node_anchor = best(openssl.get("sha256-node", {}))
node_anchor_ns = 65 / node_anchor * 1e9 if node_anchor else math.nan

merkle_home = homes.get("merkle", {}).get(1, "")
batched_ns = median_ns(merkle_home, "merkle", "batched_1024_of_2_20")
single_ns = median_ns(merkle_home, "merkle", "single_1024_of_2_20")
try:
    with open(os.path.join(work, "merkle_hashes.json")) as f:
        hashes = json.load(f)
except (OSError, ValueError):
    hashes = {}

out = []
out.append(f"Best of {reps} repetitions per side; ratio = Blocktree / anchor; "
           "'per-rep ratios' is the range of the ratios within each repetition, where both sides "
           "ran back to back.\n")
out.append("| operation | Blocktree | anchor | ratio | per-rep ratios | target | result |")
out.append("|---|---|---|---|---|---|---|")
for r in rows:
    out.append("| " + " | ".join(r) + " |")
out.append("")
out.append("Hardware paths masked with `OPENSSL_ia32cap` (one run each; Blocktree = `seal/16KiB` or `sha256_leaf/16KiB`):\n")
out.append("| paths enabled | Blocktree (aws-lc-rs) | openssl |")
out.append("|---|---|---|")
for r in masked:
    out.append("| " + " | ".join(r) + " |")
out.append("")
def us(ns):
    return "n/a" if math.isnan(ns) else f"{ns / 1e3:.2f} µs"
out.append(f"Where a seal's time goes: `seal/16KiB` takes {us(seal_ns)} (best of {reps}); measured once each, "
           f"the bare aws-lc-rs AES-256-GCM call it wraps (`seal_parts/aws_lc_aead_16KiB`, counter nonce) takes "
           f"{us(aead_ns)} and drawing its random 12-byte nonce (`seal_parts/random_nonce_12B`) {us(nonce_ns)}.\n")
node_ratio = node_anchor_ns / node_ns if node_ns else math.nan
out.append("One Merkle interior-node hash, SHA-256 over 65 bytes (`hash_parts/sha256_node_65B`, one run): "
           f"{'n/a' if math.isnan(node_ns) else f'{node_ns:.0f} ns'}; openssl sha256 -bytes 65: "
           f"{'n/a' if math.isnan(node_anchor_ns) else f'{node_anchor_ns:.0f} ns'} "
           f"(ratio {'n/a' if math.isnan(node_ratio) else f'{node_ratio:.2f}×'}, report only).\n")
def per_leaf(key):
    v = hashes.get(key)
    return "n/a" if v is None else f"{v:.2f}"
def ms(ns):
    return "n/a" if math.isnan(ns) else f"{ns / 1e6:.2f} ms"
speedup = single_ns / batched_ns if batched_ns and not math.isnan(batched_ns) else math.nan
out.append("Merkle, SHA-256 tree of 2^20 leaves, 1,024 distinct random leaves updated with precomputed leaf digests (one run, no target):\n")
out.append("| update | time per 1,024 leaves | hashes per leaf |")
out.append("|---|---|---|")
out.append(f"| batched (one `update_leaf_hashes` call) | {ms(batched_ns)} | {per_leaf('batched_hashes_per_leaf')} |")
out.append(f"| single (1,024 one-leaf calls) | {ms(single_ns)} | {per_leaf('single_hashes_per_leaf')} |")
out.append(f"| single / batched | {'n/a' if math.isnan(speedup) else f'{speedup:.2f}×'} | |")
print("\n".join(out))
PY

{
    echo "Command: \`benches/crypto.sh\` (REPS=$REPS OPENSSL_SECONDS=$OPENSSL_SECONDS MEASUREMENT_TIME=$MEASUREMENT_TIME)"
    echo "Date: $(date -u '+%Y-%m-%d %H:%M UTC'); CPU: $cpu, $(nproc) cores; flags: $flags"
    echo "Anchor: $(openssl version); Blocktree: aws-lc-rs over aws-lc-sys $awslc"
    echo "Load average before/after: $load_before / $load_after; build $((built - started)) s, benchmarks $((finished - built)) s"
    echo
    cat "$OUT/crypto.md"
} >"$OUT/crypto.md.tmp"
mv "$OUT/crypto.md.tmp" "$OUT/crypto.md"
cat "$OUT/crypto.md"
if grep -q 'FAIL' "$OUT/crypto.md"; then
    echo >&2
    echo "FAIL: a crypto speed target was missed (see the table above)." >&2
fi
exit 0
