//! A `twill-agent run` process in a node: started, stopped (SIGTERM, bounded), restarted.
use std::{
    fs,
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{bin, netns_only_command};

/// A `twill-agent run` process in a node.
pub struct Agent {
    pub(crate) child: Option<Child>,
    pub(crate) args: Vec<String>,
    pub(crate) node_netns: String,
    pub(crate) cgroup: PathBuf,
    pub(crate) log: PathBuf,
}

impl Agent {
    pub(crate) fn start(&mut self) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = netns_only_command(&self.node_netns, &self.cgroup, bin("twill-agent"));
        cmd.args(&self.args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.child = Some(cmd.spawn().context("spawning twill-agent")?);
        Ok(())
    }

    /// Stops the agent with SIGTERM (graceful: pinned maps and links stay), then waits; an
    /// agent that ignores SIGTERM for 10 s is killed and reported.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            let pid = i32::try_from(child.id())?;
            // SAFETY: plain kill(2) on our own child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!("the agent did not exit within 10 s of SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(())
    }

    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.start()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// The agent's log so far (for assertions and failure messages).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
