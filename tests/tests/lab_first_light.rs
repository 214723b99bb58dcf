//! First light: the `connect4` program from proxy-ebpf, loaded and attached to a lab node's
//! cgroup, rewrites a real connection to a Service address into a connection to a backend.
use std::net::Ipv4Addr;

use anyhow::{Result, ensure};
use aya::maps::HashMap;
use twill_agent::datapath::Datapath;
use twill_common::{
    Backend, MAP_BACKEND_SLOTS, MAP_BACKENDS, MAP_SERVICES, PROTO_TCP, SCOPE_ANY, ServiceKey,
    ServiceValue, SlotKey,
};
use twill_lab::{LabSpec, require};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

#[test]
fn connect4_rewrites_a_service_address_to_a_backend() -> Result<()> {
    let Some(lab) = require(LabSpec::nodes(2))? else {
        return Ok(());
    };
    let (client, server) = (lab.node(0), lab.node(1));
    let mut cmd = server.cmd(twill_lab::bin("labtool"));
    cmd.args(["serve", "--name", "backend-n1", "--tcp", "8080"]);
    lab.track(twill_lab::spawn_and_wait_ready(cmd)?);
    let to = format!("{VIP}:80");

    // Without the program there is no route to the virtual IP.
    let (code, out) = client.labtool(&["tcp", "--to", &to, "--timeout-ms", "500"])?;
    ensure!(
        code != 0,
        "reached {to} before any program was attached: {out}"
    );

    let mut dp = Datapath::load(&twill_agent::datapath::DatapathOptions::unpinned())?;
    dp.attach_cgroup(&client.cgroup)?;
    {
        let mut services: HashMap<_, ServiceKey, ServiceValue> =
            HashMap::try_from(dp.ebpf.map_mut(MAP_SERVICES).expect("services map"))?;
        let key = ServiceKey {
            addr_be: u32::from(VIP).to_be(),
            port_be: 80u16.to_be(),
            proto: PROTO_TCP,
            scope: SCOPE_ANY,
        };
        services.insert(
            key,
            ServiceValue {
                svc_id: 7,
                backend_count: 1,
                flags: 0,
                affinity_timeout_s: 0,
                maglev_size: 0,
            },
            0,
        )?;
    }
    {
        let mut slots: HashMap<_, SlotKey, u32> =
            HashMap::try_from(dp.ebpf.map_mut(MAP_BACKEND_SLOTS).expect("slots map"))?;
        slots.insert(SlotKey { svc_id: 7, slot: 0 }, 42, 0)?;
    }
    {
        let mut backends: HashMap<_, u32, Backend> =
            HashMap::try_from(dp.ebpf.map_mut(MAP_BACKENDS).expect("backends map"))?;
        backends.insert(
            42,
            Backend {
                addr_be: u32::from(server.ip).to_be(),
                port_be: 8080u16.to_be(),
                proto: PROTO_TCP,
                flags: 0,
            },
            0,
        )?;
    }

    let (code, out) = client.labtool(&["tcp", "--to", &to])?;
    ensure!(code == 0, "connect via {to} failed: {out}");
    ensure!(
        out.starts_with("reply=backend-n1 "),
        "unexpected reply: {out}"
    );
    // The server saw the client node's real address: no SNAT.
    ensure!(
        out.contains(&format!("reply=backend-n1 {}:", client.ip)),
        "source not preserved: {out}"
    );

    // A process outside the node's cgroup (another node) is not affected.
    let (code, _) = server.labtool(&["tcp", "--to", &to, "--timeout-ms", "500"])?;
    ensure!(code != 0, "the program leaked outside the node cgroup");
    Ok(())
}
