//! The `CNI_*` environment, parsed into a typed request.
//!
//! The environment is injected as a map so the whole plugin runs in-process in
//! tests. Rules follow SPEC.md "Parameters": which variables each verb needs and
//! what a valid container ID and interface name look like.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::path::PathBuf;

/// The CNI verb (`CNI_COMMAND`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Gc,
    Status,
}

impl Command {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "GC" => Command::Gc,
            "STATUS" => Command::Status,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
            Command::Gc => "GC",
            Command::Status => "STATUS",
        }
    }
}

/// What the environment was wrong about; every variant maps to CNI error code 4.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvError {
    #[error("CNI_COMMAND is not set; set it to one of ADD, DEL, CHECK, VERSION, GC, STATUS")]
    MissingCommand,
    #[error("CNI_COMMAND={0:?} is not a CNI verb; use one of ADD, DEL, CHECK, VERSION, GC, STATUS")]
    UnknownCommand(String),
    #[error("{var} must be set for {command}")]
    Missing {
        var: &'static str,
        command: &'static str,
    },
    #[error(
        "CNI_CONTAINERID={0:?} is invalid: it must be non-empty, start with a letter or digit and contain only letters, digits, '_', '.' and '-'"
    )]
    BadContainerId(String),
    #[error(
        "CNI_IFNAME={0:?} is invalid: an interface name is 1-15 bytes without '/', ':' or whitespace and is not '.' or '..'"
    )]
    BadIfName(String),
    #[error("CNI_NETNS={0:?} must be an absolute path to a network namespace")]
    BadNetns(String),
}

/// Container identity of an attachment: the key of every reservation (SPEC.md: attachments
/// are keyed by `CNI_CONTAINERID` and `CNI_IFNAME`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
}

/// The parsed environment for one invocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Add {
        att: Attachment,
        netns: PathBuf,
    },
    Del {
        att: Attachment,
        netns: Option<PathBuf>,
    },
    Check {
        att: Attachment,
        netns: PathBuf,
    },
    Version,
    Gc,
    Status,
}

impl Request {
    pub fn command(&self) -> Command {
        match self {
            Request::Add { .. } => Command::Add,
            Request::Del { .. } => Command::Del,
            Request::Check { .. } => Command::Check,
            Request::Version => Command::Version,
            Request::Gc => Command::Gc,
            Request::Status => Command::Status,
        }
    }
}

/// Parses the environment. Unknown and extra variables are ignored, as runtimes
/// set more than a plugin needs (`CNI_ARGS`, `CNI_PATH`).
pub fn parse<S: BuildHasher>(env: &HashMap<String, String, S>) -> Result<Request, EnvError> {
    let command = match env.get("CNI_COMMAND") {
        None => return Err(EnvError::MissingCommand),
        Some(c) => Command::parse(c).ok_or_else(|| EnvError::UnknownCommand(c.clone()))?,
    };
    let get = |var: &'static str| -> Result<&String, EnvError> {
        env.get(var)
            .filter(|v| !v.is_empty())
            .ok_or(EnvError::Missing {
                var,
                command: command.as_str(),
            })
    };
    let attachment = || -> Result<Attachment, EnvError> {
        Ok(Attachment {
            container_id: container_id(get("CNI_CONTAINERID")?)?,
            ifname: ifname(get("CNI_IFNAME")?)?,
        })
    };
    Ok(match command {
        Command::Add => Request::Add {
            att: attachment()?,
            netns: netns(get("CNI_NETNS")?)?,
        },
        Command::Check => Request::Check {
            att: attachment()?,
            netns: netns(get("CNI_NETNS")?)?,
        },
        // DEL may come after the namespace is gone; runtimes then pass an empty CNI_NETNS.
        Command::Del => Request::Del {
            att: attachment()?,
            netns: match env.get("CNI_NETNS").filter(|v| !v.is_empty()) {
                Some(n) => Some(netns(n)?),
                None => None,
            },
        },
        Command::Version => Request::Version,
        Command::Gc => Request::Gc,
        Command::Status => Request::Status,
    })
}

fn container_id(s: &str) -> Result<String, EnvError> {
    let mut chars = s.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if first_ok && rest_ok {
        Ok(s.to_owned())
    } else {
        Err(EnvError::BadContainerId(s.to_owned()))
    }
}

/// Kernel rule (`dev_valid_name`): < IFNAMSIZ bytes, no '/', ':' or whitespace.
pub fn ifname(s: &str) -> Result<String, EnvError> {
    let ok = !s.is_empty()
        && s.len() <= 15
        && s != "."
        && s != ".."
        && !s.chars().any(|c| c == '/' || c == ':' || c.is_whitespace());
    if ok {
        Ok(s.to_owned())
    } else {
        Err(EnvError::BadIfName(s.to_owned()))
    }
}

fn netns(s: &str) -> Result<PathBuf, EnvError> {
    if s.starts_with('/') {
        Ok(PathBuf::from(s))
    } else {
        Err(EnvError::BadNetns(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn add_needs_id_ifname_and_netns() {
        let e = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
        ]);
        assert_eq!(
            parse(&e),
            Err(EnvError::Missing {
                var: "CNI_NETNS",
                command: "ADD"
            })
        );
        let e = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/run/netns/x"),
        ]);
        assert!(matches!(parse(&e), Ok(Request::Add { .. })));
    }

    #[test]
    fn del_without_netns_is_fine() {
        let e = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", ""),
        ]);
        assert!(matches!(parse(&e), Ok(Request::Del { netns: None, .. })));
    }

    #[test]
    fn rejects_bad_values() {
        assert_eq!(parse(&env(&[])), Err(EnvError::MissingCommand));
        assert!(matches!(
            parse(&env(&[("CNI_COMMAND", "add")])),
            Err(EnvError::UnknownCommand(_))
        ));
        for id in ["-x", "a/b", "a b", "ä"] {
            let e = env(&[
                ("CNI_COMMAND", "DEL"),
                ("CNI_CONTAINERID", id),
                ("CNI_IFNAME", "eth0"),
            ]);
            assert!(
                matches!(parse(&e), Err(EnvError::BadContainerId(_))),
                "{id}"
            );
        }
        for name in ["a/b", "x:1", "0123456789abcdef", ".", "..", "e th"] {
            let e = env(&[
                ("CNI_COMMAND", "DEL"),
                ("CNI_CONTAINERID", "c"),
                ("CNI_IFNAME", name),
            ]);
            assert!(matches!(parse(&e), Err(EnvError::BadIfName(_))), "{name}");
        }
        let e = env(&[
            ("CNI_COMMAND", "CHECK"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "relative"),
        ]);
        assert!(matches!(parse(&e), Err(EnvError::BadNetns(_))));
    }

    #[test]
    fn verbs_without_attachment() {
        for (c, r) in [
            ("VERSION", Request::Version),
            ("GC", Request::Gc),
            ("STATUS", Request::Status),
        ] {
            assert_eq!(parse(&env(&[("CNI_COMMAND", c)])), Ok(r));
        }
    }
}
