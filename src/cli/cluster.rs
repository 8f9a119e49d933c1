//! `blocktree cluster status`, `cluster scrub` and `blocktree leave`: the running server's
//! sector-service cluster, reached through its control socket, and the
//! [`ServerControl`] that `up` gives the control socket.
//!
//! Every data directory's store is a Raft cluster (`blocktree_raftlog`): one
//! member unless other servers joined it (`blocktree join`). The server holds
//! the data directory while it runs, so these commands ask it rather than open
//! the store themselves.

use anyhow::{Context, Result, anyhow, bail};
use blocktree_core::keys::EncryptionPublicKey;
use blocktree_fs::{Caller, FileSystem};
use blocktree_nbd::control::{
    self, CONTROL_SOCKET, ClusterEntry, ControlReply, ControlRequest, MemberEntry, ScrubEntry,
    ServerControl,
};
use blocktree_raftlog::{ClusterStatus, RaftService};
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::output::Report;

/// Arguments of `blocktree cluster`.
#[derive(Debug, Args)]
pub struct ClusterArgs {
    #[command(subcommand)]
    command: ClusterCommand,
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Print the members, the leader, the term and the commit index of the
    /// running server's cluster.
    Status(StatusArgs),
    /// Check every sector of the running server's copy (checksums, metadata
    /// signatures, Merkle trees) and replace damaged ones with another member's
    /// copy. `up` also scrubs on its own every --scrub-interval.
    Scrub(StatusArgs),
}

/// Arguments of `blocktree cluster status`.
#[derive(Debug, Args)]
struct StatusArgs {
    /// The running server's data directory.
    #[arg(long, value_name = "DATA", default_value = "./blocktree-data")]
    data: PathBuf,
    /// Print one JSON object instead of the report.
    #[arg(long)]
    json: bool,
}

/// Arguments of `blocktree leave`.
#[derive(Debug, Args)]
pub struct LeaveArgs {
    /// The running server's data directory.
    #[arg(long, value_name = "DATA", default_value = "./blocktree-data")]
    data: PathBuf,
}

/// The control socket of the server running in `data`.
fn socket_of(data: &Path) -> Result<PathBuf> {
    let socket = data.join(CONTROL_SOCKET);
    if !socket.exists() {
        bail!(
            "no blocktree server is running in {} (no {CONTROL_SOCKET}): start it with \
             `blocktree up --data {0}`",
            data.display()
        );
    }
    Ok(socket)
}

fn call(data: &Path, request: ControlRequest) -> Result<ControlReply> {
    let socket = socket_of(data)?;
    match control::call(&socket, &request) {
        Ok(ControlReply::Refused(reason)) => Err(anyhow!(reason)),
        Ok(reply) => Ok(reply),
        Err(error) => Err(error).with_context(|| {
            format!(
                "the blocktree server did not answer on {}",
                socket.display()
            )
        }),
    }
}

/// Runs `blocktree cluster …`.
pub fn run(args: ClusterArgs) -> Result<()> {
    match args.command {
        ClusterCommand::Status(args) => status(&args),
        ClusterCommand::Scrub(args) => scrub(&args),
    }
}

/// How long `cluster scrub` waits for the server: it reads the whole store.
const SCRUB_WAIT: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

fn scrub(args: &StatusArgs) -> Result<()> {
    let socket = socket_of(&args.data)?;
    let reply =
        control::call_waiting(&socket, &ControlRequest::Scrub, SCRUB_WAIT).with_context(|| {
            format!(
                "the blocktree server did not answer on {}",
                socket.display()
            )
        })?;
    let found = match reply {
        ControlReply::Scrubbed(found) => found,
        ControlReply::Refused(reason) => bail!("scrub failed: {reason}"),
        other => bail!("unexpected answer from the server: {other:?}"),
    };
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "checked": found.checked,
                "corrupt": found.corrupt,
                "repaired": found.repaired,
            })
        );
        return Ok(());
    }
    let mut report = Report::new();
    report
        .field("sectors checked", found.checked)
        .field("corrupt", found.corrupt)
        .field("repaired", found.repaired);
    report.print()
}

fn status(args: &StatusArgs) -> Result<()> {
    let status = match call(&args.data, ControlRequest::ClusterStatus)? {
        ControlReply::Cluster(status) => status,
        other => bail!("unexpected answer from the server: {other:?}"),
    };
    if args.json {
        println!("{}", status_json(&status));
        return Ok(());
    }
    let index = |index: Option<u64>| index.map_or_else(|| "none".to_owned(), |i| i.to_string());
    let mut report = Report::new();
    report
        .field("directory", &status.directory)
        .field("generation", status.generation)
        .field("this member", format!("{} ({})", status.node, status.role))
        .field(
            "leader",
            status
                .leader
                .as_deref()
                .unwrap_or("none known (an election is under way)"),
        )
        .field("term", status.term)
        .field("commit index", index(status.commit_index))
        .field("applied index", index(status.applied_index))
        .field("last log index", index(status.last_log_index));
    for member in &status.members {
        let label = if member.voter { "voter" } else { "learner" };
        let place = if member.address.is_empty() {
            "no network (a one-member cluster)".to_owned()
        } else {
            format!("{} at {}", member.path, member.address)
        };
        let mut marks = Vec::new();
        if status.leader.as_deref() == Some(member.id.as_str()) {
            marks.push("leader");
        }
        if member.id == status.node {
            marks.push("this server");
        }
        let marks = if marks.is_empty() {
            String::new()
        } else {
            format!(" [{}]", marks.join(", "))
        };
        report.field(label, format!("{} {place}{marks}", member.id));
    }
    report.print()
}

/// The status as one JSON object, for scripts.
fn status_json(status: &ClusterEntry) -> serde_json::Value {
    let members: Vec<serde_json::Value> = status
        .members
        .iter()
        .map(|member| {
            serde_json::json!({
                "id": member.id,
                "voter": member.voter,
                "address": member.address,
                "path": member.path,
            })
        })
        .collect();
    serde_json::json!({
        "directory": status.directory,
        "generation": status.generation,
        "node": status.node,
        "role": status.role,
        "leader": status.leader,
        "term": status.term,
        "commit_index": status.commit_index,
        "applied_index": status.applied_index,
        "last_log_index": status.last_log_index,
        "members": members,
    })
}

/// Runs `blocktree leave`: the server in DATA leaves its cluster and stops.
pub fn leave(args: LeaveArgs) -> Result<()> {
    match call(&args.data, ControlRequest::LeaveCluster)? {
        ControlReply::Left => {}
        other => bail!("unexpected answer from the server: {other:?}"),
    }
    let mut report = Report::new();
    report
        .field("data directory", super::absolute(&args.data).display())
        .text(
            "left the cluster: the server is stopping; its copy of the sectors is kept in \
             DATA/sectors.left (no longer updated)",
        );
    report.print()
}

fn node_text(node: u64) -> String {
    format!("{node:016x}")
}

/// The [`ServerControl`] of a running `up`: status and leave on its member,
/// readcap grants on its file system. Leaving stops the server (SIGTERM to
/// itself, the same clean stop as an operator's), and `up` then moves the
/// member's data aside.
pub struct ServiceControl {
    service: Arc<RaftService>,
    fs: Arc<FileSystem>,
    left: AtomicBool,
}

impl ServiceControl {
    /// The control of `service` and the file system `fs` on it.
    pub fn new(service: Arc<RaftService>, fs: Arc<FileSystem>) -> ServiceControl {
        ServiceControl {
            service,
            fs,
            left: AtomicBool::new(false),
        }
    }

    /// True once the member left its cluster.
    pub fn has_left(&self) -> bool {
        self.left.load(Ordering::Acquire)
    }
}

/// The control socket's form of a member's status.
pub fn cluster_entry(status: &ClusterStatus) -> ClusterEntry {
    let member = |voter: bool| {
        move |(id, node): &(u64, blocktree_raftlog::types::MemberNode)| MemberEntry {
            id: node_text(*id),
            voter,
            address: node.addr.clone(),
            path: node
                .path
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
        }
    };
    let mut members: Vec<MemberEntry> = status.voters.iter().map(member(true)).collect();
    members.extend(status.learners.iter().map(member(false)));
    ClusterEntry {
        node: node_text(status.node),
        role: status.role.clone(),
        leader: status.leader.map(node_text),
        term: status.term,
        commit_index: status.commit_index,
        applied_index: status.applied_index,
        last_log_index: status.last_log_index,
        members,
        generation: status.generation,
        directory: status.directory.to_string(),
    }
}

impl ServerControl for ServiceControl {
    fn status(&self) -> Result<ClusterEntry, String> {
        Ok(cluster_entry(&self.service.status()))
    }

    fn scrub(&self) -> Result<ScrubEntry, String> {
        let found = self.service.scrub().map_err(|error| error.to_string())?;
        Ok(ScrubEntry {
            checked: found.sectors_checked,
            corrupt: found.corrupt,
            repaired: found.repaired,
        })
    }

    fn leave(&self) -> Result<(), String> {
        if self.service.local_addr().is_none() {
            return Err(
                "this server is a one-member cluster without network: there is no cluster to \
                 leave"
                    .into(),
            );
        }
        self.service.leave().map_err(|error| error.to_string())?;
        self.left.store(true, Ordering::Release);
        // The same clean stop as an operator's SIGTERM: connections finish,
        // writes are made durable.
        rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::TERM)
            .map_err(|error| format!("left the cluster, but cannot stop: {error}"))
    }

    fn grant_readcap(&self, path: &str, reader: &[u8], uid: u32, gid: u32) -> Result<u64, String> {
        let reader = EncryptionPublicKey::from_sec1(reader)
            .map_err(|error| format!("the reader's key is not a P-256 public key: {error}"))?;
        let caller = Caller {
            uid,
            gid,
            groups: Vec::new(),
        };
        let ino = self
            .fs
            .resolve(&caller, path)
            .map_err(|error| format!("cannot find {path}: {error}"))?;
        self.fs
            .grant_readcap(&caller, ino, &reader)
            .map_err(|error| format!("cannot grant a readcap on {path}: {error}"))?;
        self.fs
            .sync_all()
            .map_err(|error| format!("cannot make the readcap durable: {error}"))?;
        Ok(ino)
    }
}
