//! `blocktree`: the storage appliance's one binary.
//!
//! This file sets up the heap ([`heap`]), parses the command line and reports
//! the outcome; each subcommand family lives in its own module under [`cli`].

mod cli;
mod heap;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Blocktree: a global, self-certifying, encrypted file system.
#[derive(Debug, Parser)]
#[command(name = "blocktree", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start the appliance in a data directory, creating a new domain on first start.
    #[command(long_about = cli::up::LONG_ABOUT)]
    Up(cli::up::UpArgs),
    /// Create and inspect credential stores: root and runtime credentials, writecap
    /// requests and approvals, root backups (the original design's btprovision).
    Provision(cli::provision::ProvisionArgs),
    /// Measure the sector engine: throughput and latency like fio, index memory and
    /// start-up time.
    Bench(cli::bench::BenchArgs),
    /// Mount a Blocktree directory through FUSE (btfuse), in the foreground.
    #[command(long_about = cli::mount::LONG_ABOUT)]
    Mount(cli::mount::MountArgs),
    /// Grant readcaps: let another principal read encrypted files.
    Readcap(cli::readcap::ReadcapArgs),
    /// Create, list, resize and delete the volumes `up` exports over NBD.
    Volume(cli::volume::VolumeArgs),
    /// Start a new server as a member of a running server's cluster.
    #[command(long_about = cli::up::JOIN_LONG_ABOUT)]
    Join(cli::up::JoinArgs),
    /// Take the server running in a data directory out of its cluster (it stops).
    Leave(cli::cluster::LeaveArgs),
    /// The running server's cluster: members, leader, term, commit index.
    Cluster(cli::cluster::ClusterArgs),
    /// The bootable appliance image: its init (PID 1) and a check of its configuration.
    #[command(long_about = cli::appliance::LONG_ABOUT)]
    Appliance(cli::appliance::ApplianceArgs),
}

fn main() -> ExitCode {
    heap::tune();
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Up(args) => cli::up::run(args),
        Command::Provision(args) => cli::provision::run(args),
        Command::Bench(args) => cli::bench::run(args),
        Command::Mount(args) => cli::mount::run(args),
        Command::Readcap(args) => cli::readcap::run(args),
        Command::Volume(args) => cli::volume::run(args),
        Command::Join(args) => cli::up::join(args),
        Command::Leave(args) => cli::cluster::leave(args),
        Command::Cluster(args) => cli::cluster::run(args),
        Command::Appliance(args) => cli::appliance::run(args),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line, so scripts and logs can take the last line of stderr as the
            // cause; `{:#}` joins the context chain with ": ".
            let message = format!("{error:#}").replace('\n', " ");
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}
