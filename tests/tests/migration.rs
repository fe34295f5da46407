//! Live migration between two real agents: the guest keeps its memory and
//! its devices' slots, and every failure leaves exactly one owner.

use std::process::Command;
use std::time::Duration;

use kvm_agent_proto::v1 as pb;
use kvm_agent_tests::guest::{
    GuestConsole, boot_guest, leave_marker, marker_and_pci_devices, pci_address,
};
use kvm_agent_tests::hosts::Hosts;
use kvm_agent_tests::migration::{Migration, ResetPort};
use kvm_agent_tests::proxy::{ApiProxy, Connection, Then};
use kvm_agent_tests::*;
use tokio::sync::oneshot;
use tokio_stream::StreamExt;
use tonic::Code;
use uuid::Uuid;

const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// Slow enough that a guest's memory takes many seconds to send.
const CRAWL: u64 = 1 << 20;

fn state(info: &pb::InstanceInfo) -> pb::InstanceState {
    pb::InstanceState::try_from(info.state).unwrap()
}

fn crawl() -> pb::MigrationOptions {
    pb::MigrationOptions {
        max_bandwidth: CRAWL,
        ..Default::default()
    }
}

/// Starts the test guest on `agent` and waits until it is up.
async fn start_guest(agent: &TestAgent, name: &str, spec: Option<pb::InstanceSpec>) -> Uuid {
    let mut spec = spec.unwrap_or_else(|| agent.spec(name, 256));
    boot_guest(&mut spec);
    let uuid = spec.uuid.parse().unwrap();
    agent.start_spec(spec).await;
    let socket = agent.run_dir(name).join("serial.sock");
    tokio::task::spawn_blocking(move || GuestConsole::connect(&socket, BOOT_TIMEOUT))
        .await
        .unwrap();
    uuid
}

fn guest_running(agent: &TestAgent, name: &str) -> bool {
    operator_qmp(agent, name).execute("query-status", serde_json::json!({}))["running"] == true
}

#[tokio::test]
async fn a_running_guest_moves_with_its_memory_and_its_hotplugged_devices() {
    let source = TestAgent::start().await;
    let target = TestAgent::start().await;
    let mut spec = source.spec("mover", 256);
    // Pinned, so the target must pin its own QEMU's thread the same way.
    let last_cpu = (std::thread::available_parallelism().unwrap().get() - 1).to_string();
    spec.cpu_mask = last_cpu.clone();
    spec.disks
        .push(disk("root", &source.raw_image("root.img", 8)));
    spec.nics.push(nic("eth0", "52:54:00:00:80:01"));
    let uuid = start_guest(&source, "mover", Some(spec)).await;
    target.track(uuid);
    let hot_nic = source
        .add_nic("mover", nic("eth1", "52:54:00:00:80:02"))
        .await
        .expect("hot-add NIC")
        .device
        .unwrap();
    let hot_disk = source
        .add_disk("mover", disk("data", &source.raw_image("data.img", 8)))
        .await
        .expect("hot-add disk")
        .device
        .unwrap();
    let marker = leave_marker(&source, "mover").await;
    let before = source.instance("mover").await;
    let source_taps = source.taps();
    assert_eq!(source_taps.len(), 2, "{source_taps:?}");

    let (progress, outcome) = Migration::start(&source, "mover", &target, Default::default())
        .await
        .outcome()
        .await;

    outcome.unwrap_or_else(|s| panic!("migration: {s:?}\nsource log:\n{}", source.log()));
    let last = progress.last().expect("progress reports");
    assert_eq!(last.phase, pb::MigrationPhase::Completed as i32, "{last:?}");
    assert!(
        last.transferred_bytes > 1 << 20,
        "a booted guest sends real memory: {last:?}"
    );
    assert!(
        progress
            .iter()
            .any(|p| p.phase == pb::MigrationPhase::Preparing as i32)
    );

    // The source let go of everything.
    assert!(source.absent("mover").await);
    assert!(
        !source.record_path("mover").exists(),
        "no record left on the source"
    );
    assert!(
        source.taps().is_empty(),
        "no tap left on the source: {:?}",
        source.taps()
    );
    // The target runs the same devices at the same slots.
    let after = target.instance("mover").await;
    assert_eq!(state(&after), pb::InstanceState::Running, "{after:?}");
    let slots = |i: &pb::InstanceInfo| {
        let mut d: Vec<_> = i
            .devices
            .iter()
            .map(|d| (d.name.clone(), d.pci_slot))
            .collect();
        d.sort();
        d
    };
    assert_eq!(slots(&after), slots(&before));
    assert_eq!(
        qemu_pids_with_uuids(&[uuid].into()),
        vec![after.pid],
        "exactly one QEMU"
    );
    assert_eq!(target.taps().len(), 2);
    assert!(guest_running(&target, "mover"));
    assert_eq!(after.cpu_mask, last_cpu);
    assert_eq!(vcpu_affinity(&thread_affinities(after.pid), 0), last_cpu);

    let (nic_addr, disk_addr) = (
        pci_address(hot_nic.pci_slot),
        pci_address(hot_disk.pci_slot),
    );
    let (seen, devices) = marker_and_pci_devices(&target, "mover").await;
    assert!(seen.contains(&marker), "the guest's memory moved: {seen:?}");
    assert!(
        devices.contains(&nic_addr) && devices.contains(&disk_addr),
        "the guest still sees its hot-added devices: {devices}"
    );
}

#[tokio::test]
async fn a_target_without_the_disk_refuses_and_the_source_keeps_running() {
    let source = TestAgent::start().await;
    let images = source.scratch();
    // The target sees an empty directory where the source's disk is.
    let target = TestAgent::start_with(AgentOptions {
        wrapper: [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            "mount -t tmpfs tmpfs \"$0\" && exec \"$@\"",
        ]
        .map(String::from)
        .into_iter()
        .chain([images.display().to_string()])
        .collect(),
        ..AgentOptions::default()
    })
    .await;
    let mut spec = source.spec("stayer", 128);
    let image = source.raw_image("stayer.img", 8);
    spec.disks.push(disk("root", &image));
    let uuid: Uuid = spec.uuid.parse().unwrap();
    let info = source.start_spec(spec).await;

    let (_, outcome) = Migration::start(&source, "stayer", &target, Default::default())
        .await
        .outcome()
        .await;

    let err = outcome.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains(&image.display().to_string()),
        "{}",
        err.message()
    );
    assert!(err.message().contains("target"), "{}", err.message());
    let after = source.instance("stayer").await;
    assert_eq!(state(&after), pb::InstanceState::Running, "{after:?}");
    assert_eq!(after.pid, info.pid);
    assert!(guest_running(&source, "stayer"));
    assert!(target.absent("stayer").await);
    assert_eq!(qemu_pids_with_uuids(&[uuid].into()), vec![info.pid]);
}

/// Waits until `target` has dropped its QEMU and record of `name`, the
/// source's `pid` being the guest's only QEMU left.
async fn assert_target_dropped(target: &TestAgent, name: &str, uuid: Uuid, pid: u32) {
    let gone = wait_for(Duration::from_secs(10), async || {
        (target.absent(name).await && qemu_pids_with_uuids(&[uuid].into()) == vec![pid])
            .then_some(())
    })
    .await;
    assert!(
        gone.is_some(),
        "the target drops its QEMU and its record\ntarget log:\n{}",
        target.log()
    );
    assert!(!target.record_path(name).exists());
}

/// A guest on a fresh agent whose memory crawls to another: where a
/// migration's failures are made.
struct UnderWay {
    source: TestAgent,
    target: TestAgent,
    uuid: Uuid,
    pid: u32,
    migration: Migration,
}

async fn under_way(name: &str) -> UnderWay {
    let source = TestAgent::start().await;
    let target = TestAgent::start().await;
    let uuid = start_guest(&source, name, None).await;
    target.track(uuid);
    let pid = source.instance(name).await.pid;
    let mut migration = Migration::start(&source, name, &target, crawl()).await;
    migration.wait_sending().await;
    UnderWay {
        source,
        target,
        uuid,
        pid,
        migration,
    }
}

#[tokio::test]
async fn a_cancelled_migration_leaves_the_guest_running_on_the_source() {
    let source = TestAgent::start().await;
    let target = TestAgent::start().await;
    let uuid = start_guest(&source, "cancel1", None).await;
    target.track(uuid);
    let pid = source.instance("cancel1").await.pid;
    // With XBZRLE, as Ganeti's migration_caps can ask.
    let options = pb::MigrationOptions {
        xbzrle_cache_bytes: 8 << 20,
        ..crawl()
    };
    let mut migration = Migration::start(&source, "cancel1", &target, options).await;
    migration.wait_sending().await;
    assert_eq!(
        state(&target.instance("cancel1").await),
        pb::InstanceState::Incoming
    );
    let mut qmp = operator_qmp(&source, "cancel1");
    let capabilities = qmp.execute("query-migrate-capabilities", serde_json::json!({}));
    let xbzrle = capabilities
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["capability"] == "xbzrle");
    assert_eq!(xbzrle.unwrap()["state"], true, "{capabilities}");
    let parameters = qmp.execute("query-migrate-parameters", serde_json::json!({}));
    assert_eq!(parameters["xbzrle-cache-size"], 8 << 20, "{parameters}");
    let progress = qmp.execute("query-migrate", serde_json::json!({}));
    assert_eq!(
        progress["xbzrle-cache"]["cache-size"],
        8 << 20,
        "{progress}"
    );
    // The operators' monitor serves one client at a time.
    drop(qmp);

    let cancelled = source
        .client()
        .await
        .cancel_migration(pb::CancelMigrationRequest {
            name: "cancel1".into(),
        })
        .await
        .expect("cancel")
        .into_inner();
    let (_, outcome) = migration.outcome().await;

    assert_eq!(cancelled.cancelled, "outgoing");
    let err = outcome.unwrap_err();
    assert_eq!(err.code(), Code::Cancelled, "{err:?}");
    let after = source.instance("cancel1").await;
    assert_eq!(state(&after), pb::InstanceState::Running, "{after:?}");
    assert!(guest_running(&source, "cancel1"));
    assert_target_dropped(&target, "cancel1", uuid, pid).await;
}

#[tokio::test]
async fn a_target_agent_killed_mid_migration_leaves_the_source_owner() {
    let UnderWay {
        source,
        mut target,
        uuid,
        pid,
        migration,
    } = under_way("orphan1").await;

    target.kill_agent();
    let (_, outcome) = migration.outcome().await;

    let err = outcome.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("target agent"), "{}", err.message());
    let after = source.instance("orphan1").await;
    assert_eq!(state(&after), pb::InstanceState::Running, "{after:?}");
    assert!(guest_running(&source, "orphan1"));
    // The target's QEMU waits, paused, until its agent comes back and
    // drops it: it never ran the guest.
    target.restart().await;
    assert!(target.absent("orphan1").await);
    assert!(!target.record_path("orphan1").exists());
    let one = wait_for(Duration::from_secs(10), async || {
        (qemu_pids_with_uuids(&[uuid].into()) == vec![pid]).then_some(())
    })
    .await;
    assert!(one.is_some(), "only the source's QEMU is left");
}

#[tokio::test]
async fn a_stream_broken_mid_migration_leaves_the_guest_running_on_the_source() {
    let UnderWay {
        source,
        target,
        uuid,
        pid,
        migration,
    } = under_way("broken1").await;
    let reset = ResetPort::new(&migration.stream_port());
    let (_, outcome) = migration.outcome().await;
    drop(reset);

    let err = outcome.unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    let after = source.instance("broken1").await;
    assert_eq!(state(&after), pb::InstanceState::Running, "{after:?}");
    assert_eq!(after.pid, pid);
    assert!(guest_running(&source, "broken1"));
    // The target's QEMU still waits on its end of the stream; the source
    // agent tells the target to drop it.
    assert_target_dropped(&target, "broken1", uuid, pid).await;
}

#[tokio::test]
async fn a_source_qemu_killed_mid_migration_is_reported_crashed_and_the_target_drops_it() {
    let UnderWay {
        source,
        target,
        uuid,
        pid,
        migration,
    } = under_way("lost1").await;

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the source's QEMU");
    let (_, outcome) = migration.outcome().await;

    assert!(outcome.is_err());
    let crashed = wait_for(Duration::from_secs(10), async || {
        let info = source.instance("lost1").await;
        (state(&info) == pb::InstanceState::Crashed).then_some(info)
    })
    .await
    .expect("the source reports the crash");
    assert!(crashed.state_detail.contains("unexpectedly"), "{crashed:?}");
    let gone = wait_for(Duration::from_secs(10), async || {
        (target.absent("lost1").await && qemu_pids_with_uuids(&[uuid].into()).is_empty())
            .then_some(())
    })
    .await;
    assert!(gone.is_some(), "no QEMU is left anywhere");
}

#[tokio::test]
async fn a_runtime_with_options_its_fields_dont_explain_is_refused() {
    let source = TestAgent::start().await;
    let target = TestAgent::start().await;
    let spec = source.spec("smuggler", 128);
    let uuid: Uuid = spec.uuid.parse().unwrap();
    source.start_spec(spec).await;
    let mut runtime = source.runtime_json("smuggler").await;
    runtime["argv"].as_array_mut().unwrap().extend([
        "-monitor".into(),
        "tcp:0.0.0.0:4444,server=on,wait=off".into(),
    ]);
    let mut client = target.client().await;

    let smuggled = client
        .accept_migration(pb::AcceptMigrationRequest {
            runtime_json: runtime.to_string(),
            source: "test".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let garbage = client
        .accept_migration(pb::AcceptMigrationRequest {
            runtime_json: "{\"name\": 1".into(),
            source: "test".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();

    assert_eq!(smuggled.code(), Code::InvalidArgument, "{smuggled:?}");
    assert!(
        smuggled.message().contains("argv does not match"),
        "{}",
        smuggled.message()
    );
    assert_eq!(garbage.code(), Code::InvalidArgument, "{garbage:?}");
    assert!(target.absent("smuggler").await);
    assert!(!target.record_path("smuggler").exists());
    assert_eq!(
        qemu_pids_with_uuids(&[uuid].into()).len(),
        1,
        "only the source's QEMU"
    );
}

#[tokio::test]
async fn a_guest_moves_between_two_hosts_over_their_own_network() {
    let hosts = Hosts::create_or_explain();
    let source = TestAgent::start_with(hosts.agent_options(0)).await;
    let target = TestAgent::start_with(hosts.agent_options(1)).await;
    let spec = source.spec("traveller", 128);
    let uuid: Uuid = spec.uuid.parse().unwrap();
    target.track(uuid);
    source.start_spec(spec).await;

    let (progress, outcome) =
        Migration::start_to(&source, "traveller", hosts.api_url(1), Default::default())
            .await
            .outcome()
            .await;

    outcome.unwrap_or_else(|s| panic!("migration: {s:?}\nsource log:\n{}", source.log()));
    let address = &progress.last().unwrap().address;
    assert!(
        address.starts_with(&format!("tcp:{}:", hosts.address(1))),
        "the stream goes to the target host's own address: {address}"
    );
    assert!(source.absent("traveller").await);
    let after = target.instance("traveller").await;
    assert_eq!(state(&after), pb::InstanceState::Running);
    assert_eq!(qemu_pids_with_uuids(&[uuid].into()), vec![after.pid]);
    drop((source, target));
}

#[tokio::test]
async fn an_offline_migration_pauses_first_and_resumes_on_the_target() {
    let source = TestAgent::start().await;
    let target = TestAgent::start().await;
    let spec = source.spec("offline1", 128);
    let uuid: Uuid = spec.uuid.parse().unwrap();
    target.track(uuid);
    source.start_spec(spec).await;
    let mut events = source
        .client()
        .await
        .watch_events(pb::WatchEventsRequest {
            name: "offline1".into(),
            after_sequence: Some(0),
        })
        .await
        .expect("watch")
        .into_inner();

    let options = pb::MigrationOptions {
        offline: true,
        ..Default::default()
    };
    let (_, outcome) = Migration::start(&source, "offline1", &target, options)
        .await
        .outcome()
        .await;

    outcome.unwrap_or_else(|s| panic!("migration: {s:?}\nsource log:\n{}", source.log()));
    let after = target.instance("offline1").await;
    assert_eq!(state(&after), pb::InstanceState::Running, "{after:?}");
    assert!(
        guest_running(&target, "offline1"),
        "the target resumes what ran"
    );
    assert!(source.absent("offline1").await);
    // The source's log of events shows the move.
    let mut saw_progress = false;
    while let Ok(Some(Ok(event))) =
        tokio::time::timeout(Duration::from_millis(200), events.next()).await
    {
        saw_progress |= event.kind == pb::EventKind::MigrationProgress as i32;
    }
    assert!(saw_progress, "migration progress is published as events");
}

/// An agent whose calls to other agents give up after a second, so a
/// target that never answers is settled quickly.
fn impatient() -> AgentOptions {
    let mut options = AgentOptions::default();
    options
        .args
        .extend(["--peer-timeout-ms".into(), "1000".into()]);
    options
}

/// Starts a guest without an OS (its RAM is mostly zero, so the stream
/// completes in a moment) and returns its uuid and pid.
async fn quick_guest(source: &TestAgent, target: &TestAgent, name: &str) -> (Uuid, u32) {
    let spec = source.spec(name, 128);
    let uuid: Uuid = spec.uuid.parse().unwrap();
    target.track(uuid);
    let pid = source.start_spec(spec).await.pid;
    (uuid, pid)
}

#[tokio::test]
async fn a_finalize_that_never_reaches_the_target_leaves_the_guest_with_the_source() {
    let source = TestAgent::start_with(impatient()).await;
    let target = TestAgent::start().await;
    let (uuid, pid) = quick_guest(&source, &target, "lost1").await;
    // The first connection carries AcceptMigration and the liveness
    // checks; the second, FinalizeMigration, is held unread until the
    // source gives up on it. (Closed instead, it could be noticed dead
    // before the request went out, and the client would send it on a
    // fresh connection.)
    let proxy = ApiProxy::start(
        &target.socket(),
        vec![Connection::Forward, Connection::Hold],
        Then::Forward,
    );

    let (_, outcome) = Migration::start_to(&source, "lost1", proxy.address(), Default::default())
        .await
        .outcome()
        .await;

    let err = outcome.expect_err("nothing finalized the migration");
    assert!(
        err.message().contains("did not finalize") || err.message().contains("can't reach"),
        "{err:?}"
    );
    let after = source.instance("lost1").await;
    assert_eq!(state(&after), pb::InstanceState::Running, "{after:?}");
    assert!(guest_running(&source, "lost1"), "the source resumed it");
    assert!(target.absent("lost1").await, "{}", target.log());
    assert_eq!(qemu_pids_with_uuids(&[uuid].into()), vec![pid]);
}

#[tokio::test]
async fn a_finalize_the_target_refuses_leaves_the_guest_with_the_source() {
    let source = TestAgent::start_with(impatient()).await;
    let target = TestAgent::start().await;
    let (uuid, pid) = quick_guest(&source, &target, "refused1").await;
    let (arrived_tx, arrived) = oneshot::channel();
    let (open, open_rx) = oneshot::channel();
    let proxy = ApiProxy::start(
        &target.socket(),
        vec![
            Connection::Forward,
            Connection::Gate {
                arrived: arrived_tx,
                open: open_rx,
            },
        ],
        Then::Forward,
    );

    let migration =
        Migration::start_to(&source, "refused1", proxy.address(), Default::default()).await;
    tokio::time::timeout(Duration::from_secs(30), arrived)
        .await
        .expect("the source finalizes")
        .unwrap();
    // The stream is complete; the target drops its half before the
    // finalize reaches it, so it answers that it has nothing to finalize.
    target
        .client()
        .await
        .cancel_migration(pb::CancelMigrationRequest {
            name: "refused1".into(),
        })
        .await
        .expect("the target drops its incoming QEMU");
    open.send(()).unwrap();
    let (_, outcome) = migration.outcome().await;

    let err = outcome.expect_err("the target refused");
    assert!(
        err.message().contains("could not finalize"),
        "{err:?}\n{}",
        source.log()
    );
    let after = source.instance("refused1").await;
    assert_eq!(state(&after), pb::InstanceState::Running, "{after:?}");
    assert!(guest_running(&source, "refused1"));
    assert!(target.absent("refused1").await);
    assert_eq!(qemu_pids_with_uuids(&[uuid].into()), vec![pid]);
}

#[tokio::test]
async fn a_finalize_left_unanswered_keeps_the_guest_paused_on_both_sides() {
    let source = TestAgent::start_with(impatient()).await;
    let target = TestAgent::start().await;
    let (uuid, pid) = quick_guest(&source, &target, "limbo1").await;
    // After AcceptMigration, the target's API swallows every call.
    let proxy = ApiProxy::start(&target.socket(), vec![Connection::Forward], Then::Hold);

    let (_, outcome) = Migration::start_to(&source, "limbo1", proxy.address(), Default::default())
        .await
        .outcome()
        .await;

    let err = outcome.expect_err("the outcome is unknown");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let on_source = source.instance("limbo1").await;
    assert_eq!(
        state(&on_source),
        pb::InstanceState::Paused,
        "{on_source:?}"
    );
    assert!(
        !guest_running(&source, "limbo1"),
        "resuming could run it twice"
    );
    let on_target = target.instance("limbo1").await;
    assert_eq!(state(&on_target), pb::InstanceState::Incoming);
    assert!(!guest_running(&target, "limbo1"));

    // The operator settles it: the target takes over, the source's copy goes.
    target
        .client()
        .await
        .finalize_migration(pb::FinalizeMigrationRequest {
            name: "limbo1".into(),
            uuid: uuid.to_string(),
            resume: true,
        })
        .await
        .expect("finalize on the target");
    source
        .client()
        .await
        .stop_instance(pb::StopInstanceRequest {
            name: "limbo1".into(),
            force: true,
            ..Default::default()
        })
        .await
        .expect("stop the source's paused copy");
    let after = target.instance("limbo1").await;
    assert_eq!(state(&after), pb::InstanceState::Running);
    assert!(guest_running(&target, "limbo1"));
    let left = wait_for(Duration::from_secs(10), async || {
        let pids = qemu_pids_with_uuids(&[uuid].into());
        (pids == vec![after.pid]).then_some(())
    })
    .await;
    assert!(left.is_some(), "only the target's QEMU is left");
    assert_ne!(after.pid, pid);
}

/// Where a source agent is killed during a migration.
#[derive(Debug, Clone, Copy)]
enum SourceDeath {
    /// While QEMU streams the guest's memory.
    Streaming,
    /// Once the stream is complete, before the target is told to take
    /// the instance.
    BeforeFinalize,
    /// Once the target has taken the instance, before the source's QEMU
    /// has gone.
    AfterFinalize,
}

/// Kills the source agent at `death` during a migration, restarts it,
/// and returns the node that runs the guest afterwards, after checking
/// that it runs there alone.
async fn kill_the_source_during_a_migration(death: SourceDeath, name: &str) -> &'static str {
    let mut options = AgentOptions::default();
    let fault = match death {
        SourceDeath::Streaming => None,
        SourceDeath::BeforeFinalize => Some("migration-before-finalize"),
        SourceDeath::AfterFinalize => Some("migration-after-finalize"),
    };
    if let Some(point) = fault {
        options.args.extend(["--fault-point".into(), point.into()]);
    }
    let mut source = TestAgent::start_with(options).await;
    let target = TestAgent::start().await;
    let (uuid, source_pid) = quick_guest(&source, &target, name).await;
    let bandwidth = match death {
        // Mostly zero pages: at 16 KiB/s they still take a while.
        SourceDeath::Streaming => 16 << 10,
        _ => 0,
    };
    let mut migration = Migration::start(
        &source,
        name,
        &target,
        pb::MigrationOptions {
            max_bandwidth: bandwidth,
            ..Default::default()
        },
    )
    .await;
    match death {
        SourceDeath::Streaming => migration.wait_sending().await,
        _ => {
            let reached = wait_for(Duration::from_secs(30), async || {
                source
                    .log()
                    .contains("stopped at a fault point")
                    .then_some(())
            })
            .await;
            assert!(reached.is_some(), "{death:?}: {}", source.log());
        }
    }

    source.kill_agent();
    let _ = migration.outcome().await;
    source.restart().await;

    let found = async |agent: &TestAgent| {
        agent
            .client()
            .await
            .get_instance(pb::GetInstanceRequest { name: name.into() })
            .await
            .ok()
            .map(|r| r.into_inner())
    };
    let (on_source, on_target) = (found(&source).await, found(&target).await);
    let (node, owner, info) = match (on_source, on_target) {
        (Some(info), None) => ("source", &source, info),
        (None, Some(info)) => ("target", &target, info),
        (s, t) => panic!("{death:?}: the instance is on source {s:?} and target {t:?}"),
    };
    assert_eq!(
        state(&info),
        pb::InstanceState::Running,
        "{death:?} {node}: {info:?}"
    );
    assert!(
        guest_running(owner, name),
        "{death:?}: the guest runs on the {node}"
    );
    let alone = wait_for(Duration::from_secs(10), async || {
        (qemu_pids_with_uuids(&[uuid].into()) == vec![info.pid]).then_some(())
    })
    .await;
    assert!(
        alone.is_some(),
        "{death:?}: QEMUs {:?}, the {node}'s is {}",
        qemu_pids_with_uuids(&[uuid].into()),
        info.pid
    );
    if node == "source" {
        assert_eq!(info.pid, source_pid, "{death:?}: the same QEMU runs on");
    }
    node
}

#[tokio::test]
async fn a_source_agent_killed_at_any_point_of_a_migration_leaves_the_guest_running_once() {
    assert_eq!(
        kill_the_source_during_a_migration(SourceDeath::Streaming, "settle1").await,
        "source",
        "a stream cut short stays with the source"
    );
    assert_eq!(
        kill_the_source_during_a_migration(SourceDeath::BeforeFinalize, "settle2").await,
        "source",
        "a target that never took it drops its copy"
    );
    assert_eq!(
        kill_the_source_during_a_migration(SourceDeath::AfterFinalize, "settle3").await,
        "target",
        "a target that took it keeps it"
    );
}

/// Established connections whose local port is `port`: on a host with
/// both ends, the target's side of each.
fn connections_to(port: &str) -> usize {
    let out = Command::new("ss")
        .args(["-Htn", "state", "established"])
        .arg(format!("( sport = :{port} )"))
        .output()
        .expect("run ss (iproute2)");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

#[tokio::test]
async fn multifd_channels_carry_the_guest_each_on_a_connection_of_its_own() {
    let source = TestAgent::start().await;
    let target = TestAgent::start().await;
    let uuid = start_guest(&source, "multi", None).await;
    target.track(uuid);
    let marker = leave_marker(&source, "multi").await;
    let options = pb::MigrationOptions {
        multifd_channels: 4,
        max_bandwidth: 32 << 20,
        ..Default::default()
    };

    let mut migration = Migration::start(&source, "multi", &target, options).await;
    migration.wait_sending().await;
    let port = migration.stream_port();
    let mut most = 0;
    while !migration.outcome.is_finished() {
        most = most.max(connections_to(&port));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, outcome) = migration.outcome().await;

    outcome.unwrap_or_else(|s| panic!("migration: {s:?}\nsource log:\n{}", source.log()));
    assert_eq!(most, 5, "the main connection and 4 channels to port {port}");
    let (seen, _) = marker_and_pci_devices(&target, "multi").await;
    assert!(seen.contains(&marker), "the guest's memory moved: {seen:?}");

    // A QEMU that another manager started expects no channels.
    let request = pb::MigrateInstanceRequest {
        name: "multi".into(),
        target: "tcp:127.0.0.1:1".into(),
        options: Some(pb::MigrationOptions {
            multifd_channels: 2,
            ..Default::default()
        }),
    };
    let refused = match target.client().await.migrate_instance(request).await {
        Err(status) => status,
        Ok(stream) => stream
            .into_inner()
            .filter_map(|r| r.err())
            .next()
            .await
            .expect("refused"),
    };
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(guest_running(&target, "multi"));
}
