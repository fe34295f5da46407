//! Each QEMU boxed in: seccomp sandbox, no new privileges, a cgroup with
//! its memory limit; and what happens with confinement off or without
//! cgroups.

use std::path::PathBuf;

use kvm_agent_tests::*;

/// A field of /proc/<pid>/status.
fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

/// The memory cgroup directory of a process, and its memory limit file.
fn memory_cgroup(pid: u32) -> (PathBuf, PathBuf) {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next().unwrap(), parts.next().unwrap());
        let path = path.trim_start_matches('/');
        if controllers.split(',').any(|c| c == "memory") {
            let dir = PathBuf::from("/sys/fs/cgroup/memory").join(path);
            return (dir.clone(), dir.join("memory.limit_in_bytes"));
        }
        if controllers.is_empty()
            && PathBuf::from("/sys/fs/cgroup")
                .join(path)
                .join("memory.max")
                .exists()
        {
            let dir = PathBuf::from("/sys/fs/cgroup").join(path);
            return (dir.clone(), dir.join("memory.max"));
        }
    }
    panic!("no memory cgroup in {cgroups}");
}

#[tokio::test]
async fn a_confined_qemu_is_sandboxed_unprivileged_to_grow_and_memory_limited() {
    let agent = TestAgent::start().await;
    let info = agent.start_spec(agent.spec("boxed", 64)).await;

    assert_eq!(
        status_field(info.pid, "Seccomp"),
        "2",
        "seccomp filter mode"
    );
    assert_eq!(status_field(info.pid, "NoNewPrivs"), "1");
    let (dir, limit) = memory_cgroup(info.pid);
    assert!(
        dir.ends_with(format!("{}/boxed", agent.cgroup_parent())),
        "{}",
        dir.display()
    );
    let limit: u64 = std::fs::read_to_string(&limit)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(limit, (64 + 512) << 20, "guest memory plus QEMU's headroom");
    let runtime = agent.runtime_json("boxed").await;
    assert_eq!(runtime["sandbox"], true);
    assert_eq!(runtime["cgroup"]["memory_limit_mib"], 64 + 512);

    // Devices still come and go: QEMU gets fds, it never opens a path.
    agent
        .add_nic("boxed", nic("eth9", "52:54:00:00:a0:01"))
        .await
        .expect("hot-add a NIC under the sandbox");
    let image = agent.raw_image("boxed.img", 8);
    agent
        .add_disk("boxed", disk("data", &image))
        .await
        .expect("hot-add a disk under the sandbox");

    agent
        .client()
        .await
        .stop_instance(kvm_agent_proto::v1::StopInstanceRequest {
            name: "boxed".into(),
            force: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!dir.exists(), "the cgroup goes with QEMU");
}

#[tokio::test]
async fn with_confinement_off_qemu_runs_unboxed_and_the_agent_warns() {
    let mut options = AgentOptions::default();
    options.args.extend(["--confinement".into(), "off".into()]);
    let agent = TestAgent::start_with(options).await;
    let info = agent.start_spec(agent.spec("open", 64)).await;

    assert_eq!(status_field(info.pid, "Seccomp"), "0");
    assert_eq!(status_field(info.pid, "NoNewPrivs"), "0");
    let (dir, _) = memory_cgroup(info.pid);
    assert!(
        !dir.to_string_lossy().contains(&agent.cgroup_parent()),
        "{}",
        dir.display()
    );
    assert!(
        agent.log().contains("confinement is off"),
        "{}",
        agent.log()
    );
    assert!(agent.runtime_json("open").await.get("sandbox").is_none());
}

#[tokio::test]
async fn without_writable_cgroups_the_agent_says_so_and_instances_still_run() {
    let mut options = AgentOptions::default();
    // Nothing under /proc can become a cgroup.
    options
        .args
        .extend(["--cgroup-root".into(), "/proc".into()]);
    let agent = TestAgent::start_with(options).await;
    let info = agent.start_spec(agent.spec("uncaged", 64)).await;

    let log = agent.log();
    assert!(log.contains("no writable cgroup hierarchy"), "{log}");
    assert!(log.contains("run without a cgroup"), "{log}");
    assert_eq!(
        status_field(info.pid, "Seccomp"),
        "2",
        "the sandbox still applies"
    );
    let (dir, _) = memory_cgroup(info.pid);
    assert!(
        !dir.to_string_lossy().contains(&agent.cgroup_parent()),
        "{}",
        dir.display()
    );
}
