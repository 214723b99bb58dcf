//! `twill-agent debug services|backends|affinity|drops|fastpath|maps|policy|explain|dns|
//! conntrack [-o json]`: asks the running agent over its API socket and prints human tables (or
//! the JSON as served); `debug monitor` follows the denied-flow stream, printing each line as it
//! arrives.
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use crate::api::{AffinityRow, BackendRow, CtRow, DropRow};
use crate::config::{DebugArgs, DebugCommand, OutputFormat};
use crate::policy::monitor::MonitorLine;

#[derive(Debug, thiserror::Error)]
pub enum DebugError {
    #[error(
        "cannot reach the agent at {socket} (is `twill-agent run` running with this --api-socket?)"
    )]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("the agent's answer is not the expected JSON")]
    Decode(#[source] serde_json::Error),
}

fn path_of(what: &DebugCommand, output: OutputFormat) -> String {
    match (what, output) {
        (DebugCommand::Services, _) => "/v1/services".into(),
        (DebugCommand::Backends, _) => "/v1/backends".into(),
        (DebugCommand::Affinity, _) => "/v1/affinity".into(),
        (DebugCommand::Drops, _) => "/v1/drops".into(),
        (DebugCommand::Fastpath, OutputFormat::Table) => "/v1/fastpath?format=text".into(),
        (DebugCommand::Fastpath, OutputFormat::Json) => "/v1/fastpath".into(),
        (DebugCommand::Maps, OutputFormat::Table) => "/v1/maps".into(),
        (DebugCommand::Maps, OutputFormat::Json) => "/v1/maps?format=json".into(),
        (DebugCommand::Policy { pod }, output) => {
            let mut path = format!("/v1/policy?pod={}", pod.as_deref().unwrap_or(""));
            if output == OutputFormat::Table {
                path.push_str("&format=text");
            }
            path
        }
        (DebugCommand::Dns { name, qtype }, _) => format!("/v1/dns?name={name}&type={qtype}"),
        (DebugCommand::Monitor { .. }, _) => "/v1/monitor".into(),
        (DebugCommand::Conntrack { service, backend }, _) => format!(
            "/v1/conntrack?service={}&backend={}",
            service.as_deref().unwrap_or(""),
            backend.map(|b| b.to_string()).unwrap_or_default()
        ),
        (DebugCommand::Explain { from, to, proto }, output) => {
            let mut path = format!("/v1/explain?from={from}&to={to}&proto={proto}");
            if output == OutputFormat::Table {
                path.push_str("&format=text");
            }
            path
        }
    }
}

/// Fetches and renders; the text to print.
pub async fn run(args: &DebugArgs) -> Result<String, DebugError> {
    if let DebugCommand::Monitor { count, duration } = args.what {
        let stop = duration.map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
        monitor(args, count, stop).await?;
        return Ok(String::new());
    }
    let (status, body) = crate::api::get(&args.api_socket, &path_of(&args.what, args.output))
        .await
        .map_err(|source| DebugError::Connect {
            socket: args.api_socket.clone(),
            source,
        })?;
    if status != 200 {
        return Err(DebugError::Status {
            status,
            body: String::from_utf8_lossy(&body).trim().to_owned(),
        });
    }
    render(&args.what, args.output, &body)
}

/// Follows `/v1/monitor`, printing one line per event (table: [`MonitorLine::render`]; json:
/// the line as served) until `count` denied flows were printed, `stop` passed, or the agent
/// closed the stream.
async fn monitor(
    args: &DebugArgs,
    count: Option<u64>,
    stop: Option<tokio::time::Instant>,
) -> Result<(), DebugError> {
    use std::io::Write as _;
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
    let connect = |source| DebugError::Connect {
        socket: args.api_socket.clone(),
        source,
    };
    let mut stream = tokio::net::UnixStream::connect(&args.api_socket)
        .await
        .map_err(connect)?;
    stream
        .write_all(b"GET /v1/monitor HTTP/1.1\r\nHost: twill-agent\r\n\r\n")
        .await
        .map_err(connect)?;
    let mut lines = tokio::io::BufReader::new(stream).lines();
    let follow = async {
        let status = lines
            .next_line()
            .await
            .map_err(connect)?
            .unwrap_or_default();
        if !status.starts_with("HTTP/1.1 200") {
            let mut body = String::new();
            while let Ok(Some(l)) = lines.next_line().await {
                body.push_str(&l);
                body.push(' ');
            }
            return Err(DebugError::Status {
                status: status
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0),
                body: body.trim().to_owned(),
            });
        }
        // The rest of the head.
        while let Some(l) = lines.next_line().await.map_err(connect)? {
            if l.is_empty() {
                break;
            }
        }
        let mut denied = 0;
        while count.is_none_or(|c| denied < c) {
            let Some(l) = lines.next_line().await.map_err(connect)? else {
                break;
            };
            let line: MonitorLine = serde_json::from_str(&l).map_err(DebugError::Decode)?;
            denied += u64::from(matches!(line, MonitorLine::Deny(_)));
            let mut out = std::io::stdout().lock();
            let text = match args.output {
                OutputFormat::Json => l,
                OutputFormat::Table => line.render(),
            };
            // A closed stdout (`| head`) ends the monitor like the agent closing would.
            if writeln!(out, "{text}").and_then(|()| out.flush()).is_err() {
                break;
            }
        }
        Ok(())
    };
    match stop {
        Some(at) => tokio::time::timeout_at(at, follow).await.unwrap_or(Ok(())),
        None => follow.await,
    }
}

/// Renders an API answer.
pub fn render(
    what: &DebugCommand,
    output: OutputFormat,
    body: &[u8],
) -> Result<String, DebugError> {
    if matches!(
        what,
        DebugCommand::Maps
            | DebugCommand::Policy { .. }
            | DebugCommand::Explain { .. }
            | DebugCommand::Fastpath
    ) && output == OutputFormat::Table
    {
        return Ok(String::from_utf8_lossy(body).into_owned());
    }
    if output == OutputFormat::Json {
        let v: Value = serde_json::from_slice(body).map_err(DebugError::Decode)?;
        let mut s = serde_json::to_string_pretty(&v).map_err(DebugError::Decode)?;
        s.push('\n');
        return Ok(s);
    }
    match what {
        DebugCommand::Services => Ok(services_table(
            &serde_json::from_slice::<Vec<Value>>(body).map_err(DebugError::Decode)?,
        )),
        DebugCommand::Backends => Ok(backends_table(
            &serde_json::from_slice::<Vec<BackendRow>>(body).map_err(DebugError::Decode)?,
        )),
        DebugCommand::Affinity => Ok(affinity_table(
            &serde_json::from_slice::<Vec<AffinityRow>>(body).map_err(DebugError::Decode)?,
        )),
        DebugCommand::Drops => Ok(drops_table(
            &serde_json::from_slice::<Vec<DropRow>>(body).map_err(DebugError::Decode)?,
        )),
        DebugCommand::Dns { .. } => {
            let a: Value = serde_json::from_slice(body).map_err(DebugError::Decode)?;
            let mut out = format!("{}\n", a["result"].as_str().unwrap_or_default());
            for r in a["records"].as_array().into_iter().flatten() {
                out.push_str(r.as_str().unwrap_or_default());
                out.push('\n');
            }
            Ok(out)
        }
        DebugCommand::Conntrack { .. } => Ok(conntrack_table(
            &serde_json::from_slice::<Vec<CtRow>>(body).map_err(DebugError::Decode)?,
        )),
        DebugCommand::Maps
        | DebugCommand::Policy { .. }
        | DebugCommand::Explain { .. }
        | DebugCommand::Fastpath => {
            unreachable!("handled above")
        }
        DebugCommand::Monitor { .. } => unreachable!("a stream: `run` follows it, never renders"),
    }
}

fn conntrack_table(rows: &[CtRow]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.scope.clone(),
                r.protocol.clone(),
                r.direction.clone(),
                r.source.clone(),
                r.destination.clone(),
                format!("{} > {}", r.rewritten_source, r.rewritten_destination),
                r.backend.clone().unwrap_or_else(|| "-".into()),
                r.state.clone(),
                format!("{}s", r.idle_s),
                format!("{}s", r.expires_in_s),
            ]
        })
        .collect();
    table(
        &[
            "SCOPE",
            "PROTO",
            "DIR",
            "SOURCE",
            "DESTINATION",
            "REWRITTEN TO",
            "BACKEND",
            "STATE",
            "IDLE",
            "EXPIRES IN",
        ],
        &rows,
    )
}

/// Left-aligned columns separated by two spaces.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, c) in cells.enumerate() {
            let _ = write!(l, "{c:<w$}  ", w = widths[i]);
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut out, &mut header.iter().copied());
    for r in rows {
        line(&mut out, &mut r.iter().map(String::as_str));
    }
    out
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// An address as it is written before `:port`: IPv6 in brackets (RFC 3986 §3.2.2).
fn bracketed(addr: &str) -> String {
    if addr.contains(':') {
        format!("[{addr}]")
    } else {
        addr.to_owned()
    }
}

fn services_table(services: &[Value]) -> String {
    let rows: Vec<Vec<String>> = services
        .iter()
        .map(|sv| {
            let frontends: Vec<String> = sv["frontends"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|f| {
                    let addr = bracketed(f["addr"].as_str().unwrap_or("*"));
                    format!("{addr}:{}/{}", s(&f["port"]), s(&f["protocol"]))
                })
                .collect();
            let endpoints: Vec<String> = sv["endpoints"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| {
                    format!(
                        "{}:{}({})",
                        bracketed(&s(&e["addr"])),
                        s(&e["port"]),
                        s(&e["state"])
                    )
                })
                .collect();
            vec![
                format!("{}/{}", s(&sv["namespace"]), s(&sv["name"])),
                if sv["port_name"].as_str().is_some_and(|p| !p.is_empty()) {
                    s(&sv["port_name"])
                } else {
                    "-".into()
                },
                s(&sv["type"]),
                frontends.join(","),
                endpoints.join(","),
            ]
        })
        .collect();
    table(
        &["SERVICE", "PORT-NAME", "TYPE", "FRONTENDS", "ENDPOINTS"],
        &rows,
    )
}

fn backends_table(rows: &[BackendRow]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|b| {
            vec![
                b.id.to_string(),
                format!(
                    "{}/{}",
                    std::net::SocketAddr::new(b.addr, b.port),
                    b.protocol
                ),
                if b.flags.is_empty() {
                    "-".into()
                } else {
                    b.flags.join(",")
                },
                if b.services.is_empty() {
                    "-".into()
                } else {
                    b.services.join(",")
                },
            ]
        })
        .collect();
    table(&["ID", "BACKEND", "FLAGS", "SERVICES"], &rows)
}

fn affinity_table(rows: &[AffinityRow]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|a| {
            vec![
                a.svc_id.to_string(),
                format!("{:#x}", a.client_id),
                a.backend_id.to_string(),
                a.backend.clone().unwrap_or_else(|| "-".into()),
                format!("{}s", a.idle_s),
            ]
        })
        .collect();
    table(
        &["SVC-ID", "CLIENT", "BACKEND-ID", "BACKEND", "IDLE"],
        &rows,
    )
}

fn drops_table(rows: &[DropRow]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|d| {
            vec![
                d.reason.clone(),
                if d.drop { "drop" } else { "verdict" }.into(),
                d.count.to_string(),
            ]
        })
        .collect();
    table(&["REASON", "KIND", "COUNT"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_render() {
        let body = serde_json::to_vec(&vec![DropRow {
            reason: "no_backends".into(),
            drop: true,
            count: 3,
        }])
        .unwrap();
        let t = render(&DebugCommand::Drops, OutputFormat::Table, &body).unwrap();
        assert_eq!(t, "REASON       KIND  COUNT\nno_backends  drop  3\n");
        let j = render(&DebugCommand::Drops, OutputFormat::Json, &body).unwrap();
        assert!(j.contains("\"count\": 3"));
        let svc = serde_json::json!([{"namespace":"d","name":"web","port_name":"","type":"ClusterIP",
            "frontends":[{"addr":"10.96.0.1","port":80,"protocol":"TCP"}],
            "endpoints":[{"addr":"10.244.1.2","port":8080,"state":"ready"}]}]);
        let t = render(
            &DebugCommand::Services,
            OutputFormat::Table,
            &serde_json::to_vec(&svc).unwrap(),
        )
        .unwrap();
        assert!(
            t.contains("d/web    -          ClusterIP  10.96.0.1:80/TCP  10.244.1.2:8080(ready)"),
            "{t}"
        );
        assert_eq!(
            render(&DebugCommand::Maps, OutputFormat::Table, b"dump\n").unwrap(),
            "dump\n"
        );
        assert!(render(&DebugCommand::Backends, OutputFormat::Table, b"{").is_err());
    }

    #[test]
    fn ipv6_addresses_are_bracketed_before_their_port() {
        let svc = serde_json::json!([{"namespace":"d","name":"web","port_name":"","type":"ClusterIP",
            "family":"IPv6",
            "frontends":[{"addr":"fd00:10:96::a","port":80,"protocol":"TCP"}],
            "endpoints":[{"addr":"fd00:244:1::5","port":8080,"state":"ready"}]}]);
        let t = render(
            &DebugCommand::Services,
            OutputFormat::Table,
            &serde_json::to_vec(&svc).unwrap(),
        )
        .unwrap();
        assert!(
            t.contains("[fd00:10:96::a]:80/TCP  [fd00:244:1::5]:8080(ready)"),
            "{t}"
        );
        let rows = vec![BackendRow {
            id: 7,
            addr: "fd00:244:1::5".parse().unwrap(),
            port: 8080,
            protocol: "UDP".into(),
            flags: vec!["local".into()],
            services: vec!["d/web:dns".into()],
        }];
        let body = serde_json::to_vec(&rows).unwrap();
        let t = render(&DebugCommand::Backends, OutputFormat::Table, &body).unwrap();
        assert!(
            t.contains("7   [fd00:244:1::5]:8080/UDP  local  d/web:dns"),
            "{t}"
        );
        let j = render(&DebugCommand::Backends, OutputFormat::Json, &body).unwrap();
        assert!(j.contains("\"addr\": \"fd00:244:1::5\""), "{j}");
    }
}
