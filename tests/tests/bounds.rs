//! What a caller can make the agent hold, and for how long: waits beyond
//! a documented maximum are refused, a forced stop never waits out a
//! graceful one, a migration to the node itself is refused at once, and
//! huge names or resume points come back as short, clear errors.

use std::time::{Duration, Instant};

use kvm_agent_proto::v1 as pb;
use kvm_agent_tests::*;
use tonic::Code;

#[tokio::test]
async fn waits_and_migration_parameters_past_their_limits_are_refused() {
    let agent = TestAgent::start().await;
    let info = agent.start_spec(agent.spec("bounded", 64)).await;
    let mut client = agent.client().await;

    let stop = client
        .stop_instance(pb::StopInstanceRequest {
            name: "bounded".into(),
            force: false,
            powerdown_timeout_ms: u32::MAX,
        })
        .await
        .unwrap_err();
    let balloon = client
        .set_memory(pb::SetMemoryRequest {
            name: "bounded".into(),
            memory_mib: 32,
            wait: true,
            timeout_ms: u64::MAX,
        })
        .await
        .unwrap_err();
    let mut refused_migrations = Vec::new();
    for options in [
        pb::MigrationOptions {
            downtime_limit_ms: 4_000_000,
            ..Default::default()
        },
        pb::MigrationOptions {
            max_bandwidth: u64::MAX,
            ..Default::default()
        },
    ] {
        refused_migrations.push(
            client
                .migrate_instance(pb::MigrateInstanceRequest {
                    name: "bounded".into(),
                    target: "unix:///nonexistent".into(),
                    options: Some(options),
                })
                .await
                .map(drop)
                .unwrap_err(),
        );
    }

    for (refused, field) in [
        (&stop, "powerdown_timeout_ms"),
        (&balloon, "timeout_ms"),
        (&refused_migrations[0], "downtime_limit_ms"),
        (&refused_migrations[1], "max_bandwidth"),
    ] {
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
        assert!(refused.message().contains(field), "{}", refused.message());
    }
    let after = agent.instance("bounded").await;
    assert_eq!(after.state, pb::InstanceState::Running as i32);
    assert_eq!(after.pid, info.pid);
}

#[tokio::test]
async fn a_forced_stop_preempts_a_graceful_one_waiting_on_the_guest() {
    let agent = TestAgent::start().await;
    // No guest OS: nothing answers the ACPI powerdown.
    let info = agent.start_spec(agent.spec("deaf", 64)).await;
    let graceful = {
        let mut client = agent.client().await;
        tokio::spawn(async move {
            client
                .stop_instance(pb::StopInstanceRequest {
                    name: "deaf".into(),
                    force: false,
                    powerdown_timeout_ms: 3_600_000,
                })
                .await
        })
    };
    wait_for(Duration::from_secs(10), async || {
        (agent.instance("deaf").await.state == pb::InstanceState::Stopping as i32).then_some(())
    })
    .await
    .expect("the graceful stop waits on the guest");

    let started = Instant::now();
    let forced = agent
        .client()
        .await
        .stop_instance(pb::StopInstanceRequest {
            name: "deaf".into(),
            force: true,
            powerdown_timeout_ms: 0,
        })
        .await
        .expect("the forced stop goes through")
        .into_inner();
    let graceful = graceful.await.unwrap().expect("the graceful stop ends too");

    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the forced stop waited {:?}",
        started.elapsed()
    );
    assert_eq!(
        graceful.into_inner().method,
        pb::StopMethod::Kill as i32,
        "the graceful stop gave way to a kill"
    );
    assert_eq!(forced.method, pb::StopMethod::AlreadyStopped as i32);
    assert!(!process_alive(info.pid));
    assert_eq!(
        agent.instance("deaf").await.state,
        pb::InstanceState::Stopped as i32
    );
}

#[tokio::test]
async fn a_migration_to_the_instances_own_agent_is_refused_at_once() {
    let agent = TestAgent::start().await;
    let info = agent.start_spec(agent.spec("homebody", 64)).await;
    let started = Instant::now();

    let mut stream = agent
        .client()
        .await
        .migrate_instance(pb::MigrateInstanceRequest {
            name: "homebody".into(),
            target: agent.address(),
            options: None,
        })
        .await
        .unwrap()
        .into_inner();
    let mut outcome = Ok(());
    while let Some(item) = tokio_stream::StreamExt::next(&mut stream).await {
        if let Err(status) = item {
            outcome = Err(status);
        }
    }

    let refused = outcome.expect_err("a node can't be its own target");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("must be another node"),
        "{}",
        refused.message()
    );
    let after = agent.instance("homebody").await;
    assert_eq!(after.state, pb::InstanceState::Running as i32);
    assert_eq!(after.pid, info.pid);
}

#[tokio::test]
async fn huge_names_and_resume_points_get_short_clear_errors() {
    let agent = TestAgent::start().await;
    let mut client = agent.client().await;

    for size in [16 << 10, 512 << 10] {
        let missing = client
            .get_instance(pb::GetInstanceRequest {
                name: "n".repeat(size),
            })
            .await
            .unwrap_err();
        assert_eq!(missing.code(), Code::InvalidArgument, "{size}");
        assert!(missing.message().len() < 512, "{}", missing.message().len());
    }
    let ahead = client
        .watch_events(pb::WatchEventsRequest {
            name: String::new(),
            after_sequence: Some(u64::MAX),
        })
        .await
        .map(drop)
        .unwrap_err();
    assert_eq!(ahead.code(), Code::OutOfRange, "{ahead:?}");
    assert!(ahead.message().contains("restarted"), "{}", ahead.message());

    // Still answering, and the log didn't take the names in full.
    agent.start_spec(agent.spec("after", 64)).await;
    assert!(
        agent.log().len() < 1 << 20,
        "{} bytes of log",
        agent.log().len()
    );
}

/// Opens `held` connections to `socket` and one more; returns whether the
/// one more was closed by the agent while every held one stayed open.
fn one_past_the_limit_is_closed(socket: &std::path::Path, held: usize) -> bool {
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    let open: Vec<UnixStream> = (0..held)
        .map(|_| UnixStream::connect(socket).unwrap())
        .collect();
    let mut extra = UnixStream::connect(socket).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let closed = matches!(extra.read(&mut [0u8; 64]), Ok(0));
    let all_held_open = open.iter().all(|mut c| {
        c.set_nonblocking(true).unwrap();
        matches!(c.read(&mut [0u8; 64]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    });
    closed && all_held_open
}

#[tokio::test]
async fn connections_past_the_limit_are_closed_and_the_rest_still_served() {
    let mut options = AgentOptions::default();
    options
        .args
        .extend(["--max-connections".into(), "4".into()]);
    let agent = TestAgent::start_with(options).await;
    let socket = agent.socket();

    // A connection of the fixture's own may still be on its way out.
    let limited = wait_for(Duration::from_secs(10), async || {
        let socket = socket.clone();
        tokio::task::spawn_blocking(move || one_past_the_limit_is_closed(&socket, 4))
            .await
            .unwrap()
            .then_some(())
    })
    .await;

    assert!(limited.is_some(), "{}", agent.log());
    assert!(
        agent.log().contains("too many connections"),
        "{}",
        agent.log()
    );
    // Once the held ones are gone, the agent serves new callers again.
    let served = wait_for(Duration::from_secs(10), async || {
        let channel = agent.try_channel().await.ok()?;
        pb::node_agent_client::NodeAgentClient::new(channel)
            .get_node_info(pb::GetNodeInfoRequest {})
            .await
            .ok()
    })
    .await;
    assert!(served.is_some(), "{}", agent.log());
}
