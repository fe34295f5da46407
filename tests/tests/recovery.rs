//! An agent restarted under running instances finishes or rolls back the
//! hotplug it was doing when it died, whichever matches what QEMU has.

use std::time::Duration;

use kvm_agent_proto::v1 as pb;
use kvm_agent_tests::guest::{GuestConsole, boot_guest, pci_address};
use kvm_agent_tests::records::newest_record_envelope;
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
        .map_or(true, |b| b.trim_ascii().is_empty())
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

fn instance_named<'a>(list: &'a [pb::InstanceInfo], name: &str) -> &'a pb::InstanceInfo {
    list.iter()
        .find(|i| i.name == name)
        .unwrap_or_else(|| panic!("{name} is not listed"))
}

/// The agent is killed in the middle of a NIC hot-add, after QEMU took the
/// netdev and before it got the device; another instance's QEMU dies while
/// no agent runs, and a third's pidfile is left naming an unrelated
/// process. The next agent sorts every one out, and quickly.
#[tokio::test]
async fn a_killed_agent_is_replaced_by_one_that_reconciles_every_instance() {
    let mut options = AgentOptions::default();
    options
        .args
        .extend(["--fault-point".to_owned(), "hotplug-before-qemu".to_owned()]);
    let mut agent = TestAgent::start_with(options).await;
    let mut pids = std::collections::HashMap::new();
    for name in ["one", "two", "three", "lost", "stranger"] {
        let info = agent.start_spec(agent.spec(name, 64)).await;
        pids.insert(name, info.pid);
    }

    let nic_uuid = uuid::Uuid::new_v4();
    let mut half_added = nic("eth1", "52:54:00:00:92:01");
    half_added.uuid = nic_uuid.to_string();
    let adding = {
        let mut client = agent.client().await;
        tokio::spawn(async move {
            client
                .add_nic(pb::AddNicRequest {
                    name: "two".into(),
                    nic: Some(half_added),
                })
                .await
        })
    };
    let stalled = wait_for(Duration::from_secs(10), async || {
        agent
            .log()
            .contains("stopped at a fault point")
            .then_some(())
    })
    .await;
    assert!(
        stalled.is_some(),
        "the hot-add never reached its fault point:\n{}",
        agent.log()
    );
    // QEMU gets the NIC's netdev (a tap of its own) but never the device.
    let tap = format!("kr{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let netdev = format!("net-{}", &nic_uuid.simple().to_string()[..12]);
    let mut qmp = operator_qmp(&agent, "two");
    // The test's own fd on the tap closes at the end of the statement.
    qmp.pass_fd("halfadded", open_tap(&tap).queue_fds().next().unwrap());
    qmp.execute(
        "netdev_add",
        json!({"type": "tap", "id": netdev, "fd": "halfadded"}),
    );
    drop(qmp);
    assert!(std::path::Path::new(&format!("/sys/class/net/{tap}")).exists());

    agent.kill_agent();
    adding.abort();
    send_signal(pids["lost"], libc::SIGKILL);
    send_signal(pids["stranger"], libc::SIGKILL);
    let mut unrelated = std::process::Command::new("sleep")
        .arg("300")
        .spawn()
        .unwrap();
    std::fs::write(
        agent.run_dir("stranger").join("pid"),
        unrelated.id().to_string(),
    )
    .unwrap();
    assert!(
        wait_for(Duration::from_secs(5), async || {
            (!process_alive(pids["lost"]) && !process_alive(pids["stranger"])).then_some(())
        })
        .await
        .is_some()
    );

    let began = std::time::Instant::now();
    agent.restart_unsettled().await;
    agent.wait_reconciled(Duration::from_secs(10)).await;
    let took = began.elapsed();
    let mut client = agent.client().await;
    let settled = client
        .list_instances(pb::ListInstancesRequest {})
        .await
        .unwrap()
        .into_inner()
        .instances;
    assert!(took < Duration::from_secs(2), "reconciling took {took:?}");

    for name in ["one", "two", "three"] {
        let info = instance_named(&settled, name);
        assert_eq!(info.state(), pb::InstanceState::Running, "{name}: {info:?}");
        assert_eq!(info.pid, pids[name], "{name} keeps its QEMU");
        // QMP is connected again: pausing and resuming both go through it.
        client
            .pause_instance(pb::PauseInstanceRequest { name: name.into() })
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        client
            .resume_instance(pb::ResumeInstanceRequest { name: name.into() })
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    for name in ["lost", "stranger"] {
        let info = instance_named(&settled, name);
        assert_eq!(info.state(), pb::InstanceState::Crashed, "{name}: {info:?}");
        assert_eq!(info.pid, 0);
    }
    assert!(
        process_alive(unrelated.id()),
        "the unrelated process is left alone"
    );
    let _ = unrelated.kill();
    let _ = unrelated.wait();

    // The half-done hot-add is gone from QEMU and from the runtime alike.
    let two = instance_named(&settled, "two");
    assert!(two.devices.is_empty(), "{:?}", two.devices);
    let rt = agent.runtime_json("two").await;
    assert_eq!(rt["nics"], json!([]), "{rt}");
    assert!(
        !std::path::Path::new(&format!("/sys/class/net/{tap}")).exists(),
        "the netdev and its tap were deleted"
    );
    let nic_id = format!("nic-{}", &nic_uuid.simple().to_string()[..12]);
    let in_qemu = operator_qmp(&agent, "two").pci_devices();
    assert!(
        in_qemu.iter().all(|(_, id, _)| *id != nic_id),
        "{in_qemu:?}"
    );
    assert!(intent_is_clear(&agent, "two"));
}

/// While one instance's QEMU can't be reached yet, the restarted agent
/// already answers: that instance is listed as reconciling (and calls on it
/// wait), the others are done.
#[tokio::test]
async fn the_agent_answers_while_an_instance_is_still_being_reconciled() {
    let mut options = AgentOptions::default();
    options
        .args
        .extend(["--qmp-greeting-timeout-ms".to_owned(), "20000".to_owned()]);
    let mut agent = TestAgent::start_with(options).await;
    let frozen = agent.start_spec(agent.spec("frozen", 64)).await;
    agent.start_spec(agent.spec("fine", 64)).await;
    agent.kill_agent();
    send_signal(frozen.pid, libc::SIGSTOP);

    agent.restart_unsettled().await;
    let mut client = agent.client().await;
    let fine_done = wait_for(Duration::from_secs(5), async || {
        let list = client
            .list_instances(pb::ListInstancesRequest {})
            .await
            .ok()?
            .into_inner()
            .instances;
        (!instance_named(&list, "fine").reconciling).then_some(list)
    })
    .await;
    // SIGCONT before any assertion can fail, so the QEMU doesn't stay stopped.
    let mut pause = tonic::Request::new(pb::PauseInstanceRequest {
        name: "frozen".into(),
    });
    pause.set_timeout(Duration::from_millis(300));
    let waited = client.pause_instance(pause).await;
    send_signal(frozen.pid, libc::SIGCONT);

    let list = fine_done.expect("the reachable instance was reconciled");
    let fine = instance_named(&list, "fine");
    assert_eq!(fine.state(), pb::InstanceState::Running);
    let frozen_info = instance_named(&list, "frozen");
    assert!(frozen_info.reconciling, "{frozen_info:?}");
    let waited = waited.unwrap_err();
    assert!(
        matches!(
            waited.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "calls on an instance being reconciled wait for it: {waited:?}"
    );

    let adopted = wait_for(Duration::from_secs(10), async || {
        let info = client
            .get_instance(pb::GetInstanceRequest {
                name: "frozen".into(),
            })
            .await
            .ok()?
            .into_inner();
        (!info.reconciling).then_some(info)
    })
    .await
    .expect("the frozen instance is reconciled once QEMU runs again");
    assert_eq!(adopted.state(), pb::InstanceState::Running);
    assert_eq!(adopted.pid, frozen.pid);
}

#[tokio::test]
async fn a_running_instance_whose_record_is_unreadable_stays_in_sight_and_blocks_its_name() {
    let mut agent = TestAgent::start().await;
    let first = agent.start_spec(agent.spec("orphan", 64)).await;
    agent.kill_agent();
    // One flipped byte in the only copy left: the record fails its
    // checksum at the next start.
    let record = agent.record_path("orphan");
    let mut bytes = serde_json::to_vec_pretty(&newest_record_envelope(&record)).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&record, bytes).unwrap();
    agent.restart().await;

    let seen = agent.instance("orphan").await;
    assert_eq!(seen.state, pb::InstanceState::Quarantined as i32);
    assert_eq!(seen.pid, first.pid);
    assert!(seen.state_detail.contains("stop"), "{}", seen.state_detail);
    let listed = agent
        .client()
        .await
        .list_instances(pb::ListInstancesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(listed.instances.iter().any(|i| i.name == "orphan"));

    // Its name can't start a second QEMU on the same disks.
    let second = agent
        .client()
        .await
        .start_instance(start_request(agent.spec("orphan", 64)))
        .await
        .unwrap_err();
    assert_eq!(second.code(), tonic::Code::FailedPrecondition, "{second:?}");
    assert!(
        second.message().contains(&first.pid.to_string()),
        "{}",
        second.message()
    );
    assert!(process_alive(first.pid));

    // Stopping it resolves it: the QEMU goes, and the name is free.
    agent
        .client()
        .await
        .stop_instance(pb::StopInstanceRequest {
            name: "orphan".into(),
            force: true,
            ..Default::default()
        })
        .await
        .unwrap();
    wait_for(Duration::from_secs(10), async || {
        (!process_alive(first.pid)).then_some(())
    })
    .await
    .expect("the quarantined QEMU is gone");
    let again = agent.start_spec(agent.spec("orphan", 64)).await;
    assert_ne!(again.pid, first.pid);
}

/// Rewrites the record of `name` with `edit`, keeping its stored checksum,
/// which then fails.
fn tamper_with_record(agent: &TestAgent, name: &str, edit: impl FnOnce(&mut Value)) {
    let path = agent.record_path(name);
    let mut envelope = newest_record_envelope(&path);
    edit(&mut envelope);
    std::fs::write(&path, serde_json::to_vec_pretty(&envelope).unwrap()).unwrap();
}

#[tokio::test]
async fn a_quarantined_instance_is_adopted_only_when_qemu_shows_its_runtime() {
    let mut agent = TestAgent::start().await;
    let mut spec = agent.spec("intact", 64);
    spec.disks = vec![disk("root", &agent.raw_image("intact.raw", 4))];
    spec.nics = vec![nic("eth0", "52:54:00:ad:00:01")];
    let intact = agent.start_spec(spec).await;
    add_nic(&agent, "intact", "eth1", "52:54:00:ad:00:02").await;
    let devices = agent.instance("intact").await.devices;
    let altered = agent.start_spec(agent.spec("altered", 64)).await;
    agent.kill_agent();
    // One record loses only its checksum; the other says more memory
    // than its QEMU has.
    tamper_with_record(&agent, "intact", |envelope| {
        let digest = envelope["sha256"].as_str().unwrap().to_owned();
        let flipped = if digest.starts_with('0') { "1" } else { "0" };
        envelope["sha256"] = json!(format!("{flipped}{}", &digest[1..]));
    });
    tamper_with_record(&agent, "altered", |envelope| {
        envelope["payload"]["runtime"]["memory_mib"] = json!(96);
        let argv = envelope["payload"]["runtime"]["argv"]
            .as_array_mut()
            .unwrap();
        for arg in argv.iter_mut() {
            if arg == "size=64M" {
                *arg = json!("size=96M");
            }
        }
    });
    agent.restart().await;
    for name in ["intact", "altered"] {
        assert_eq!(
            agent.instance(name).await.state,
            pb::InstanceState::Quarantined as i32,
            "{name}"
        );
    }
    let mut client = agent.client().await;

    let adopted = client
        .adopt_instance(pb::AdoptInstanceRequest {
            name: "intact".into(),
        })
        .await
        .unwrap_or_else(|s| panic!("{s:?}\n{}", agent.log()))
        .into_inner();
    let refused = client
        .adopt_instance(pb::AdoptInstanceRequest {
            name: "altered".into(),
        })
        .await
        .unwrap_err();

    assert_eq!(adopted.state, pb::InstanceState::Running as i32);
    assert_eq!(adopted.pid, intact.pid, "the same QEMU, never restarted");
    assert_eq!(adopted.devices, devices, "the hot-added NIC too");
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("command line"),
        "{}",
        refused.message()
    );
    let still = agent.instance("altered").await;
    assert_eq!(still.state, pb::InstanceState::Quarantined as i32);
    assert!(
        process_alive(altered.pid),
        "a refused adoption leaves QEMU alone"
    );
    // The adopted record is whole again: the next agent loads it. The
    // other one stays in sight, its record still set aside.
    agent.restart().await;
    assert_eq!(
        agent.instance("intact").await.state,
        pb::InstanceState::Running as i32
    );
    let still = agent.instance("altered").await;
    assert_eq!(still.state, pb::InstanceState::Quarantined as i32);
    assert_eq!(still.pid, altered.pid);
}

#[tokio::test]
async fn a_run_directory_left_without_its_instance_is_removed_at_restart() {
    let mut agent = TestAgent::start().await;
    // What an agent killed between removing a migrated instance's record
    // and its run directory leaves: the directory, a stale pidfile.
    let orphan = agent.run_dir("gone");
    std::fs::create_dir_all(&orphan).unwrap();
    std::fs::write(orphan.join("pid"), "999999\n").unwrap();
    std::fs::write(orphan.join("qemu.log"), "old log\n").unwrap();
    // One whose pidfile names a live process of that name stays: that
    // QEMU isn't the agent's to clean up after.
    let mut keeper_process = std::process::Command::new("sh")
        .args([
            "-c",
            "sleep 60; true",
            "-name",
            "guest=keeper,debug-threads=on",
        ])
        .spawn()
        .unwrap();
    let keeper = agent.run_dir("keeper");
    std::fs::create_dir_all(&keeper).unwrap();
    std::fs::write(keeper.join("pid"), format!("{}\n", keeper_process.id())).unwrap();

    agent.restart().await;
    agent.wait_reconciled(Duration::from_secs(20)).await;

    assert!(
        !orphan.exists(),
        "the orphaned run directory is still there"
    );
    assert!(keeper.exists(), "a live QEMU's run directory was removed");
    let _ = keeper_process.kill();
    let _ = keeper_process.wait();
}
