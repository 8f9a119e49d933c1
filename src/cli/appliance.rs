//! `blocktree appliance`: the init of the bootable appliance image
//! (`appliance-image/`) and a check of its configuration file.

pub mod config;
pub mod disk;
mod init;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use std::path::PathBuf;

use config::{ApplianceConfig, OVERRIDES};

/// The long `--help` text of `blocktree appliance`.
pub const LONG_ABOUT: &str = "The bootable appliance image (appliance-image/build).

`init` is PID 1 of the image: it mounts the data disk (formatting it on first boot only \
when it is blank), configures the network, creates missing volumes and runs `blocktree up` \
as a supervised service, restarted on failure. `check-config` validates an appliance.toml \
and kernel command line overrides on any machine, as the image will read them.";

/// Arguments of `blocktree appliance`.
#[derive(Debug, Args)]
pub struct ApplianceArgs {
    #[command(subcommand)]
    command: ApplianceCommand,
}

#[derive(Debug, Subcommand)]
enum ApplianceCommand {
    /// Run as PID 1 of the appliance image (its /init runs this).
    Init,
    /// Check an appliance.toml and print the configuration the image would use.
    CheckConfig {
        /// The configuration file (blocktree/appliance.toml on the image's EFI partition).
        file: PathBuf,
        /// A kernel command line whose blocktree.KEY=VALUE parameters override the file.
        #[arg(long, value_name = "CMDLINE", default_value = "")]
        cmdline: String,
    },
}

/// Runs `blocktree appliance`.
pub fn run(args: ApplianceArgs) -> Result<()> {
    match args.command {
        ApplianceCommand::Init => init::run(),
        ApplianceCommand::CheckConfig { file, cmdline } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let mut config = ApplianceConfig::parse(&text, &file.display().to_string())?;
            config.apply_cmdline(&cmdline)?;
            let warnings = config.validate()?;
            for warning in &warnings {
                eprintln!("warning: {warning}");
            }
            let effective = toml::to_string(&config).context("cannot print the configuration")?;
            print!("{effective}");
            println!("# kernel command line overrides (blocktree.KEY=VALUE):");
            for (key, target, value) in OVERRIDES {
                println!("#   blocktree.{key}=<{value}>  sets {target}");
            }
            Ok(())
        }
    }
}
