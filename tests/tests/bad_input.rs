//! Refused requests and failed starts leave nothing behind: no record, no
//! run directory, no process, no tap.

use kvm_agent_proto::v1 as pb;
use kvm_agent_tests::*;
use tonic::Code;

async fn start_err(agent: &TestAgent, spec: pb::InstanceSpec) -> tonic::Status {
    agent
        .client()
        .await
        .start_instance(start_request(spec))
        .await
        .expect_err("start must fail")
}

fn assert_nothing_left(agent: &TestAgent, name: &str) {
    assert!(agent.live_qemus().is_empty(), "no QEMU may run");
    assert!(
        agent.taps().is_empty(),
        "no tap may remain: {:?}",
        agent.taps()
    );
    let records = std::fs::read_dir(agent.state_dir().join("runtime"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(records, 0, "no runtime record may be written for {name:?}");
    if !name.is_empty() && !name.contains('/') {
        assert!(
            !agent.run_dir(name).exists(),
            "no run directory for {name:?}"
        );
    }
}

#[tokio::test]
async fn invalid_specs_are_invalid_argument_and_create_nothing() {
    let agent = TestAgent::start().await;
    let image = agent.raw_image("ok.img", 8);
    let image = image.to_str().unwrap();
    let base = || {
        let mut s = agent.spec("bad", 64);
        s.nics = vec![nic("eth0", "52:54:00:00:40:01")];
        s.disks = vec![disk("root", std::path::Path::new(image))];
        s
    };
    let cases: Vec<(&str, pb::InstanceSpec)> = vec![
        (
            "name with a slash",
            pb::InstanceSpec {
                name: "a/b".into(),
                ..base()
            },
        ),
        (
            "name of dots",
            pb::InstanceSpec {
                name: "..".into(),
                ..base()
            },
        ),
        (
            "name with a traversal",
            pb::InstanceSpec {
                name: "../etc".into(),
                ..base()
            },
        ),
        (
            "name with a NUL",
            pb::InstanceSpec {
                name: "web\0x".into(),
                ..base()
            },
        ),
        (
            "name of 300 characters",
            pb::InstanceSpec {
                name: "a".repeat(300),
                ..base()
            },
        ),
        (
            "disk path with a newline",
            pb::InstanceSpec {
                disks: vec![disk("root", std::path::Path::new("/srv/a\nb.img"))],
                ..base()
            },
        ),
        (
            "disk path with a comma",
            pb::InstanceSpec {
                disks: vec![disk("root", &agent.raw_image("a,file=evil.img", 8))],
                ..base()
            },
        ),
        (
            "disk path with an equals sign",
            pb::InstanceSpec {
                disks: vec![disk("root", &agent.raw_image("x=y.img", 8))],
                ..base()
            },
        ),
        (
            "kernel path with a comma",
            pb::InstanceSpec {
                boot: Some(pb::BootSpec {
                    kernel: "/boot/vmlinuz,initrd=/evil".into(),
                    ..Default::default()
                }),
                ..base()
            },
        ),
        (
            "disk path with a NUL",
            pb::InstanceSpec {
                disks: vec![disk("root", std::path::Path::new("/srv/a\0b.img"))],
                ..base()
            },
        ),
        (
            "all-zero MAC",
            pb::InstanceSpec {
                nics: vec![nic("eth0", "00:00:00:00:00:00")],
                ..base()
            },
        ),
        (
            "bridge name with a slash",
            pb::InstanceSpec {
                nics: vec![pb::NicSpec {
                    bridge: "br0/../x".into(),
                    ..nic("eth0", "52:54:00:00:40:01")
                }],
                ..base()
            },
        ),
        (
            "relative disk path",
            pb::InstanceSpec {
                disks: vec![disk("root", std::path::Path::new("images/root.img"))],
                ..base()
            },
        ),
        (
            "multicast MAC",
            pb::InstanceSpec {
                nics: vec![nic("eth0", "01:00:5e:00:00:01")],
                ..base()
            },
        ),
        (
            "broadcast MAC",
            pb::InstanceSpec {
                nics: vec![nic("eth0", "ff:ff:ff:ff:ff:ff")],
                ..base()
            },
        ),
        (
            "malformed MAC",
            pb::InstanceSpec {
                nics: vec![nic("eth0", "52:54:00:zz:00:01")],
                ..base()
            },
        ),
        (
            "zero memory",
            pb::InstanceSpec {
                memory_mib: 0,
                ..base()
            },
        ),
        (
            "absurd memory",
            pb::InstanceSpec {
                memory_mib: u64::MAX,
                ..base()
            },
        ),
        (
            "absurd vcpus",
            pb::InstanceSpec {
                vcpus: 100_000,
                ..base()
            },
        ),
        (
            "duplicate device name",
            pb::InstanceSpec {
                disks: vec![disk("eth0", std::path::Path::new(image))],
                ..base()
            },
        ),
        (
            "CPU flags smuggled in",
            pb::InstanceSpec {
                cpu_model: "host,+vmx".into(),
                ..base()
            },
        ),
        (
            "malformed uuid",
            pb::InstanceSpec {
                uuid: "not-a-uuid".into(),
                ..base()
            },
        ),
    ];

    for (what, spec) in cases {
        let name = spec.name.clone();

        let err = start_err(&agent, spec).await;

        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
        assert!(
            !err.message().is_empty(),
            "{what}: the message must say what is wrong"
        );
        assert_nothing_left(&agent, &name);
    }
}

#[tokio::test]
async fn a_missing_disk_is_invalid_argument_naming_the_path() {
    let agent = TestAgent::start().await;
    let mut spec = agent.spec("nodisk", 64);
    spec.disks = vec![disk(
        "root",
        std::path::Path::new("/nonexistent/kvm-agent-test/root.img"),
    )];
    spec.nics = vec![nic("eth0", "52:54:00:00:40:02")];

    let err = start_err(&agent, spec).await;

    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message()
            .contains("/nonexistent/kvm-agent-test/root.img"),
        "{}",
        err.message()
    );
    assert_nothing_left(&agent, "nodisk");
}

#[tokio::test]
async fn qemu_exiting_at_once_returns_its_stderr_and_leaves_nothing() {
    let agent = TestAgent::start().await;
    // A raw file declared as qcow2: QEMU refuses it while starting.
    let image = agent.raw_image("raw.img", 8);
    let mut spec = agent.spec("early", 64);
    spec.disks = vec![pb::DiskSpec {
        format: pb::DiskFormat::Qcow2 as i32,
        ..disk("root", &image)
    }];
    spec.nics = vec![nic("eth0", "52:54:00:00:40:03")];

    let err = start_err(&agent, spec).await;

    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("QEMU exited during start-up"),
        "{}",
        err.message()
    );
    assert!(
        err.message().contains("qcow2"),
        "QEMU's own words must be in the error: {}",
        err.message()
    );
    assert_nothing_left(&agent, "early");
}

#[tokio::test]
async fn a_missing_qemu_binary_says_what_to_install() {
    let agent = TestAgent::start_with(AgentOptions {
        qemu_binary: Some("/nonexistent/qemu-system-x86_64".into()),
        ..AgentOptions::default()
    })
    .await;
    let mut spec = agent.spec("noqemu", 64);
    spec.nics = vec![nic("eth0", "52:54:00:00:40:04")];

    let err = start_err(&agent, spec).await;

    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("not found"), "{}", err.message());
    assert!(
        err.message().contains("qemu-system-x86"),
        "{}",
        err.message()
    );
    assert_nothing_left(&agent, "noqemu");
}

#[tokio::test]
async fn unknown_instances_are_not_found() {
    let agent = TestAgent::start().await;
    let mut client = agent.client().await;

    let get = client
        .get_instance(pb::GetInstanceRequest {
            name: "ghost".into(),
        })
        .await
        .unwrap_err();
    let stop = client
        .stop_instance(pb::StopInstanceRequest {
            name: "ghost".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();

    assert_eq!(get.code(), Code::NotFound);
    assert_eq!(stop.code(), Code::NotFound);
}

#[tokio::test]
async fn an_oversized_request_is_refused_before_it_is_read() {
    let agent = TestAgent::start().await;
    let mut spec = agent.spec("big", 64);
    spec.name = "a".repeat(5 << 20);

    let err = start_err(&agent, spec).await;

    assert!(
        matches!(err.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{err:?}"
    );
    assert_nothing_left(&agent, "");
    agent
        .client()
        .await
        .list_instances(pb::ListInstancesRequest::default())
        .await
        .expect("the agent keeps serving");
}

#[tokio::test]
async fn files_outside_the_allowed_roots_are_refused_even_through_a_symlink() {
    let allowed = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let mut options = AgentOptions::default();
    options.args.extend([
        "--allowed-root".to_owned(),
        allowed.path().display().to_string(),
    ]);
    let agent = TestAgent::start_with(options).await;
    let image = |dir: &std::path::Path, name: &str| {
        let path = dir.join(name);
        std::fs::File::create(&path)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        path
    };
    let inside = image(allowed.path(), "ok.img");
    let outside = image(elsewhere.path(), "no.img");
    let sneaky = allowed.path().join("sneaky.img");
    std::os::unix::fs::symlink(&outside, &sneaky).unwrap();

    for (what, path) in [
        ("outside", &outside),
        ("a symlink leading outside", &sneaky),
    ] {
        let mut spec = agent.spec("rooted", 64);
        spec.disks = vec![disk("root", path)];
        let err = start_err(&agent, spec).await;
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
        assert!(
            err.message().contains("outside the directories"),
            "{what}: {}",
            err.message()
        );
        assert_nothing_left(&agent, "rooted");
    }

    let mut spec = agent.spec("rooted", 64);
    spec.disks = vec![disk("root", &inside)];
    agent.start_spec(spec).await;
    let hot = agent
        .add_disk("rooted", disk("data", &sneaky))
        .await
        .unwrap_err();
    assert_eq!(hot.code(), Code::InvalidArgument, "{hot:?}");
    let save_path = elsewhere.path().join("rooted.save");
    let save = agent
        .client()
        .await
        .save_instance(pb::SaveInstanceRequest {
            name: "rooted".into(),
            path: save_path.display().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(save.code(), Code::InvalidArgument, "{save:?}");
    assert!(!save_path.exists());
    assert_eq!(
        agent.instance("rooted").await.state(),
        pb::InstanceState::Running
    );
}
