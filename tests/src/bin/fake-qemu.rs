//! Stands in for `qemu-system-x86_64` to show QMP faults a real QEMU won't
//! produce on demand.
//!
//! An instance named `qmp-fault-<fault>` gets a scripted QMP monitor on the
//! listening socket the agent passes (`-chardev socket,id=qmp,fd=N`). The
//! first `stop` command meets the fault; every later command is answered
//! normally, so a test can see the agent rebuild its connection. Anything
//! else, the agent's probe included, runs the real QEMU from `PATH`.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::FromRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;

use serde_json::{Value, json};

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "fake"}, "capabilities": []}}"#;

/// Commands the fake claims to support.
const COMMANDS: [&str; 9] = [
    "qmp_capabilities",
    "query-commands",
    "query-status",
    "query-pci",
    "query-block",
    "stop",
    "cont",
    "system_powerdown",
    "quit",
];

#[derive(Clone, Copy, PartialEq)]
enum Fault {
    /// Accepts, never greets.
    NoGreeting,
    /// Never answers the command.
    Silent,
    /// Answers with a line that isn't JSON.
    Garbage,
    /// Answers with a 64 MiB line.
    LongLine,
    /// Answers with another command's id.
    UnknownId,
    /// Sends events before and after the reply.
    Interleaved,
    /// Hangs up after reading the command.
    HangUp,
}

impl Fault {
    fn from_name(name: &str) -> Option<Fault> {
        Some(match name.strip_prefix("qmp-fault-")? {
            "no-greeting" => Fault::NoGreeting,
            "silent" => Fault::Silent,
            "garbage" => Fault::Garbage,
            "long-line" => Fault::LongLine,
            "unknown-id" => Fault::UnknownId,
            "interleaved" => Fault::Interleaved,
            "hang-up" => Fault::HangUp,
            _ => return None,
        })
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value_after = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .unwrap_or_default()
    };
    let name = value_after("-name");
    let name = name
        .strip_prefix("guest=")
        .and_then(|n| n.split(',').next())
        .unwrap_or_default();
    let Some(fault) = Fault::from_name(name) else {
        let err = std::process::Command::new("qemu-system-x86_64")
            .args(&args)
            .exec();
        eprintln!("fake-qemu: can't run qemu-system-x86_64: {err}");
        std::process::exit(127);
    };
    let qmp_fd: i32 = args
        .iter()
        .find_map(|a| a.strip_prefix("socket,id=qmp,fd="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|fd| fd.parse().ok())
        .expect("a -chardev socket,id=qmp,fd=N argument");
    // SAFETY: the agent passed this listening socket to us, open, as fd N.
    let listener = unsafe { UnixListener::from_raw_fd(qmp_fd) };
    let mut faulted = false;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        serve(stream, fault, &mut faulted);
    }
}

/// Serves one connection until it closes.
fn serve(stream: UnixStream, fault: Fault, faulted: &mut bool) {
    let mut out = stream.try_clone().expect("clone the socket");
    if fault == Fault::NoGreeting {
        // Hold the connection open without a word until the peer leaves.
        let _ = BufReader::new(stream).lines().count();
        return;
    }
    let _ = writeln!(out, "{GREETING}");
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        let Ok(request) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        let id = request["id"].clone();
        let command = request["execute"].as_str().unwrap_or_default();
        let reply = |ret: Value| json!({"return": ret, "id": id}).to_string();
        let lines: Vec<String> = match command {
            "stop" if !*faulted => {
                *faulted = true;
                match fault {
                    Fault::NoGreeting | Fault::Silent => vec![],
                    Fault::Garbage => vec!["this is not QMP".into()],
                    Fault::LongLine => vec![format!(
                        "{{\"return\": \"{}\", \"id\": {id}}}",
                        "x".repeat(64 << 20)
                    )],
                    Fault::UnknownId => vec![json!({"return": {}, "id": 424242}).to_string()],
                    Fault::Interleaved => vec![
                        json!({"event": "STOP", "data": {}}).to_string(),
                        json!({"event": "RTC_CHANGE", "data": {"offset": 0}}).to_string(),
                        reply(json!({})),
                        json!({"event": "RTC_CHANGE", "data": {"offset": 1}}).to_string(),
                    ],
                    Fault::HangUp => return,
                }
            }
            "query-commands" => vec![reply(json!(
                COMMANDS
                    .iter()
                    .map(|c| json!({"name": c}))
                    .collect::<Vec<_>>()
            ))],
            "query-status" => vec![reply(json!({"status": "running", "running": true}))],
            "query-pci" => vec![reply(json!([{"bus": 0, "devices": []}]))],
            "query-block" => vec![reply(json!([]))],
            "quit" => {
                let _ = writeln!(out, "{}", reply(json!({})));
                std::process::exit(0);
            }
            _ => vec![reply(json!({}))],
        };
        for l in lines {
            if writeln!(out, "{l}").is_err() {
                return;
            }
        }
    }
}
