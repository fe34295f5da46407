//! The host files a request names reach QEMU only from beneath the
//! allowed roots, whatever happens to the path between the check and the
//! open; and save, restore and boot paths can't point the agent at its own
//! state or at a FIFO that would hold the call.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kvm_agent_proto::v1 as pb;
use kvm_agent_tests::*;
use tonic::Code;

/// An agent whose host files must lie under `imgs`, with a decoy file
/// outside it; the temp dir holding both goes with the last value.
async fn rooted_agent() -> (TestAgent, PathBuf, PathBuf, tempfile::TempDir) {
    let mut options = AgentOptions::default();
    let dir = tempfile::Builder::new()
        .prefix("ka-roots")
        .tempdir()
        .unwrap();
    let scratch = dir.path();
    let imgs = scratch.join("imgs");
    std::fs::create_dir(&imgs).unwrap();
    let decoy = scratch.join("decoy.raw");
    std::fs::write(&decoy, vec![0xd1; 1 << 20]).unwrap();
    options
        .args
        .extend(["--allowed-root".into(), imgs.display().to_string()]);
    (TestAgent::start_with(options).await, imgs, decoy, dir)
}

/// Device and inode of each file `pid` holds open.
fn open_inodes(pid: u32) -> HashSet<(u64, u64)> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.filter_map(Result::ok)
                .filter_map(|fd| std::fs::metadata(fd.path()).ok())
                .map(|m| (m.dev(), m.ino()))
                .collect()
        })
        .unwrap_or_default()
}

fn inode(path: &Path) -> (u64, u64) {
    let meta = std::fs::metadata(path).unwrap();
    (meta.dev(), meta.ino())
}

#[tokio::test]
async fn a_path_swapped_to_a_symlink_during_starts_never_hands_qemu_an_outside_file() {
    let (agent, imgs, decoy, _dir) = rooted_agent().await;
    let good = imgs.join("good.raw");
    std::fs::write(&good, vec![0x60; 1 << 20]).unwrap();
    let racy = imgs.join("race.raw");
    std::fs::hard_link(&good, &racy).unwrap();

    // Flip the path between a hard link to the allowed image and a
    // symlink to the decoy, each swap one atomic rename.
    let stop = Arc::new(AtomicBool::new(false));
    let flipper = {
        let (stop, imgs, good, decoy, racy) = (
            stop.clone(),
            imgs.clone(),
            good.clone(),
            decoy.clone(),
            racy.clone(),
        );
        std::thread::spawn(move || {
            let (link, sym) = (imgs.join(".link"), imgs.join(".sym"));
            let mut flips = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let _ = std::fs::remove_file(&link);
                std::fs::hard_link(&good, &link).unwrap();
                std::fs::rename(&link, &racy).unwrap();
                let _ = std::fs::remove_file(&sym);
                std::os::unix::fs::symlink(&decoy, &sym).unwrap();
                std::fs::rename(&sym, &racy).unwrap();
                flips += 2;
            }
            flips
        })
    };

    let decoy_inode = inode(&decoy);
    let good_inode = inode(&good);
    let (mut started, mut refused) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while started + refused < 30 && Instant::now() < deadline {
        let mut spec = agent.spec("racer", 64);
        let mut image = disk("racy", &racy);
        image.read_only = true;
        spec.disks = vec![image];
        let reply = agent
            .client()
            .await
            .start_instance(start_request(spec))
            .await;
        match reply {
            Ok(info) => {
                started += 1;
                let held = open_inodes(info.into_inner().pid);
                assert!(
                    !held.contains(&decoy_inode),
                    "QEMU was handed the file outside the allowed roots"
                );
                assert!(held.contains(&good_inode), "QEMU holds the allowed image");
                agent
                    .client()
                    .await
                    .stop_instance(pb::StopInstanceRequest {
                        name: "racer".into(),
                        force: true,
                        ..Default::default()
                    })
                    .await
                    .unwrap();
            }
            Err(status) => {
                refused += 1;
                assert!(
                    matches!(
                        status.code(),
                        Code::InvalidArgument | Code::PermissionDenied | Code::FailedPrecondition
                    ),
                    "{status:?}"
                );
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let flips = flipper.join().unwrap();
    assert!(flips > 1000, "only {flips} swaps");
    assert!(
        started > 0 && refused > 0,
        "{started} started, {refused} refused: the race was not exercised"
    );
    assert!(
        agent.live_qemus().is_empty(),
        "no QEMU left behind by a refused start"
    );
}

#[tokio::test]
async fn a_soft_reboot_refuses_an_image_that_now_leads_outside_the_roots() {
    let (agent, imgs, decoy, _dir) = rooted_agent().await;
    let image = imgs.join("boot.raw");
    std::fs::write(&image, vec![0x42; 1 << 20]).unwrap();
    let mut spec = agent.spec("moved", 64);
    spec.disks = vec![disk("root", &image)];
    let before = agent.start_spec(spec).await;

    std::fs::remove_file(&image).unwrap();
    std::os::unix::fs::symlink(&decoy, &image).unwrap();
    let refused = agent
        .client()
        .await
        .reboot_instance(pb::RebootInstanceRequest {
            name: "moved".into(),
            mode: pb::RebootMode::Soft as i32,
            spec: None,
            ..Default::default()
        })
        .await
        .unwrap_err();

    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("outside the directories this node allows"),
        "{}",
        refused.message()
    );
    let after = agent.instance("moved").await;
    assert_eq!(after.pid, before.pid, "the guest kept running");
    assert_eq!(after.state, pb::InstanceState::Running as i32);
    assert!(!open_inodes(after.pid).contains(&inode(&decoy)));
}

#[tokio::test]
async fn save_and_restore_paths_in_the_agents_state_are_refused() {
    let agent = TestAgent::start().await;
    agent.start_spec(agent.spec("kept", 64)).await;
    let mut client = agent.client().await;
    let inside = agent.state_dir().join("runtime").join("x.json");

    let save = client
        .save_instance(pb::SaveInstanceRequest {
            name: "kept".into(),
            path: inside.display().to_string(),
        })
        .await
        .unwrap_err();
    let restore = client
        .restore_instance(pb::RestoreInstanceRequest {
            path: agent.record_path("kept").display().to_string(),
            paused: false,
        })
        .await
        .unwrap_err();

    for refused in [&save, &restore] {
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
        assert!(
            refused.message().contains("state directory"),
            "{}",
            refused.message()
        );
    }
    assert!(!inside.exists());
    assert_eq!(
        agent.instance("kept").await.state,
        pb::InstanceState::Running as i32
    );
}

#[tokio::test]
async fn a_fifo_as_kernel_initrd_or_save_file_is_refused_at_once() {
    let agent = TestAgent::start().await;
    let fifo = agent.scratch().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    let kernel = agent.scratch().join("vmlinuz");
    std::fs::write(&kernel, b"not a kernel").unwrap();
    let fifo_text = fifo.display().to_string();
    let mut client = agent.client().await;
    let started = Instant::now();

    let mut as_kernel = agent.spec("fifo-kernel", 64);
    as_kernel.boot = Some(pb::BootSpec {
        kernel: fifo_text.clone(),
        ..Default::default()
    });
    let mut as_initrd = agent.spec("fifo-initrd", 64);
    as_initrd.boot = Some(pb::BootSpec {
        kernel: kernel.display().to_string(),
        initrd: fifo_text.clone(),
        ..Default::default()
    });
    let mut refusals = Vec::new();
    for spec in [as_kernel, as_initrd] {
        refusals.push(
            client
                .start_instance(start_request(spec))
                .await
                .unwrap_err(),
        );
    }
    refusals.push(
        client
            .restore_instance(pb::RestoreInstanceRequest {
                path: fifo_text,
                paused: false,
            })
            .await
            .unwrap_err(),
    );

    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a FIFO held a call for {:?}",
        started.elapsed()
    );
    for refused in &refusals {
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
        assert!(
            refused.message().contains("not a regular file"),
            "{}",
            refused.message()
        );
    }
    assert!(agent.live_qemus().is_empty());
}
