//! WatchEvents: ordered, resumable, and honest about what it no longer has.

use std::time::Duration;

use kvm_agent_proto::v1 as pb;
use kvm_agent_tests::*;
use tonic::Code;

/// Reads events until `done` accepts one (inclusive) or 30 s pass.
async fn collect_until(
    stream: &mut tonic::Streaming<pb::Event>,
    done: impl Fn(&pb::Event) -> bool,
) -> Vec<pb::Event> {
    let mut seen = Vec::new();
    let read = async {
        while let Some(event) = stream.message().await.expect("event stream") {
            let finished = done(&event);
            seen.push(event);
            if finished {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("the expected event never came");
    seen
}

async fn watch(
    agent: &TestAgent,
    instance: &str,
    after: Option<u64>,
) -> Result<tonic::Streaming<pb::Event>, tonic::Status> {
    agent
        .client()
        .await
        .watch_events(pb::WatchEventsRequest {
            name: instance.into(),
            after_sequence: after,
        })
        .await
        .map(|r| r.into_inner())
}

fn label(e: &pb::Event) -> String {
    match pb::EventKind::try_from(e.kind).unwrap() {
        pb::EventKind::StateChanged => pb::InstanceState::try_from(e.state)
            .unwrap()
            .as_str_name()
            .to_owned(),
        pb::EventKind::DeviceAdded => format!("added {}", e.device),
        pb::EventKind::DeviceRemoved => format!("removed {}", e.device),
        pb::EventKind::Rebooted => format!("rebooted {}", e.reboot),
        pb::EventKind::MigrationProgress => "migration".into(),
        pb::EventKind::Deleted => format!("deleted ({})", e.state_detail),
        pb::EventKind::Unspecified => "?".into(),
    }
}

fn is_stopped(e: &pb::Event) -> bool {
    e.kind == pb::EventKind::StateChanged as i32 && e.state == pb::InstanceState::Stopped as i32
}

#[tokio::test]
async fn a_watcher_sees_a_lifecycle_in_order_and_a_resume_gets_exactly_the_rest() {
    let agent = TestAgent::start().await;
    let mut stream = watch(&agent, "watched", None).await.unwrap();
    let mut client = agent.client().await;

    client
        .start_instance(start_request(agent.spec("watched", 64)))
        .await
        .unwrap();
    client
        .add_nic(pb::AddNicRequest {
            name: "watched".into(),
            nic: Some(pb::NicSpec {
                name: "eth1".into(),
                mac: "52:54:00:00:a0:01".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    client
        .reboot_instance(pb::RebootInstanceRequest {
            name: "watched".into(),
            mode: pb::RebootMode::Soft as i32,
            spec: None,
            ..Default::default()
        })
        .await
        .unwrap();
    client
        .stop_instance(pb::StopInstanceRequest {
            name: "watched".into(),
            force: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut seen = Vec::new();
    while seen.iter().filter(|e| is_stopped(e)).count() < 2 {
        seen.extend(collect_until(&mut stream, is_stopped).await);
    }

    let labels: Vec<String> = seen.iter().map(label).collect();
    assert_eq!(
        labels,
        [
            "INSTANCE_STATE_STARTING",
            "INSTANCE_STATE_RUNNING",
            "added eth1",
            "INSTANCE_STATE_STOPPING",
            "INSTANCE_STATE_STOPPED",
            "INSTANCE_STATE_STARTING",
            "INSTANCE_STATE_RUNNING",
            "rebooted soft",
            "INSTANCE_STATE_STOPPING",
            "INSTANCE_STATE_STOPPED",
        ]
    );
    assert!(
        seen.windows(2).all(|w| w[1].sequence == w[0].sequence + 1),
        "sequence numbers without gaps"
    );

    let added = seen
        .iter()
        .find(|e| e.kind == pb::EventKind::DeviceAdded as i32)
        .unwrap();
    let mut resumed = watch(&agent, "watched", Some(added.sequence))
        .await
        .unwrap();
    let mut rest = Vec::new();
    while rest.iter().filter(|e| is_stopped(e)).count() < 2 {
        rest.extend(collect_until(&mut resumed, is_stopped).await);
    }
    let after_added: Vec<&pb::Event> = seen
        .iter()
        .filter(|e| e.sequence > added.sequence)
        .collect();
    assert_eq!(rest.iter().collect::<Vec<_>>(), after_added);
}

#[tokio::test]
async fn a_killed_qemu_gives_a_crashed_event() {
    let agent = TestAgent::start().await;
    let info = agent.start_spec(agent.spec("doomed", 64)).await;
    let mut stream = watch(&agent, "doomed", None).await.unwrap();

    send_signal(info.pid, libc::SIGKILL);
    let seen = collect_until(&mut stream, |e| {
        e.kind == pb::EventKind::StateChanged as i32
    })
    .await;

    assert_eq!(seen[0].state, pb::InstanceState::Crashed as i32);
    assert!(!seen[0].guest_initiated);
    assert!(
        seen[0].state_detail.contains("exited unexpectedly"),
        "{}",
        seen[0].state_detail
    );
}

#[tokio::test]
async fn resuming_from_events_no_longer_kept_is_out_of_range() {
    let options = AgentOptions {
        args: ["--powerdown-timeout-ms", "1000", "--event-buffer", "3"]
            .map(String::from)
            .to_vec(),
        ..AgentOptions::default()
    };
    let agent = TestAgent::start_with(options).await;
    let mut client = agent.client().await;
    client
        .start_instance(start_request(agent.spec("brief", 64)))
        .await
        .unwrap();
    client
        .stop_instance(pb::StopInstanceRequest {
            name: "brief".into(),
            force: true,
            ..Default::default()
        })
        .await
        .unwrap();

    let too_old = watch(&agent, "", Some(0))
        .await
        .expect_err("the first events are gone");
    let kept = watch(&agent, "", Some(1)).await;

    assert_eq!(too_old.code(), Code::OutOfRange, "{too_old:?}");
    assert!(
        too_old.message().contains("oldest kept is 2"),
        "{}",
        too_old.message()
    );
    // The three kept events, from the oldest, without a gap.
    let mut kept = kept.expect("events after 1 are kept");
    let seen = collect_until(&mut kept, |e| e.sequence == 4).await;
    assert_eq!(
        seen.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        [2, 3, 4]
    );
    assert_eq!(seen[2].state, pb::InstanceState::Stopped as i32);
}
