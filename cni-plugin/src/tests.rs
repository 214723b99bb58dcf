//! In-process tests of whole invocations: env, stdin and stdout injected, the
//! kernel replaced by [`Fake`]. IPAM runs for real on a temp directory.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::rc::Rc;

use proptest::prelude::*;
use serde_json::{Value, json};

use crate::dataplane::{Dataplane, DataplaneError, LinkState, Observed, PodLinkSpec, host_if_name};
use crate::result::Route;

#[derive(Default)]
struct FakeState {
    /// Host link name → the spec that made it (`None` for a foreign link).
    links: BTreeMap<String, Option<PodLinkSpec>>,
    /// Retired host link name → (pod netns, pod-side name) it still holds.
    retired: BTreeMap<String, (String, String)>,
    /// Host link name → the pod netns its peer was made in.
    netns_of: BTreeMap<String, String>,
    next_index: u32,
    fail_create: bool,
    /// `(ip_forward, IPv6 forwarding)` as the plugin left them.
    forwarding: (bool, bool),
    /// Tamper knobs for CHECK tests.
    mtu_override: Option<u32>,
    drop_neigh6: bool,
}

#[derive(Clone, Default)]
struct Fake(Rc<RefCell<FakeState>>);

impl Dataplane for Fake {
    type Netns = String;

    fn open_netns(&mut self, path: &Path) -> Result<String, DataplaneError> {
        if path.starts_with("/run/netns") {
            Ok(path.to_string_lossy().into_owned())
        } else {
            Err(DataplaneError::Netns {
                path: path.to_owned(),
                source: std::io::Error::from_raw_os_error(libc::ENOENT),
            })
        }
    }

    fn enable_forwarding(&mut self, ipv4: bool, ipv6: bool) -> Result<(), DataplaneError> {
        let mut s = self.0.borrow_mut();
        s.forwarding.0 |= ipv4;
        s.forwarding.1 |= ipv6;
        Ok(())
    }

    fn create(&mut self, ns: &String, spec: &PodLinkSpec) -> Result<(), DataplaneError> {
        let mut s = self.0.borrow_mut();
        if s.fail_create {
            return Err(DataplaneError::Netlink {
                op: "create veth".into(),
                source: std::io::Error::from_raw_os_error(libc::ENOMEM),
            });
        }
        let pod_end_taken = s
            .retired
            .values()
            .any(|(n, pod_if)| n == ns && *pod_if == spec.pod_if);
        if s.links.contains_key(&spec.host_if) || pod_end_taken {
            return Err(DataplaneError::LinkExists {
                host_if: spec.host_if.clone(),
                pod_if: spec.pod_if.clone(),
            });
        }
        s.links.insert(spec.host_if.clone(), Some(spec.clone()));
        s.netns_of.insert(spec.host_if.clone(), ns.clone());
        Ok(())
    }

    fn retire_host_link(&mut self, name: &str) -> Result<bool, DataplaneError> {
        let mut s = self.0.borrow_mut();
        let Some(spec) = s.links.remove(name) else {
            return Ok(false);
        };
        s.next_index += 1;
        let tomb = crate::dataplane::retired_if_name(s.next_index);
        let ns = s.netns_of.remove(name).unwrap_or_default();
        let pod_if = spec.map(|p| p.pod_if).unwrap_or_default();
        s.retired.insert(tomb, (ns, pod_if));
        Ok(true)
    }

    fn delete_retired_links(&mut self) -> Result<usize, DataplaneError> {
        let mut s = self.0.borrow_mut();
        let n = s.retired.len();
        s.retired.clear();
        Ok(n)
    }

    fn delete_host_link(&mut self, name: &str) -> Result<bool, DataplaneError> {
        Ok(self.0.borrow_mut().links.remove(name).is_some())
    }

    fn list_host_links(&mut self) -> Result<Vec<String>, DataplaneError> {
        Ok(self
            .0
            .borrow()
            .links
            .keys()
            .filter(|n| crate::dataplane::is_host_if_name(n))
            .cloned()
            .collect())
    }

    fn observe(
        &mut self,
        _ns: &String,
        host_if: &str,
        _pod_if: &str,
    ) -> Result<Observed, DataplaneError> {
        let s = self.0.borrow();
        let Some(Some(spec)) = s.links.get(host_if) else {
            return Ok(Observed::default());
        };
        let mtu = s.mtu_override.unwrap_or(spec.mtu);
        let mut o = Observed {
            host_link: Some(LinkState {
                mtu: spec.mtu,
                up: true,
                mac: spec.host_mac,
                is_veth: true,
            }),
            pod_link: Some(LinkState {
                mtu,
                up: true,
                mac: spec.pod_mac,
                is_veth: true,
            }),
            ..Observed::default()
        };
        if let Some(ip) = spec.pod_ip4 {
            let net = format!("{ip}/32").parse().unwrap();
            o.host_routes.push(net);
            o.pod_addrs.push(net);
            o.pod_routes.push(Route {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: Some(spec.gateway.into()),
            });
            o.pod_neighs.push((spec.gateway.into(), spec.host_mac));
        }
        if let Some(ip) = spec.pod_ip6 {
            let net = format!("{ip}/128").parse().unwrap();
            o.host_routes.push(net);
            o.pod_addrs.push(net);
            o.host_addrs
                .push(format!("{}/64", spec.gateway6).parse().unwrap());
            o.pod_routes.push(Route {
                dst: "::/0".parse().unwrap(),
                gw: Some(spec.gateway6.into()),
            });
            if !s.drop_neigh6 {
                o.pod_neighs.push((spec.gateway6.into(), spec.host_mac));
            }
        }
        Ok(o)
    }
}

struct Harness {
    dir: tempfile::TempDir,
    fake: Fake,
}

struct Out {
    rc: i32,
    stdout: String,
}

impl Out {
    fn json(&self) -> Value {
        assert_eq!(
            self.stdout.lines().count(),
            1,
            "exactly one JSON document: {:?}",
            self.stdout
        );
        serde_json::from_str(&self.stdout).unwrap()
    }
    fn code(&self) -> u64 {
        assert_eq!(self.rc, 1, "expected an error, got {}", self.stdout);
        let v = self.json();
        assert!(v["msg"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        v["code"].as_u64().unwrap()
    }
}

impl Harness {
    fn new() -> Self {
        Harness {
            dir: tempfile::tempdir().unwrap(),
            fake: Fake::default(),
        }
    }

    fn conf(&self, version: &str, cidr: &str) -> Value {
        self.conf_cidrs(version, &[cidr])
    }

    fn conf_cidrs(&self, version: &str, cidrs: &[&str]) -> Value {
        json!({"cniVersion": version, "name": "twill", "type": "twill-cni", "podCIDRs": cidrs,
               "stateDir": self.dir.path().join("state"), "logFile": self.dir.path().join("log"), "logLevel": "debug"})
    }

    fn invoke(&self, cmd: &str, id: &str, stdin: &Value) -> Out {
        let mut env: HashMap<String, String> = HashMap::new();
        env.insert("CNI_COMMAND".into(), cmd.into());
        env.insert("CNI_CONTAINERID".into(), id.into());
        env.insert("CNI_IFNAME".into(), "eth0".into());
        env.insert("CNI_NETNS".into(), format!("/run/netns/{id}"));
        env.insert("CNI_PATH".into(), "/opt/cni/bin".into());
        self.raw(&env, stdin.to_string().as_bytes())
    }

    fn raw(&self, env: &HashMap<String, String>, stdin: &[u8]) -> Out {
        let mut stdout = Vec::new();
        let fake = self.fake.clone();
        let rc = crate::run(env, stdin, &mut stdout, move || Ok(fake));
        Out {
            rc,
            stdout: String::from_utf8(stdout).unwrap(),
        }
    }

    fn reservations(&self) -> Vec<String> {
        let dir = self.dir.path().join("state/ipam/twill");
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    fn links(&self) -> Vec<String> {
        self.fake.0.borrow().links.keys().cloned().collect()
    }
}

fn with_prev(mut conf: Value, prev: Value) -> Value {
    conf["prevResult"] = prev;
    conf
}

#[test]
fn version_lists_everything() {
    let h = Harness::new();
    let out = h.raw(
        &HashMap::from([("CNI_COMMAND".into(), "VERSION".into())]),
        b"",
    );
    assert_eq!(out.rc, 0);
    assert_eq!(
        out.json(),
        json!({"cniVersion": "1.1.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]})
    );
    let out = h.raw(
        &HashMap::from([("CNI_COMMAND".into(), "VERSION".into())]),
        br#"{"cniVersion":"0.4.0"}"#,
    );
    assert_eq!(out.json()["cniVersion"], "0.4.0");
}

#[test]
fn add_then_del_round_trip() {
    let h = Harness::new();
    let conf = h.conf("1.0.0", "10.244.1.0/24");
    let out = h.invoke("ADD", "c1", &conf);
    assert_eq!(out.rc, 0, "{}", out.stdout);
    let r = out.json();
    assert_eq!(r["cniVersion"], "1.0.0");
    assert_eq!(r["ips"][0]["address"], "10.244.1.1/32");
    assert_eq!(r["ips"][0]["gateway"], "169.254.1.1");
    assert_eq!(r["interfaces"][0]["name"], host_if_name("c1"));
    assert_eq!(r["interfaces"][1]["sandbox"], "/run/netns/c1");
    assert!(h.fake.0.borrow().forwarding.0);
    assert_eq!(h.reservations(), ["10.244.1.1"]);
    assert_eq!(h.links(), [host_if_name("c1")]);
    let log = std::fs::read_to_string(h.dir.path().join("log")).unwrap();
    assert!(log.contains("ADD ok container=c1"), "{log}");

    let out = h.invoke("DEL", "c1", &with_prev(conf.clone(), r));
    assert_eq!((out.rc, out.stdout.as_str()), (0, ""));
    assert!(h.reservations().is_empty() && h.links().is_empty());
    let log = std::fs::read_to_string(h.dir.path().join("log")).unwrap();
    assert!(
        log.contains(&format!(
            "link {} retired, released [10.244.1.1]",
            host_if_name("c1")
        )),
        "{log}"
    );
    assert_eq!(
        h.fake.0.borrow().retired.len(),
        1,
        "retired, not yet reaped"
    );
    // Idempotent: again, and for a container never seen.
    assert_eq!(h.invoke("DEL", "c1", &conf).rc, 0);
    assert_eq!(h.invoke("DEL", "never-seen", &conf).rc, 0);
    assert_eq!(h.fake.0.borrow().retired.len(), 1);
}

#[test]
fn add_right_after_del_in_the_same_netns_deletes_the_retired_link() {
    // The pod end of a retired link keeps CNI_IFNAME in the pod namespace until its
    // reaper runs; an immediate re-ADD (a runtime restarting the container in the same
    // namespace) must not fail on that.
    let h = Harness::new();
    let conf = h.conf("1.0.0", "10.244.1.0/24");
    assert_eq!(h.invoke("ADD", "c1", &conf).rc, 0);
    assert_eq!(h.invoke("DEL", "c1", &conf).rc, 0);
    assert_eq!(h.fake.0.borrow().retired.len(), 1);
    let out = h.invoke("ADD", "c1", &conf);
    assert_eq!(out.rc, 0, "{}", out.stdout);
    assert!(h.fake.0.borrow().retired.is_empty());
    assert_eq!(h.links(), [host_if_name("c1")]);
    // A real conflict is still reported: a second ADD without DEL.
    assert_eq!(h.invoke("ADD", "c1", &conf).code(), 102);
    assert_eq!(
        h.reservations(),
        ["10.244.1.2"],
        "the failed ADD gave its address back"
    );
}

#[test]
fn del_without_netns_succeeds() {
    let h = Harness::new();
    let conf = h.conf("1.0.0", "10.244.1.0/24");
    assert_eq!(h.invoke("ADD", "c1", &conf).rc, 0);
    let env = HashMap::from([
        ("CNI_COMMAND".to_owned(), "DEL".to_owned()),
        ("CNI_CONTAINERID".to_owned(), "c1".to_owned()),
        ("CNI_IFNAME".to_owned(), "eth0".to_owned()),
    ]);
    assert_eq!(h.raw(&env, conf.to_string().as_bytes()).rc, 0);
    assert!(h.reservations().is_empty());
}

#[test]
fn results_follow_the_config_version() {
    for v in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        let h = Harness::new();
        let r = h.invoke("ADD", "c", &h.conf(v, "10.244.1.0/24")).json();
        assert_eq!(r["cniVersion"], v);
        assert_eq!(
            r["ips"][0].get("version").is_some(),
            v.starts_with("0."),
            "{v}"
        );
        assert_eq!(r["interfaces"][1].get("mtu").is_some(), v == "1.1.0", "{v}");
    }
}

#[test]
fn failed_add_rolls_back_the_reservation() {
    let h = Harness::new();
    h.fake.0.borrow_mut().fail_create = true;
    let out = h.invoke("ADD", "c1", &h.conf("1.0.0", "10.244.1.0/24"));
    assert_eq!(out.code(), 101);
    assert!(out.json()["msg"].as_str().unwrap().contains("create veth"));
    assert!(h.reservations().is_empty());
}

#[test]
fn bad_netns_reserves_nothing() {
    let h = Harness::new();
    let mut env = HashMap::new();
    for (k, v) in [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c1"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_NETNS", "/proc/nope"),
    ] {
        env.insert(k.to_owned(), v.to_owned());
    }
    let out = h.raw(
        &env,
        h.conf("1.0.0", "10.244.1.0/24").to_string().as_bytes(),
    );
    assert_eq!(out.code(), 4);
    assert!(out.json()["msg"].as_str().unwrap().contains("CNI_NETNS"));
    assert!(h.reservations().is_empty());
}

#[test]
fn repeated_add_for_a_live_container_fails_without_leaking() {
    let h = Harness::new();
    let conf = h.conf("1.0.0", "10.244.1.0/24");
    assert_eq!(h.invoke("ADD", "c1", &conf).rc, 0);
    assert_eq!(h.invoke("ADD", "c1", &conf).code(), 102);
    assert_eq!(h.reservations(), ["10.244.1.1"]);
}

#[test]
fn exhaustion_is_a_clear_error() {
    let h = Harness::new();
    let conf = h.conf("1.0.0", "10.244.1.0/30");
    assert_eq!(h.invoke("ADD", "a", &conf).rc, 0);
    assert_eq!(h.invoke("ADD", "b", &conf).rc, 0);
    let out = h.invoke("ADD", "c", &conf);
    assert_eq!(out.code(), 100);
    assert!(
        out.json()["msg"]
            .as_str()
            .unwrap()
            .contains("10.244.1.0/30")
    );
    assert_eq!(h.links().len(), 2);
    assert_eq!(h.reservations().len(), 2);
    // STATUS agrees.
    let mut st = h.conf("1.1.0", "10.244.1.0/30");
    assert_eq!(h.invoke("STATUS", "x", &st).code(), 50);
    st["podCIDRs"] = json!(["10.244.1.0/29"]);
    let out = h.invoke("STATUS", "x", &st);
    assert_eq!((out.rc, out.stdout.as_str()), (0, ""));
}

#[test]
fn gc_releases_everything_not_valid() {
    let h = Harness::new();
    let conf = h.conf("1.1.0", "10.244.1.0/24");
    for c in ["c1", "c2", "c3"] {
        assert_eq!(h.invoke("ADD", c, &conf).rc, 0);
    }
    // A host veth whose ADD was killed before IPAM recorded it, and a foreign link.
    h.fake
        .0
        .borrow_mut()
        .links
        .insert(host_if_name("orphan"), None);
    h.fake.0.borrow_mut().links.insert("eth0".into(), None);
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "c2", "ifname": "eth0"}]);
    // A link a DEL retired whose reaper never ran.
    assert_eq!(h.invoke("DEL", "c3", &conf).rc, 0);
    assert_eq!(h.fake.0.borrow().retired.len(), 1);
    let out = h.invoke("GC", "-", &gc);
    assert_eq!((out.rc, out.stdout.as_str()), (0, ""));
    assert!(h.fake.0.borrow().retired.is_empty());
    let mut want = vec![host_if_name("c2"), "eth0".to_owned()];
    want.sort();
    assert_eq!(h.links(), want);
    assert_eq!(h.reservations(), ["10.244.1.2"]);

    let mut old = h.conf("1.0.0", "10.244.1.0/24");
    old["cni.dev/valid-attachments"] = json!([]);
    assert_eq!(h.invoke("GC", "-", &old).code(), 1);
    assert_eq!(h.invoke("GC", "-", &conf).code(), 7);
}

#[test]
fn check_compares_against_prev_result() {
    let h = Harness::new();
    let conf = h.conf("1.0.0", "10.244.1.0/24");
    let r = h.invoke("ADD", "c1", &conf).json();
    let out = h.invoke("CHECK", "c1", &with_prev(conf.clone(), r.clone()));
    assert_eq!((out.rc, out.stdout.as_str()), (0, ""));
    h.fake.0.borrow_mut().mtu_override = Some(9000);
    let out = h.invoke("CHECK", "c1", &with_prev(conf.clone(), r.clone()));
    assert_eq!(out.code(), 104);
    assert!(
        out.json()["msg"].as_str().unwrap().contains("MTU 9000"),
        "{}",
        out.stdout
    );
    assert_eq!(h.invoke("CHECK", "c1", &conf).code(), 7);
    assert_eq!(
        h.invoke("CHECK", "zz", &with_prev(conf.clone(), r.clone()))
            .code(),
        3
    );
    let old = with_prev(h.conf("0.3.1", "10.244.1.0/24"), r);
    assert_eq!(h.invoke("CHECK", "c1", &old).code(), 1);
}

#[test]
fn input_errors_have_spec_codes() {
    let h = Harness::new();
    assert_eq!(h.raw(&HashMap::new(), b"{}").code(), 4);
    let env = HashMap::from([
        ("CNI_COMMAND".to_owned(), "DEL".to_owned()),
        ("CNI_CONTAINERID".to_owned(), "c".to_owned()),
        ("CNI_IFNAME".to_owned(), "eth0".to_owned()),
    ]);
    assert_eq!(h.raw(&env, b"not json").code(), 6);
    assert_eq!(h.raw(&env, b"").code(), 6);
    let mut c = h.conf("0.4.0", "10.244.1.0/24");
    c["mtu"] = json!(10);
    let out = h.raw(&env, c.to_string().as_bytes());
    assert_eq!(out.code(), 7);
    // Errors are encoded in the version the config asked for.
    assert_eq!(out.json()["cniVersion"], "0.4.0");
    c["cniVersion"] = json!("9.9.9");
    assert_eq!(h.raw(&env, c.to_string().as_bytes()).code(), 1);
}

#[test]
fn a_lock_held_too_long_is_try_again_later_and_reserves_nothing() {
    let h = Harness::new();
    let conf = h.conf("1.1.0", "10.244.1.0/24");
    // Another invocation (here: the test) holds the store lock past the bound.
    let ipam = crate::ipam::Ipam::new(&h.dir.path().join("state"), "twill");
    let held = ipam.lock().unwrap();
    let t0 = std::time::Instant::now();
    let out = h.invoke("ADD", "c1", &conf);
    assert!(t0.elapsed() >= crate::ipam::LOCK_WAIT);
    assert_eq!(out.code(), 11);
    let msg = out.json()["msg"].as_str().unwrap().to_owned();
    assert!(msg.contains("try again later"), "{msg}");
    assert!(h.reservations().is_empty() && h.links().is_empty());
    drop(held);
    // Once released, the same ADD goes through.
    assert_eq!(h.invoke("ADD", "c1", &conf).rc, 0);
    assert_eq!(h.reservations(), ["10.244.1.1"]);
}

#[test]
fn status_needs_1_1_0() {
    let h = Harness::new();
    assert_eq!(
        h.invoke("STATUS", "x", &h.conf("1.0.0", "10.244.1.0/24"))
            .code(),
        1
    );
}

/// Arbitrary JSON values mixing the right and the wrong types for each key.
fn field() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        any::<bool>().prop_map(Value::from),
        ".{0,24}".prop_map(Value::from),
        prop::sample::select(vec![
            "1.0.0",
            "1.1.0",
            "0.3.1",
            "0.2.0",
            "10.244.1.0/24",
            "10.244.1.0/30",
            "10.244.1.5/24",
            "fd00::/64",
            "169.254.1.1",
            "255.255.255.255",
            "twill",
            "info",
            "debug",
            "../x",
        ])
        .prop_map(Value::from),
        prop::collection::vec(".{0,20}".prop_map(Value::from), 0..3).prop_map(Value::from),
        prop::collection::vec(
            prop::sample::select(vec!["10.244.1.0/24", "10.0.0.0/8", "x", "10.244.1.0/31"]),
            0..3
        )
        .prop_map(|v| json!(v)),
    ]
}

fn config_strategy() -> impl Strategy<Value = Value> {
    let keys = [
        "cniVersion",
        "name",
        "type",
        "podCIDRs",
        "mtu",
        "gateway",
        "logLevel",
        "ipam",
        "prevResult",
        "cni.dev/valid-attachments",
    ];
    prop::collection::vec((prop::sample::select(keys.to_vec()), field()), 0..10).prop_map(|kv| {
        let mut m = serde_json::Map::new();
        for (k, v) in kv {
            m.insert(k.to_owned(), v);
        }
        Value::Object(m)
    })
}

fn env_strategy() -> impl Strategy<Value = HashMap<String, String>> {
    let cmd = prop_oneof![
        prop::sample::select(vec!["ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS"])
            .prop_map(str::to_owned),
        ".{0,8}",
    ];
    (
        prop::option::of(cmd),
        prop::option::of(prop_oneof![Just("c1".to_owned()), ".{0,12}"]),
        prop::option::of(prop_oneof![Just("eth0".to_owned()), ".{0,17}"]),
        prop::option::of(prop_oneof![
            Just("/run/netns/p".to_owned()),
            Just("/nope".to_owned()),
            ".{0,10}"
        ]),
    )
        .prop_map(|(c, id, ifn, ns)| {
            let mut m = HashMap::new();
            for (k, v) in [
                ("CNI_COMMAND", c),
                ("CNI_CONTAINERID", id),
                ("CNI_IFNAME", ifn),
                ("CNI_NETNS", ns),
            ] {
                if let Some(v) = v {
                    m.insert(k.to_owned(), v);
                }
            }
            m
        })
}

/// Every outcome is either success (nothing or one JSON document on stdout) or
/// exit 1 with one error object carrying an integer code and a message.
fn assert_protocol(out: &Out) {
    if out.rc == 0 {
        if !out.stdout.is_empty() {
            let _ = out.json();
        }
    } else {
        assert_eq!(out.rc, 1);
        let v = out.json();
        assert!(v["code"].is_u64(), "{v}");
        assert!(v["msg"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        assert!(v["cniVersion"].is_string(), "{v}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(env in env_strategy(), stdin in prop::collection::vec(any::<u8>(), 0..256)) {
        let h = Harness::new();
        assert_protocol(&h.raw(&env, &stdin));
    }

    #[test]
    fn arbitrary_configs_never_panic(env in env_strategy(), conf in config_strategy()) {
        let h = Harness::new();
        let mut conf = conf;
        // Keep every file the plugin might touch inside the test's temp directory.
        conf["stateDir"] = json!(h.dir.path().join("state"));
        conf["logFile"] = json!(h.dir.path().join("log"));
        assert_protocol(&h.raw(&env, conf.to_string().as_bytes()));
    }
}

/// DEL frees by container ID and interface name: a DEL for another interface of the same
/// container (one this network never attached) leaves the container's link and address.
#[test]
fn del_frees_only_the_attachment_it_names() {
    let h = Harness::new();
    let conf = h.conf("1.1.0", "10.244.1.0/24");
    assert_eq!(h.invoke("ADD", "c1", &conf).rc, 0);
    let mut env: HashMap<String, String> = HashMap::new();
    for (k, v) in [
        ("CNI_COMMAND", "DEL"),
        ("CNI_CONTAINERID", "c1"),
        ("CNI_IFNAME", "net1"),
        ("CNI_NETNS", "/run/netns/c1"),
        ("CNI_PATH", "/opt/cni/bin"),
    ] {
        env.insert(k.into(), v.into());
    }
    let out = h.raw(&env, conf.to_string().as_bytes());
    assert_eq!((out.rc, out.stdout.as_str()), (0, ""));
    assert_eq!(h.links(), [host_if_name("c1")]);
    assert_eq!(h.reservations().len(), 1);
    assert!(h.fake.0.borrow().retired.is_empty());

    assert_eq!(h.invoke("DEL", "c1", &conf).rc, 0);
    assert!(h.links().is_empty());
    assert!(h.reservations().is_empty());
}

/// GC of one network leaves the attachments of another Twill network on the node (its
/// addresses and host links), and a DEL of one network leaves the other's link.
#[test]
fn gc_and_del_touch_only_their_own_network() {
    let h = Harness::new();
    let conf = h.conf("1.1.0", "10.244.1.0/24");
    let mut other = h.conf("1.1.0", "10.245.1.0/24");
    other["name"] = json!("other");
    assert_eq!(h.invoke("ADD", "mine", &conf).rc, 0);
    assert_eq!(h.invoke("ADD", "theirs", &other).rc, 0);

    // DEL of the container through the network it never joined.
    assert_eq!(h.invoke("DEL", "theirs", &conf).rc, 0);
    assert!(h.links().contains(&host_if_name("theirs")));

    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([]);
    let out = h.invoke("GC", "-", &gc);
    assert_eq!((out.rc, out.stdout.as_str()), (0, ""));
    assert_eq!(h.links(), [host_if_name("theirs")]);
    assert!(h.reservations().is_empty());
    let other_store: Vec<_> = std::fs::read_dir(h.dir.path().join("state/ipam/other"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("10."))
        .collect();
    assert_eq!(other_store.len(), 1, "{other_store:?}");
}

/// "[Feature:IPv6DualStack] should create pod, add ipv6 and ipv4 ip to pod ips": a
/// dual-stack network gives the pod one address per family, primary first, in every
/// result version; CHECK, DEL and GC cover both.
#[test]
fn dual_stack_add_check_del_gc() {
    for v in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        let h = Harness::new();
        let conf = h.conf_cidrs(v, &["10.244.1.0/24", "fd00:10:244:1::/64"]);
        let out = h.invoke("ADD", "c1", &conf);
        assert_eq!(out.rc, 0, "{}", out.stdout);
        let r = out.json();
        assert_eq!(r["ips"][0]["address"], "10.244.1.1/32", "{v}");
        assert_eq!(r["ips"][0]["gateway"], "169.254.1.1");
        assert_eq!(r["ips"][1]["address"], "fd00:10:244:1::1/128", "{v}");
        assert_eq!(r["ips"][1]["gateway"], "fe80::1");
        assert_eq!(r["ips"][1]["interface"], 1);
        // 0.3.x and 0.4.0 name each address's family (SPEC 0.4.0 "ips[].version").
        if v.starts_with("0.") {
            assert_eq!(r["ips"][0]["version"], "4");
            assert_eq!(r["ips"][1]["version"], "6");
        } else {
            assert!(r["ips"][1].get("version").is_none());
        }
        assert_eq!(
            r["routes"],
            json!([{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}, {"dst": "::/0", "gw": "fe80::1"}])
        );
        {
            let s = h.fake.0.borrow();
            assert_eq!(s.forwarding, (true, true));
            let spec = s.links[&host_if_name("c1")].clone().unwrap();
            assert_eq!(spec.pod_ip4, Some("10.244.1.1".parse().unwrap()));
            assert_eq!(spec.pod_ip6, Some("fd00:10:244:1::1".parse().unwrap()));
        }
        assert_eq!(h.reservations(), ["10.244.1.1", "fd00:10:244:1::1"]);
        if v != "0.3.0" && v != "0.3.1" {
            let out = h.invoke("CHECK", "c1", &with_prev(conf.clone(), r.clone()));
            assert_eq!((out.rc, out.stdout.as_str()), (0, ""), "{v}");
            h.fake.0.borrow_mut().drop_neigh6 = true;
            let out = h.invoke("CHECK", "c1", &with_prev(conf.clone(), r.clone()));
            assert_eq!(out.code(), 104);
            assert!(
                out.json()["msg"].as_str().unwrap().contains("fe80::1"),
                "{}",
                out.stdout
            );
            h.fake.0.borrow_mut().drop_neigh6 = false;
        }
        assert_eq!(h.invoke("DEL", "c1", &with_prev(conf.clone(), r)).rc, 0);
        assert!(h.reservations().is_empty(), "{v}");
    }
    // GC releases both families of attachments the runtime no longer knows.
    let h = Harness::new();
    let conf = h.conf_cidrs("1.1.0", &["fd00:10:244:1::/64", "10.244.1.0/24"]);
    for c in ["a", "b"] {
        assert_eq!(h.invoke("ADD", c, &conf).rc, 0);
    }
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "b", "ifname": "eth0"}]);
    assert_eq!(h.invoke("GC", "-", &gc).rc, 0);
    assert_eq!(h.reservations(), ["10.244.1.2", "fd00:10:244:1::2"]);
    assert_eq!(h.links(), [host_if_name("b")]);
}

/// IPv6 first and IPv6 only: the primary family leads the result, and a network with no
/// IPv4 range configures no IPv4 at all.
#[test]
fn ipv6_primary_and_ipv6_only() {
    let h = Harness::new();
    let r = h
        .invoke(
            "ADD",
            "c1",
            &h.conf_cidrs("1.0.0", &["fd00::/120", "10.244.1.0/24"]),
        )
        .json();
    assert_eq!(r["ips"][0]["address"], "fd00::1/128");
    assert_eq!(r["ips"][1]["address"], "10.244.1.1/32");
    assert_eq!(r["routes"][0]["dst"], "::/0");

    let h = Harness::new();
    let conf = h.conf_cidrs("1.1.0", &["fd00::/126"]);
    let r = h.invoke("ADD", "c1", &conf).json();
    assert_eq!(r["ips"].as_array().unwrap().len(), 1);
    assert_eq!(r["ips"][0]["address"], "fd00::1/128");
    assert_eq!(r["routes"], json!([{"dst": "::/0", "gw": "fe80::1"}]));
    {
        let s = h.fake.0.borrow();
        assert_eq!(s.forwarding, (false, true));
        assert_eq!(s.links[&host_if_name("c1")].as_ref().unwrap().pod_ip4, None);
    }
    let out = h.invoke("CHECK", "c1", &with_prev(conf.clone(), r));
    assert_eq!((out.rc, out.stdout.as_str()), (0, ""));
    // A /126 has three addresses: the fourth ADD is refused, as is STATUS once full.
    assert_eq!(h.invoke("ADD", "c2", &conf).rc, 0);
    assert_eq!(h.invoke("STATUS", "-", &conf).rc, 0);
    assert_eq!(h.invoke("ADD", "c3", &conf).rc, 0);
    assert_eq!(h.invoke("STATUS", "-", &conf).code(), 50);
    let out = h.invoke("ADD", "c4", &conf);
    assert_eq!(out.code(), 100);
    assert!(out.json()["msg"].as_str().unwrap().contains("fd00::/126"));
}

/// When one family is exhausted the ADD fails whole: the other family's address is
/// given back and no link is made.
#[test]
fn dual_stack_exhaustion_leaks_nothing() {
    let h = Harness::new();
    let conf = h.conf_cidrs("1.1.0", &["10.244.1.0/24", "fd00::/126"]);
    for c in ["a", "b", "c"] {
        assert_eq!(h.invoke("ADD", c, &conf).rc, 0);
    }
    assert_eq!(h.invoke("STATUS", "-", &conf).code(), 50);
    let out = h.invoke("ADD", "d", &conf);
    assert_eq!(out.code(), 100);
    assert_eq!(h.reservations().len(), 6);
    assert_eq!(h.links().len(), 3);
    // A failed link setup gives both addresses back.
    assert_eq!(h.invoke("DEL", "c", &conf).rc, 0);
    h.fake.0.borrow_mut().fail_create = true;
    assert_eq!(h.invoke("ADD", "e", &conf).code(), 101);
    assert_eq!(h.reservations().len(), 4);
}

#[test]
fn add_result_carries_the_cluster_dns_search_list_for_the_pods_namespace() {
    let h = Harness::new();
    let mut conf = h.conf("1.0.0", "10.244.1.0/24");
    conf["dns"] = json!({"nameservers": ["169.254.20.10"], "domain": "cluster.local", "options": ["ndots:5"]});
    let mut env: HashMap<String, String> = HashMap::new();
    env.insert("CNI_COMMAND".into(), "ADD".into());
    env.insert("CNI_CONTAINERID".into(), "c1".into());
    env.insert("CNI_IFNAME".into(), "eth0".into());
    env.insert("CNI_NETNS".into(), "/run/netns/c1".into());
    env.insert("CNI_PATH".into(), "/opt/cni/bin".into());
    env.insert(
        "CNI_ARGS".into(),
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=web-0".into(),
    );
    let out = h.raw(&env, conf.to_string().as_bytes());
    assert_eq!(out.rc, 0, "{}", out.stdout);
    assert_eq!(
        out.json()["dns"],
        json!({
            "nameservers": ["169.254.20.10"],
            "domain": "cluster.local",
            "search": ["demo.svc.cluster.local", "svc.cluster.local", "cluster.local"],
            "options": ["ndots:5"],
        })
    );
    // The result round-trips as a prevResult (CHECK decodes it).
    let r = out.json();
    assert_eq!(h.invoke("CHECK", "c1", &with_prev(conf.clone(), r)).rc, 0);
    // Without a dns key the section stays empty.
    let out = h.invoke("ADD", "c2", &h.conf("1.0.0", "10.244.1.0/24"));
    assert_eq!(out.json()["dns"], json!({}));
    let mut bad = h.conf("1.0.0", "10.244.1.0/24");
    bad["dns"] = json!({"nameservers": ["not-an-ip"]});
    assert_eq!(h.invoke("ADD", "c3", &bad).code(), 7);
}
