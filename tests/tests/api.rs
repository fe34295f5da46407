//! The API surface around the instance calls: node facts, the runtime
//! record, health, and the command line as an operator uses it.

use std::process::Command;

use kvm_agent_proto::v1 as pb;
use kvm_agent_tests::*;
use serde_json::Value;

#[tokio::test]
async fn node_info_reports_qemu_and_kvm() {
    let agent = TestAgent::start().await;

    let info = agent
        .client()
        .await
        .get_node_info(pb::GetNodeInfoRequest {})
        .await
        .unwrap()
        .into_inner();

    assert!(
        info.qemu_version.contains("QEMU emulator version"),
        "{info:?}"
    );
    assert_eq!(
        info.kvm_available,
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok()
    );
    assert!(info.memory_total_mib > 0);
    assert!(info.cpus > 0);
}

#[tokio::test]
async fn runtime_record_holds_the_resolved_machine_and_device_slots() {
    let agent = TestAgent::start().await;
    let mut spec = agent.spec("described", 64);
    spec.nics = vec![pb::NicSpec {
        name: "eth0".into(),
        mac: "52:54:00:00:50:01".into(),
        ..Default::default()
    }];
    agent.start_spec(spec).await;

    let reply = agent
        .client()
        .await
        .get_runtime(pb::GetRuntimeRequest {
            name: "described".into(),
        })
        .await
        .unwrap()
        .into_inner();

    let runtime: Value = serde_json::from_str(&reply.runtime_json).unwrap();
    assert!(
        runtime["machine_type"]
            .as_str()
            .unwrap()
            .starts_with("pc-i440fx-"),
        "{runtime}"
    );
    assert_eq!(runtime["nics"][0]["slot"], 3);
    assert_eq!(reply.generation, 1);
}

#[tokio::test]
async fn cli_lists_instances_as_json() {
    let agent = TestAgent::start().await;
    agent.start_spec(agent.spec("listed", 64)).await;

    let out = Command::new(agent_binary())
        .args([
            "--socket",
            agent.socket().to_str().unwrap(),
            "--output",
            "json",
            "instance",
            "list",
        ])
        .output()
        .unwrap();

    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["name"], "listed");
    assert_eq!(list[0]["state"], "running");
}

#[tokio::test]
async fn cli_starts_and_stops_an_instance() {
    let agent = TestAgent::start().await;
    let uuid = uuid::Uuid::new_v4();
    agent.track(uuid);
    let socket = agent.socket();
    let cli = |args: &[&str]| {
        Command::new(agent_binary())
            .args(["--socket", socket.to_str().unwrap(), "--output", "json"])
            .args(args)
            .output()
            .unwrap()
    };

    let started = cli(&[
        "instance",
        "start",
        "--name",
        "cli1",
        "--uuid",
        &uuid.to_string(),
        "--memory",
        "64",
        "--nic",
        "mac=52:54:00:00:50:02",
    ]);
    // As the README's quick start has it: the name as the argument.
    let soft = cli(&["instance", "reboot", "cli1", "--mode", "soft"]);
    let misplaced = cli(&["instance", "reboot", "cli1", "--memory", "96"]);
    let hard = cli(&[
        "instance", "reboot", "cli1", "--mode", "hard", "--memory", "96",
    ]);
    let stopped = cli(&["instance", "stop", "cli1", "--force"]);
    let missing = cli(&["instance", "info", "nope"]);

    for (what, out) in [("soft", &soft), ("hard", &hard)] {
        assert!(
            out.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(!misplaced.status.success());
    assert!(
        String::from_utf8_lossy(&misplaced.stderr).contains("--mode hard"),
        "{}",
        String::from_utf8_lossy(&misplaced.stderr)
    );
    let rebooted: Value = serde_json::from_slice(&hard.stdout).unwrap();
    assert_eq!(rebooted["memory_mib"], 96, "{rebooted}");

    assert!(
        started.status.success(),
        "{}",
        String::from_utf8_lossy(&started.stderr)
    );
    let info: Value = serde_json::from_slice(&started.stdout).unwrap();
    assert_eq!(info["state"], "running");
    assert_eq!(info["devices"][0]["kind"], "nic");
    assert!(stopped.status.success());
    let stop: Value = serde_json::from_slice(&stopped.stdout).unwrap();
    assert_eq!(stop["method"], "kill");
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not found"));
}

#[tokio::test]
async fn socket_and_state_directory_are_private_to_the_owner() {
    use std::os::unix::fs::PermissionsExt;
    let agent = TestAgent::start().await;

    let mode = std::fs::metadata(agent.socket())
        .unwrap()
        .permissions()
        .mode();

    assert_eq!(mode & 0o777, 0o600);
    let state_dir_mode = std::fs::metadata(agent.state_dir())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(state_dir_mode & 0o777, 0o700);
}

#[tokio::test]
async fn health_service_reports_the_node_agent_serving() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let agent = TestAgent::start().await;
    let channel = agent.channel().await;

    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "kvmagent.v1.NodeAgent".into(),
        })
        .await
        .unwrap()
        .into_inner();

    assert_eq!(reply.status, ServingStatus::Serving as i32);
}

#[tokio::test]
async fn reflection_lists_the_health_service_and_a_log_file_has_no_colour_codes() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let agent = TestAgent::start().await;
    let mut client = ServerReflectionClient::new(agent.channel().await);

    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let reply = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .expect("one reply");

    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("not a service list: {reply:?}");
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
    assert!(names.contains(&"kvmagent.v1.NodeAgent"), "{names:?}");
    // The fixture sends the agent's stderr to a file.
    let log = agent.log();
    assert!(log.contains("serving"), "{log}");
    assert!(!log.contains('\x1b'), "colour codes in a log file: {log:?}");
}

#[tokio::test]
async fn cli_hot_adds_and_lists_devices_as_json() {
    let agent = TestAgent::start().await;
    agent.start_spec(agent.spec("devs", 64)).await;
    let image = agent.raw_image("cli.img", 8);
    let socket = agent.socket();
    let cli = |args: &[&str]| {
        Command::new(agent_binary())
            .args([
                "--socket",
                socket.to_str().unwrap(),
                "--output",
                "json",
                "device",
            ])
            .args(args)
            .output()
            .unwrap()
    };

    let nic = cli(&[
        "add-nic",
        "devs",
        "--mac",
        "52:54:00:00:80:01",
        "--name",
        "eth1",
        "--queues",
        "2",
    ]);
    let disk = cli(&[
        "add-disk",
        "devs",
        "--path",
        image.to_str().unwrap(),
        "--name",
        "data",
        "--cache",
        "writeback",
    ]);
    let list = cli(&["list", "devs"]);
    let support = cli(&["support", "devs"]);
    let missing = cli(&["remove", "devs", "nope"]);

    for out in [&nic, &disk, &list, &support] {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let nic: Value = serde_json::from_slice(&nic.stdout).unwrap();
    assert_eq!(nic["kind"], "nic");
    assert!(nic["tap"].as_str().is_some_and(|t| !t.is_empty()));
    let list: Value = serde_json::from_slice(&list.stdout).unwrap();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["data", "eth1"]);
    let support: Value = serde_json::from_slice(&support.stdout).unwrap();
    assert_eq!(support["nic"]["supported"], true);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("has no device \"nope\""));
}

#[tokio::test]
async fn json_logs_carry_the_request_id_the_caller_received() {
    let agent = TestAgent::start_with(AgentOptions {
        args: ["--powerdown-timeout-ms", "1000", "--log-format", "json"]
            .map(String::from)
            .to_vec(),
        ..AgentOptions::default()
    })
    .await;

    let reply = agent
        .client()
        .await
        .start_instance(start_request(agent.spec("logged", 64)))
        .await
        .unwrap();
    let refused = agent
        .client()
        .await
        .start_instance(start_request(agent.spec("bad/name", 64)))
        .await
        .unwrap_err();

    let id = reply
        .metadata()
        .get("x-request-id")
        .expect("request id")
        .to_str()
        .unwrap()
        .to_owned();
    let refused_id = refused
        .metadata()
        .get("x-request-id")
        .expect("request id on errors too")
        .to_str()
        .unwrap()
        .to_owned();
    assert_ne!(id, refused_id);
    let log = agent.log();
    let lines: Vec<Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let of = |id: &str| -> Vec<&Value> {
        lines
            .iter()
            .filter(|l| l["span"]["request_id"] == id)
            .collect()
    };
    let ours = of(&id);
    assert!(
        ours.iter()
            .any(|l| l["fields"]["message"] == "starting QEMU"),
        "{log}"
    );
    assert!(ours.iter().all(|l| l["span"]["instance"] == "logged"));
    assert!(
        of(&refused_id).iter().any(|l| l["level"] == "ERROR"),
        "{log}"
    );
}

fn scrape(addr: std::net::SocketAddr) -> prometheus_parse::Scrape {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("metrics endpoint");
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
        .expect("valid Prometheus text")
}

fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

#[tokio::test]
async fn metrics_are_valid_prometheus_text_and_move_with_operations() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let agent = TestAgent::start_with(AgentOptions {
        args: vec![
            "--powerdown-timeout-ms".into(),
            "1000".into(),
            "--metrics-listen".into(),
            addr.to_string(),
        ],
        ..AgentOptions::default()
    })
    .await;
    wait_for(std::time::Duration::from_secs(10), async || {
        std::net::TcpStream::connect(addr).ok()
    })
    .await
    .expect("metrics listen");
    let before = tokio::task::spawn_blocking(move || scrape(addr))
        .await
        .unwrap();

    agent.start_spec(agent.spec("counted", 64)).await;
    let after = tokio::task::spawn_blocking(move || scrape(addr))
        .await
        .unwrap();

    let starts = |s: &prometheus_parse::Scrape| {
        sample(
            s,
            "kvm_agent_operations_total",
            &[("op", "start"), ("outcome", "ok")],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(starts(&before), 0.0);
    assert_eq!(starts(&after), 1.0);
    assert_eq!(
        sample(&after, "kvm_agent_instances", &[("state", "running")]),
        Some(1.0)
    );
    assert!(
        after
            .samples
            .iter()
            .any(|s| s.metric.starts_with("kvm_agent_operation_duration_seconds")),
        "latency is recorded"
    );
}

#[tokio::test]
async fn cli_output_into_a_pipe_nobody_reads_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let agent = TestAgent::start().await;
    agent.start_spec(agent.spec("piped", 64)).await;
    // As `kvm-agent instance info piped | head -1`, with `head` gone before
    // the first line.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(agent_binary())
        .args(["--socket", agent.socket().to_str().unwrap()])
        .args(["instance", "info", "piped"])
        .stdout(writer)
        .output()
        .unwrap();
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{out:?}");
    assert!(
        out.stderr.is_empty(),
        "no panic, no message: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn cli_prints_completions_that_bash_loads() {
    let script = Command::new(agent_binary())
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(
        script.status.success(),
        "{}",
        String::from_utf8_lossy(&script.stderr)
    );
    let text = String::from_utf8(script.stdout).unwrap();
    for subcommand in ["instance", "device", "migrate", "events", "completions"] {
        assert!(text.contains(subcommand), "no {subcommand} in:\n{text}");
    }
    // Sourced into a real bash, the script registers the command.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("kvm-agent.bash");
    std::fs::write(&file, &text).unwrap();
    let registered = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source {} && complete -p kvm-agent",
            file.display()
        ))
        .output()
        .unwrap();
    assert!(
        registered.status.success(),
        "{}",
        String::from_utf8_lossy(&registered.stderr)
    );
    assert!(String::from_utf8_lossy(&registered.stdout).contains("kvm-agent"));

    let zsh = Command::new(agent_binary())
        .args(["completions", "zsh"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&zsh.stdout).starts_with("#compdef kvm-agent"));
    let unknown = Command::new(agent_binary())
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(unknown.status.code(), Some(2));
}

/// `kvm-agent` with none of the caller's `KVM_AGENT_*` settings.
fn clean_agent_command() -> Command {
    let mut cmd = Command::new(agent_binary());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("KVM_AGENT_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

fn config_check(file: &std::path::Path) -> std::process::Output {
    clean_agent_command()
        .args(["config", "check", "--config"])
        .arg(file)
        .output()
        .unwrap()
}

#[test]
fn config_check_accepts_the_example_and_layers_env_and_flags_over_it() {
    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/config.example.toml");
    let plain = config_check(&example);
    assert!(
        plain.status.success(),
        "{}",
        String::from_utf8_lossy(&plain.stderr)
    );
    let effective: toml::Table = toml::from_str(&String::from_utf8(plain.stdout).unwrap()).unwrap();
    assert_eq!(effective["state_dir"].as_str(), Some("/var/lib/kvm-agent"));
    assert_eq!(
        effective["stop"]["quit_timeout_ms"].as_integer(),
        Some(5000)
    );
    assert_eq!(
        effective["migration"]["ports"].as_str(),
        Some("49152-49215")
    );

    // The environment overrides the file, and a flag overrides both.
    let layered = clean_agent_command()
        .args(["config", "check", "--output", "json", "--config"])
        .arg(&example)
        .args(["--kill-timeout-ms", "1234", "--quit-timeout-ms", "4321"])
        .env("KVM_AGENT_QUIT_TIMEOUT_MS", "7000")
        .env("KVM_AGENT_MIGRATION_PORTS", "50000-50009")
        .output()
        .unwrap();
    assert!(
        layered.status.success(),
        "{}",
        String::from_utf8_lossy(&layered.stderr)
    );
    let effective: Value = serde_json::from_slice(&layered.stdout).unwrap();
    assert_eq!(effective["stop"]["kill_timeout_ms"], 1234);
    assert_eq!(effective["stop"]["quit_timeout_ms"], 4321);
    assert_eq!(effective["migration"]["ports"], "50000-50009");
    assert_eq!(
        effective["stop"]["powerdown_timeout_ms"], 60000,
        "from the file"
    );
}

#[test]
fn config_check_names_the_line_of_an_unknown_key_and_a_bad_value() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "unknown.toml",
            "state_dir = \"/srv/kvm\"\n\n[stop]\nquit_timeout = 5000\n",
            "line 4",
            "unknown field `quit_timeout`",
        ),
        (
            "bad-value.toml",
            "[qmp]\ntimeout_ms = 10000\ngreeting_timeout_ms = \"ten seconds\"\n",
            "line 3",
            "invalid type",
        ),
        (
            "bad-range.toml",
            "# ports\n[migration]\naddress = \"10.0.0.1\"\nports = \"50010-50000\"\n",
            "line 4",
            "not a port range",
        ),
    ];
    for (name, text, line, what) in cases {
        let file = dir.path().join(name);
        std::fs::write(&file, text).unwrap();
        let out = config_check(&file);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        assert!(
            out.stdout.is_empty(),
            "{name}: nothing is printed as effective"
        );
        assert!(
            stderr.contains(&file.display().to_string()),
            "{name}: {stderr}"
        );
        assert!(stderr.contains(line), "{name}: {stderr}");
        assert!(stderr.contains(what), "{name}: {stderr}");
    }
}

#[test]
fn serve_runs_with_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state");
    let socket = dir.path().join("from-config.sock");
    let file = dir.path().join("config.toml");
    std::fs::write(
        &file,
        format!(
            "state_dir = \"{}\"\nsocket = \"{}\"\nqemu_binary = \"{}\"\n",
            state_dir.display(),
            socket.display(),
            require_qemu().display()
        ),
    )
    .unwrap();
    let mut serve = clean_agent_command()
        .args(["serve", "--config"])
        .arg(&file)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let info = loop {
        let out = clean_agent_command()
            .args(["node", "info", "--output", "json", "--socket"])
            .arg(&socket)
            .output()
            .unwrap();
        if out.status.success() {
            break out;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the agent never answered on the socket its config names: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let _ = serve.kill();
    let _ = serve.wait();
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["qemu_path"], require_qemu().display().to_string());
    assert!(
        state_dir.is_dir(),
        "the agent made the state directory its config names"
    );
}

/// The field names of the README table whose header starts with `header`.
fn readme_fields(header: &str) -> std::collections::BTreeSet<String> {
    let readme = include_str!("../../README.md");
    let table = readme
        .split("\n\n")
        .find(|block| block.starts_with(&format!("| {header}")))
        .unwrap_or_else(|| panic!("README has no table headed {header:?}"));
    table
        .lines()
        .filter_map(|row| row.strip_prefix("| `"))
        .map(|row| row.split('`').next().unwrap().to_owned())
        .collect()
}

fn keys(object: &Value) -> std::collections::BTreeSet<String> {
    object
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {object}"))
        .keys()
        .cloned()
        .collect()
}

#[tokio::test]
async fn cli_json_has_exactly_the_fields_the_readme_documents() {
    let agent = TestAgent::start().await;
    let mut spec = agent.spec("documented", 64);
    spec.nics = vec![nic("eth0", "52:54:00:00:90:01")];
    spec.disks = vec![disk("root", &agent.raw_image("doc.img", 8))];
    agent.start_spec(spec).await;
    let socket = agent.socket();
    let cli = |args: &[&str]| -> Value {
        let out = Command::new(agent_binary())
            .args(["--socket", socket.to_str().unwrap(), "--output", "json"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{args:?}: {e}"))
    };
    let instance_fields = readme_fields("Instance field");
    let device_fields = readme_fields("Device field");

    let list = cli(&["instance", "list"]);
    let info = cli(&["instance", "info", "documented"]);
    let devices = cli(&["device", "list", "documented"]);

    assert_eq!(keys(&list[0]), instance_fields);
    assert_eq!(keys(&info), instance_fields);
    assert_eq!(info["state"], "running");
    let devices = devices.as_array().unwrap();
    assert_eq!(devices.len(), 2);
    for device in devices.iter().chain(info["devices"].as_array().unwrap()) {
        assert_eq!(keys(device), device_fields, "{device}");
    }
}
