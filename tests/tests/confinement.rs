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

    let uid = status_ids(info.pid, "Uid")[0];
    assert!(
        DEFAULT_UID_POOL.contains(&uid),
        "uid {uid}: one of the pool's"
    );
    assert_eq!(status_ids(info.pid, "Uid"), vec![uid; 4]);
    assert_eq!(status_ids(info.pid, "Gid"), vec![uid; 4]);
    let runtime = agent.runtime_json("boxed").await;
    assert_eq!(runtime["qemu_user"], json!({ "uid": uid, "gid": uid }));
    if runtime["accelerator"] == "kvm" {
        // KVM through the device's group, and no other.
        let kvm_group = std::fs::metadata("/dev/kvm").unwrap().gid();
        assert_eq!(status_ids(info.pid, "Groups"), vec![kvm_group]);
    } else {
        assert_eq!(status_ids(info.pid, "Groups"), Vec::<u32>::new());
    }
    let run_dir = std::fs::metadata(agent.run_dir("boxed")).unwrap();
    assert_eq!((run_dir.uid(), run_dir.gid()), (uid, uid));
    assert_eq!(run_dir.permissions().mode() & 0o777, 0o700);
    // Shut into a directory that holds the NICs' option ROMs and nothing
    // else, with the capability to get there as its only one.
    let chroot = agent.run_dir("boxed").join("root");
    assert_eq!(
        std::fs::read_link(format!("/proc/{}/root", info.pid)).unwrap(),
        chroot
    );
    let root_meta = std::fs::metadata(&chroot).unwrap();
    assert_eq!((root_meta.uid(), root_meta.mode() & 0o777), (0, 0o555));
    let inside: Vec<_> = std::fs::read_dir(&chroot)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(!inside.is_empty(), "hot-added NICs need their option ROMs");
    for file in &inside {
        let meta = std::fs::symlink_metadata(file).unwrap();
        assert!(
            meta.is_file() && file.extension().is_some_and(|e| e == "rom"),
            "{}: only ROM files, no directory to chroot into",
            file.display()
        );
        assert_eq!(
            (meta.uid(), meta.mode() & 0o222),
            (0, 0o200),
            "{}",
            file.display()
        );
    }
    // No directory fd leads out of the box either.
    for fd in std::fs::read_dir(format!("/proc/{}/fd", info.pid)).unwrap() {
        let target = std::fs::read_link(fd.unwrap().path()).unwrap();
        if target.is_dir() {
            assert_eq!(target, chroot, "QEMU holds a directory outside its root");
        }
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
        .expect("hot-add a NIC under the sandbox, its ROM found in the chroot");
    let escape = try_chroot_escape(info.pid, &chroot);
    assert_eq!(escape["ways_out"], json!([]), "{escape}");
    assert_eq!(escape["directories"], json!([]), "{escape}");
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
    agent.settled("boxed").await;
    assert!(!dir.exists(), "the cgroup goes with QEMU");
}

#[tokio::test]
async fn a_qemu_killed_by_its_cgroups_memory_limit_is_reported_as_such() {
    let agent = TestAgent::start().await;
    let info = agent.start_spec(agent.spec("hungry", 64)).await;
    let (dir, limit) = memory_cgroup(info.pid);
    let usage_file = if dir.join("memory.current").exists() {
        "memory.current"
    } else {
        "memory.usage_in_bytes"
    };
    let usage: u64 = std::fs::read_to_string(dir.join(usage_file))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Room for QEMU as it is, not for 512 MiB more.
    std::fs::write(&limit, (usage + (32 << 20)).to_string()).unwrap();
    let mut qmp = operator_qmp(&agent, "hungry");

    qmp.send(
        "object-add",
        json!({ "qom-type": "memory-backend-ram", "id": "ballast", "size": 512u64 << 20, "prealloc": true }),
    );

    let crashed = wait_for(std::time::Duration::from_secs(30), async || {
        let now = agent.instance("hungry").await;
        (now.state == pb::InstanceState::Crashed as i32).then_some(now)
    })
    .await
    .expect("QEMU is killed over its limit");
    assert!(
        crashed.state_detail.contains("OOM killer")
            && crashed.state_detail.contains("memory limit of 576 MiB"),
        "{}",
        crashed.state_detail
    );
    assert!(!process_alive(info.pid));
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
    let uid = status_ids(info.pid, "Uid")[0];
    assert!(DEFAULT_UID_POOL.contains(&uid), "the rest of the box holds");
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

/// The uids the agent gives QEMUs unless told otherwise.
const DEFAULT_UID_POOL: std::ops::RangeInclusive<u32> = 70000..=70999;

/// The interpreter the escape and isolation probes run in: the
/// distribution's, which QEMU's uid may execute.
const PYTHON: &str = "/usr/bin/python3";

/// A `setpriv` command that runs as `pid` does: its uid, gid and
/// supplementary groups, `no_new_privs`, and `CAP_SYS_CHROOT` kept
/// through exec when that process holds it. `cwd` is entered before the
/// drop, so it needn't be reachable by that uid.
fn as_process(pid: u32, cwd: &Path) -> Command {
    let uid = status_ids(pid, "Uid")[0];
    let gid = status_ids(pid, "Gid")[0];
    let groups = status_ids(pid, "Groups");
    let mut command = Command::new("setpriv");
    command
        .current_dir(cwd)
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"));
    if groups.is_empty() {
        command.arg("--clear-groups");
    } else {
        let list: Vec<String> = groups.iter().map(u32::to_string).collect();
        command.arg(format!("--groups={}", list.join(",")));
    }
    let effective = u64::from_str_radix(&status_field(pid, "CapEff"), 16).unwrap();
    if effective & (1 << 18) != 0 {
        command.args([
            "--inh-caps=-all,+sys_chroot",
            "--ambient-caps=-all,+sys_chroot",
        ]);
    }
    if status_field(pid, "NoNewPrivs") == "1" {
        command.arg("--no-new-privs");
    }
    command
}

/// Tries every directory below the working directory, taken as the root,
/// as a way out: chroot into it, then climb `..` from the working
/// directory that chroot leaves behind, the classic escape. Reports the
/// directories it found and where it got out.
const ESCAPE_PROBE: &str = r#"
import json, os
os.chroot("."); os.chdir("/")
box = os.stat("/")
inside = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
dirs = [os.path.join(top, d) for top, subdirs, _ in os.walk("/") for d in subdirs]
ways_out = []
for way in dirs + ["."]:
    os.fchdir(inside)
    os.chroot(".")
    try:
        os.chroot(way)
    except OSError as e:
        continue
    for _ in range(64):
        try:
            os.chdir("..")
        except OSError:
            break
    here = os.stat(".")
    if (here.st_dev, here.st_ino) != (box.st_dev, box.st_ino):
        ways_out.append({"via": way, "sees": sorted(os.listdir("."))[:20]})
print(json.dumps({"directories": dirs, "ways_out": ways_out}))
"#;

/// Runs [`ESCAPE_PROBE`] in `root` as the process `pid` (a QEMU, standing
/// where QEMU stands once it has entered that root), first in a box that
/// has a way out, to show the probe finds one where there is one.
fn try_chroot_escape(pid: u32, root: &Path) -> Value {
    let run = |dir: &Path| {
        let out = as_process(pid, dir)
            .args([PYTHON, "-c", ESCAPE_PROBE])
            .output()
            .expect("run setpriv (util-linux)");
        assert!(
            out.status.success(),
            "escape probe: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let leaky = tempfile::Builder::new()
        .prefix("ka-leaky-box")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(leaky.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir(leaky.path().join("usr")).unwrap();
    let control = run(leaky.path());
    assert_ne!(
        control["ways_out"],
        json!([]),
        "the probe must find the way out of a box with a directory: {control}"
    );
    run(root)
}

/// Checks, as the QEMU `pid` would, that it can't signal the QEMU
/// `other`, list `other_run_dir` or connect to the sockets there. Reports
/// each attempt as "ok" or the errno's name.
const ISOLATION_PROBE: &str = r#"
import errno, json, os, socket, sys
other = int(sys.argv[1])
out = {}
def attempt(name, action):
    try:
        action()
        out[name] = "ok"
    except OSError as e:
        out[name] = errno.errorcode[e.errno]
attempt("signal", lambda: os.kill(other, 0))
attempt("list", lambda: os.listdir("."))
for sock in ["qmp.sock", "qmp-operator.sock"]:
    attempt(sock, lambda: socket.socket(socket.AF_UNIX).connect(sock))
print(json.dumps(out))
"#;

fn reach_other_qemu(pid: u32, other: u32, other_run_dir: &Path) -> Value {
    let out = as_process(pid, other_run_dir)
        .args([PYTHON, "-c", ISOLATION_PROBE, &other.to_string()])
        .output()
        .expect("run setpriv (util-linux)");
    assert!(
        out.status.success(),
        "isolation probe: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn by_default_each_qemu_has_a_uid_of_its_own_and_cant_reach_another() {
    let agent = TestAgent::start().await;
    let one = agent.start_spec(agent.spec("one", 64)).await;
    let two = agent.start_spec(agent.spec("two", 64)).await;
    let (uid_one, uid_two) = (status_ids(one.pid, "Uid")[0], status_ids(two.pid, "Uid")[0]);
    assert_ne!(uid_one, uid_two);
    assert!(DEFAULT_UID_POOL.contains(&uid_one) && DEFAULT_UID_POOL.contains(&uid_two));
    assert!(
        !agent.log().contains("every QEMU runs as"),
        "no shared-user warning by default"
    );

    let reached = reach_other_qemu(one.pid, two.pid, &agent.run_dir("two"));
    assert_eq!(
        reached,
        json!({
            "signal": "EPERM",
            "list": "EACCES",
            "qmp.sock": "EACCES",
            "qmp-operator.sock": "EACCES",
        })
    );
    // The probe can tell: as that QEMU's own uid, the same calls work.
    let own = reach_other_qemu(two.pid, two.pid, &agent.run_dir("two"));
    assert_eq!(
        (&own["signal"], &own["list"]),
        (&json!("ok"), &json!("ok")),
        "{own}"
    );
}

#[tokio::test]
async fn one_user_for_every_qemu_is_an_explicit_choice_warned_about() {
    let mut options = AgentOptions::default();
    options.args.extend(["--qemu-user".into(), "nobody".into()]);
    let agent = TestAgent::start_with(options).await;
    let one = agent.start_spec(agent.spec("one", 64)).await;
    let two = agent.start_spec(agent.spec("two", 64)).await;
    assert_eq!(status_ids(one.pid, "Uid"), vec![65534; 4]);
    assert_eq!(status_ids(two.pid, "Uid"), vec![65534; 4]);
    let log = agent.log();
    assert!(log.contains("every QEMU runs as \"nobody\""), "{log}");
    assert!(log.contains("uid_pool"), "{log}");
}

#[tokio::test]
async fn a_pool_that_overlaps_an_account_is_refused_at_startup() {
    // uid 1 is the `daemon` account on Debian.
    let state = tempfile::tempdir().unwrap();
    let out = Command::new(agent_binary())
        .args(["serve", "--qemu-uid-pool", "1-5", "--state-dir"])
        .arg(state.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("uid pool 1-5 overlaps"), "{stderr}");
    assert!(
        stderr.contains("choose a range no account uses"),
        "{stderr}"
    );
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
                ..Default::default()
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
        .start_instance(start_request(agent.spec("fourth", 64)))
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
async fn a_migration_keeps_the_pool_uid_where_free_and_the_target_picks_otherwise() {
    let pool = |range: &str| AgentOptions {
        args: vec!["--qemu-uid-pool".into(), range.into()],
        ..AgentOptions::default()
    };
    let source = TestAgent::start_with(pool("64300-64309")).await;
    let same_pool = TestAgent::start_with(pool("64300-64309")).await;
    let other_pool = TestAgent::start_with(pool("64310-64319")).await;
    source.start_spec(source.spec("wanderer", 64)).await;
    same_pool.start_spec(same_pool.spec("resident", 64)).await;
    let (uid, _) = qemu_uid(&source, "wanderer").await;
    let (resident, _) = qemu_uid(&same_pool, "resident").await;
    assert_ne!(
        resident, uid,
        "a uid another agent's QEMU runs as is not handed out again"
    );

    migrate(&source, "wanderer", &same_pool)
        .await
        .expect("migrate to a node whose pool has the uid free");
    assert_eq!(
        qemu_uid(&same_pool, "wanderer").await.0,
        uid,
        "the runtime's uid came along"
    );

    // A target whose pool lacks the uid gives one of its own: the uid is
    // the executing node's decision, never the sender's.
    migrate(&same_pool, "wanderer", &other_pool)
        .await
        .expect("migrate to a node with another pool");
    let (moved, _) = qemu_uid(&other_pool, "wanderer").await;
    assert!((64310..=64319).contains(&moved), "{moved}");
}

/// The runtime of a running instance of `source`, rewritten to ask for
/// less confinement than any node gives: no sandbox (its option taken out
/// of the argv too, so the argv still matches), no chroot, a shared user,
/// and `cgroup` as given.
async fn forged_runtime(source: &TestAgent, name: &str, cgroup: Value) -> Value {
    let mut runtime = source.runtime_json(name).await;
    let argv = runtime["argv"].as_array().unwrap().clone();
    let at = argv.iter().position(|a| a == "-sandbox").unwrap();
    let mut argv = argv;
    argv.drain(at..at + 2);
    runtime["argv"] = Value::Array(argv);
    runtime["sandbox"] = json!(false);
    runtime["chroot"] = json!(false);
    runtime["qemu_user"] = json!({ "uid": 65534, "gid": 65534 });
    runtime["cgroup"] = cgroup;
    runtime
}

#[tokio::test]
async fn a_sender_cannot_loosen_the_targets_confinement() {
    let source = TestAgent::start().await;
    let target = TestAgent::start().await;
    source.start_spec(source.spec("loose", 64)).await;
    let forgeries = [
        json!(null),
        json!({ "memory_limit_mib": 64, "cpu_weight": 10000 }),
    ];
    for cgroup in forgeries {
        let runtime = forged_runtime(&source, "loose", cgroup.clone()).await;
        let mut client = target.client().await;
        client
            .accept_migration(pb::AcceptMigrationRequest {
                runtime_json: runtime.to_string(),
                source: "forger".into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("{cgroup}: {s:?}"));
        let pid = target.instance("loose").await.pid;

        // The target's own box, whatever the sender wrote.
        let uid = status_ids(pid, "Uid")[0];
        assert!(DEFAULT_UID_POOL.contains(&uid), "{cgroup}: uid {uid}");
        assert_eq!(status_field(pid, "Seccomp"), "2", "{cgroup}");
        assert_eq!(status_field(pid, "NoNewPrivs"), "1", "{cgroup}");
        assert_eq!(
            std::fs::read_link(format!("/proc/{pid}/root")).unwrap(),
            target.run_dir("loose").join("root"),
            "{cgroup}"
        );
        let (dir, limit) = memory_cgroup(pid);
        assert!(dir.ends_with(format!("{}/loose", target.cgroup_parent())));
        assert_eq!(
            std::fs::read_to_string(limit).unwrap().trim(),
            ((64u64 + 512) << 20).to_string(),
            "{cgroup}: the target's headroom"
        );
        let kept = target.runtime_json("loose").await;
        assert_eq!(kept["sandbox"], true);
        assert_eq!(kept["chroot"], true);
        assert_eq!(kept["qemu_user"]["uid"], uid);

        client
            .cancel_migration(pb::CancelMigrationRequest {
                name: "loose".into(),
            })
            .await
            .unwrap();
        wait_for(std::time::Duration::from_secs(10), async || {
            (!process_alive(pid)).then_some(())
        })
        .await
        .expect("the dropped incoming QEMU ends");
    }
}

#[tokio::test]
async fn extra_qemu_options_run_only_where_the_node_allows_them() {
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        "allowed_extra_options = [\"-device virtio-rng-pci,id=rng0\"]\n",
    )
    .unwrap();
    let mut options = AgentOptions::default();
    options
        .args
        .extend(["--config".into(), config.path().display().to_string()]);
    let allowing = TestAgent::start_with(options).await;
    let refusing = TestAgent::start().await;
    let extra = ["-device", "virtio-rng-pci,id=rng0"].map(str::to_owned);

    let mut spec = allowing.spec("rng", 64);
    spec.extra_args = extra.to_vec();
    allowing.start_spec(spec).await;
    let pci = operator_qmp(&allowing, "rng").pci_devices();
    assert!(
        pci.iter().any(|(_, id, _)| id == "rng0"),
        "QEMU has the allowed device: {pci:?}"
    );
    let runtime = allowing.runtime_json("rng").await;
    assert_eq!(runtime["extra_args"], json!(extra));

    let mut spec = refusing.spec("rng", 64);
    spec.extra_args = extra.to_vec();
    let refused = refusing.start_refused(spec).await;
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("allowed_extra_options"),
        "{refused:?}"
    );
    assert!(refusing.live_qemus().is_empty());
}
