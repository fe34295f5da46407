//! Two hosts on one machine: two network namespaces joined by a veth
//! pair, whose agents serve the API with mutual TLS on their own
//! addresses, as agents on two nodes of a cluster do.

use std::process::Command;

use uuid::Uuid;

use crate::AgentOptions;
use crate::tls::{TestCa, TlsPaths};

/// The two namespaces, removed on drop.
pub struct Hosts {
    names: [String; 2],
    veths: [String; 2],
    addresses: [String; 2],
    ca: TestCa,
}

/// The API port of the agents in [`Hosts`].
const HOST_API_PORT: u16 = 7070;

impl Hosts {
    /// Makes the namespaces, or says why they can't be made.
    pub fn create() -> Result<Hosts, String> {
        let tag = &Uuid::new_v4().simple().to_string()[..6];
        let octet = 16 + (u8::from_str_radix(&tag[..2], 16).unwrap_or(0) % 200);
        let hosts = Hosts {
            names: [format!("ka{tag}a"), format!("ka{tag}b")],
            veths: [format!("v{tag}a"), format!("v{tag}b")],
            addresses: [format!("10.213.{octet}.1"), format!("10.213.{octet}.2")],
            ca: TestCa::new("cluster"),
        };
        let [a, b] = &hosts.names;
        let [veth_a, veth_b] = hosts.veths.clone();
        let cidr = |host: usize| format!("{}/24", hosts.addresses[host]);
        let (cidr_a, cidr_b) = (cidr(0), cidr(1));
        let steps: Vec<Vec<&str>> = vec![
            vec!["netns", "add", a],
            vec!["netns", "add", b],
            vec![
                "link", "add", &veth_a, "netns", a, "type", "veth", "peer", "name", &veth_b,
                "netns", b,
            ],
            vec!["-n", a, "addr", "add", &cidr_a, "dev", &veth_a],
            vec!["-n", b, "addr", "add", &cidr_b, "dev", &veth_b],
            vec!["-n", a, "link", "set", &veth_a, "up"],
            vec!["-n", b, "link", "set", &veth_b, "up"],
            vec!["-n", a, "link", "set", "lo", "up"],
            vec!["-n", b, "link", "set", "lo", "up"],
        ];
        for args in steps {
            let out = Command::new("ip")
                .args(&args)
                .output()
                .map_err(|e| format!("ip: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "ip {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
        Ok(hosts)
    }

    /// Makes the namespaces; panics with what the test needs when they
    /// can't be made.
    pub fn create_or_explain() -> Hosts {
        Hosts::create().unwrap_or_else(|why| {
            panic!(
                "this test needs two network namespaces joined by a veth pair (root, iproute2), \
                 and they can't be made here: {why}"
            )
        })
    }

    /// The cluster's CA, which signed both agents' certificates.
    pub fn ca(&self) -> &TestCa {
        &self.ca
    }

    /// The network namespace of `host`.
    pub fn netns(&self, host: usize) -> &str {
        &self.names[host]
    }

    /// The address of `host` on the link between the two.
    pub fn address(&self, host: usize) -> &str {
        &self.addresses[host]
    }

    /// A certificate of the cluster's CA for `host`, naming its address.
    pub fn node_certificate(&self, host: usize) -> TlsPaths {
        self.ca.issue(&self.names[host], &[&self.addresses[host]])
    }

    /// How the agent of `host` is started: inside its namespace, serving
    /// the API with mutual TLS on its address, receiving migrations there.
    pub fn agent_options(&self, host: usize) -> AgentOptions {
        let mut options = AgentOptions {
            wrapper: vec![
                "ip".into(),
                "netns".into(),
                "exec".into(),
                self.names[host].clone(),
            ],
            ..AgentOptions::default()
        };
        let address = &self.addresses[host];
        options.args.extend([
            "--migration-address".into(),
            address.clone(),
            "--listen".into(),
            format!("tcp://{address}:{HOST_API_PORT}"),
        ]);
        options.args.extend(self.node_certificate(host).args());
        options
    }

    /// Takes the link between the two hosts down.
    pub fn cut_link(&self) {
        let status = Command::new("ip")
            .args(["-n", &self.names[0], "link", "set", &self.veths[0], "down"])
            .status()
            .expect("run ip");
        assert!(status.success(), "ip link set down");
    }

    /// The agent of `host` as the other host reaches it.
    pub fn api_url(&self, host: usize) -> String {
        format!("https://{}:{HOST_API_PORT}", self.addresses[host])
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}
