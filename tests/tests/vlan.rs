//! VLANs on bridged NICs: a NIC meant for a VLAN never joins a bridge that
//! would carry it untagged beside every other port. A bridge that doesn't
//! filter VLANs is refused at start and at hot-add, before any tap joins
//! it, and bad ids are the request's fault.

use kvm_agent_proto::v1 as pb;
use kvm_agent_tests::*;
use tonic::Code;

fn vlan(untagged: u32, tagged: &[u32]) -> pb::VlanSpec {
    pb::VlanSpec {
        untagged,
        tagged: tagged.to_vec(),
    }
}

fn nic_on(name: &str, mac: &str, bridge: &Bridge, vlans: pb::VlanSpec) -> pb::NicSpec {
    pb::NicSpec {
        bridge: bridge.name.clone(),
        vlan: Some(vlans),
        ..nic(name, mac)
    }
}

#[tokio::test]
async fn a_vlan_on_a_bridge_that_doesnt_filter_is_refused_and_leaves_no_tap() {
    let agent = TestAgent::start().await;
    let plain = Bridge::create();
    let mut spec = agent.spec("untagged", 64);
    spec.nics = vec![nic_on("eth0", "52:54:00:7a:00:11", &plain, vlan(100, &[]))];
    let refused = agent
        .client()
        .await
        .start_instance(start_request(spec))
        .await
        .expect_err("no untagged tap on a bridge that carries every VLAN");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("vlan_filtering"), "{refused:?}");
    assert_eq!(agent.taps(), Vec::<String>::new());
    assert!(agent.live_qemus().is_empty());

    agent.start_spec(agent.spec("untagged", 64)).await;
    let refused = agent
        .add_nic(
            "untagged",
            nic_on("eth1", "52:54:00:7a:00:12", &plain, vlan(0, &[300])),
        )
        .await
        .expect_err("nor at hot-add");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(agent.taps(), Vec::<String>::new());
    assert!(agent.instance("untagged").await.devices.is_empty());

    // Ids outside 1-4094, or given twice, are the request's fault, checked
    // before any bridge is looked at.
    for bad in [vlan(0, &[]), vlan(4095, &[]), vlan(100, &[100])] {
        let status = agent
            .add_nic(
                "untagged",
                nic_on("eth1", "52:54:00:7a:00:13", &plain, bad.clone()),
            )
            .await
            .expect_err("bad VLAN ids are refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}: {status:?}");
    }
}
