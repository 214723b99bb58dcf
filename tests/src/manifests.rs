//! Service and EndpointSlice manifests as the lab's manifest source reads them, in both
//! families: one writer for tests and benchmarks that need a Service with given ClusterIPs.
use std::fmt::Write as _;
use std::net::IpAddr;

/// The `ipFamilies` word of an address.
pub fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() { "IPv4" } else { "IPv6" }
}

/// A ClusterIP Service `namespace/name` with `cluster_ips` (primary first), its `ipFamilies`
/// from them and `ipFamilyPolicy` `policy`; ports: (name, port, targetPort, protocol).
pub fn service(
    namespace: &str,
    name: &str,
    cluster_ips: &[IpAddr],
    policy: &str,
    ports: &[(&str, u16, u16, &str)],
) -> String {
    let ips: Vec<String> = cluster_ips.iter().map(|ip| format!("\"{ip}\"")).collect();
    let families: Vec<&str> = cluster_ips.iter().map(|ip| family(*ip)).collect();
    let mut y = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {namespace}\n\
         spec:\n  type: ClusterIP\n  clusterIP: {}\n  clusterIPs: [{}]\n  ipFamilies: [{}]\n  \
         ipFamilyPolicy: {policy}\n  ports:\n",
        ips.first().map_or("None", String::as_str),
        ips.join(", "),
        families.join(", ")
    );
    for (pname, port, target, proto) in ports {
        let _ = writeln!(
            y,
            "  - name: \"{pname}\"\n    port: {port}\n    targetPort: {target}\n    protocol: {proto}"
        );
    }
    y
}

/// An EndpointSlice `namespace/name` of Service `svc`, of the family of its first address
/// (`addressType`); endpoints: (address, node name), all ready; ports: (name, port, protocol).
pub fn endpoint_slice(
    namespace: &str,
    svc: &str,
    name: &str,
    eps: &[(IpAddr, &str)],
    ports: &[(&str, u16, &str)],
) -> String {
    let address_type = eps.first().map_or("IPv4", |(ip, _)| family(*ip));
    let mut y = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  \
         namespace: {namespace}\n  labels:\n    kubernetes.io/service-name: {svc}\n\
         addressType: {address_type}\nendpoints:\n"
    );
    for (ip, node) in eps {
        let _ = writeln!(
            y,
            "- addresses: [\"{ip}\"]\n  nodeName: {node}\n  conditions: {{ready: true, serving: true, terminating: false}}"
        );
    }
    y.push_str("ports:\n");
    for (pname, port, proto) in ports {
        let _ = writeln!(
            y,
            "- name: \"{pname}\"\n  port: {port}\n  protocol: {proto}"
        );
    }
    y
}
