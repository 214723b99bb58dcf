//! `cargo xtask <command>`: everything a developer or CI runs, each doing its own setup.
mod bench;
mod demo;
mod image;
mod setup;
mod test;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Twill developer commands")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Make this machine ready: nightly rust-src, bpf-linker, bpffs, Debian packages, the
    /// deployment tests' checkers from PyPI.
    Setup,
    /// Build every binary (the eBPF object is built and embedded by twill-agent's build script).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Formatting, clippy (warnings are errors), unit tests and privileged lab tests.
    Test {
        /// Only run tests whose name contains this filter.
        filter: Option<String>,
        /// Skip fmt and clippy.
        #[arg(long)]
        no_lint: bool,
    },
    /// Build the node image localhost/twill:<version> offline (debootstrap base + release
    /// binaries, assembled with buildah) into target/image/twill-<version>.tar.
    Image,
    /// The main job: a multi-node lab with pods and Services, narrated, torn down at the end.
    Demo,
    /// Side-by-side benchmark against kube-proxy-shaped iptables/nftables and the direct path.
    Bench(bench::BenchArgs),
    /// Lab maintenance.
    Lab {
        #[command(subcommand)]
        command: LabCmd,
    },
}

#[derive(Subcommand)]
enum LabCmd {
    /// Remove leftovers of killed lab runs (namespaces twl-*, lab cgroups, bpffs pins, scratch).
    Clean,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Setup => setup::run(),
        Cmd::Build { release } => {
            setup::run()?;
            test::build(release)
        }
        Cmd::Test { filter, no_lint } => test::run(filter.as_deref(), no_lint),
        Cmd::Image => image::run(),
        Cmd::Demo => demo::run(),
        Cmd::Bench(args) => bench::run(&args),
        Cmd::Lab {
            command: LabCmd::Clean,
        } => {
            let removed = twill_lab::clean_leftovers()?;
            if removed.is_empty() {
                println!("lab clean: nothing to remove");
            }
            for r in removed {
                println!("lab clean: removed {r}");
            }
            Ok(())
        }
    }
}
