//! Fuzzes the decoders of a file credential store's files through
//! `FileCredStore::open`: `runtime.cred` (keys and writecap) and `root.cred`
//! (sealed root keys, whose Argon2id parameters must be bounded on load). The first
//! input byte picks the file; the rest is its content, the other file being valid
//! or absent. A corrupt store gives an error, never a panic.
#![no_main]

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use blocktree_core::credstore::{CredStore, FileCredStore};
use blocktree_fuzz::show;
use libfuzzer_sys::fuzz_target;

/// A valid `runtime.cred`, from a store created once per process.
fn valid_runtime() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        let dir = scratch("template");
        FileCredStore::create(&dir).expect("creating a credential store");
        let bytes = fs::read(dir.join("runtime.cred")).expect("reading runtime.cred");
        let _ = fs::remove_dir_all(&dir);
        bytes
    })
}

fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "blocktree-fuzz-credstore-{}-{name}",
        std::process::id()
    ))
}

fn write_private(path: &Path, bytes: &[u8]) {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| file.write_all(bytes))
        .expect("writing a store file");
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, content)) = data.split_first() else {
        return;
    };
    let valid = valid_runtime();
    let dir = scratch("store");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("creating the store directory");
    if selector & 1 == 0 {
        write_private(&dir.join("runtime.cred"), content);
    } else {
        write_private(&dir.join("runtime.cred"), valid);
        write_private(&dir.join("root.cred"), content);
    }
    let opened = FileCredStore::open(&dir);
    show(&opened);
    if let Ok(store) = &opened {
        let _ = (
            store.principal(),
            store.root_public(),
            store.storage_public_key(),
        );
        if let Some(writecap) = store.writecap() {
            let _ = format!("{writecap:?}");
        }
    }
    drop(opened);
    let _ = fs::remove_dir_all(&dir);
});
