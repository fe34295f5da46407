//! The Debian package: what it holds, and that what it holds works. The
//! binary runs, the init script starts the agent and stops it without
//! stopping its instances, and the Python client it carries works with
//! the distribution's python3.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use kvm_agent_proto::v1 as pb;
use kvm_agent_tests::*;

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn run(command: &mut Command) -> Output {
    let output = command.output().expect("run a command");
    assert!(
        output.status.success(),
        "{command:?} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn text(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Runs the package's init script with the defaults file `defaults`.
fn init_script(tree: &Path, defaults: &Path, action: &str) -> Output {
    Command::new(tree.join("etc/init.d/kvm-agent"))
        .arg(action)
        .env("KVM_AGENT_DEFAULTS", defaults)
        .output()
        .expect("run the init script")
}

async fn client_on(
    socket: &Path,
) -> Option<pb::node_agent_client::NodeAgentClient<tonic::transport::Channel>> {
    let socket = socket.to_owned();
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                tokio::net::UnixStream::connect(socket)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await
        .ok()?;
    Some(pb::node_agent_client::NodeAgentClient::new(channel))
}

/// Stops what the test started through the package, however it ends.
struct Cleanup {
    tree: PathBuf,
    defaults: PathBuf,
    uuid: uuid::Uuid,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = init_script(&self.tree, &self.defaults, "stop");
        for pid in qemu_pids_with_uuids(&[self.uuid].into()) {
            send_signal(pid, libc::SIGKILL);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_package_holds_a_working_agent_init_script_and_client() {
    let out = tempfile::tempdir().unwrap();
    // Uncompressed: xz takes minutes over a debug build's binary, and the
    // compression is dpkg-deb's own work, not the package's.
    let built = run(Command::new(workspace().join("scripts/build-deb"))
        .arg("--uncompressed")
        .arg("--binary")
        .arg(agent_binary())
        .arg("--out")
        .arg(out.path()));
    let deb = PathBuf::from(text(&built));
    let field = |name: &str| {
        text(&run(Command::new("dpkg-deb")
            .arg("--field")
            .arg(&deb)
            .arg(name)))
    };
    assert_eq!(field("Package"), "kvm-agent");
    assert_eq!(field("Architecture"), "amd64");
    assert!(field("Depends").contains("qemu-system-x86"));
    let conffiles = text(&run(Command::new("dpkg-deb")
        .arg("--info")
        .arg(&deb)
        .arg("conffiles")));
    assert_eq!(
        conffiles,
        "/etc/kvm-agent/config.toml\n/etc/init.d/kvm-agent"
    );

    let tree = tempfile::tempdir().unwrap();
    run(Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(tree.path()));
    let tree = tree.path();
    let version = text(&run(
        Command::new(tree.join("usr/bin/kvm-agent")).arg("--version")
    ));
    assert!(version.starts_with("kvm-agent "), "{version}");
    for completion in [
        "usr/share/bash-completion/completions/kvm-agent",
        "usr/share/zsh/vendor-completions/_kvm-agent",
        "usr/share/fish/vendor_completions.d/kvm-agent.fish",
    ] {
        let script = std::fs::read_to_string(tree.join(completion)).unwrap();
        assert!(script.contains("kvm-agent"), "{completion}");
    }
    let unit = std::fs::read_to_string(tree.join("lib/systemd/system/kvm-agent.service")).unwrap();
    assert!(
        unit.contains("ExecStart=/usr/bin/kvm-agent serve"),
        "{unit}"
    );
    assert!(unit.contains("KillMode=process"), "{unit}");
    assert!(
        tree.join("usr/share/kvm-agent/ganeti/hypervisor_init.py")
            .is_file()
    );
    assert!(
        tree.join("usr/lib/kvm-agent/python/kvm_agent_ganeti/hypervisor.py")
            .is_file()
    );

    // The init script: the agent starts, an instance runs under it, and
    // a stop ends the agent alone; started again, it adopts the instance.
    let state = tempfile::tempdir().unwrap();
    let socket = state.path().join("agent.sock");
    let defaults = state.path().join("defaults");
    std::fs::write(
        &defaults,
        format!(
            "DAEMON={daemon}\nDAEMON_ARGS=\"serve --state-dir {state} --cgroup-parent kvm-agent-test/package --powerdown-timeout-ms 1000\"\nPIDFILE={state}/agent.pid\nLOGFILE={state}/agent.log\nSTOP_TIMEOUT=20\n",
            daemon = tree.join("usr/bin/kvm-agent").display(),
            state = state.path().display(),
        ),
    )
    .unwrap();
    let uuid = uuid::Uuid::new_v4();
    let _cleanup = Cleanup {
        tree: tree.to_owned(),
        defaults: defaults.clone(),
        uuid,
    };
    let started = init_script(tree, &defaults, "start");
    assert!(started.status.success(), "{started:?}");
    let mut client = wait_for(Duration::from_secs(20), async || client_on(&socket).await)
        .await
        .expect("the agent the init script started answers");
    let spec = pb::InstanceSpec {
        name: "packaged".into(),
        uuid: uuid.to_string(),
        memory_mib: 64,
        ..Default::default()
    };

    let qemu = client
        .start_instance(start_request(spec))
        .await
        .expect("start through the packaged agent")
        .into_inner()
        .pid;
    assert!(init_script(tree, &defaults, "status").status.success());

    // The packaged client, with the distribution's python3.
    let listed = run(Command::new("/usr/bin/python3")
        .env("PYTHONPATH", tree.join("usr/lib/kvm-agent/python"))
        .arg("-c")
        .arg("import sys, kvm_agent_client as k\nwith k.Client.unix(sys.argv[1]) as c:\n    print(' '.join(i.name for i in c.list_instances().instances))")
        .arg(&socket));
    assert_eq!(text(&listed), "packaged");

    let stopped = init_script(tree, &defaults, "stop");
    assert!(stopped.status.success(), "{stopped:?}");
    assert_eq!(
        init_script(tree, &defaults, "status").status.code(),
        Some(3)
    );
    assert!(process_alive(qemu), "the instance outlives the agent");
    assert!(init_script(tree, &defaults, "start").status.success());
    let mut client = wait_for(Duration::from_secs(20), async || client_on(&socket).await)
        .await
        .expect("the agent answers again");
    let adopted = wait_for(Duration::from_secs(20), async || {
        let info = client
            .get_instance(pb::GetInstanceRequest {
                name: "packaged".into(),
            })
            .await
            .ok()?
            .into_inner();
        (!info.reconciling).then_some(info)
    })
    .await
    .expect("the instance, reconciled");
    assert_eq!(adopted.pid, qemu);
    client
        .stop_instance(pb::StopInstanceRequest {
            name: "packaged".into(),
            force: true,
            powerdown_timeout_ms: 0,
        })
        .await
        .unwrap();
    assert!(init_script(tree, &defaults, "stop").status.success());
    // Nothing is left running, whatever failed above.
    assert!(qemu_pids_with_uuids(&[uuid].into()).is_empty());
}
