//! The control socket: how `blocktree volume` manages the volumes of a running
//! server (create, list, resize, delete) while their exports stay up, and how
//! `blocktree cluster status`, `leave` and `readcap grant` reach the server's
//! cluster member and file system.
//!
//! `blocktree up` holds its data directory's lock, so no other process may open
//! the store; it listens on a Unix socket in the data directory instead (mode
//! 0600: only its owner, who could read the store's files anyway, may connect),
//! and performs the requests on the volumes it serves. A volume created this way
//! is exported at once; one with open connections is not deleted or shrunk.
//!
//! The wire format is one request and one reply per connection, each a frame
//! `[length u32 BE][version u8][postcard body]` of at most [`MAX_FRAME`] bytes.
//! The decoders ([`decode_request`], [`decode_reply`]) are fuzzed and never
//! panic. The socket server needs the `server` feature.

use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};
use thiserror::Error;

/// The control socket's file name inside the data directory.
pub const CONTROL_SOCKET: &str = "control.sock";

/// The format version written first in every frame body.
pub const CONTROL_VERSION: u8 = 1;

/// The largest frame body either side accepts: a list of many volumes fits.
pub const MAX_FRAME: usize = 1 << 20;

/// What a client asks of the server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlRequest {
    /// Every volume, with its open connections.
    List,
    /// Create a volume (sparse).
    Create {
        /// Its name.
        name: String,
        /// Its size in bytes.
        size: u64,
        /// Its block size in bytes.
        block_size: u32,
    },
    /// Change a volume's size.
    Resize {
        /// The volume.
        name: String,
        /// The new size in bytes.
        size: u64,
        /// Whether shrinking (dropping the end) is allowed.
        shrink: bool,
    },
    /// Delete a volume and its data.
    Delete {
        /// The volume.
        name: String,
    },
    /// The server's view of its sector service's cluster.
    ClusterStatus,
    /// Take the server out of its cluster; it then stops.
    LeaveCluster,
    /// Grant a readcap on an encrypted file or directory of the store.
    GrantReadcap {
        /// The file or directory, as a path in the store (`/` for everything).
        path: String,
        /// The reader's encryption public key (SEC1 point).
        reader: Vec<u8>,
        /// Who asks: the caller's user and groups, for the owner check.
        uid: u32,
        /// The caller's group.
        gid: u32,
    },
    /// Check every sector of the member's store (checksums, signatures,
    /// Merkle trees) and repair the damaged ones from the other members.
    Scrub,
}

/// A member of the cluster, as a server reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberEntry {
    /// Its Raft id (hex).
    pub id: String,
    /// Voter or learner.
    pub voter: bool,
    /// Where it listens for the others (empty: a member without network).
    pub address: String,
    /// Its runtime path, if it has a network.
    pub path: String,
}

/// The state of a server's cluster, as the server sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterEntry {
    /// The answering member's Raft id (hex).
    pub node: String,
    /// Its role: Leader, Follower, Candidate or Learner.
    pub role: String,
    /// The leader's Raft id (hex), when one is known.
    pub leader: Option<String>,
    /// The current term.
    pub term: u64,
    /// The highest log index known committed.
    pub commit_index: Option<u64>,
    /// The last log index applied to the sectors.
    pub applied_index: Option<u64>,
    /// The last log index held.
    pub last_log_index: Option<u64>,
    /// Voters and learners.
    pub members: Vec<MemberEntry>,
    /// The generation the cluster stores.
    pub generation: u64,
    /// The directory it serves.
    pub directory: String,
}

/// What a scrub found and did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubEntry {
    /// Sectors checked.
    pub checked: u64,
    /// Sectors found damaged.
    pub corrupt: u64,
    /// Damaged sectors replaced by another member's copy.
    pub repaired: u64,
}

/// What the control socket asks of the server besides its volumes: its
/// cluster member and its file system.
pub trait ServerControl: Send + Sync {
    /// The member's view of its cluster.
    fn status(&self) -> Result<ClusterEntry, String>;
    /// Takes the member out of its cluster (the server then stops).
    fn leave(&self) -> Result<(), String>;
    /// Grants `reader` a readcap on `path` as user `uid`/`gid`; returns the inode.
    fn grant_readcap(&self, path: &str, reader: &[u8], uid: u32, gid: u32) -> Result<u64, String>;
    /// Scrubs the member's store (see [`ControlRequest::Scrub`]).
    fn scrub(&self) -> Result<ScrubEntry, String>;
}

/// A volume as the server reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeEntry {
    /// Its name, the export name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Block size in bytes.
    pub block_size: u32,
    /// NBD connections that have it open now.
    pub connections: u32,
}

/// The server's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlReply {
    /// The volumes, by name.
    Volumes(Vec<VolumeEntry>),
    /// The volume created.
    Created(VolumeEntry),
    /// The volume before and after a resize.
    Resized {
        /// Before.
        old: VolumeEntry,
        /// After.
        new: VolumeEntry,
    },
    /// The volume deleted.
    Deleted(VolumeEntry),
    /// The cluster's state.
    Cluster(ClusterEntry),
    /// The server left its cluster and is stopping.
    Left,
    /// The readcap was granted (and is durable) on this inode.
    Granted(u64),
    /// The scrub is done.
    Scrubbed(ScrubEntry),
    /// The request was refused or failed; the message says why.
    Refused(String),
}

/// Why a control exchange failed.
#[derive(Debug, Error)]
pub enum ControlError {
    /// The socket failed or timed out.
    #[error("control socket: {0}")]
    Io(#[from] io::Error),
    /// A frame longer than [`MAX_FRAME`].
    #[error("control frame of {0} bytes is longer than the limit of {MAX_FRAME}")]
    TooLong(usize),
    /// An empty frame, or a version this build does not read.
    #[error("control frame version {0:?} is not {CONTROL_VERSION}")]
    Version(Option<u8>),
    /// The body does not decode.
    #[error("malformed control frame: {0}")]
    Malformed(String),
}

fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    let mut body = vec![CONTROL_VERSION];
    // Serializing these plain enums to a Vec cannot fail.
    body.extend(postcard::to_allocvec(message).unwrap_or_default());
    body
}

fn decode<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ControlError> {
    if body.len() > MAX_FRAME {
        return Err(ControlError::TooLong(body.len()));
    }
    match body.split_first() {
        Some((&CONTROL_VERSION, rest)) => match postcard::take_from_bytes::<T>(rest) {
            Ok((message, [])) => Ok(message),
            Ok((_, extra)) => Err(ControlError::Malformed(format!(
                "{} bytes after the message",
                extra.len()
            ))),
            Err(error) => Err(ControlError::Malformed(error.to_string())),
        },
        Some((&version, _)) => Err(ControlError::Version(Some(version))),
        None => Err(ControlError::Version(None)),
    }
}

/// The body of a request frame.
pub fn encode_request(request: &ControlRequest) -> Vec<u8> {
    encode(request)
}

/// Decodes the body of a request frame.
pub fn decode_request(body: &[u8]) -> Result<ControlRequest, ControlError> {
    decode(body)
}

/// The body of a reply frame.
pub fn encode_reply(reply: &ControlReply) -> Vec<u8> {
    encode(reply)
}

/// Decodes the body of a reply frame.
pub fn decode_reply(body: &[u8]) -> Result<ControlReply, ControlError> {
    decode(body)
}

/// Reads one frame body, refusing lengths over [`MAX_FRAME`] before reading them.
pub fn read_frame(reader: &mut impl Read) -> Result<Vec<u8>, ControlError> {
    let mut length = [0u8; 4];
    reader.read_exact(&mut length)?;
    let length = u32::from_be_bytes(length) as usize;
    if length > MAX_FRAME {
        return Err(ControlError::TooLong(length));
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    Ok(body)
}

/// Writes one frame.
pub fn write_frame(writer: &mut impl Write, body: &[u8]) -> Result<(), ControlError> {
    let length = u32::try_from(body.len())
        .ok()
        .filter(|length| *length as usize <= MAX_FRAME)
        .ok_or(ControlError::TooLong(body.len()))?;
    writer.write_all(&length.to_be_bytes())?;
    writer.write_all(body)?;
    writer.flush()?;
    Ok(())
}

#[cfg(feature = "server")]
pub use socket::{ControlServer, call, call_waiting};

#[cfg(feature = "server")]
mod socket {
    use super::*;
    use crate::volumes::{Volume, Volumes};
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::path::{Path, PathBuf};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::thread::JoinHandle;
    use std::time::Duration;

    /// How long a client has to send its request: a stuck client must not hold
    /// up the next one for long.
    const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

    /// How long a client waits for the reply: a resize makes the volume durable.
    const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

    /// The control socket of a running server; stops and removes the socket when
    /// dropped.
    pub struct ControlServer {
        path: PathBuf,
        stopping: Arc<AtomicBool>,
        thread: Option<JoinHandle<()>>,
    }

    impl ControlServer {
        /// Listens on `path` (replacing a stale socket file there: the caller
        /// holds the data directory's lock, so no other server uses it) and
        /// serves requests on `volumes` and `cluster`, one at a time, on its own
        /// thread.
        pub fn start(
            path: &Path,
            volumes: Arc<Volumes>,
            cluster: Arc<dyn ServerControl>,
        ) -> io::Result<ControlServer> {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => return Err(error),
            }
            let listener = UnixListener::bind(path)?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
            let stopping = Arc::new(AtomicBool::new(false));
            let thread = {
                let stopping = stopping.clone();
                std::thread::Builder::new()
                    .name("control".into())
                    .spawn(move || accept_loop(listener, &volumes, &*cluster, &stopping))?
            };
            Ok(ControlServer {
                path: path.to_owned(),
                stopping,
                thread: Some(thread),
            })
        }

        /// The socket's path.
        pub fn path(&self) -> &Path {
            &self.path
        }
    }

    impl Drop for ControlServer {
        fn drop(&mut self) {
            self.stopping.store(true, Ordering::Release);
            // Wakes the accept; the loop sees the flag and returns.
            let _ = UnixStream::connect(&self.path);
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
            let _ = std::fs::remove_file(&self.path);
        }
    }

    fn accept_loop(
        listener: UnixListener,
        volumes: &Volumes,
        cluster: &dyn ServerControl,
        stopping: &AtomicBool,
    ) {
        for stream in listener.incoming() {
            if stopping.load(Ordering::Acquire) {
                return;
            }
            match stream {
                Ok(stream) => {
                    if let Err(error) = serve_one(stream, volumes, cluster) {
                        tracing::warn!("control socket: {error}");
                    }
                }
                Err(error) => tracing::warn!("control socket: accept failed: {error}"),
            }
        }
    }

    fn serve_one(
        mut stream: UnixStream,
        volumes: &Volumes,
        cluster: &dyn ServerControl,
    ) -> Result<(), ControlError> {
        stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
        stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
        let reply = match read_frame(&mut stream).and_then(|body| decode_request(&body)) {
            Ok(ControlRequest::ClusterStatus) => cluster
                .status()
                .map_or_else(ControlReply::Refused, ControlReply::Cluster),
            Ok(ControlRequest::LeaveCluster) => cluster
                .leave()
                .map_or_else(ControlReply::Refused, |()| ControlReply::Left),
            Ok(ControlRequest::GrantReadcap {
                path,
                reader,
                uid,
                gid,
            }) => cluster
                .grant_readcap(&path, &reader, uid, gid)
                .map_or_else(ControlReply::Refused, ControlReply::Granted),
            Ok(ControlRequest::Scrub) => cluster
                .scrub()
                .map_or_else(ControlReply::Refused, ControlReply::Scrubbed),
            Ok(request) => perform(volumes, request),
            // A malformed request gets an answer saying so; the server goes on.
            Err(error) => ControlReply::Refused(error.to_string()),
        };
        write_frame(&mut stream, &encode_reply(&reply))
    }

    fn entry(volumes: &Volumes, volume: Volume) -> VolumeEntry {
        VolumeEntry {
            connections: volumes.connections(volume.ino),
            name: volume.name,
            size: volume.size,
            block_size: volume.block_size,
        }
    }

    fn perform(volumes: &Volumes, request: ControlRequest) -> ControlReply {
        let result = match request {
            ControlRequest::List => volumes.list().map(|list| {
                ControlReply::Volumes(list.into_iter().map(|v| entry(volumes, v)).collect())
            }),
            ControlRequest::Create {
                name,
                size,
                block_size,
            } => volumes
                .create(&name, size, block_size)
                .map(|volume| ControlReply::Created(entry(volumes, volume))),
            ControlRequest::Resize { name, size, shrink } => volumes
                .resize(&name, size, shrink)
                .map(|(old, new)| ControlReply::Resized {
                    old: entry(volumes, old),
                    new: entry(volumes, new),
                }),
            ControlRequest::Delete { name } => volumes
                .delete(&name)
                .map(|volume| ControlReply::Deleted(entry(volumes, volume))),
            ControlRequest::ClusterStatus
            | ControlRequest::LeaveCluster
            | ControlRequest::GrantReadcap { .. }
            | ControlRequest::Scrub => {
                return ControlReply::Refused("not a volume request".into());
            }
        };
        result.unwrap_or_else(|error| ControlReply::Refused(error.to_string()))
    }

    /// Sends `request` to the server listening on `path` and returns its reply.
    pub fn call(path: &Path, request: &ControlRequest) -> Result<ControlReply, ControlError> {
        call_waiting(path, request, REPLY_TIMEOUT)
    }

    /// [`call`], waiting up to `reply_timeout` for the answer (a scrub reads
    /// the whole store first).
    pub fn call_waiting(
        path: &Path,
        request: &ControlRequest,
        reply_timeout: Duration,
    ) -> Result<ControlReply, ControlError> {
        let mut stream = UnixStream::connect(path)?;
        stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
        stream.set_read_timeout(Some(reply_timeout))?;
        write_frame(&mut stream, &encode_request(request))?;
        decode_reply(&read_frame(&mut stream)?)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_round_trip_through_frames() {
        let requests = [
            ControlRequest::List,
            ControlRequest::Create {
                name: "vol1".into(),
                size: 1 << 30,
                block_size: 4096,
            },
            ControlRequest::Resize {
                name: "vol1".into(),
                size: 1 << 20,
                shrink: true,
            },
            ControlRequest::Delete {
                name: "vol1".into(),
            },
            ControlRequest::ClusterStatus,
            ControlRequest::LeaveCluster,
            ControlRequest::GrantReadcap {
                path: "/".into(),
                reader: vec![4; 65],
                uid: 0,
                gid: 0,
            },
            ControlRequest::Scrub,
        ];
        for request in requests {
            let mut wire = Vec::new();
            write_frame(&mut wire, &encode_request(&request)).unwrap();
            let body = read_frame(&mut wire.as_slice()).unwrap();
            assert_eq!(decode_request(&body).unwrap(), request);
        }
        let entry = VolumeEntry {
            name: "vol0".into(),
            size: 1 << 30,
            block_size: 4096,
            connections: 2,
        };
        let reply = ControlReply::Volumes(vec![entry.clone(), entry]);
        assert_eq!(decode_reply(&encode_reply(&reply)).unwrap(), reply);
        let cluster = ControlReply::Cluster(ClusterEntry {
            node: "00000000000000ab".into(),
            role: "Leader".into(),
            leader: Some("00000000000000ab".into()),
            term: 3,
            commit_index: Some(17),
            applied_index: Some(17),
            last_log_index: Some(17),
            members: vec![MemberEntry {
                id: "00000000000000ab".into(),
                voter: true,
                address: "127.0.0.1:7001".into(),
                path: "/root/a".into(),
            }],
            generation: 1,
            directory: "/root".into(),
        });
        assert_eq!(decode_reply(&encode_reply(&cluster)).unwrap(), cluster);
        let scrubbed = ControlReply::Scrubbed(ScrubEntry {
            checked: 262_147,
            corrupt: 2,
            repaired: 2,
        });
        assert_eq!(decode_reply(&encode_reply(&scrubbed)).unwrap(), scrubbed);
    }

    #[test]
    fn bad_frames_are_errors() {
        assert!(matches!(
            decode_request(&[]),
            Err(ControlError::Version(None))
        ));
        assert!(matches!(
            decode_request(&[9, 0]),
            Err(ControlError::Version(Some(9)))
        ));
        assert!(matches!(
            decode_request(&[CONTROL_VERSION, 200]),
            Err(ControlError::Malformed(_))
        ));
        let mut trailing = encode_request(&ControlRequest::List);
        trailing.push(0);
        assert!(matches!(
            decode_request(&trailing),
            Err(ControlError::Malformed(_))
        ));
        let huge = (MAX_FRAME as u32 + 1).to_be_bytes();
        assert!(matches!(
            read_frame(&mut huge.as_slice()),
            Err(ControlError::TooLong(_))
        ));
        let truncated = [0, 0, 0, 9, CONTROL_VERSION];
        assert!(matches!(
            read_frame(&mut truncated.as_slice()),
            Err(ControlError::Io(_))
        ));
    }
}
