//! A guest that dirties its memory faster than the stream carries it:
//! precopy alone gives up with a report that says so, auto-converge
//! throttles the guest until the migration finishes, and with postcopy
//! allowed the agent switches once precopy stalls; a stream that breaks in
//! postcopy resumes, and one cut for good leaves the guest paused on both
//! sides.

use kvm_agent_proto::v1 as pb;
use kvm_agent_tests::guest::{
    BOOT_TIMEOUT, GuestConsole, in_guest, leave_marker, marker_and_pci_devices, start_guest_with,
};
use kvm_agent_tests::hosts::Hosts;
use kvm_agent_tests::*;
use tokio_stream::StreamExt;
use tonic::Code;
use uuid::Uuid;

/// A cap the guest's copy loop outruns many times over.
const SLOW_LINK: u64 = 8 << 20;

fn state(info: &pb::InstanceInfo) -> pb::InstanceState {
    pb::InstanceState::try_from(info.state).unwrap()
}

/// One test guest at a time: each keeps a core busy under TCG, and they
/// would starve each other.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test]
async fn precopy_gives_up_on_a_busy_guest_and_auto_converge_moves_it() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let source = TestAgent::start().await;
    let target = TestAgent::start().await;
    let (info, console) = start_guest_with(&source, "busy", |_| {}).await;
    target.track(info.uuid.parse::<Uuid>().unwrap());
    drop(console);
    // One 16 MiB process buffer, refilled over and over in the background
    // from a file of random bytes (zeros would not do: QEMU sends a zero
    // page as a marker). Under TCG this writes about three times as fast
    // as reading /dev/urandom, which on a loaded host came close enough to
    // the link that the throttled half converged before any throttle.
    let console = GuestConsole::attach(&source.run_dir("busy").join("serial.sock"), BOOT_TIMEOUT);
    let (console, writer) = in_guest(console, |c| {
        c.run(
            "dd if=/dev/urandom of=/tmp/blob bs=1M count=16 2>/dev/null; \
             (while true; do dd if=/tmp/blob of=/dev/null bs=16M 2>/dev/null; done) & echo $!",
        )
    })
    .await;
    let writer = writer.trim().to_owned();
    let (console, running) = in_guest(console, move |c| {
        c.run(&format!("kill -0 {writer} && echo alive"))
    })
    .await;
    assert_eq!(running.trim(), "alive", "the writer runs");
    drop(console);

    let precopy_alone = pb::MigrationOptions {
        max_bandwidth: SLOW_LINK,
        auto_converge: Some(false),
        stalled_passes_limit: 3,
        ..Default::default()
    };
    let (progress, outcome) = source
        .migrate_with("busy", target.address(), precopy_alone)
        .await;

    let gave_up = outcome.expect_err("precopy can't catch up with the guest");
    assert_eq!(gave_up.code(), Code::Aborted, "{gave_up:?}");
    assert!(
        gave_up.message().contains("stopped converging")
            && gave_up.message().contains("dirties")
            && gave_up.message().contains("cap of 8 MiB/s"),
        "the report says why: {}",
        gave_up.message()
    );
    let passes = progress.iter().map(|p| p.passes).max().unwrap_or(0);
    assert!(passes >= 4, "it tried a few passes: {passes}");
    assert!(progress.iter().all(|p| p.throttle_percent == 0));
    assert_eq!(
        state(&source.instance("busy").await),
        pb::InstanceState::Running
    );
    assert!(target.absent("busy").await);

    // Under TCG a fully throttled guest still dirties a few MiB per pass,
    // so the switch-over may take longer than the default 300 ms.
    let throttled = pb::MigrationOptions {
        max_bandwidth: SLOW_LINK,
        downtime_limit_ms: 1500,
        auto_converge: Some(true),
        throttle_initial_percent: 50,
        throttle_increment_percent: 25,
        ..Default::default()
    };
    let (progress, outcome) = source
        .migrate_with("busy", target.address(), throttled)
        .await;

    outcome.unwrap_or_else(|s| panic!("migration: {s:?}\nsource log:\n{}", source.log()));
    let most = progress.iter().map(|p| p.throttle_percent).max().unwrap();
    assert!(most >= 50, "the throttle shows in the progress: {most}%");
    assert!(progress.iter().all(|p| !p.postcopy));
    assert_eq!(
        state(&target.instance("busy").await),
        pb::InstanceState::Running
    );
    assert!(source.absent("busy").await);
    // Under TCG, a guest throttled this hard has been seen to crash on the
    // target after the switch (with a copy loop in tmpfs as with this
    // writer), so this half checks the agents' side. That the guest's
    // memory arrives whole is checked where no throttle runs: in
    // migration.rs, and in postcopy's tests below.
}

/// A migration in postcopy, started from the test: the outcome comes in
/// a task of its own.
struct Postcopy {
    outcome: tokio::task::JoinHandle<Result<(), tonic::Status>>,
    /// Where the stream goes.
    port: String,
    /// What the guest wrote into its memory before it left.
    marker: String,
}

/// Starts the test guest `name` on `source`, busy, migrates it to the
/// agent at `target` with postcopy allowed over a link it outruns, and
/// returns when `target_agent` runs the guest (after the agent's switch).
async fn switched_to_postcopy(
    source: &TestAgent,
    name: &str,
    target: String,
    target_agent: &TestAgent,
    recovery_window_ms: u32,
) -> Postcopy {
    let (info, console) = start_guest_with(source, name, |_| {}).await;
    drop(console);
    target_agent.track(info.uuid.parse::<Uuid>().unwrap());
    let marker = leave_marker(source, name).await;
    let console = GuestConsole::attach(&source.run_dir(name).join("serial.sock"), BOOT_TIMEOUT);
    drop(
        in_guest(console, |c| {
            c.run("dd if=/dev/urandom of=/tmp/blob bs=1M count=16 2>/dev/null; (while true; do cp /tmp/blob /tmp/copy; done) >/dev/null 2>&1 & true")
        })
        .await,
    );
    let request = pb::MigrateInstanceRequest {
        name: name.into(),
        target,
        options: Some(pb::MigrationOptions {
            max_bandwidth: 8 << 20,
            postcopy: true,
            auto_converge: Some(false),
            stalled_passes_limit: 2,
            postcopy_recovery_window_ms: recovery_window_ms,
            ..Default::default()
        }),
    };
    let mut stream = source
        .client()
        .await
        .migrate_instance(request)
        .await
        .expect("MigrateInstance")
        .into_inner();
    let (port_tx, port_rx) = tokio::sync::oneshot::channel();
    let outcome = tokio::spawn(async move {
        let mut port_tx = Some(port_tx);
        while let Some(item) = stream.next().await {
            let progress = item?;
            if let Some((_, port)) = progress.address.rsplit_once(':')
                && let Some(tx) = port_tx.take()
            {
                let _ = tx.send(port.to_owned());
            }
        }
        Ok(())
    });
    let Ok(port) = port_rx.await else {
        let failed = outcome.await.unwrap();
        panic!(
            "the migration never sent: {failed:?}\nsource log:\n{}",
            source.log()
        );
    };
    wait_for(target_agent, name, |i| {
        state(i) == pb::InstanceState::Running
    })
    .await;
    Postcopy {
        outcome,
        port,
        marker,
    }
}

/// Resets the connections of the stream on `port` in the network
/// namespace `netns` (none: this one), as a failed link does.
fn reset_stream(netns: Option<&str>, port: &str) {
    let mut command = match netns {
        Some(netns) => {
            let mut c = std::process::Command::new("ip");
            c.args(["netns", "exec", netns, "ss"]);
            c
        }
        None => std::process::Command::new("ss"),
    };
    let filter = format!("( sport = :{port} or dport = :{port} )");
    let out = command
        .args(["-K", "-tn"])
        .arg(filter)
        .output()
        .expect("run ss (iproute2)");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(port),
        "ss -K reset the stream: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The busy guest can't move in precopy (it stalls after two passes), so
/// the agent switches to postcopy on its own; then the stream breaks, and
/// the source resumes it where the target listens again.
#[tokio::test]
async fn a_busy_guest_moves_in_postcopy_and_a_broken_stream_resumes() {
    let _alone = ONE_AT_A_TIME.lock().await;
    allow_postcopy();
    let source = TestAgent::start().await;
    let target = TestAgent::start().await;
    let postcopy = switched_to_postcopy(&source, "mended", target.address(), &target, 0).await;
    let marker = postcopy.marker.clone();

    reset_stream(None, &postcopy.port);
    let outcome = tokio::time::timeout(std::time::Duration::from_secs(180), postcopy.outcome)
        .await
        .expect("the migration ends")
        .unwrap();

    outcome.unwrap_or_else(|s| panic!("migration: {s:?}\nsource log:\n{}", source.log()));
    let log = source.log();
    assert!(
        log.contains("switching to postcopy") && log.contains("precopy stopped converging"),
        "the agent switched on its own:\n{log}"
    );
    assert!(
        log.contains("the postcopy stream resumed"),
        "the stream broke and resumed:\n{log}"
    );
    assert_eq!(
        state(&target.instance("mended").await),
        pb::InstanceState::Running
    );
    let (seen, _) = marker_and_pci_devices(&target, "mended").await;
    assert!(seen.contains(&marker), "{seen:?}");
}

#[tokio::test]
async fn a_postcopy_stream_cut_for_good_leaves_the_guest_paused_on_both_sides() {
    let _alone = ONE_AT_A_TIME.lock().await;
    allow_postcopy();
    let hosts = Hosts::create_or_explain();
    let source = TestAgent::start_with(hosts.agent_options(0)).await;
    let target = TestAgent::start_with(hosts.agent_options(1)).await;
    let postcopy = switched_to_postcopy(&source, "split", hosts.api_url(1), &target, 2000).await;

    // The link goes, and both QEMUs see their connection reset.
    hosts.cut_link();
    reset_stream(Some(hosts.netns(0)), &postcopy.port);
    reset_stream(Some(hosts.netns(1)), &postcopy.port);
    let outcome = tokio::time::timeout(std::time::Duration::from_secs(60), postcopy.outcome)
        .await
        .expect("the migration ends")
        .unwrap();

    let lost = outcome.expect_err("the stream can't resume");
    assert_eq!(lost.code(), Code::DataLoss, "{lost:?}");
    assert!(
        lost.message().contains("split between"),
        "{}",
        lost.message()
    );
    let here = source.instance("split").await;
    assert_eq!(state(&here), pb::InstanceState::Paused, "{here:?}");
    assert!(here.state_detail.contains("postcopy"), "{here:?}");
    let there = wait_for(&target, "split", |i| state(i) != pb::InstanceState::Running).await;
    assert_eq!(state(&there), pb::InstanceState::Paused, "{there:?}");
    assert!(there.state_detail.contains("postcopy"), "{there:?}");
}

#[tokio::test]
async fn a_never_lose_instance_is_not_migrated_in_postcopy() {
    let source = TestAgent::start().await;
    let target = TestAgent::start().await;
    let mut spec = source.spec("precious", 64);
    spec.never_lose = true;
    target.track(spec.uuid.parse().unwrap());
    let pid = source.start_spec(spec).await.pid;
    let postcopy = pb::MigrationOptions {
        postcopy: true,
        ..Default::default()
    };

    let (_, outcome) = source
        .migrate_with("precious", target.address(), postcopy)
        .await;

    let refused = outcome.expect_err("never_lose forbids postcopy");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("never_lose"),
        "{}",
        refused.message()
    );
    let kept = source.instance("precious").await;
    assert_eq!((state(&kept), kept.pid), (pb::InstanceState::Running, pid));
    // Without postcopy it moves as any other.
    source.migrate_to("precious", &target).await.unwrap();
    assert_eq!(
        state(&target.instance("precious").await),
        pb::InstanceState::Running
    );
}

/// Polls `name` on `agent` until `wanted` holds (at most 30 s).
async fn wait_for(
    agent: &TestAgent,
    name: &str,
    wanted: impl Fn(&pb::InstanceInfo) -> bool,
) -> pb::InstanceInfo {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let info = agent
            .client()
            .await
            .get_instance(pb::GetInstanceRequest { name: name.into() })
            .await
            .map(tonic::Response::into_inner);
        if let Ok(info) = info {
            if wanted(&info) {
                return info;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{name} never got there: {info:?}"
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
