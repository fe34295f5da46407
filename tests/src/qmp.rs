//! A minimal, independent QMP client the tests use to check what QEMU
//! really has, on the operators' monitor socket rather than the agent's.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use crate::TestAgent;

/// A QMP connection of the test's own.
pub struct Qmp {
    reader: BufReader<StdUnixStream>,
    writer: StdUnixStream,
}

impl Qmp {
    /// Connects and negotiates capabilities.
    pub fn connect(path: &Path) -> Qmp {
        let stream = StdUnixStream::connect(path)
            .unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone().expect("clone")),
            writer: stream,
        };
        // An event of the previous client's session can reach a new
        // client before QEMU has noticed that session end: skip it.
        let mut greeting = qmp.line();
        while greeting.get("event").is_some() {
            greeting = qmp.line();
        }
        assert!(
            greeting.get("QMP").is_some(),
            "not a QMP greeting: {greeting}"
        );
        qmp.execute("qmp_capabilities", json!({}));
        qmp
    }

    fn line(&mut self) -> Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("read QMP line");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad QMP line {line:?}: {e}"))
    }

    /// Hands QEMU `fd` under `name` (`getfd`, with the fd attached to the
    /// message), as the agent hands it taps and images.
    pub fn pass_fd(&mut self, name: &str, fd: std::os::fd::BorrowedFd<'_>) {
        use std::os::fd::AsRawFd;

        use sendfd::SendWithFd;
        let msg = format!(
            "{}\n",
            json!({ "execute": "getfd", "arguments": { "fdname": name } })
        );
        let sent = self
            .writer
            .send_with_fd(msg.as_bytes(), &[fd.as_raw_fd()])
            .expect("send getfd with its fd");
        self.writer
            .write_all(&msg.as_bytes()[sent..])
            .expect("send the rest of getfd");
        loop {
            let v = self.line();
            if v.get("return").is_some() {
                return;
            }
            assert!(v.get("error").is_none(), "QMP getfd failed: {v}");
        }
    }

    /// Sends a command without waiting for its reply, for one that QEMU
    /// may not live to answer.
    pub fn send(&mut self, command: &str, arguments: Value) {
        let msg = json!({ "execute": command, "arguments": arguments });
        writeln!(self.writer, "{msg}").unwrap_or_else(|e| panic!("write QMP {command}: {e}"));
    }

    /// Runs a command and returns its `return`; panics on an error reply.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Value {
        let msg = json!({ "execute": command, "arguments": arguments });
        writeln!(self.writer, "{msg}").unwrap_or_else(|e| panic!("write QMP {command}: {e}"));
        loop {
            let v = self.line();
            if let Some(r) = v.get("return") {
                return r.clone();
            }
            if let Some(e) = v.get("error") {
                panic!("QMP {command} failed: {e}");
            }
        }
    }

    /// Devices on bus 0 as (slot, qdev_id, class description).
    pub fn pci_devices(&mut self) -> Vec<(u64, String, String)> {
        let buses = self.execute("query-pci", json!({}));
        buses[0]["devices"]
            .as_array()
            .expect("devices")
            .iter()
            .map(|d| {
                (
                    d["slot"].as_u64().expect("slot"),
                    d["qdev_id"].as_str().unwrap_or_default().to_owned(),
                    d["class_info"]["desc"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                )
            })
            .collect()
    }

    /// Guest RAM in bytes.
    pub fn base_memory(&mut self) -> u64 {
        self.execute("query-memory-size-summary", json!({}))["base-memory"]
            .as_u64()
            .expect("base-memory")
    }
}

/// The operators' QMP of a running instance.
pub fn operator_qmp(agent: &TestAgent, name: &str) -> Qmp {
    Qmp::connect(&agent.run_dir(name).join("qmp-operator.sock"))
}
