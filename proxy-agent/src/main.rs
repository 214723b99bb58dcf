//! `twill-agent run | debug | uninstall`.
use std::process::ExitCode;

use clap::Parser;
use twill_agent::config::{Cli, Command};

fn main() -> ExitCode {
    limit_malloc_arenas();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("twill-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// glibc gives each thread that allocates concurrently its own arena (up to 8 per core), and
/// each keeps its freed memory; the agent's threads share a few large, short-lived compile
/// results, so two arenas keep RSS close to what is live at no measurable cost.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt before any thread exists; an unknown option is ignored by glibc.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(args) => {
            let cfg = args.resolve()?;
            twill_agent::run::log_open_file_limit();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(twill_agent::run::run(cfg))?;
        }
        Command::Debug(args) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let out = rt.block_on(twill_agent::debug_cli::run(&args))?;
            print!("{out}");
        }
        Command::Uninstall(args) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let done = rt.block_on(twill_agent::uninstall::uninstall(&args))?;
            if done.cni_conf {
                println!("removed CNI config from {}", args.cni_conf_dir.display());
            }
            for p in &done.pins {
                println!("removed {}", p.display());
            }
            let net = &done.network;
            if net.routes_removed > 0 || net.device_removed {
                println!(
                    "removed {} routes to other nodes{}",
                    net.routes_removed,
                    if net.device_removed {
                        " and the VXLAN device"
                    } else {
                        ""
                    }
                );
            }
            if done.api_socket {
                println!("removed {}", args.api_socket.display());
            }
            if done.nat_ports {
                println!(
                    "released ports {}-{} from net.ipv4.ip_local_reserved_ports",
                    twill_common::MASQ_PORT_MIN,
                    twill_common::MASQ_PORT_MAX
                );
            }
        }
    }
    Ok(())
}
