//! Signatures and readcap unwraps per second, `TpmCredStore` on the TPM at TCTI
//! against `FileCredStore`, in the same run; `benches/tpm.sh` starts swtpm and
//! runs this.
//!
//! Usage: `tpm_bench TCTI [SECONDS] [REPS]` (defaults 2 and 3). Each repetition
//! measures the four cases back to back for SECONDS each; the table reports the
//! best repetition of each case and the range of the per-repetition ratios
//! (file store / TPM store), because other jobs share the machine.
//!
//! A signature is `CredStore::sign` of a 64-byte message (SHA-256, then ECDSA
//! P-256: TPM2_Sign, or aws-lc in memory). A readcap unwrap is
//! `ReadcapTable::open` of a file key granted to the store's encryption key
//! (HMAC lookup, then HPKE open whose P-256 Diffie-Hellman is TPM2_ECDH_ZGen, or
//! aws-lc in memory).
// A benchmark's setup failing is a bug in the run; it says which and stops.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use blocktree_core::aead::SymmetricKey;
use blocktree_core::credstore::tpm::{Tcti, TpmCredStore};
use blocktree_core::credstore::{CredStore, FileCredStore};
use blocktree_core::hash::HashAlgorithm;
use blocktree_core::readcap::{FileIds, ReadcapTable};

/// Runs `operation` for `seconds`; operations per second.
fn rate(seconds: f64, mut operation: impl FnMut()) -> f64 {
    let budget = Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut count = 0u64;
    while started.elapsed() < budget {
        operation();
        count += 1;
    }
    count as f64 / started.elapsed().as_secs_f64()
}

/// A readcap table holding a file key for `store`'s encryption key.
fn readcap_for(store: &dyn CredStore) -> (ReadcapTable, [u8; 32], FileIds, SymmetricKey) {
    let ids = FileIds {
        generation: 1,
        inode: 2,
    };
    let salt = [9u8; 32];
    let key = SymmetricKey::generate().unwrap();
    let mut table = ReadcapTable::default();
    table
        .grant(
            HashAlgorithm::Sha256,
            &salt,
            ids,
            &store.encryption_public_key(),
            &key,
        )
        .unwrap();
    (table, salt, ids, key)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let tcti: Tcti = args
        .next()
        .expect("usage: tpm_bench TCTI [SECONDS] [REPS]")
        .parse()
        .expect("a TCTI such as swtpm:host=127.0.0.1,port=2321");
    let seconds: f64 = args.next().map_or(2.0, |s| s.parse().expect("SECONDS"));
    let reps: usize = args.next().map_or(3, |s| s.parse().expect("REPS"));

    let dir = tempfile::tempdir().unwrap();
    let tpm = TpmCredStore::create(dir.path().join("tpm"), &tcti).unwrap();
    let file = FileCredStore::create(dir.path().join("file")).unwrap();
    let stores: [(&str, &dyn CredStore); 2] = [("TpmCredStore", &tpm), ("FileCredStore", &file)];
    let message = [0x5au8; 64];
    let readcaps: Vec<_> = stores.iter().map(|(_, s)| readcap_for(*s)).collect();
    // Warm up (the TPM loads its keys) and check that both stores work.
    for ((_, store), (table, salt, ids, key)) in stores.iter().zip(&readcaps) {
        let signature = store.sign(&message).unwrap();
        store
            .signing_public_key()
            .verify(&message, &signature)
            .unwrap();
        assert_eq!(&table.open(salt, *ids, *store).unwrap(), key);
    }

    // rates[case][store][rep]
    let mut rates = [[vec![], vec![]], [vec![], vec![]]];
    for _ in 0..reps {
        for (index, ((_, store), (table, salt, ids, _))) in stores.iter().zip(&readcaps).enumerate()
        {
            rates[0][index].push(rate(seconds, || {
                store.sign(&message).unwrap();
            }));
            rates[1][index].push(rate(seconds, || {
                table.open(salt, *ids, *store).unwrap();
            }));
        }
    }

    println!(
        "Best of {reps} repetitions of {seconds} s per case; ratio = FileCredStore / TpmCredStore \
         ('per-rep ratios' is the range within each repetition). TPM: {tcti}.\n"
    );
    println!("| operation | TpmCredStore | FileCredStore | ratio | per-rep ratios |");
    println!("|---|---|---|---|---|");
    for (case, name) in ["signature (64 B message)", "readcap unwrap"]
        .iter()
        .enumerate()
    {
        let best = |runs: &Vec<f64>| runs.iter().cloned().fold(0.0, f64::max);
        let (tpm_best, file_best) = (best(&rates[case][0]), best(&rates[case][1]));
        let ratios: Vec<f64> = rates[case][0]
            .iter()
            .zip(&rates[case][1])
            .map(|(tpm, file)| file / tpm)
            .collect();
        let low = ratios.iter().cloned().fold(f64::INFINITY, f64::min);
        let high = ratios.iter().cloned().fold(0.0, f64::max);
        println!(
            "| {name} | {} /s | {} /s | {:.0}× | {low:.0}–{high:.0} |",
            grouped(tpm_best),
            grouped(file_best),
            file_best / tpm_best
        );
    }
}

/// 12345.6 → "12,346".
fn grouped(value: f64) -> String {
    let digits = format!("{:.0}", value);
    let mut out = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    out
}
