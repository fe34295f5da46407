//! A q35 instance against real QEMU and the test guest (TCG): every device
//! behind a PCIe root port of its own, hot-adds into the spare ports, and
//! the topology kept by a soft reboot and a migration.

use std::time::Duration;

use kvm_agent_proto::v1 as pb;
use kvm_agent_tests::guest::{GuestConsole, boot_guest, in_guest};
use kvm_agent_tests::*;
use serde_json::{Value, json};
use tokio_stream::StreamExt;

const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
const GUEST_SEES_TIMEOUT: Duration = Duration::from_secs(30);

/// `(port slot, device id)` of every device behind one of the agent's root
/// ports, from QEMU's own view.
fn behind_ports(qmp: &mut Qmp) -> Vec<(u64, String)> {
    let pci = qmp.execute("query-pci", json!({}));
    let mut found = Vec::new();
    for port in pci[0]["devices"].as_array().unwrap() {
        let id = port["qdev_id"].as_str().unwrap_or_default();
        if !id.starts_with("root-port-") {
            continue;
        }
        let slot = port["slot"].as_u64().unwrap();
        let children = port["pci_bridge"]["devices"].as_array().cloned();
        for child in children.unwrap_or_default() {
            found.push((slot, child["qdev_id"].as_str().unwrap().to_owned()));
        }
    }
    found.sort();
    found
}

fn port_of(devices: &[(u64, String)], id: &str) -> u64 {
    devices
        .iter()
        .find(|(_, d)| d == id)
        .unwrap_or_else(|| panic!("{id} is behind no root port: {devices:?}"))
        .0
}

fn runtime_ports(runtime: &Value) -> Vec<u64> {
    runtime["pcie_root_ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap())
        .collect()
}

#[tokio::test]
async fn a_q35_guest_hotplugs_into_its_root_ports_and_keeps_them_across_reboot_and_migration() {
    let agent = TestAgent::start().await;
    let target = TestAgent::start().await;
    let root = agent.raw_image("root.img", 8);
    let data = agent.raw_image("data.img", 8);
    let mut spec = agent.spec("pcie", 256);
    target.track(spec.uuid.parse().unwrap());
    boot_guest(&mut spec);
    spec.machine_type = "q35".into();
    spec.hotplug_ports = Some(2);
    spec.disks = vec![disk("root", &root)];
    spec.nics = vec![
        nic("eth0", "52:54:00:35:00:01"),
        nic("eth1", "52:54:00:35:00:02"),
    ];
    let started = agent.start_spec(spec).await;
    assert!(started.machine_type.starts_with("pc-q35-"), "{started:?}");
    let socket = agent.run_dir("pcie").join("serial.sock");
    let console = tokio::task::spawn_blocking(move || GuestConsole::connect(&socket, BOOT_TIMEOUT))
        .await
        .unwrap();
    let runtime = agent.runtime_json("pcie").await;
    let ports = runtime_ports(&runtime);
    // Disk, two NICs and the balloon, each behind its port, and two spare.
    assert_eq!(ports.len(), 6, "{runtime}");
    let mut qmp = operator_qmp(&agent, "pcie");
    let cold = behind_ports(&mut qmp);
    assert_eq!(cold.len(), 4, "{cold:?}");
    for device in &started.devices {
        assert_eq!(port_of(&cold, &device.qemu_id), u64::from(device.pci_slot));
    }

    // A NIC and a disk take the two spare ports, and the guest sees them.
    let mut client = agent.client().await;
    let added_nic = client
        .add_nic(pb::AddNicRequest {
            name: "pcie".into(),
            nic: Some(nic("eth2", "52:54:00:35:00:03")),
        })
        .await
        .unwrap_or_else(|s| panic!("add NIC: {s:?}\n{}", agent.log()))
        .into_inner()
        .device
        .unwrap();
    let added_disk = client
        .add_disk(pb::AddDiskRequest {
            name: "pcie".into(),
            disk: Some(disk("data", &data)),
        })
        .await
        .unwrap_or_else(|s| panic!("add disk: {s:?}\n{}", agent.log()))
        .into_inner()
        .device
        .unwrap();
    for added in [&added_nic, &added_disk] {
        assert!(
            ports.contains(&u64::from(added.pci_slot)),
            "{added:?} {ports:?}"
        );
        let hot = behind_ports(&mut qmp);
        assert_eq!(port_of(&hot, &added.qemu_id), u64::from(added.pci_slot));
    }
    let (console, seen) = in_guest(console, |c| {
        c.run_until(
            "cat /sys/class/net/*/address; ls /sys/block",
            GUEST_SEES_TIMEOUT,
            |out| out.contains("52:54:00:35:00:03") && out.contains("vdb"),
        )
    })
    .await;
    assert!(seen.contains("vda"), "{seen}");

    // Every port is taken now.
    let full = client
        .add_nic(pb::AddNicRequest {
            name: "pcie".into(),
            nic: Some(nic("eth3", "52:54:00:35:00:04")),
        })
        .await
        .unwrap_err();
    assert_eq!(full.code(), tonic::Code::ResourceExhausted, "{full:?}");

    // The guest lets the NIC go; its port is free again.
    client
        .remove_device(pb::RemoveDeviceRequest {
            name: "pcie".into(),
            device: "eth2".into(),
        })
        .await
        .unwrap_or_else(|s| panic!("remove: {s:?}\n{}", agent.log()));
    let (_console, seen) = in_guest(console, |c| {
        c.run_until("cat /sys/class/net/*/address", GUEST_SEES_TIMEOUT, |out| {
            !out.contains("52:54:00:35:00:03")
        })
    })
    .await;
    assert!(seen.contains("52:54:00:35:00:01"), "{seen}");

    // A soft reboot replays the same ports, the same devices behind them.
    let before = behind_ports(&mut qmp);
    client
        .reboot_instance(pb::RebootInstanceRequest {
            name: "pcie".into(),
            mode: pb::RebootMode::Soft as i32,
            ..Default::default()
        })
        .await
        .expect("soft reboot");
    let runtime = agent.runtime_json("pcie").await;
    assert_eq!(runtime_ports(&runtime), ports);
    let mut qmp = operator_qmp(&agent, "pcie");
    let rebooted = wait_for(BOOT_TIMEOUT, async || {
        let seen = behind_ports(&mut qmp);
        (seen == before).then_some(seen)
    })
    .await;
    assert!(
        rebooted.is_some(),
        "{before:?} vs {:?}",
        behind_ports(&mut qmp)
    );

    // The migration's target has the same ports and devices.
    let mut stream = client
        .migrate_instance(pb::MigrateInstanceRequest {
            name: "pcie".into(),
            target: target.address(),
            options: Some(pb::MigrationOptions::default()),
        })
        .await
        .expect("migrate")
        .into_inner();
    while let Some(progress) = stream.next().await {
        progress.unwrap_or_else(|s| panic!("migration: {s:?}\n{}", agent.log()));
    }
    assert_eq!(runtime_ports(&target.runtime_json("pcie").await), ports);
    let mut qmp = operator_qmp(&target, "pcie");
    assert_eq!(behind_ports(&mut qmp), before);
}
