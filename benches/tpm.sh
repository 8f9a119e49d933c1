#!/usr/bin/env bash
# benches/tpm.sh: the TPM credential store (issue #8) against the file credential
# store, side by side in one run: signatures per second (CredStore::sign, ECDSA
# P-256) and readcap unwraps per second (ReadcapTable::open: HPKE whose P-256
# Diffie-Hellman the TPM does with TPM2_ECDH_ZGen).
#
# The TPM is swtpm, started here on two free loopback ports with a fresh state
# directory and killed at the end. swtpm is an emulator: its figures say what the
# TPM path costs in software (TSS marshalling, the salted HMAC session, parameter
# encryption, a TCP round trip per command, libtpms's crypto), not what a TPM chip
# does (those take milliseconds per ECC operation). So there is no target; the
# ratio is reported.
#
# The measuring program is core/examples/tpm_bench.rs (built in release with
# `--features tpm`); it runs the four cases back to back in each of REPS
# repetitions and prints the best of each, and the range of the per-repetition
# ratios, because other jobs share the machine. `openssl speed` runs first as the
# anchor for P-256 in software.
#
# Output: a markdown table on stdout and in target/bench-results/tpm.md. Needs
# swtpm, libtss2-dev, openssl and cargo.
#
# Knobs (environment): REPS (default 3), CASE_SECONDS (per case and repetition,
# default 2).

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

REPS=${REPS:-3}
SECONDS_PER_CASE=${CASE_SECONDS:-2}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
OUT="$ROOT/target/bench-results"
mkdir -p "$OUT"
STATE=$(mktemp -d)
SWTPM_PID=
cleanup() {
    if [ -n "$SWTPM_PID" ]; then kill "$SWTPM_PID" 2>/dev/null || true; wait "$SWTPM_PID" 2>/dev/null || true; fi
    rm -rf "$STATE"
}
trap cleanup EXIT

for tool in swtpm openssl cargo; do
    command -v "$tool" >/dev/null || { echo "benches/tpm.sh: needs $tool" >&2; exit 1; }
done

echo "building core/examples/tpm_bench (release, --features tpm)" >&2
cargo build --release --locked -p blocktree-core --features tpm --example tpm_bench >&2

# Two free consecutive ports: swtpm takes commands on PORT and control on PORT+1.
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for _ in $(seq 1 50); do
    PORT=$((20000 + RANDOM % 40000))
    port_free "$PORT" && port_free "$((PORT + 1))" || continue
    swtpm socket --tpm2 --tpmstate dir="$STATE" \
        --server type=tcp,port="$PORT" --ctrl type=tcp,port="$((PORT + 1))" \
        --flags not-need-init,startup-clear >"$STATE/swtpm.log" 2>&1 &
    SWTPM_PID=$!
    for _ in $(seq 1 100); do
        if ! kill -0 "$SWTPM_PID" 2>/dev/null; then SWTPM_PID=; break; fi
        if ! port_free "$((PORT + 1))"; then break 2; fi
        sleep 0.05
    done
    [ -n "$SWTPM_PID" ] && { kill "$SWTPM_PID" 2>/dev/null || true; wait "$SWTPM_PID" 2>/dev/null || true; SWTPM_PID=; }
done
[ -n "$SWTPM_PID" ] || { echo "benches/tpm.sh: swtpm did not start" >&2; exit 1; }
TCTI="swtpm:host=127.0.0.1,port=$PORT"

{
    echo "Machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'); load $(cut -d' ' -f1-3 /proc/loadavg)."
    echo "swtpm $(swtpm --version 2>&1 | head -n1 | sed 's/.*version \([^,]*\).*/\1/'), libtss2 $(pkg-config --modversion tss2-esys 2>/dev/null || echo '?')."
    echo
    echo "Anchor, P-256 in software (\`openssl speed -seconds $SECONDS_PER_CASE ecdsap256 ecdhp256\`):"
    echo
    echo '```'
    openssl speed -seconds "$SECONDS_PER_CASE" ecdsap256 ecdhp256 2>/dev/null | grep -E '^ +(sign|op) |^ *256 bits ecd' || true
    echo '```'
    echo
    TSS2_LOG=all+none "$TARGET/release/examples/tpm_bench" "$TCTI" "$SECONDS_PER_CASE" "$REPS"
} | tee "$OUT/tpm.md"
