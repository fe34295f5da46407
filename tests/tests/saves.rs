//! Save and restore against real QEMU: a guest's memory survives, files
//! are never replaced, and a damaged file starts nothing and stays as it
//! was.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kvm_agent_proto::v1 as pb;
use kvm_agent_tests::guest::{GuestConsole, boot_guest};
use kvm_agent_tests::*;
use tonic::Code;
use uuid::Uuid;

const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

async fn save(
    agent: &TestAgent,
    name: &str,
    path: &Path,
) -> Result<pb::SaveInstanceResponse, tonic::Status> {
    agent
        .client()
        .await
        .save_instance(pb::SaveInstanceRequest {
            name: name.into(),
            path: path.display().to_string(),
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn restore(
    agent: &TestAgent,
    path: &Path,
    paused: bool,
) -> Result<pb::RestoreInstanceResponse, tonic::Status> {
    agent
        .client()
        .await
        .restore_instance(pb::RestoreInstanceRequest {
            path: path.display().to_string(),
            paused,
        })
        .await
        .map(tonic::Response::into_inner)
}

fn state(info: &pb::InstanceInfo) -> pb::InstanceState {
    pb::InstanceState::try_from(info.state).unwrap()
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn a_saved_guest_comes_back_with_its_memory() {
    let agent = TestAgent::start().await;
    let mut spec = agent.spec("saved1", 256);
    boot_guest(&mut spec);
    let uuid: Uuid = spec.uuid.parse().unwrap();
    agent.start_spec(spec).await;
    let socket = agent.run_dir("saved1").join("serial.sock");
    let marker = format!("MARK-{}", Uuid::new_v4().simple());
    let line = marker.clone();
    tokio::task::spawn_blocking(move || {
        let mut console = GuestConsole::connect(&socket, BOOT_TIMEOUT);
        // /tmp lives in the initramfs: only the guest's RAM holds it.
        console.run(&format!("echo {line} > /tmp/marker"));
    })
    .await
    .unwrap();

    let file = agent.scratch().join("saved1.save");
    let saved = save(&agent, "saved1", &file).await.expect("save");
    assert!(saved.was_running);
    assert_eq!(mode(&file), 0o600);
    assert_eq!(saved.file_bytes, std::fs::metadata(&file).unwrap().len());
    let info = agent.instance("saved1").await;
    assert_eq!(state(&info), pb::InstanceState::Saved, "{info:?}");
    assert!(info.state_detail.contains("saved1.save"), "{info:?}");
    assert!(
        qemu_pids_with_uuids(&[uuid].into()).is_empty(),
        "QEMU must be gone after a save"
    );

    let restored = restore(&agent, &file, false).await.expect("restore");
    let info = restored.instance.unwrap();
    assert_eq!(state(&info), pb::InstanceState::Running, "{info:?}");
    assert_eq!(info.uuid, uuid.to_string());
    let socket = agent.run_dir("saved1").join("serial.sock");
    let seen = tokio::task::spawn_blocking(move || {
        let mut console = GuestConsole::attach(&socket, BOOT_TIMEOUT);
        console.run("cat /tmp/marker")
    })
    .await
    .unwrap();
    assert!(
        seen.contains(&marker),
        "the guest's memory survives: {seen:?}"
    );
}

#[tokio::test]
async fn a_paused_restore_waits_for_resume() {
    let agent = TestAgent::start().await;
    agent.start_spec(agent.spec("paused1", 128)).await;
    let file = agent.scratch().join("paused1.save");
    save(&agent, "paused1", &file).await.expect("save");

    let info = restore(&agent, &file, true)
        .await
        .expect("restore")
        .instance
        .unwrap();
    assert_eq!(state(&info), pb::InstanceState::Paused, "{info:?}");
    let mut qmp = operator_qmp(&agent, "paused1");
    let status = qmp.execute("query-status", serde_json::json!({}));
    assert_eq!(status["running"], false, "{status}");

    let info = agent
        .client()
        .await
        .resume_instance(pb::ResumeInstanceRequest {
            name: "paused1".into(),
        })
        .await
        .expect("resume")
        .into_inner();
    assert_eq!(state(&info), pb::InstanceState::Running);
    let status = qmp.execute("query-status", serde_json::json!({}));
    assert_eq!(status["running"], true, "{status}");
}

#[tokio::test]
async fn saving_over_an_existing_file_is_refused_and_the_guest_keeps_running() {
    let agent = TestAgent::start().await;
    let info = agent.start_spec(agent.spec("kept1", 128)).await;
    let file = agent.scratch().join("taken.save");
    std::fs::write(&file, b"someone else's file").unwrap();

    let err = save(&agent, "kept1", &file).await.unwrap_err();

    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert!(
        err.message().contains("already exists"),
        "{}",
        err.message()
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"someone else's file");
    let after = agent.instance("kept1").await;
    assert_eq!(state(&after), pb::InstanceState::Running);
    assert_eq!(after.pid, info.pid);
    let status = operator_qmp(&agent, "kept1").execute("query-status", serde_json::json!({}));
    assert_eq!(status["running"], true, "{status}");
}

#[tokio::test]
async fn a_save_that_runs_out_of_space_leaves_no_file_and_the_guest_running() {
    let agent = TestAgent::start().await;
    agent.start_spec(agent.spec("full1", 128)).await;
    let mount = tempfile::Builder::new().prefix("kasave").tempdir().unwrap();
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
        .arg(mount.path())
        .status()
        .expect("run mount");
    assert!(status.success(), "mounting a small tmpfs needs root");

    let err = save(&agent, "full1", &mount.path().join("full1.save"))
        .await
        .unwrap_err();

    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let left: Vec<_> = std::fs::read_dir(mount.path()).unwrap().collect();
    assert!(left.is_empty(), "the partial file is removed: {left:?}");
    let info = agent.instance("full1").await;
    assert_eq!(state(&info), pb::InstanceState::Running, "{info:?}");
    let status = operator_qmp(&agent, "full1").execute("query-status", serde_json::json!({}));
    assert_eq!(
        status["running"],
        true,
        "the guest runs again: {status}\n{}",
        agent.log()
    );
    let _ = Command::new("umount").arg(mount.path()).status();
}

/// A copy of `good` damaged by `damage`.
fn damaged(good: &Path, name: &str, damage: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut bytes = std::fs::read(good).unwrap();
    damage(&mut bytes);
    let path = good.with_file_name(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[tokio::test]
async fn a_damaged_save_file_is_refused_leaves_no_qemu_and_stays_as_it_was() {
    let agent = TestAgent::start().await;
    let spec = agent.spec("bad1", 128);
    let uuid: Uuid = spec.uuid.parse().unwrap();
    agent.start_spec(spec).await;
    let good = agent.scratch().join("good.save");
    save(&agent, "bad1", &good).await.expect("save");
    let len = std::fs::metadata(&good).unwrap().len() as usize;

    let cases = [
        (
            damaged(&good, "header-flip.save", |b| b[40] ^= 0x01),
            Code::InvalidArgument,
            "header is corrupt",
        ),
        (
            damaged(&good, "stream-flip.save", |b| b[len / 2] ^= 0x01),
            Code::InvalidArgument,
            "stream is corrupt",
        ),
        (
            damaged(&good, "truncated.save", |b| b.truncate(len - 1000)),
            Code::InvalidArgument,
            "truncated",
        ),
        (
            damaged(&good, "version.save", |b| {
                b[8..12].copy_from_slice(&9u32.to_le_bytes())
            }),
            Code::InvalidArgument,
            "format version 9 is not supported",
        ),
        (
            damaged(&good, "not-a-save.save", |b| {
                b[..8].copy_from_slice(b"GARBAGE!")
            }),
            Code::InvalidArgument,
            "not a kvm-agent save file",
        ),
    ];
    for (file, code, words) in &cases {
        let before = std::fs::read(file).unwrap();
        let err = restore(&agent, file, false).await.unwrap_err();
        assert_eq!(err.code(), *code, "{}: {err:?}", file.display());
        assert!(
            err.message().contains(words),
            "{}: {}",
            file.display(),
            err.message()
        );
        assert_eq!(
            std::fs::read(file).unwrap(),
            before,
            "{} is left as it was",
            file.display()
        );
        assert!(
            qemu_pids_with_uuids(&[uuid].into()).is_empty(),
            "{}: no QEMU is left",
            file.display()
        );
        let info = agent.instance("bad1").await;
        assert_eq!(
            state(&info),
            pb::InstanceState::Saved,
            "{}: {info:?}",
            file.display()
        );
    }

    // Another instance now has the name: the file's uuid doesn't match.
    let mut other = agent.spec("bad1", 128);
    other.uuid = Uuid::new_v4().to_string();
    agent.start_spec(other).await;
    agent
        .client()
        .await
        .stop_instance(pb::StopInstanceRequest {
            name: "bad1".into(),
            force: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let err = restore(&agent, &good, false).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("another instance"),
        "{}",
        err.message()
    );
    assert!(qemu_pids_with_uuids(&[uuid].into()).is_empty());
    assert!(agent.live_qemus().is_empty(), "nothing starts");

    let err = restore(&agent, Path::new("relative.save"), false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = restore(&agent, &agent.scratch().join("missing.save"), false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
}
