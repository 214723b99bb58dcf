//! A `twill-agent run` process in a node: started, stopped (SIGTERM, bounded), restarted.
use std::{
    fs,
    path::PathBuf,
    process::{Child, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result};

use crate::{bin, netns_only_command, terminate};

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
        match self.child.take() {
            Some(child) => terminate(child, "the agent", Duration::from_secs(10)),
            None => Ok(()),
        }
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
