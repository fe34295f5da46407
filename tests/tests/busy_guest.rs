//! A guest that dirties its memory faster than the stream carries it:
//! precopy alone gives up with a report that says so, and auto-converge
//! throttles the guest until the migration finishes.

use kvm_agent_proto::v1 as pb;
use kvm_agent_tests::guest::{
    BOOT_TIMEOUT, GuestConsole, in_guest, leave_marker, marker_and_pci_devices, start_guest_with,
};
use kvm_agent_tests::*;
use tonic::Code;
use uuid::Uuid;

/// A cap the guest's copy loop outruns many times over.
const SLOW_LINK: u64 = 8 << 20;

fn state(info: &pb::InstanceInfo) -> pb::InstanceState {
    pb::InstanceState::try_from(info.state).unwrap()
}

#[tokio::test]
async fn precopy_gives_up_on_a_busy_guest_and_auto_converge_moves_it() {
    let source = TestAgent::start().await;
    let target = TestAgent::start().await;
    let (info, console) = start_guest_with(&source, "busy", |_| {}).await;
    target.track(info.uuid.parse::<Uuid>().unwrap());
    drop(console);
    let marker = leave_marker(&source, "busy").await;
    // 16 MiB of random bytes, copied over and over in the background.
    let console = GuestConsole::attach(&source.run_dir("busy").join("serial.sock"), BOOT_TIMEOUT);
    let (console, written) = in_guest(console, |c| {
        c.run("dd if=/dev/urandom of=/tmp/blob bs=1M count=16 2>/dev/null; wc -c < /tmp/blob")
    })
    .await;
    assert_eq!(written.trim(), "16777216");
    drop(
        in_guest(console, |c| {
            c.run("(while true; do cp /tmp/blob /tmp/copy; done) >/dev/null 2>&1 & true")
        })
        .await,
    );

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
    let (seen, _) = marker_and_pci_devices(&target, "busy").await;
    assert!(seen.contains(&marker), "the guest's memory moved: {seen:?}");
}
