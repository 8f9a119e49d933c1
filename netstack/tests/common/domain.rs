//! A test domain: a root in a file credential store (cheap KDF), and runtime
//! stores with writecaps the root approves. Shared by netstack's and raftlog's
//! process tests (raftlog includes this file with `#[path]`).

use blocktree_core::credstore::{CredStore, FileCredStore, KdfParams};
use blocktree_core::keys::Signer;
use blocktree_core::provision::{WritecapRequest, approve};
use blocktree_core::time::Timestamp;
use blocktree_core::{BtPath, PrincipalId};
use std::path::Path;
use std::time::Duration;
use tempfile::TempDir;

/// The root password of every test domain.
pub const PASSWORD: &str = "test root password";

/// A root and the directory its test stores live in.
pub struct Domain {
    pub dir: TempDir,
    root_store: FileCredStore,
    pub root: PrincipalId,
}

impl Domain {
    pub fn new() -> Domain {
        let dir = tempfile::tempdir().unwrap();
        let mut root_store = FileCredStore::create(dir.path().join("root"))
            .unwrap()
            .with_kdf_params(KdfParams {
                memory_kib: 1024,
                iterations: 1,
                parallelism: 1,
            })
            .unwrap();
        let root = root_store.generate_root(PASSWORD).unwrap().principal();
        Domain {
            dir,
            root_store,
            root,
        }
    }

    /// `/<root>/components...`.
    pub fn path(&self, components: &[&str]) -> BtPath {
        components
            .iter()
            .fold(BtPath::root_of(self.root), |path, c| path.join(c).unwrap())
    }

    pub fn root_signer(&self) -> Box<dyn Signer + '_> {
        self.root_store.root_signer(PASSWORD).unwrap()
    }

    /// A new file store in `dir` with a writecap for `/<root>/components...`,
    /// valid for an hour, approved by the root; returns its principal and path.
    pub fn approved_store(&self, dir: &Path, components: &[&str]) -> (PrincipalId, BtPath) {
        let mut store = FileCredStore::create(dir).unwrap();
        let path = self.path(components);
        let request = WritecapRequest::new(&store, Some(path.clone())).unwrap();
        let now = Timestamp::now();
        let writecap = approve(
            &request,
            &*self.root_signer(),
            None,
            None,
            now.after(Duration::from_secs(3600)),
            now,
        )
        .unwrap();
        store.set_writecap(writecap).unwrap();
        (store.principal(), path)
    }
}
