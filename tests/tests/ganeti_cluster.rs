//! A real Ganeti 3.0 cluster drives the agents: two nodes, each in network,
//! mount and UTS namespaces of its own with its own sshd, Ganeti daemons
//! and agent installed from the Debian package, driven by `gnt-*` commands.
//! The steps and their checks are in `integrations/ganeti/tests/cluster.sh`,
//! which an operator can also run by hand; this test builds its inputs and
//! runs it.

use std::path::PathBuf;
use std::process::Command;

use kvm_agent_tests::guest::guest_image;
use kvm_agent_tests::{agent_binary, require_qemu};

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

#[test]
fn a_real_ganeti_cluster_runs_its_instances_through_the_agents() {
    require_qemu();
    let out = tempfile::tempdir().unwrap();
    let built = Command::new(workspace().join("scripts/build-deb"))
        .arg("--binary")
        .arg(agent_binary())
        .arg("--out")
        .arg(out.path())
        .arg("--uncompressed")
        .output()
        .expect("run scripts/build-deb");
    assert!(
        built.status.success(),
        "building the package failed:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let deb = String::from_utf8_lossy(&built.stdout).trim().to_owned();
    let guest = guest_image();
    let guest_dir = guest.kernel.parent().unwrap();

    // The script's own timeout is the one that counts; this one only keeps
    // a wedged run from holding the suite forever.
    let run = Command::new("timeout")
        .arg("--kill-after=30")
        .arg("900")
        .arg(workspace().join("integrations/ganeti/tests/cluster.sh"))
        .arg("--binary")
        .arg(agent_binary())
        .arg("--deb")
        .arg(&deb)
        .arg("--guest")
        .arg(guest_dir)
        .output()
        .expect("run integrations/ganeti/tests/cluster.sh");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "the cluster run failed ({}):\n{stdout}\n{stderr}",
        run.status
    );
    eprintln!("{stdout}");
}
