//! README.md's command examples, read from the README itself and run as
//! written against real agents, so the README can't drift from the
//! command line.
//!
//! Only what can't be the same on a test machine is replaced, by the
//! table in `substitutions`: the README's example paths, bridge and
//! second agent become this test's, `sudo` goes (the suite runs as root),
//! and `target/release/kvm-agent` is the binary under test. Every option
//! and argument stays as the README writes it.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kvm_agent_proto::v1 as pb;
use kvm_agent_tests::{AgentOptions, Bridge, TestAgent, agent_binary};

/// The README's `sh` blocks, each as its commands (continued lines
/// joined), in order.
fn readme_blocks() -> Vec<Vec<String>> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let text = std::fs::read_to_string(&path).expect("read README.md");
    let mut blocks = Vec::new();
    let mut current: Option<Vec<String>> = None;
    let mut continued = String::new();
    for line in text.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```sh") => current = Some(Vec::new()),
            (Some(_), "```") => blocks.push(current.take().unwrap()),
            (Some(block), line) => {
                if let Some(head) = line.strip_suffix('\\') {
                    continued.push_str(head);
                } else {
                    continued.push_str(line);
                    block.push(std::mem::take(&mut continued).trim().to_owned());
                }
            }
            (None, _) => {}
        }
    }
    blocks
}

/// Whether a README command is one of the command line's: it runs the
/// agent's binary, or installs the config file the next one checks.
fn is_cli_example(command: &str) -> bool {
    let program = command.trim_start_matches("sudo ");
    program.starts_with("target/release/kvm-agent ")
        || program.starts_with("kvm-agent ")
        || program.starts_with("install ") && program.contains("config.toml")
}

/// What a command must come to.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// Exit 0.
    Success,
    /// Accepted by the command line (no usage error), whatever the agent
    /// answers: the README shows it for a situation this run isn't in.
    Accepted,
    /// Still running after a while (a stream that follows until stopped).
    KeepsRunning,
}

fn expectation(command: &str) -> Expect {
    if command.contains(" events ") || command.contains(" serve ") {
        // `serve` here is the cluster example with certificates this test
        // doesn't have; it must still parse, and may not get further.
        return if command.contains(" serve ") {
            Expect::Accepted
        } else {
            Expect::KeepsRunning
        };
    }
    let situational = [
        // No guest OS runs a balloon driver.
        " instance set-memory ",
        // No guest OS answers the ACPI eject.
        " device remove ",
        // The README shows it after a paused restore.
        " instance resume ",
        // The instance has gone to the first target by then.
        " --to https://",
        " cancel-migration ",
        // The cluster's certificates, which this test doesn't have.
        "--tls-cert operator.pem",
    ];
    if situational.iter().any(|s| command.contains(s)) {
        Expect::Accepted
    } else {
        Expect::Success
    }
}

struct Run {
    output: Output,
    /// Killed after the wait, still running.
    killed: bool,
}

impl Run {
    fn text(&self) -> String {
        format!(
            "exit {:?}\nstdout:\n{}\nstderr:\n{}",
            self.output.status.code(),
            String::from_utf8_lossy(&self.output.stdout),
            String::from_utf8_lossy(&self.output.stderr)
        )
    }

    /// clap's usage errors exit with 2; the agent's refusals with 1.
    fn usage_error(&self) -> bool {
        self.output.status.code() == Some(2)
            || String::from_utf8_lossy(&self.output.stderr).contains("Usage:")
    }
}

struct Readme {
    substitutions: Vec<(String, String)>,
    env: Vec<(String, String)>,
}

impl Readme {
    fn apply(&self, command: &str) -> String {
        let command = command.replace("sudo ", "");
        // A command may name the installed binary by its bare name.
        let command = match command.strip_prefix("kvm-agent ") {
            Some(rest) => format!("{} {rest}", agent_binary().display()),
            None => command,
        };
        self.substitutions
            .iter()
            .fold(command, |c, (from, to)| c.replace(from, to))
    }

    /// Runs `command` with `sh`, as a shell would; a command that still
    /// runs after `wait` is killed.
    fn run(&self, command: &str, wait: Duration) -> Run {
        let mut sh = Command::new("sh");
        sh.arg("-c")
            .arg(self.apply(command))
            .current_dir(workspace())
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        if command.contains(" serve ") {
            // The example's `serve` gets a socket of its own, never the
            // test agent's.
            sh.env_remove("KVM_AGENT_ADDRESS");
        }
        let mut child = sh
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("run sh");
        // Ctrl-] is how the README says to leave a console.
        if command.contains(" console ") {
            use std::io::Write;
            let _ = child.stdin.as_mut().unwrap().write_all(b"\x1d");
        }
        drop(child.stdin.take());
        let deadline = Instant::now() + wait;
        let mut killed = false;
        while child.try_wait().expect("wait").is_none() {
            if Instant::now() > deadline {
                // The whole group: sh and the agent binary under it.
                // SAFETY: kill(2) takes plain integers; the group is the
                // child's own (process_group(0) above).
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                killed = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let output = child.wait_with_output().expect("collect output");
        Run { output, killed }
    }

    /// Runs a command and checks it against what it must come to.
    fn check(&self, command: &str) {
        let expect = expectation(command);
        let wait = match expect {
            Expect::KeepsRunning => Duration::from_secs(2),
            _ => Duration::from_secs(120),
        };
        let run = self.run(command, wait);
        let shown = format!(
            "README command `{command}`, run as `{}`",
            self.apply(command)
        );
        match expect {
            Expect::Success => assert!(
                !run.killed && run.output.status.success(),
                "{shown} failed:\n{}",
                run.text()
            ),
            Expect::Accepted => assert!(
                !run.killed && !run.usage_error(),
                "{shown} was not accepted by the command line:\n{}",
                run.text()
            ),
            Expect::KeepsRunning => assert!(
                run.killed,
                "{shown} ended instead of following:\n{}",
                run.text()
            ),
        }
    }
}

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// The README's example values and what stands for them here.
fn substitutions(
    scratch: &Path,
    bridge: &Bridge,
    target: &TestAgent,
    data_image: &Path,
) -> Vec<(String, String)> {
    let binary = agent_binary().display().to_string();
    let in_scratch = |name: &str| scratch.join(name).display().to_string();
    let guest = kvm_agent_tests::guest::guest_image();
    let iso = |path: &Path| path.display().to_string();
    vec![
        ("target/release/kvm-agent".into(), binary),
        ("/srv/img/data.img".into(), data_image.display().to_string()),
        ("/srv/img/installer.img".into(), in_scratch("installer.img")),
        ("/srv/iso/debian.iso".into(), iso(&guest.boot_iso)),
        ("/srv/iso/drivers.iso".into(), iso(&guest.data_iso)),
        ("/srv/saves/demo.save".into(), in_scratch("demo.save")),
        ("--bridge br0".into(), format!("--bridge {}", bridge.name)),
        (
            "unix:/var/lib/kvm-agent-b/agent.sock".into(),
            format!("unix:{}", target.socket().display()),
        ),
        (
            "/etc/bash_completion.d/kvm-agent".into(),
            in_scratch("completion.bash"),
        ),
        (
            "/etc/kvm-agent/config.toml".into(),
            in_scratch("config.toml"),
        ),
        // The certificates go to a directory of this test's.
        ("--dir .".into(), format!("--dir {}", in_scratch("tls"))),
    ]
}

async fn instance(agent: &TestAgent, name: &str) -> pb::InstanceInfo {
    agent
        .client()
        .await
        .get_instance(pb::GetInstanceRequest { name: name.into() })
        .await
        .expect("get the instance")
        .into_inner()
}

/// Whether `agent` has no instance by that name.
async fn gone_from(agent: &TestAgent, name: &str) -> bool {
    let found = agent
        .client()
        .await
        .get_instance(pb::GetInstanceRequest { name: name.into() })
        .await;
    found.is_err_and(|status| status.code() == tonic::Code::NotFound)
}

/// Runs one example of the other blocks, with what it needs from the
/// agents before and what it did to them after.
async fn run_example(
    readme: &mut Readme,
    command: &str,
    agent: &TestAgent,
    target: &TestAgent,
    data_image: &Path,
) {
    if command.contains(" device remove ") {
        let disk = instance(agent, "demo")
            .await
            .devices
            .into_iter()
            .find(|d| d.detail == data_image.display().to_string())
            .expect("the disk the README's add-disk added");
        readme
            .substitutions
            .push(("<device-name>".into(), disk.name.clone()));
    }
    readme.check(command);
    if command.contains(" migrate demo --to unix:") {
        // The target owns it now. Whether it runs there depends on the
        // guest: with no OS, a KVM that can't run firmware stops it.
        let moved = instance(target, "demo").await;
        let owned = [pb::InstanceState::Running, pb::InstanceState::Paused].map(|s| s as i32);
        assert!(owned.contains(&moved.state), "{moved:?}");
        assert!(
            gone_from(agent, "demo").await,
            "the source still has demo after the migration"
        );
    }
    if command.contains(" instance rename demo demo-old") {
        assert!(gone_from(agent, "demo").await, "demo kept its old name");
        assert_eq!(instance(agent, "demo-old").await.name, "demo-old");
    }
    if command.contains(" instance delete demo-old") {
        assert!(
            gone_from(agent, "demo-old").await,
            "demo-old is still there"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn readme_examples_run_as_written() {
    let blocks = readme_blocks();
    let quick_start: Vec<String> = blocks
        .iter()
        .find(|b| b.iter().any(|c| c.contains(" instance start ")))
        .expect("README.md has a quick start that starts an instance")
        .clone();
    let examples: Vec<Vec<String>> = blocks
        .iter()
        .filter(|b| **b != quick_start)
        .map(|b| b.iter().filter(|c| is_cli_example(c)).cloned().collect())
        .filter(|b: &Vec<String>| !b.is_empty())
        .collect();
    assert!(
        examples.iter().flatten().count() >= 15,
        "expected the README's CLI examples, found {examples:?}"
    );

    let mut options = AgentOptions::default();
    options
        .args
        .extend(["--unplug-timeout-ms".into(), "1000".into()]);
    let agent = TestAgent::start_with(options).await;
    let target = TestAgent::start().await;
    let bridge = Bridge::create();
    let scratch = agent.scratch();
    let data_image = agent.raw_image("data", 16);
    agent.raw_image("installer.img", 16);
    let mut readme = Readme {
        substitutions: substitutions(&scratch, &bridge, &target, &data_image),
        env: vec![
            (
                "KVM_AGENT_ADDRESS".into(),
                format!("unix:{}", agent.socket().display()),
            ),
            (
                "KVM_AGENT_CONFIG".into(),
                scratch.join("config.toml").display().to_string(),
            ),
            // `serve` from the cluster example, should it get that far,
            // keeps its state here rather than in /var/lib/kvm-agent.
            (
                "KVM_AGENT_STATE_DIR".into(),
                scratch.join("serve-state").display().to_string(),
            ),
        ],
    };

    // The quick start, whole, and what it did.
    let (start, rest) = quick_start.split_first().expect("a quick start");
    readme.check(start);
    let demo = instance(&agent, "demo").await;
    assert_eq!(demo.state, pb::InstanceState::Running as i32, "{demo:?}");
    let nics: Vec<_> = demo
        .devices
        .iter()
        .filter(|d| d.kind == pb::DeviceKind::Nic as i32)
        .collect();
    assert_eq!(nics.len(), 1, "{demo:?}");
    assert_eq!(nics[0].detail, "52:54:00:12:34:56");
    for command in rest {
        readme.check(command);
    }
    let demo = instance(&agent, "demo").await;
    assert_eq!(demo.state, pb::InstanceState::Stopped as i32, "{demo:?}");

    // Each other block acts on a running demo, as the README's text says;
    // where an earlier block stopped, moved or deleted it, it is started
    // again the quick start's way first.
    for block in &examples {
        let here = agent
            .client()
            .await
            .get_instance(pb::GetInstanceRequest {
                name: "demo".into(),
            })
            .await;
        if !here.is_ok_and(|i| i.get_ref().state == pb::InstanceState::Running as i32) {
            readme.check(start);
        }
        for command in block {
            run_example(&mut readme, command, &agent, &target, &data_image).await;
        }
    }
    let completion = std::fs::read_to_string(scratch.join("completion.bash")).unwrap_or_default();
    assert!(
        completion.contains("kvm-agent"),
        "the completion example wrote no script"
    );
    assert!(
        scratch.join("demo.save").exists(),
        "the save example wrote no file"
    );
}
