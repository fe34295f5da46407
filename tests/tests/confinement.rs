//! Each QEMU boxed in: an unprivileged user (fixed, or one per instance
//! from a pool), seccomp sandbox, no new privileges, a cgroup with its
//! memory limit, and only fds for the host's files; and what happens with
//! confinement off or without cgroups.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use kvm_agent_proto::v1 as pb;
use kvm_agent_tests::*;
use serde_json::{Value, json};
use tonic::Code;

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

    let nobody = 65534;
    assert_eq!(status_ids(info.pid, "Uid"), vec![nobody; 4]);
    assert_eq!(status_ids(info.pid, "Gid"), vec![nobody; 4]);
    let runtime = agent.runtime_json("boxed").await;
    assert_eq!(
        runtime["qemu_user"],
        json!({ "uid": nobody, "gid": nobody })
    );
    if runtime["accelerator"] == "kvm" {
        // KVM through the device's group, and no other.
        let kvm_group = std::fs::metadata("/dev/kvm").unwrap().gid();
        assert_eq!(status_ids(info.pid, "Groups"), vec![kvm_group]);
    } else {
        assert_eq!(status_ids(info.pid, "Groups"), Vec::<u32>::new());
    }
    let run_dir = std::fs::metadata(agent.run_dir("boxed")).unwrap();
    assert_eq!((run_dir.uid(), run_dir.gid()), (nobody, nobody));
    assert_eq!(run_dir.permissions().mode() & 0o777, 0o700);
    // Shut into an empty directory, with the capability to get there as
    // its only one.
    let chroot = agent.run_dir("boxed").join("root");
    assert_eq!(
        std::fs::read_link(format!("/proc/{}/root", info.pid)).unwrap(),
        chroot
    );
    let inside = files_under(&chroot);
    assert!(!inside.is_empty(), "hot-added NICs need their option ROMs");
    for file in &inside {
        let meta = std::fs::metadata(file).unwrap();
        assert!(
            file.extension().is_some_and(|e| e == "rom"),
            "{}",
            file.display()
        );
        assert_eq!(
            (meta.uid(), meta.mode() & 0o222),
            (0, 0o200),
            "{}",
            file.display()
        );
    }
    let cap_sys_chroot = format!("{:016x}", 1u64 << 18);
    assert_eq!(status_field(info.pid, "CapEff"), cap_sys_chroot);
    assert_eq!(status_field(info.pid, "CapPrm"), cap_sys_chroot);
    assert_eq!(runtime["chroot"], true);

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
    assert!(open_files(info.pid).contains(&image));

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
    assert_eq!(status_ids(info.pid, "Uid"), vec![0; 4], "root, as asked");
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
    let runtime = agent.runtime_json("open").await;
    assert!(runtime.get("sandbox").is_none(), "{runtime}");
    assert!(runtime.get("qemu_user").is_none(), "{runtime}");
    assert!(runtime.get("chroot").is_none(), "{runtime}");
    assert_eq!(
        std::fs::read_link(format!("/proc/{}/root", info.pid)).unwrap(),
        PathBuf::from("/")
    );
}

#[tokio::test]
async fn a_qemu_without_a_sandbox_is_reported_and_its_instances_still_run_boxed() {
    // A QEMU built without seccomp refuses -sandbox; this one pretends to
    // be such a build. QEMU's user must reach it, so it lives outside the
    // agent's private directories.
    let dir = tempfile::Builder::new()
        .prefix("ka-noseccomp")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let qemu = dir.path().join("qemu-system-x86_64");
    std::fs::write(
        &qemu,
        format!(
            "#!/bin/sh\nfor arg in \"$@\"; do\n  [ \"$arg\" = -sandbox ] && {{ echo \"-sandbox: there is no option group 'sandbox'\" >&2; exit 1; }}\ndone\nexec {} \"$@\"\n",
            require_qemu().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&qemu, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut options = AgentOptions::default();
    options
        .args
        .extend(["--qemu-binary".into(), qemu.display().to_string()]);
    let agent = TestAgent::start_with(options).await;

    let info = agent.start_spec(agent.spec("unsandboxed", 64)).await;

    let log = agent.log();
    assert!(log.contains("has no seccomp sandbox"), "{log}");
    assert_eq!(status_field(info.pid, "Seccomp"), "0");
    assert_eq!(status_field(info.pid, "NoNewPrivs"), "1");
    assert_eq!(
        status_ids(info.pid, "Uid"),
        vec![65534; 4],
        "the rest of the box holds"
    );
    let runtime = agent.runtime_json("unsandboxed").await;
    assert!(runtime.get("sandbox").is_none(), "{runtime}");
    assert_eq!(runtime["chroot"], true, "{runtime}");
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

/// Every file below `dir`.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().map(Result::unwrap) {
        if entry.file_type().unwrap().is_dir() {
            files.extend(files_under(&entry.path()));
        } else {
            files.push(entry.path());
        }
    }
    files
}

/// A raw image of `mib` MiB filled with `byte`, owned by root with mode
/// 0600.
fn private_image(path: &Path, mib: usize, byte: u8) {
    std::fs::write(path, vec![byte; mib << 20]).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let meta = std::fs::metadata(path).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o600));
}

/// Runs a qemu-io command on a block node through QEMU's block layer. Its
/// report goes to QEMU's stdout, which is qemu.log.
fn qemu_io(qmp: &mut Qmp, node: &str, command: &str) {
    qmp.execute(
        "human-monitor-command",
        json!({ "command-line": format!("qemu-io {node} \"{command}\"") }),
    );
}

/// The access mode (`O_RDONLY`, `O_WRONLY` or `O_RDWR`) of each fd `pid`
/// holds on `path`.
fn access_modes(pid: u32, path: &Path) -> Vec<i32> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == path))
        .map(|e| {
            let info = std::fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                e.file_name().to_string_lossy()
            ))
            .unwrap();
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .unwrap()
                .trim();
            i32::from_str_radix(flags, 8).unwrap() & libc::O_ACCMODE
        })
        .collect()
}

/// The format node of the disk `name`, from the instance's runtime.
fn format_node(runtime: &Value, name: &str) -> String {
    let uuid = runtime["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == name)
        .and_then(|d| d["uuid"].as_str())
        .unwrap_or_else(|| panic!("no disk {name} in {runtime}"));
    // As ARCHITECTURE.md names them: fmt-<first 12 hex digits of the uuid>.
    format!("fmt-{}", &uuid.replace('-', "")[..12])
}

#[tokio::test]
async fn a_root_only_image_serves_qemu_through_the_agents_fd_but_not_by_path() {
    let agent = TestAgent::start().await;
    let boot = agent.scratch().join("boot.img");
    let extra = agent.scratch().join("extra.img");
    private_image(&boot, 4, 0x5a);
    private_image(&extra, 4, 0x3c);
    let mut spec = agent.spec("private", 64);
    spec.disks = vec![disk("root", &boot)];
    agent.start_spec(spec).await;
    agent
        .add_disk("private", disk("extra", &extra))
        .await
        .expect("hot-add a root-only image");
    let info = agent.instance("private").await;
    let runtime = agent.runtime_json("private").await;

    // QEMU reads what is in them, and holds them open for writing.
    let mut qmp = operator_qmp(&agent, "private");
    for (name, path, byte) in [("root", &boot, 0x5a), ("extra", &extra, 0x3c)] {
        qemu_io(
            &mut qmp,
            &format_node(&runtime, name),
            &format!("read -P {byte:#x} 0 64k"),
        );
        assert_eq!(access_modes(info.pid, path), vec![libc::O_RDWR], "{name}");
    }

    // QEMU's own user can't open them by path.
    let uid = status_ids(info.pid, "Uid")[0];
    let gid = status_ids(info.pid, "Gid")[0];
    assert_ne!(uid, 0);
    for path in [&boot, &extra] {
        let cat = Command::new("setpriv")
            .args([
                "--reuid",
                &uid.to_string(),
                "--regid",
                &gid.to_string(),
                "--clear-groups",
            ])
            .arg("cat")
            .arg(path)
            .output()
            .expect("run setpriv (util-linux)");
        assert!(!cat.status.success(), "uid {uid} read {}", path.display());
        let stderr = String::from_utf8_lossy(&cat.stderr);
        assert!(stderr.contains("Permission denied"), "{stderr}");
    }

    // A quit flushes QEMU's stdout: both reads found their pattern.
    qmp.execute("quit", json!({}));
    drop(qmp);
    wait_for(std::time::Duration::from_secs(10), async || {
        (!process_alive(info.pid)).then_some(())
    })
    .await
    .expect("QEMU quits");
    let log = std::fs::read_to_string(agent.run_dir("private").join("qemu.log")).unwrap();
    assert_eq!(log.matches("read 65536/65536 bytes").count(), 2, "{log}");
    assert!(!log.contains("Pattern verification failed"), "{log}");
}

async fn qemu_uid(agent: &TestAgent, name: &str) -> (u32, u32) {
    let info = agent.instance(name).await;
    let uid = status_ids(info.pid, "Uid")[0];
    let runtime: Value = agent.runtime_json(name).await;
    assert_eq!(runtime["qemu_user"]["uid"], uid, "{runtime}");
    assert_eq!(runtime["qemu_user"]["gid"], uid, "{runtime}");
    assert_eq!(status_ids(info.pid, "Gid")[0], uid);
    (uid, info.pid)
}

#[tokio::test]
async fn pool_uids_are_one_per_instance_and_kept_across_restart_and_reboot() {
    let mut options = AgentOptions::default();
    options
        .args
        .extend(["--qemu-uid-pool".into(), "64200-64202".into()]);
    let mut agent = TestAgent::start_with(options).await;
    agent.start_spec(agent.spec("first", 64)).await;
    agent.start_spec(agent.spec("second", 64)).await;
    let (first, _) = qemu_uid(&agent, "first").await;
    let (second, _) = qemu_uid(&agent, "second").await;
    assert_ne!(first, second);
    assert!((64200..=64202).contains(&first) && (64200..=64202).contains(&second));

    agent.restart().await;
    assert_eq!(qemu_uid(&agent, "first").await.0, first);
    assert_eq!(qemu_uid(&agent, "second").await.0, second);
    // The restarted agent knows which uids are held.
    agent.start_spec(agent.spec("third", 64)).await;
    let (third, _) = qemu_uid(&agent, "third").await;
    assert!(third != first && third != second, "{third}");

    for name in ["first", "second"] {
        let (uid, pid) = qemu_uid(&agent, name).await;
        agent
            .client()
            .await
            .reboot_instance(pb::RebootInstanceRequest {
                name: name.into(),
                mode: pb::RebootMode::Soft as i32,
                spec: None,
            })
            .await
            .unwrap_or_else(|s| panic!("soft reboot of {name}: {s:?}"));
        let (after, new_pid) = qemu_uid(&agent, name).await;
        assert_ne!(new_pid, pid, "a soft reboot starts a new QEMU");
        assert_eq!(after, uid, "{name} keeps its uid");
    }

    // The pool is used up: a fourth instance is refused, clearly.
    let refused = agent
        .client()
        .await
        .start_instance(pb::StartInstanceRequest {
            spec: Some(agent.spec("fourth", 64)),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("64200-64202"),
        "{}",
        refused.message()
    );
}

/// Migrates `name` from `source` to `target` and returns how it ended.
async fn migrate(source: &TestAgent, name: &str, target: &TestAgent) -> Result<(), tonic::Status> {
    let mut stream = source
        .client()
        .await
        .migrate_instance(pb::MigrateInstanceRequest {
            name: name.into(),
            target: target.address(),
            options: None,
        })
        .await?
        .into_inner();
    while let Some(progress) = tokio_stream::StreamExt::next(&mut stream).await {
        progress?;
    }
    Ok(())
}

#[tokio::test]
async fn a_migration_keeps_the_pool_uid_and_a_target_holding_it_refuses() {
    let pool = |range: &str| AgentOptions {
        args: vec!["--qemu-uid-pool".into(), range.into()],
        ..AgentOptions::default()
    };
    let source = TestAgent::start_with(pool("64300-64309")).await;
    let target = TestAgent::start_with(pool("64300-64309")).await;
    source.start_spec(source.spec("wanderer", 64)).await;
    target.start_spec(target.spec("resident", 64)).await;
    let (uid, source_pid) = qemu_uid(&source, "wanderer").await;
    assert_eq!(
        qemu_uid(&target, "resident").await.0,
        uid,
        "both took the pool's first"
    );

    // The target's resident holds that uid: the migration is refused and
    // the guest stays where it was.
    let refused = migrate(&source, "wanderer", &target).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("resident"),
        "{}",
        refused.message()
    );
    assert!(process_alive(source_pid));
    assert_eq!(
        source.instance("wanderer").await.state,
        pb::InstanceState::Running as i32
    );

    target
        .client()
        .await
        .stop_instance(pb::StopInstanceRequest {
            name: "resident".into(),
            force: true,
            ..Default::default()
        })
        .await
        .unwrap();
    migrate(&source, "wanderer", &target)
        .await
        .expect("migrate once the uid is free");
    assert_eq!(
        qemu_uid(&target, "wanderer").await.0,
        uid,
        "the runtime's uid came along"
    );
}
