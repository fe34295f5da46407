//! QMP faults a real QEMU can't be made to show, through the whole agent:
//! a stand-in QEMU (`fake-qemu`) misbehaves once on `stop`, the caller of
//! PauseInstance gets a clear status in time, the agent rebuilds the
//! connection for the next call, and a real instance beside it keeps
//! answering throughout.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kvm_agent_proto::v1 as pb;
use kvm_agent_tests::*;
use tonic::Code;

const QMP_TIMEOUT: Duration = Duration::from_millis(1000);
const GREETING_TIMEOUT: Duration = Duration::from_millis(1500);
/// Slack on top of a timeout for scheduling on a busy machine.
const SLACK: Duration = Duration::from_millis(1500);

async fn fault_agent() -> TestAgent {
    let mut options = AgentOptions {
        qemu_binary: Some(PathBuf::from(env!("CARGO_BIN_EXE_fake-qemu"))),
        ..AgentOptions::default()
    };
    options.args.extend([
        "--qmp-timeout-ms".to_owned(),
        QMP_TIMEOUT.as_millis().to_string(),
        "--qmp-greeting-timeout-ms".to_owned(),
        GREETING_TIMEOUT.as_millis().to_string(),
    ]);
    TestAgent::start_with(options).await
}

/// Peak resident memory of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

/// Calls GetInstance on `name` until told to stop; returns the slowest
/// answer and every failure.
async fn keep_reading(
    agent: &TestAgent,
    name: &str,
) -> (
    Arc<AtomicBool>,
    tokio::task::JoinHandle<(Duration, Vec<String>)>,
) {
    let done = Arc::new(AtomicBool::new(false));
    let name = name.to_owned();
    let channel = agent.channel().await;
    let flag = done.clone();
    let task = tokio::spawn(async move {
        let mut client = pb::node_agent_client::NodeAgentClient::new(channel);
        let mut slowest = Duration::ZERO;
        let mut failures = Vec::new();
        while !flag.load(Ordering::SeqCst) {
            let began = Instant::now();
            match client
                .get_instance(pb::GetInstanceRequest { name: name.clone() })
                .await
            {
                Ok(r) if r.get_ref().state() == pb::InstanceState::Running => {}
                Ok(r) => failures.push(format!("state {:?}", r.get_ref().state())),
                Err(e) => failures.push(e.to_string()),
            }
            slowest = slowest.max(began.elapsed());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (slowest, failures)
    });
    (done, task)
}

#[tokio::test]
async fn each_qmp_fault_is_a_clear_status_in_time_and_the_connection_is_rebuilt() {
    let agent = fault_agent().await;
    let mut client = agent.client().await;
    client
        .start_instance(start_request(agent.spec("real", 64)))
        .await
        .expect("a real QEMU starts through the stand-in");
    let (stop_reading, reader) = keep_reading(&agent, "real").await;

    // A QEMU that never greets fails its start, and nothing stays behind.
    let began = Instant::now();
    let err = client
        .start_instance(start_request(agent.spec("qmp-fault-no-greeting", 64)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("greeting"), "{}", err.message());
    assert!(
        began.elapsed() < GREETING_TIMEOUT + SLACK,
        "{:?}",
        began.elapsed()
    );
    let gone = client
        .get_instance(pb::GetInstanceRequest {
            name: "qmp-fault-no-greeting".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);

    let agent_pid = agent.agent_pid().unwrap();
    let peak_before = peak_rss_kib(agent_pid);
    let faults = [
        ("silent", Some(Code::DeadlineExceeded)),
        ("garbage", Some(Code::Unavailable)),
        ("long-line", Some(Code::Unavailable)),
        ("unknown-id", Some(Code::DeadlineExceeded)),
        ("hang-up", Some(Code::Unavailable)),
        ("interleaved", None),
    ];
    for (fault, expected) in faults {
        let name = format!("qmp-fault-{fault}");
        client
            .start_instance(start_request(agent.spec(&name, 64)))
            .await
            .unwrap_or_else(|e| panic!("{name} starts: {e}"));

        let began = Instant::now();
        let first = client
            .pause_instance(pb::PauseInstanceRequest { name: name.clone() })
            .await;
        let took = began.elapsed();
        match expected {
            Some(code) => {
                let err = first.expect_err(&name);
                assert_eq!(err.code(), code, "{name}: {err:?}");
                assert!(err.message().contains("QMP"), "{name}: {}", err.message());
            }
            None => {
                first.unwrap_or_else(|e| panic!("{name}: {e}"));
            }
        }
        assert!(took < QMP_TIMEOUT + SLACK, "{name} took {took:?}");

        // The fault is gone from the stand-in, so only a rebuilt connection
        // is needed for the next calls to work.
        if expected.is_some() {
            let paused = client
                .pause_instance(pb::PauseInstanceRequest { name: name.clone() })
                .await
                .unwrap_or_else(|e| panic!("{name}: pause after the fault: {e}"));
            assert_eq!(paused.get_ref().state(), pb::InstanceState::Paused);
        }
        client
            .resume_instance(pb::ResumeInstanceRequest { name: name.clone() })
            .await
            .unwrap_or_else(|e| panic!("{name}: resume: {e}"));
        client
            .stop_instance(pb::StopInstanceRequest {
                name: name.clone(),
                force: true,
                powerdown_timeout_ms: 0,
            })
            .await
            .unwrap_or_else(|e| panic!("{name}: stop: {e}"));
    }
    // A 64 MiB line is refused at the 1 MiB bound, not read into memory.
    let grown_mib = peak_rss_kib(agent_pid).saturating_sub(peak_before) / 1024;
    assert!(
        grown_mib < 32,
        "the agent's peak RSS grew by {grown_mib} MiB"
    );

    stop_reading.store(true, Ordering::SeqCst);
    let (slowest, failures) = reader.await.unwrap();
    assert!(
        failures.is_empty(),
        "GetInstance on the real instance: {failures:?}"
    );
    assert!(
        slowest < Duration::from_millis(500),
        "GetInstance on the real instance took {slowest:?}"
    );
    let real = client
        .get_instance(pb::GetInstanceRequest {
            name: "real".into(),
        })
        .await
        .unwrap();
    assert_eq!(real.get_ref().state(), pb::InstanceState::Running);
}
