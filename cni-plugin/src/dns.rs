//! The pod's DNS settings in the ADD result's `dns` section (SPEC.md "Success": `nameservers`,
//! `domain`, `search`, `options`), which runtimes that take DNS from the network write into the
//! pod's resolv.conf.
//!
//! The network configuration's own `dns` key (SPEC.md "Network configuration") says which
//! nameservers and options the node offers and, as `domain`, the cluster's DNS zone. With a
//! zone and the pod's namespace (`K8S_POD_NAMESPACE` in `CNI_ARGS`, which Kubernetes runtimes
//! set) the search list is the kubelet's for `dnsPolicy: ClusterFirst`:
//! `<ns>.svc.<zone> svc.<zone> <zone>` followed by any `search` the configuration lists.
//! <https://github.com/kubernetes/kubernetes/blob/master/pkg/kubelet/network/dns/dns.go>
use std::net::IpAddr;

/// DNS settings: what the configuration's `dns` key holds, and what the result carries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dns {
    pub nameservers: Vec<IpAddr>,
    pub domain: Option<String>,
    pub search: Vec<String>,
    pub options: Vec<String>,
}

impl Dns {
    pub fn is_empty(&self) -> bool {
        self.nameservers.is_empty()
            && self.domain.is_none()
            && self.search.is_empty()
            && self.options.is_empty()
    }
}

/// The value of `K8S_POD_NAMESPACE` in `CNI_ARGS` (`K=V;K=V`, CNI's conventions).
pub fn k8s_namespace(cni_args: &str) -> Option<&str> {
    cni_args
        .split(';')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| k.trim() == "K8S_POD_NAMESPACE")
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty())
}

/// The result's DNS section for a pod in `namespace` from the configuration's `dns`: the
/// cluster search list first when both a zone and a namespace are known.
pub fn pod_dns(conf: &Dns, namespace: Option<&str>) -> Dns {
    let mut search = Vec::new();
    if let Some(zone) = &conf.domain {
        if let Some(ns) = namespace {
            search.push(format!("{ns}.svc.{zone}"));
        }
        search.push(format!("svc.{zone}"));
        search.push(zone.clone());
    }
    for s in &conf.search {
        if !search.contains(s) {
            search.push(s.clone());
        }
    }
    Dns {
        nameservers: conf.nameservers.clone(),
        domain: conf.domain.clone(),
        search,
        options: conf.options.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> Dns {
        Dns {
            nameservers: vec!["169.254.20.10".parse().unwrap()],
            domain: Some("cluster.local".into()),
            search: Vec::new(),
            options: vec!["ndots:5".into()],
        }
    }

    #[test]
    fn namespace_comes_from_cni_args() {
        assert_eq!(
            k8s_namespace("IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=web-0"),
            Some("demo")
        );
        assert_eq!(k8s_namespace("K8S_POD_NAME=web-0"), None);
        assert_eq!(k8s_namespace("K8S_POD_NAMESPACE="), None);
        assert_eq!(k8s_namespace(""), None);
    }

    #[test]
    fn search_list_is_the_kubelets_cluster_first_list() {
        let d = pod_dns(&cluster(), Some("demo"));
        assert_eq!(
            d.search,
            [
                "demo.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local"
            ]
        );
        assert_eq!(d.options, ["ndots:5"]);
        assert_eq!(d.nameservers, cluster().nameservers);
        // Without a namespace the namespace-relative entry is left out, not guessed.
        assert_eq!(
            pod_dns(&cluster(), None).search,
            ["svc.cluster.local", "cluster.local"]
        );
    }

    #[test]
    fn configured_search_entries_follow_the_cluster_ones_once() {
        let mut c = cluster();
        c.search = vec!["corp.example".into(), "cluster.local".into()];
        assert_eq!(
            pod_dns(&c, Some("demo")).search,
            [
                "demo.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local",
                "corp.example"
            ]
        );
    }

    #[test]
    fn no_dns_configuration_gives_an_empty_section() {
        assert!(pod_dns(&Dns::default(), Some("demo")).is_empty());
    }
}
