//! An agent restarted under running instances finishes or rolls back the
//! hotplug it was doing when it died, whichever matches what QEMU has.

use std::time::Duration;

use kvm_agent_proto::v1 as pb;
use kvm_agent_tests::guest::{GuestConsole, boot_guest, pci_address};
use kvm_agent_tests::*;
use runtime_store::RecordStore;
use serde_json::{Value, json};

async fn add_nic(agent: &TestAgent, name: &str, nic_name: &str, mac: &str) -> pb::DeviceInfo {
    agent
        .add_nic(name, nic(nic_name, mac))
        .await
        .unwrap()
        .device
        .unwrap()
}

fn write_intent(agent: &TestAgent, name: &str, intent: Value) {
    std::fs::write(
        agent.state_dir().join(format!("journal/{name}.intent")),
        intent.to_string(),
    )
    .unwrap();
}

fn intent_is_clear(agent: &TestAgent, name: &str) -> bool {
    std::fs::read(agent.state_dir().join(format!("journal/{name}.intent")))
        .map_or(true, |b| b.is_empty())
}

fn nic_intent(name: &str, uuid: &str, mac: &str) -> Value {
    json!({ "op": "add_nic", "nic": {
        "name": name, "uuid": uuid, "mac": mac, "model": "virtio", "bridge": null, "vhost": false, "queues": 1
    }})
}

#[tokio::test]
async fn a_hot_add_qemu_completed_is_finished_in_the_record() {
    let mut agent = TestAgent::start().await;
    agent.start_spec(agent.spec("half", 64)).await;
    let before_add = std::fs::read(agent.record_path("half")).unwrap();
    let added = add_nic(&agent, "half", "eth1", "52:54:00:00:90:01").await;
    // The agent dies after QEMU took the NIC but before the record said so.
    agent.kill_agent();
    std::fs::write(agent.record_path("half"), before_add).unwrap();
    write_intent(
        &agent,
        "half",
        nic_intent("eth1", &added.uuid, "52:54:00:00:90:01"),
    );

    agent.restart().await;

    let rt = agent.runtime_json("half").await;
    assert_eq!(rt["nics"][0]["name"], "eth1", "{rt}");
    assert_eq!(rt["nics"][0]["slot"], added.pci_slot);
    let info = agent
        .client()
        .await
        .get_instance(pb::GetInstanceRequest {
            name: "half".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.devices[0].tap, added.tap, "the tap is found again");
    assert!(intent_is_clear(&agent, "half"));
}

#[tokio::test]
async fn a_hot_add_qemu_never_completed_is_rolled_back_in_the_record() {
    let mut agent = TestAgent::start().await;
    agent.start_spec(agent.spec("ahead", 64)).await;
    let kept = add_nic(&agent, "ahead", "eth1", "52:54:00:00:91:01").await;
    agent.kill_agent();
    // The record got ahead of QEMU: it lists a NIC QEMU never took.
    let ghost = uuid::Uuid::new_v4().to_string();
    let store = RecordStore::open(&agent.state_dir(), "runtime").unwrap();
    let mut record = store.load::<Value>("ahead").unwrap().unwrap().value;
    let mut ghost_nic = nic_intent("ghost", &ghost, "52:54:00:00:91:02")["nic"].clone();
    ghost_nic["slot"] = json!(20);
    record["runtime"]["nics"]
        .as_array_mut()
        .unwrap()
        .push(ghost_nic);
    store.save("ahead", &record).unwrap();
    write_intent(
        &agent,
        "ahead",
        nic_intent("ghost", &ghost, "52:54:00:00:91:02"),
    );

    agent.restart().await;

    let rt = agent.runtime_json("ahead").await;
    let names: Vec<&str> = rt["nics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["eth1"], "{rt}");
    assert_eq!(rt["nics"][0]["uuid"], kept.uuid.as_str());
    assert!(intent_is_clear(&agent, "ahead"));
}

#[tokio::test]
async fn a_removal_the_guest_completed_is_finished_in_the_record() {
    let mut agent = TestAgent::start().await;
    let mut spec = agent.spec("leaving", 256);
    boot_guest(&mut spec);
    agent.start_spec(spec).await;
    let socket = agent.run_dir("leaving").join("serial.sock");
    let console = tokio::task::spawn_blocking(move || {
        GuestConsole::connect(&socket, Duration::from_secs(60))
    })
    .await
    .unwrap();
    let added = add_nic(&agent, "leaving", "eth1", "52:54:00:00:92:01").await;
    let address = pci_address(added.pci_slot);
    let _console = tokio::task::spawn_blocking(move || {
        let mut console = console;
        console.run_until("ls /sys/bus/pci/devices", Duration::from_secs(20), |out| {
            out.contains(&address)
        });
        console
    })
    .await
    .unwrap();
    // The agent dies after device_del; the guest releases the NIC meanwhile.
    agent.kill_agent();
    write_intent(
        &agent,
        "leaving",
        json!({ "op": "remove", "device": "eth1" }),
    );
    let mut qmp = operator_qmp(&agent, "leaving");
    qmp.execute("device_del", json!({ "id": added.qemu_id }));
    let gone = wait_for(Duration::from_secs(20), async || {
        (!qmp
            .pci_devices()
            .iter()
            .any(|(_, id, _)| id == &added.qemu_id))
        .then_some(())
    })
    .await;
    assert!(gone.is_some(), "the guest must release the NIC");

    agent.restart().await;

    let rt = agent.runtime_json("leaving").await;
    assert_eq!(rt["nics"], json!([]), "{rt}");
    assert!(intent_is_clear(&agent, "leaving"));
}
