//! Deleting and renaming stopped instances: refused while QEMU runs, and
//! once done, nothing of the old name is left, in the agent, on disk, or
//! after a restart.

use std::time::Duration;

use kvm_agent_proto::v1 as pb;
use kvm_agent_tests::*;
use tokio_stream::StreamExt;
use tonic::Code;

async fn delete(agent: &TestAgent, name: &str) -> Result<(), tonic::Status> {
    agent
        .client()
        .await
        .delete_instance(pb::DeleteInstanceRequest { name: name.into() })
        .await
        .map(drop)
}

async fn rename(
    agent: &TestAgent,
    name: &str,
    new_name: &str,
) -> Result<pb::InstanceInfo, tonic::Status> {
    agent
        .client()
        .await
        .rename_instance(pb::RenameInstanceRequest {
            name: name.into(),
            new_name: new_name.into(),
        })
        .await
        .map(|r| r.into_inner())
}

async fn lookup(agent: &TestAgent, name: &str) -> Result<pb::InstanceInfo, tonic::Status> {
    agent
        .client()
        .await
        .get_instance(pb::GetInstanceRequest { name: name.into() })
        .await
        .map(|r| r.into_inner())
}

fn device_uuid(info: &pb::InstanceInfo, kind: pb::DeviceKind) -> String {
    let device = info.devices.iter().find(|d| d.kind == kind as i32);
    device.expect("the device").uuid.clone()
}

fn slots(info: &pb::InstanceInfo) -> Vec<(String, u32)> {
    let mut slots: Vec<_> = info
        .devices
        .iter()
        .map(|d| (d.uuid.clone(), d.pci_slot))
        .collect();
    slots.sort();
    slots
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_instance_is_renamed_with_its_devices_then_deleted_for_good() {
    let mut agent = TestAgent::start().await;
    let mut events = agent
        .client()
        .await
        .watch_events(pb::WatchEventsRequest {
            name: String::new(),
            after_sequence: None,
        })
        .await
        .unwrap()
        .into_inner();
    let mut spec = agent.spec("before", 64);
    let data = agent.raw_image("data.img", 8);
    spec.disks = vec![disk("data", &data)];
    spec.nics = vec![nic("eth0", "52:54:00:00:31:01")];
    let started = agent.start_spec(spec).await;
    agent.start_spec(agent.spec("taken", 64)).await;
    agent.force_stop("taken").await;

    // Neither while QEMU runs.
    for refused in [
        delete(&agent, "before").await.map(drop),
        rename(&agent, "before", "after").await.map(drop),
    ] {
        let status = refused.unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert!(status.message().contains("stop it first"), "{status:?}");
    }
    assert_eq!(lookup(&agent, "before").await.unwrap().pid, started.pid);
    agent.force_stop("before").await;

    let taken = rename(&agent, "before", "taken").await.unwrap_err();
    assert_eq!(taken.code(), Code::AlreadyExists, "{taken:?}");
    let bad = rename(&agent, "before", "no/slash").await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");

    let renamed = rename(&agent, "before", "after").await.unwrap();
    assert_eq!(renamed.name, "after");
    assert_eq!(renamed.uuid, started.uuid);
    assert_eq!(slots(&renamed), slots(&started));
    assert_eq!(
        lookup(&agent, "before").await.unwrap_err().code(),
        Code::NotFound
    );
    assert!(!agent.record_path("before").exists());
    assert!(agent.record_path("after").exists());

    // It starts under its new name with the devices where they were.
    let runtime = agent.runtime_json("after").await;
    assert_eq!(runtime["name"], "after");
    let mut again = agent.spec("after", 64);
    again.uuid = started.uuid.clone();
    again.disks = vec![pb::DiskSpec {
        uuid: device_uuid(&started, pb::DeviceKind::Disk),
        ..disk("data", &data)
    }];
    again.nics = vec![pb::NicSpec {
        uuid: device_uuid(&started, pb::DeviceKind::Nic),
        ..nic("eth0", "52:54:00:00:31:01")
    }];
    let running = agent.start_spec(again).await;
    assert_eq!(slots(&running), slots(&started));
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", running.pid)).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(cmdline.contains("after"), "{cmdline}");
    agent.force_stop("after").await;

    delete(&agent, "after").await.unwrap();
    assert_eq!(
        lookup(&agent, "after").await.unwrap_err().code(),
        Code::NotFound
    );
    assert!(!agent.record_path("after").exists());
    assert!(!agent.run_dir("after").exists());
    assert_eq!(
        delete(&agent, "after").await.unwrap_err().code(),
        Code::NotFound
    );

    // Watchers were told, with why.
    let mut deleted = Vec::new();
    while deleted.len() < 2 {
        let event = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("the deleted events")
            .unwrap()
            .unwrap();
        if event.kind == pb::EventKind::Deleted as i32 {
            deleted.push((event.instance, event.state_detail));
        }
    }
    assert_eq!(
        deleted,
        [
            ("before".to_owned(), "renamed to after".to_owned()),
            ("after".to_owned(), "deleted".to_owned())
        ]
    );

    // A restarted agent knows only what is left.
    agent.restart().await;
    let names: Vec<String> = agent
        .client()
        .await
        .list_instances(pb::ListInstancesRequest {})
        .await
        .unwrap()
        .into_inner()
        .instances
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(names, ["taken"]);
}
