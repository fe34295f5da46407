//! Runtimes as earlier releases wrote them (`tests/fixtures/runtimes`)
//! keep working: each reaches this agent as a migration from a peer of its
//! release would send it, is kept as a running instance's record across an
//! agent restart, soft-reboots and migrates on with every device in its
//! slot. A runtime from a newer release is refused with the versions
//! named, and an instance whose record is one is left running.

use std::path::{Path, PathBuf};

use kvm_agent_proto::v1 as pb;
use kvm_agent_tests::*;
use runtime_store::RecordStore;
use serde_json::Value;
use tonic::Code;
use uuid::Uuid;

/// Where the disk images of a fixture live; replaced by the test's.
const IMAGES: &str = "@IMAGES@";

fn fixtures() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/runtimes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "fixtures: {files:?}");
    files
}

/// A fixture's runtime with its images made under `images`.
fn load_fixture(path: &Path, images: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap();
    let runtime: Value =
        serde_json::from_str(&text.replace(IMAGES, &images.display().to_string())).unwrap();
    for disk in runtime["disks"].as_array().unwrap() {
        let image = PathBuf::from(disk["path"].as_str().unwrap());
        let file = std::fs::File::create(&image).unwrap();
        file.set_len(8 << 20).unwrap();
    }
    runtime
}

/// Each device's slot, by name.
fn slots(runtime: &Value) -> Vec<(String, u64)> {
    let mut slots: Vec<(String, u64)> = ["disks", "nics"]
        .iter()
        .flat_map(|kind| runtime[*kind].as_array().unwrap().iter())
        .map(|d| {
            (
                d["name"].as_str().unwrap().to_owned(),
                d["slot"].as_u64().unwrap(),
            )
        })
        .collect();
    slots.sort();
    slots
}

/// The slots QEMU has a device in.
fn qemu_slots(agent: &TestAgent, name: &str) -> Vec<u64> {
    operator_qmp(agent, name)
        .pci_devices()
        .into_iter()
        .map(|d| d.0)
        .collect()
}

async fn accept(
    agent: &TestAgent,
    runtime: &Value,
    protocol: u32,
) -> Result<String, tonic::Status> {
    agent
        .client()
        .await
        .accept_migration(pb::AcceptMigrationRequest {
            runtime_json: runtime.to_string(),
            source: "a peer of an earlier release".into(),
            protocol_version: protocol,
            multifd_channels: 0,
            encrypted_stream: false,
            postcopy: false,
        })
        .await
        .map(|r| r.into_inner().address)
}

/// Makes the incoming instance `name` a running instance's record, as an
/// agent of the fixture's release would have left it, and restarts the
/// agent on it.
async fn record_as_running(agent: &mut TestAgent, name: &str) {
    agent.kill_agent();
    let store = RecordStore::open(&agent.state_dir(), "runtime").unwrap();
    let mut record = store.load::<Value>(name).unwrap().unwrap().value;
    record["state"] = "running".into();
    store.save(name, &record).unwrap();
    agent.restart().await;
}

#[tokio::test]
async fn runtimes_of_earlier_releases_load_soft_reboot_and_migrate() {
    let mut agent = TestAgent::start().await;
    let onward = TestAgent::start().await;
    let images = tempfile::Builder::new().prefix("ka-fx").tempdir().unwrap();
    for path in fixtures() {
        let fixture = load_fixture(&path, images.path());
        let name = fixture["name"].as_str().unwrap().to_owned();
        let uuid: Uuid = fixture["uuid"].as_str().unwrap().parse().unwrap();
        agent.track(uuid);
        onward.track(uuid);
        let protocol = match fixture["format_version"].as_u64().unwrap() {
            1 => 0, // releases that sent no protocol version
            _ => 2,
        };
        let expected = slots(&fixture);

        accept(&agent, &fixture, protocol)
            .await
            .unwrap_or_else(|s| panic!("{}: {s:?}\n{}", path.display(), agent.log()));
        record_as_running(&mut agent, &name).await;
        let rebooted = agent
            .client()
            .await
            .reboot_instance(pb::RebootInstanceRequest {
                name: name.clone(),
                mode: pb::RebootMode::Soft as i32,
                force: true,
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("{}: {s:?}\n{}", path.display(), agent.log()))
            .into_inner();

        assert_eq!(
            pb::InstanceState::try_from(rebooted.state).unwrap(),
            pb::InstanceState::Running,
            "{}: {rebooted:?}",
            path.display()
        );
        let replayed = agent.runtime_json(&name).await;
        assert_eq!(
            replayed["format_version"],
            hypervisor::runtime::RUNTIME_FORMAT_VERSION
        );
        assert_eq!(slots(&replayed), expected, "{}", path.display());
        assert_eq!(replayed["machine_type"], fixture["machine_type"]);
        let present = qemu_slots(&agent, &name);
        for (device, slot) in &expected {
            assert!(
                present.contains(slot),
                "{}: {device} in slot {slot}: {present:?}",
                path.display()
            );
        }

        agent
            .migrate_to(&name, &onward)
            .await
            .unwrap_or_else(|s| panic!("{}: {s:?}\n{}", path.display(), agent.log()));
        assert_eq!(slots(&onward.runtime_json(&name).await), expected);
        let present = qemu_slots(&onward, &name);
        assert!(expected.iter().all(|(_, slot)| present.contains(slot)));
    }
}

#[tokio::test]
async fn a_runtime_of_a_newer_release_is_refused_naming_the_versions() {
    let mut agent = TestAgent::start().await;
    let images = tempfile::Builder::new().prefix("ka-fx").tempdir().unwrap();
    let mut newer = load_fixture(&fixtures()[0], images.path());
    newer["name"] = "from-the-future".into();
    newer["uuid"] = Uuid::new_v4().to_string().into();
    newer["format_version"] = 99.into();

    let refused = accept(&agent, &newer, 2).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("format version 99")
            && refused.message().contains(&format!(
                "1 to {}",
                hypervisor::runtime::RUNTIME_FORMAT_VERSION
            )),
        "{refused:?}"
    );
    let too_new_peer = accept(&agent, &load_fixture(&fixtures()[0], images.path()), 99)
        .await
        .unwrap_err();
    assert_eq!(too_new_peer.code(), Code::FailedPrecondition);
    assert!(
        too_new_peer.message().contains("peer protocol 99"),
        "{too_new_peer:?}"
    );

    // A running instance whose record a newer agent wrote keeps running.
    let spec = agent.spec("kept", 64);
    let running = agent.start_spec(spec).await;
    agent.kill_agent();
    let store = RecordStore::open(&agent.state_dir(), "runtime").unwrap();
    let mut record = store.load::<Value>("kept").unwrap().unwrap().value;
    record["runtime"]["format_version"] = 99.into();
    store.save("kept", &record).unwrap();
    agent.restart().await;

    let kept = agent.instance("kept").await;
    assert_eq!(
        pb::InstanceState::try_from(kept.state).unwrap(),
        pb::InstanceState::Quarantined,
        "{kept:?}"
    );
    assert_eq!(kept.pid, running.pid, "its QEMU was left running");
    assert!(process_alive(running.pid));
    assert!(
        kept.state_detail.contains("format version 99"),
        "{}",
        kept.state_detail
    );
    let set_aside = std::fs::read_dir(agent.state_dir().join("quarantine"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect::<Vec<_>>();
    assert!(
        set_aside
            .iter()
            .any(|r| r.contains("\"format_version\":99")),
        "the record is kept as it was: {set_aside:?}"
    );
}

/// Whether a peer sent `agent` a runtime in format 1, speaking protocol 1.
fn received_in_format_1(agent: &TestAgent) -> bool {
    agent.log().lines().any(|line| {
        line.contains("a peer sends a runtime")
            && line.contains("protocol=1 runtime_format=Some(1)")
    })
}

/// An agent that speaks no newer peer protocol than `protocol`, as the
/// release that introduced it does.
async fn agent_speaking(protocol: u32) -> TestAgent {
    let dir = tempfile::tempdir().unwrap().keep();
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!("[migration]\npeer_protocol = {protocol}\n"),
    )
    .unwrap();
    let mut options = AgentOptions::default();
    options
        .args
        .extend(["--config".into(), config.display().to_string()]);
    TestAgent::start_with(options).await
}

#[tokio::test]
async fn agents_of_adjacent_releases_migrate_both_ways_in_the_older_ones_format() {
    let older = agent_speaking(1).await;
    let newer = TestAgent::start().await;
    let spec = newer.spec("rolling", 64);
    let uuid: Uuid = spec.uuid.parse().unwrap();
    older.track(uuid);
    newer.start_spec(spec).await;
    for (agent, protocol) in [(&older, 1), (&newer, 3)] {
        let info = agent
            .client()
            .await
            .get_node_info(pb::GetNodeInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.peer_protocol, protocol);
    }

    newer.migrate_to("rolling", &older).await.unwrap();
    assert!(
        received_in_format_1(&older),
        "the newer agent sent the older one's format:\n{}",
        older.log()
    );
    older.migrate_to("rolling", &newer).await.unwrap();
    assert!(
        received_in_format_1(&newer),
        "the older agent spoke its own protocol:\n{}",
        newer.log()
    );
    let back = newer.runtime_json("rolling").await;
    assert_eq!(
        back["format_version"],
        hypervisor::runtime::RUNTIME_FORMAT_VERSION
    );
    assert_eq!(
        pb::InstanceState::try_from(newer.instance("rolling").await.state).unwrap(),
        pb::InstanceState::Running
    );
}
