//! `blocktree bench`, run as the real binary against real, small engine stores.
//!
//! Each run is short (`--duration 1`, a few MiB of working set): these tests check
//! that the benchmark runs and reports sane numbers, not how fast anything is.
//! Speed is for `benches/engine.sh`.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

const BLOCKTREE: &str = env!("CARGO_BIN_EXE_blocktree");

fn blocktree(args: &[&str]) -> Output {
    Command::new(BLOCKTREE)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run the blocktree binary")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).expect("output is UTF-8")
}

/// Runs `blocktree bench sectors --dir DIR ARGS --json`; returns its one JSON object.
fn sectors_json(dir: &Path, args: &[&str]) -> Value {
    let dir = dir.to_str().expect("UTF-8 temporary path");
    let mut all = vec!["bench", "sectors", "--dir", dir, "--json"];
    all.extend_from_slice(args);
    let output = blocktree(&all);
    let stdout = text(&output.stdout);
    assert!(
        output.status.success(),
        "blocktree {all:?} failed ({}): {}",
        output.status,
        text(&output.stderr)
    );
    assert_eq!(stdout.lines().count(), 1, "one JSON object: {stdout}");
    serde_json::from_str(&stdout).unwrap_or_else(|error| panic!("{error}: {stdout}"))
}

fn number(report: &Value, field: &str) -> f64 {
    report[field]
        .as_f64()
        .unwrap_or_else(|| panic!("no number {field:?} in {report}"))
}

/// What every successful run must report.
fn assert_sane(report: &Value) {
    assert!(number(report, "ops") > 0.0, "no operations: {report}");
    assert!(number(report, "mb_per_s") > 0.0, "no throughput: {report}");
    assert!(number(report, "iops") > 0.0, "no IOPS: {report}");
    let (p50, p99, p999) = (
        number(report, "p50_us"),
        number(report, "p99_us"),
        number(report, "p999_us"),
    );
    assert!(
        0.0 < p50 && p50 <= p99 && p99 <= p999,
        "percentiles out of order: {report}"
    );
    assert_eq!(number(report, "errors"), 0.0, "errors: {report}");
    assert_eq!(number(report, "duration_s"), 1.0);
}

/// The store the benchmark made, if it is still there.
fn leftover_stores(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("list the benchmark directory")
        .map(|entry| {
            entry
                .expect("directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

#[test]
fn random_writes_report_json_and_remove_their_store() {
    let dir = tempfile::tempdir().unwrap();
    let report = sectors_json(
        dir.path(),
        &[
            "--rw",
            "write",
            "--pattern",
            "rand",
            "--size",
            "8M",
            "--qd",
            "8",
            "--duration",
            "1",
        ],
    );
    assert_sane(&report);
    assert_eq!(report["rw"], "write");
    assert_eq!(report["pattern"], "rand");
    assert_eq!(report["sector_size"], 4096);
    assert_eq!(report["qd"], 8);
    assert_eq!(report["crypto"], false);
    assert!(
        report["read"].is_null(),
        "a write run reports no reads: {report}"
    );
    assert_eq!(leftover_stores(dir.path()), Vec::<String>::new());
}

#[test]
fn sequential_reads_prefill_then_read() {
    let dir = tempfile::tempdir().unwrap();
    let report = sectors_json(
        dir.path(),
        &[
            "--rw",
            "read",
            "--pattern",
            "seq",
            "--size",
            "4M",
            "--sector-size",
            "16K",
            "--qd",
            "4",
            "--jobs",
            "2",
            "--duration",
            "1",
        ],
    );
    assert_sane(&report);
    assert_eq!(report["prefill"], true);
    assert_eq!(report["jobs"], 2);
    // Prefilled: the whole working set is live.
    assert_eq!(report["engine"]["live_sectors"], 256);
}

#[test]
fn mixed_durable_writes_report_both_kinds() {
    let dir = tempfile::tempdir().unwrap();
    let report = sectors_json(
        dir.path(),
        &[
            "--rw",
            "mixed",
            "--mix",
            "70",
            "--size",
            "4M",
            "--qd",
            "2",
            "--jobs",
            "4",
            "--flush-every",
            "1",
            "--no-direct",
            "--duration",
            "1",
        ],
    );
    assert_sane(&report);
    assert_eq!(report["read_percent"], 70);
    assert_eq!(report["direct_io"], false);
    for kind in ["read", "write"] {
        assert!(
            report[kind]["ops"].as_u64().unwrap_or(0) > 0,
            "no {kind}s in a mixed run: {report}"
        );
    }
}

/// One second of `--crypto --rw mixed` over `size` in 8 KiB sectors at QD 8, with
/// a flush every `flush_every` writes, in a fresh directory.
fn mixed_crypto_run(size: &str, flush_every: &str) -> Value {
    let dir = tempfile::tempdir().expect("a temporary directory");
    sectors_json(
        dir.path(),
        &[
            "--crypto",
            "--rw",
            "mixed",
            "--size",
            size,
            "--sector-size",
            "8K",
            "--qd",
            "8",
            "--flush-every",
            flush_every,
            "--duration",
            "1",
        ],
    )
}

#[test]
fn crypto_seals_on_write_and_verifies_on_read() {
    // Mixed, so that reads open and Merkle-check records that the same run sealed
    // and overwrote; a failed check would show as errors.
    let report = mixed_crypto_run("4M", "16");
    assert_sane(&report);
    assert_eq!(report["crypto"], true);
    assert!(number(&report["read"], "ops") > 0.0, "{report}");
    assert!(number(&report, "flushes") > 0.0, "{report}");
}

#[test]
fn crypto_in_regions_barely_larger_than_the_queue() {
    // With --crypto, writes are prepared ahead in groups; that needs free sectors
    // beyond the queue. Regions of exactly the queue, one short of the room needed
    // and just enough must all run (a job with no free sector would spin forever).
    for sectors in [8, 11, 12] {
        let report = mixed_crypto_run(&format!("{}K", sectors * 8), "3");
        assert_sane(&report);
        assert!(
            number(&report["write"], "ops") > 0.0,
            "{sectors} sectors: {report}"
        );
        assert!(
            number(&report["read"], "ops") > 0.0,
            "{sectors} sectors: {report}"
        );
    }
}

#[test]
fn table_output_and_keep() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_str().unwrap();
    let output = blocktree(&[
        "bench",
        "sectors",
        "--dir",
        path,
        "--size",
        "2M",
        "--qd",
        "2",
        "--duration",
        "1",
        "--keep",
    ]);
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert!(output.status.success(), "{stderr}");
    for expected in [
        "MB/s",
        "IOPS",
        "p50 µs",
        "p99 µs",
        "p99.9 µs",
        "errors",
        "write ",
    ] {
        assert!(stdout.contains(expected), "no {expected:?} in:\n{stdout}");
    }
    // stderr is not a terminal here: no progress bar, only the note about the store.
    assert!(stderr.starts_with("kept the benchmark store"), "{stderr}");
    let kept = leftover_stores(dir.path());
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(kept[0].starts_with("blocktree-bench-"), "{kept:?}");
}

#[test]
fn index_bench_reports_bytes_per_sector_and_open_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_str().unwrap();
    let output = blocktree(&[
        "bench",
        "index",
        "--dir",
        path,
        "--sectors",
        "20k",
        "--batch",
        "1000",
        "--json",
    ]);
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["sectors"], 20_000);
    assert_eq!(report["live_sectors"], 20_000);
    assert_eq!(report["live_sectors_after_open"], 20_000);
    assert!(number(&report, "index_bytes_per_sector") > 0.0, "{report}");
    assert!(number(&report, "open_s") > 0.0, "{report}");
    assert_eq!(leftover_stores(dir.path()), Vec::<String>::new());
}

#[test]
fn bad_flags_fail_with_one_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--sector-size", "1000"], "multiple of 512"),
        (&["--sector-size", "2M"], "at most 1 MiB"),
        (&["--qd", "0"], "queue depth must be between 1 and"),
        (&["--jobs", "0"], "jobs must be between 1 and"),
        (&["--size", "lots"], "is not a size"),
        (&["--duration", "soon"], "is not a duration"),
        (&["--duration", "0"], "--duration must be more than 0"),
        (&["--mix", "30"], "--mix applies only to --rw mixed"),
        (&["--rw", "mixed", "--mix", "101"], "between 0 and 100"),
        (&["--size", "8K", "--qd", "4"], "fewer than --jobs × --qd"),
        (&["--pattern", "zigzag"], "invalid value 'zigzag'"),
    ];
    for (args, expected) in cases {
        let mut all = vec!["bench", "sectors", "--dir", path];
        all.extend_from_slice(args);
        let output = blocktree(&all);
        let stderr = text(&output.stderr);
        assert!(!output.status.success(), "{args:?} succeeded");
        assert!(output.stdout.is_empty(), "{args:?} printed results");
        let errors: Vec<&str> = stderr
            .lines()
            .filter(|line| line.starts_with("error:"))
            .collect();
        assert_eq!(
            errors.len(),
            1,
            "{args:?}: one error line expected in:\n{stderr}"
        );
        assert!(
            errors[0].contains(expected),
            "{args:?}: {:?} lacks {expected:?}",
            errors[0]
        );
    }
    let output = blocktree(&["bench", "sectors", "--dir", "/nonexistent/blocktree-bench"]);
    assert!(
        text(&output.stderr)
            .starts_with("error: --dir /nonexistent/blocktree-bench is not a directory")
    );
    // Nothing was created for any of them.
    assert_eq!(leftover_stores(dir.path()), Vec::<String>::new());
}
