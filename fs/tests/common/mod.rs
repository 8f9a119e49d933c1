//! Test domains: a root, runtime credentials with writecaps, a local store.

#![allow(dead_code)]
// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use blocktree_core::BtPath;
use blocktree_core::credstore::{CredStore, FileCredStore, KdfParams};
use blocktree_core::provision::{self, WritecapRequest};
use blocktree_core::time::Timestamp;
use blocktree_fs::{Caller, FileSystem, FsConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub const PASSWORD: &str = "correct horse battery staple";

pub fn fast_kdf() -> KdfParams {
    KdfParams {
        memory_kib: 8 * 1024,
        iterations: 1,
        parallelism: 1,
    }
}

/// A domain in a temporary directory: `data/credentials` holds the root and a
/// runtime with a writecap for the whole domain.
pub struct Domain {
    pub dir: tempfile::TempDir,
    pub creds: Arc<FileCredStore>,
}

impl Domain {
    pub fn new() -> Domain {
        let dir = tempfile::tempdir().unwrap();
        let mut store = FileCredStore::create(dir.path().join("credentials"))
            .unwrap()
            .with_kdf_params(fast_kdf())
            .unwrap();
        let root = store.generate_root(PASSWORD).unwrap();
        let domain = BtPath::root_of(root.principal());
        let request = WritecapRequest::new(&store, Some(domain.clone())).unwrap();
        let now = Timestamp::now();
        let writecap = {
            let signer = store.root_signer(PASSWORD).unwrap();
            provision::approve(
                &request,
                &*signer,
                None,
                Some(domain),
                now.after(Duration::from_secs(3600)),
                now,
            )
            .unwrap()
        };
        store.set_writecap(writecap).unwrap();
        Domain {
            dir,
            creds: Arc::new(store),
        }
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Another runtime of the same domain, with a writecap for `/<root>/<sub>`.
    pub fn other_principal(&self, sub: &str) -> Arc<FileCredStore> {
        let mut store = FileCredStore::create(self.dir.path().join(format!("creds-{sub}")))
            .unwrap()
            .with_kdf_params(fast_kdf())
            .unwrap();
        let root_path = self.creds.writecap().unwrap().path().unwrap().clone();
        let path = root_path.join(sub).unwrap();
        let request = WritecapRequest::new(&store, Some(path.clone())).unwrap();
        let now = Timestamp::now();
        let writecap = {
            let signer = self.creds.root_signer(PASSWORD).unwrap();
            provision::approve(
                &request,
                &*signer,
                None,
                Some(path),
                now.after(Duration::from_secs(3600)),
                now,
            )
            .unwrap()
        };
        store.set_writecap(writecap).unwrap();
        Arc::new(store)
    }

    pub fn mount(&self, config: FsConfig) -> FileSystem {
        mount_with(&self.data(), self.creds.clone(), config)
    }
}

pub fn mount_with(data: &Path, creds: Arc<dyn CredStore>, config: FsConfig) -> FileSystem {
    blocktree_fs::local::open_local(data, creds, config).unwrap()
}

pub fn user(uid: u32) -> Caller {
    Caller {
        uid,
        gid: uid,
        groups: vec![],
    }
}

pub fn root() -> Caller {
    Caller::root()
}
