#!/usr/bin/env bash
# The replicated sector service's benchmarks (raftlog, issue #7): replicated
# write throughput of three members against one member in the same run,
# failover time over 20 SIGKILLs, and a new member's catch-up by snapshot.
# Members are `raft-node` processes on 127.0.0.1, data in $TMPDIR.
#
#   raftlog/benches/raft.sh                       # all three
#   RAFT_BENCH_SNAPSHOT_MIB=256 raftlog/benches/raft.sh
#
# Prints `bench:` lines; record them with this command in BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/work/target-raft}"
# PROFILE=release for release builds (a full rebuild); the default is the dev
# profile, whose dependencies are optimized (Cargo.toml), as the tests build.
profile=()
[[ "${PROFILE:-dev}" == release ]] && profile=(--release)
cargo build "${profile[@]}" -p blocktree-raftlog --bin raft-node --tests >/dev/null
cargo nextest run "${profile[@]}" -p blocktree-raftlog --test bench --run-ignored only \
    --no-capture --test-threads 1 2>/dev/null | grep '^bench:'
