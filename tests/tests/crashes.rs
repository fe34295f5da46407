//! Random operations on a few instances across two agents, with `kill -9`
//! hitting an agent at random moments (and at random fault points), and
//! after every restart a check of what the agents promise: never two
//! QEMUs for one instance, every QEMU known to exactly one agent, each
//! runtime as QEMU has it, nothing leaked, no record that fails to load.
//!
//! Every run prints its seed; `KVM_AGENT_CRASH_SEED` replays one, and
//! `KVM_AGENT_CRASH_OPS` makes a longer soak. A failure prints the seed and
//! the operation log.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kvm_agent_proto::v1 as pb;
use kvm_agent_proto::v1::node_agent_client::NodeAgentClient;
use kvm_agent_tests::*;
use serde_json::json;
use tonic::transport::Channel;
use uuid::Uuid;

/// Operations per run in CI; each run also kills agents at least
/// `MIN_KILLS` times.
const OPS: usize = 160;
const MIN_KILLS: usize = 15;
/// An operation that takes longer is taken to hang at a fault point.
const HUNG: Duration = Duration::from_secs(8);
/// The fault points an agent may be restarted with.
const FAULT_POINTS: [&str; 3] = [
    "hotplug-before-qemu",
    "migration-before-finalize",
    "migration-after-finalize",
];
const INSTANCES: [&str; 3] = ["c0", "c1", "c2"];

/// splitmix64: small, seedable and the same everywhere, so a seed replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}

/// What one run did, for the report of a failure.
struct Journal {
    seed: u64,
    lines: Vec<String>,
    /// The agents' logs, whose ends a failure shows.
    logs: Vec<PathBuf>,
}

impl Journal {
    fn note(&mut self, line: String) {
        self.lines.push(line);
    }

    fn fail(&self, why: String) -> ! {
        let tails: Vec<String> = self
            .logs
            .iter()
            .enumerate()
            .map(|(node, path)| {
                let log = std::fs::read_to_string(path).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(40)..].join("\n");
                format!("node {node}'s log ends with:\n{tail}")
            })
            .collect();
        panic!(
            "invariant broken with seed {} (replay: KVM_AGENT_CRASH_SEED={}): {why}\noperations:\n{}\n{}",
            self.seed,
            self.seed,
            self.lines.join("\n"),
            tails.join("\n")
        );
    }
}

/// The two nodes, and what each instance is made of.
struct World {
    agents: [TestAgent; 2],
    specs: BTreeMap<&'static str, pb::InstanceSpec>,
    images: PathBuf,
    saves: BTreeMap<&'static str, (usize, PathBuf)>,
    devices: usize,
    uuids: HashSet<Uuid>,
}

impl World {
    async fn new() -> World {
        // Quick escalation: the guests have no OS to answer ACPI.
        let options = || AgentOptions {
            args: [
                "--powerdown-timeout-ms",
                "200",
                "--quit-timeout-ms",
                "2000",
                "--kill-timeout-ms",
                "5000",
                "--unplug-timeout-ms",
                "300",
                "--peer-timeout-ms",
                "3000",
            ]
            .map(String::from)
            .to_vec(),
            ..AgentOptions::default()
        };
        let agents = [
            TestAgent::start_with(options()).await,
            TestAgent::start_with(options()).await,
        ];
        let images = agents[0].scratch();
        let mut specs = BTreeMap::new();
        let mut uuids = HashSet::new();
        for name in INSTANCES {
            let mut spec = agents[0].spec(name, 64);
            let image = images.join(format!("{name}-root.raw"));
            std::fs::File::create(&image)
                .unwrap()
                .set_len(4 << 20)
                .unwrap();
            spec.disks = vec![disk("root", &image)];
            spec.nics = vec![nic("eth0", &format!("52:54:00:c0:00:{:02x}", specs.len()))];
            let uuid: Uuid = spec.uuid.parse().unwrap();
            agents[1].track(uuid);
            uuids.insert(uuid);
            specs.insert(name, spec);
        }
        World {
            agents,
            specs,
            images,
            saves: BTreeMap::new(),
            devices: 0,
            uuids,
        }
    }

    async fn client(&self, node: usize) -> NodeAgentClient<Channel> {
        self.agents[node].client().await
    }

    /// Where `name` is and what state it is in, if any agent has it.
    async fn find(&self, name: &str) -> Option<(usize, pb::InstanceInfo)> {
        for node in 0..2 {
            let found = self.agents[node]
                .try_channel()
                .await
                .ok()
                .map(NodeAgentClient::new);
            if let Some(mut client) = found
                && let Ok(info) = client
                    .get_instance(pb::GetInstanceRequest { name: name.into() })
                    .await
            {
                return Some((node, info.into_inner()));
            }
        }
        None
    }

    /// A random operation for `name` where it is now, as a task on a
    /// client of its own, so the agent can be killed under it.
    async fn operation(
        &mut self,
        rng: &mut Rng,
        name: &'static str,
    ) -> (
        String,
        usize,
        tokio::task::JoinHandle<Result<(), tonic::Status>>,
    ) {
        let found = self.find(name).await;
        let (node, state) = match &found {
            Some((node, info)) => (*node, pb::InstanceState::try_from(info.state).ok()),
            None => (rng.below(2), None),
        };
        let mut client = self.client(node).await;
        let spec = self.specs[name].clone();
        let running = matches!(
            state,
            Some(pb::InstanceState::Running | pb::InstanceState::Paused)
        );
        let restorable = state == Some(pb::InstanceState::Saved) && self.saves.contains_key(name);
        let choice = if running {
            rng.below(10)
        } else if restorable && rng.chance(2) {
            10
        } else if matches!(
            state,
            None | Some(
                pb::InstanceState::Stopped | pb::InstanceState::Crashed | pb::InstanceState::Saved
            )
        ) {
            11
        } else {
            12
        };
        let other = self.agents[1 - node].address();
        let device_names: Vec<String> = found
            .as_ref()
            .map(|(_, i)| i.devices.iter().map(|d| d.name.clone()).collect())
            .unwrap_or_default();
        self.devices += 1;
        let serial = self.devices;
        let mut save_path = None;
        let (label, work): (String, _) = match choice {
            0 => ("stop".into(), Op::Stop(rng.chance(2))),
            1 => ("soft reboot".into(), Op::Reboot(pb::RebootMode::Soft, None)),
            2 => (
                "hard reboot".into(),
                Op::Reboot(pb::RebootMode::Hard, Some(spec.clone())),
            ),
            3 => {
                let mac = format!(
                    "52:54:00:c1:{:02x}:{:02x}",
                    serial >> 8 & 0xff,
                    serial & 0xff
                );
                (
                    format!("add nic n{serial}"),
                    Op::AddNic(nic(&format!("n{serial}"), &mac)),
                )
            }
            4 => {
                let image = self.images.join(format!("d{serial}.raw"));
                std::fs::File::create(&image)
                    .unwrap()
                    .set_len(1 << 20)
                    .unwrap();
                (
                    format!("add disk d{serial}"),
                    Op::AddDisk(disk(&format!("d{serial}"), &image)),
                )
            }
            5 if !device_names.is_empty() => {
                let device = device_names[rng.below(device_names.len())].clone();
                (format!("remove {device}"), Op::Remove(device))
            }
            6 => {
                let path = self.images.join(format!("{name}-{serial}.save"));
                save_path = Some(path.clone());
                (format!("save to {}", path.display()), Op::Save(path))
            }
            7 | 8 => (format!("migrate to node {}", 1 - node), Op::Migrate(other)),
            9 => ("set memory".into(), Op::SetMemory),
            10 => {
                let path = self.saves[name].1.clone();
                (format!("restore {}", path.display()), Op::Restore(path))
            }
            11 => ("start".into(), Op::Start(spec.clone())),
            _ => ("force stop".into(), Op::Stop(true)),
        };
        if let Some(path) = save_path {
            self.saves.insert(name, (node, path));
        }
        let name = name.to_owned();
        let handle = tokio::spawn(async move { work.run(&mut client, &name).await });
        (label, node, handle)
    }

    /// Kills agent `node` and starts it again, maybe with a fault point
    /// to stop dead at, and waits until it has reconciled.
    async fn crash(&mut self, node: usize, fault: Option<&str>, journal: &mut Journal) {
        let agent = &mut self.agents[node];
        agent.kill_agent();
        let args = agent.args_mut();
        if let Some(at) = args.iter().position(|a| a == "--fault-point") {
            args.drain(at..at + 2);
        }
        if let Some(point) = fault {
            args.extend(["--fault-point".into(), point.into()]);
        }
        journal.note(format!(
            "  kill -9 node {node}; restart{}",
            fault
                .map(|f| format!(" stopping at {f}"))
                .unwrap_or_default()
        ));
        agent.restart().await;
    }

    /// Crashes the agents stopped dead at a fault point, which is where a
    /// real crash would have struck them; returns how many.
    async fn crash_the_stopped(&mut self, journal: &mut Journal) -> usize {
        let mut crashed = 0;
        for node in 0..2 {
            if self.agents[node].log().contains("stopped at a fault point") {
                self.crash(node, None, journal).await;
                crashed += 1;
            }
        }
        crashed
    }

    /// Checks every promise against QEMU and the host.
    async fn check(&self, journal: &Journal) {
        // Never two QEMUs for one instance, on one node or across both.
        let mut qemus: BTreeMap<Uuid, Vec<u32>> = BTreeMap::new();
        for pid in qemu_pids_with_uuids(&self.uuids) {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if let Some(uuid) = self
                .uuids
                .iter()
                .find(|u| String::from_utf8_lossy(&cmdline).contains(&u.to_string()))
            {
                qemus.entry(*uuid).or_default().push(pid);
            }
        }
        for (uuid, pids) in &qemus {
            if pids.len() > 1 {
                journal.fail(format!("instance {uuid} has QEMUs {pids:?}"));
            }
        }
        // Every running QEMU is known to exactly one agent, and every
        // instance an agent says runs has that QEMU.
        let mut claims: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        let mut listed = [BTreeSet::new(), BTreeSet::new()];
        for (node, listed) in listed.iter_mut().enumerate() {
            let list = self
                .client(node)
                .await
                .list_instances(pb::ListInstancesRequest {})
                .await
                .unwrap_or_else(|s| journal.fail(format!("node {node} doesn't list: {s:?}")))
                .into_inner();
            for info in list.instances {
                listed.insert(info.name.clone());
                let state = pb::InstanceState::try_from(info.state).ok();
                if info.pid != 0 {
                    claims.entry(info.pid).or_default().push(node);
                }
                if matches!(
                    state,
                    Some(pb::InstanceState::Running | pb::InstanceState::Paused)
                ) {
                    if !process_alive(info.pid) {
                        journal.fail(format!(
                            "node {node} says {} runs as pid {}, which is gone",
                            info.name, info.pid
                        ));
                    }
                    self.check_devices(node, &info, journal);
                }
            }
        }
        for pids in qemus.values() {
            let owners = claims.get(&pids[0]).cloned().unwrap_or_default();
            if owners.len() != 1 {
                journal.fail(format!("QEMU {} is known to nodes {owners:?}", pids[0]));
            }
        }
        for (node, listed) in listed.iter().enumerate() {
            self.check_leaks(node, listed, journal).await;
        }
    }

    /// The runtime's devices are what QEMU has, at the same slots, and
    /// QEMU holds no fd set nobody released.
    fn check_devices(&self, node: usize, info: &pb::InstanceInfo, journal: &Journal) {
        let ours = |id: &str| id.starts_with("nic-") || id.starts_with("disk-");
        let recorded: BTreeSet<(u64, String)> = info
            .devices
            .iter()
            .map(|d| (u64::from(d.pci_slot), d.qemu_id.clone()))
            .collect();
        let mut qmp = operator_qmp(&self.agents[node], &info.name);
        let present: BTreeSet<(u64, String)> = qmp
            .pci_devices()
            .into_iter()
            .filter(|(_, id, _)| ours(id))
            .map(|(slot, id, _)| (slot, id))
            .collect();
        if recorded != present {
            journal.fail(format!(
                "node {node}, {}: the runtime has {recorded:?}, QEMU has {present:?}",
                info.name
            ));
        }
        let blocks = qmp.execute("query-block", json!({}));
        for disk in info
            .devices
            .iter()
            .filter(|d| d.kind == pb::DeviceKind::Disk as i32)
        {
            let attached = blocks.as_array().unwrap().iter().any(|b| {
                b["qdev"]
                    .as_str()
                    .is_some_and(|q| q.contains(&disk.qemu_id))
                    && !b["inserted"].is_null()
            });
            if !attached {
                journal.fail(format!(
                    "node {node}, {}: disk {} has no image in QEMU: {blocks}",
                    info.name, disk.name
                ));
            }
        }
        // A set the agent released shows no fds; its block node may still
        // hold the dup it made, which keeps the set listed. QEMU closes a
        // released fd only while the guest runs (the agent releases them
        // again when it resumes one), so a paused guest may still show it.
        if qmp.execute("query-status", json!({}))["running"] != json!(true) {
            return;
        }
        let fdsets = qmp.execute("query-fdsets", json!({}));
        let unreleased = fdsets
            .as_array()
            .unwrap()
            .iter()
            .any(|set| set["fds"].as_array().is_some_and(|fds| !fds.is_empty()));
        if unreleased {
            let status = qmp.execute("query-status", json!({}));
            journal.fail(format!(
                "node {node}, {}: fds left in sets: {fdsets} (QEMU {status})",
                info.name
            ));
        }
    }

    /// No tap, cgroup, chroot or run directory outlives what it was for,
    /// and no record was set aside as unreadable. Things that go with a
    /// QEMU's exit get a moment to go.
    async fn check_leaks(&self, node: usize, listed: &BTreeSet<String>, journal: &Journal) {
        let agent = &self.agents[node];
        let leaks = wait_for(Duration::from_secs(5), async || {
            let leaks = self.leaks(node, listed).await;
            leaks.is_empty().then_some(())
        })
        .await;
        if leaks.is_none() {
            let found = self.leaks(node, listed).await;
            journal.fail(format!(
                "node {node} leaks: {found:?}\nlog:\n{}",
                agent.log()
            ));
        }
        let quarantine = agent.state_dir().join("quarantine");
        let set_aside = std::fs::read_dir(&quarantine).map_or(0, |d| d.count());
        if set_aside > 0 || agent.log().contains("record unusable") {
            journal.fail(format!(
                "node {node} has unreadable records\n{}",
                agent.log()
            ));
        }
    }

    async fn leaks(&self, node: usize, listed: &BTreeSet<String>) -> Vec<String> {
        let agent = &self.agents[node];
        let list = self
            .client(node)
            .await
            .list_instances(pb::ListInstancesRequest {})
            .await
            .map(|r| r.into_inner().instances)
            .unwrap_or_default();
        let running: BTreeSet<String> = list
            .iter()
            .filter(|i| i.pid != 0)
            .map(|i| i.name.clone())
            .collect();
        let taps_in_use: BTreeSet<String> = list
            .iter()
            .flat_map(|i| i.devices.iter().map(|d| d.tap.clone()))
            .filter(|t| !t.is_empty())
            .collect();
        let mut leaks = Vec::new();
        for tap in agent.taps() {
            if !taps_in_use.contains(&tap) {
                leaks.push(format!("tap {tap}"));
            }
        }
        for hierarchy in ["/sys/fs/cgroup/memory", "/sys/fs/cgroup"] {
            let parent = Path::new(hierarchy).join(agent.cgroup_parent());
            for dir in subdirectories(&parent) {
                if !running.contains(&dir) {
                    leaks.push(format!("cgroup {}/{dir}", parent.display()));
                }
            }
        }
        let run = agent.state_dir().join("run");
        for dir in subdirectories(&run) {
            if !listed.contains(&dir) {
                leaks.push(format!("run directory {dir}"));
            }
            if !running.contains(&dir) && run.join(&dir).join("root").exists() {
                leaks.push(format!("chroot of {dir}"));
            }
        }
        leaks
    }
}

fn subdirectories(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// One call to an agent.
enum Op {
    Start(pb::InstanceSpec),
    Stop(bool),
    Reboot(pb::RebootMode, Option<pb::InstanceSpec>),
    AddNic(pb::NicSpec),
    AddDisk(pb::DiskSpec),
    Remove(String),
    Save(PathBuf),
    Restore(PathBuf),
    Migrate(String),
    SetMemory,
}

impl Op {
    async fn run(
        self,
        client: &mut NodeAgentClient<Channel>,
        name: &str,
    ) -> Result<(), tonic::Status> {
        let name = name.to_owned();
        match self {
            Op::Start(spec) => client.start_instance(start_request(spec)).await.map(drop),
            Op::Stop(force) => client
                .stop_instance(pb::StopInstanceRequest {
                    name,
                    force,
                    powerdown_timeout_ms: 0,
                })
                .await
                .map(drop),
            Op::Reboot(mode, spec) => client
                .reboot_instance(pb::RebootInstanceRequest {
                    name,
                    mode: mode as i32,
                    spec,
                    ..Default::default()
                })
                .await
                .map(drop),
            Op::AddNic(nic) => client
                .add_nic(pb::AddNicRequest {
                    name,
                    nic: Some(nic),
                })
                .await
                .map(drop),
            Op::AddDisk(disk) => client
                .add_disk(pb::AddDiskRequest {
                    name,
                    disk: Some(disk),
                })
                .await
                .map(drop),
            Op::Remove(device) => client
                .remove_device(pb::RemoveDeviceRequest { name, device })
                .await
                .map(drop),
            Op::Save(path) => client
                .save_instance(pb::SaveInstanceRequest {
                    name,
                    path: path.display().to_string(),
                })
                .await
                .map(drop),
            Op::Restore(path) => client
                .restore_instance(pb::RestoreInstanceRequest {
                    path: path.display().to_string(),
                    paused: false,
                })
                .await
                .map(drop),
            Op::Migrate(target) => {
                let mut stream = client
                    .migrate_instance(pb::MigrateInstanceRequest {
                        name,
                        target,
                        options: None,
                    })
                    .await?
                    .into_inner();
                while stream.message().await?.is_some() {}
                Ok(())
            }
            Op::SetMemory => client
                .set_memory(pb::SetMemoryRequest {
                    name,
                    memory_mib: 48,
                    wait: false,
                    timeout_ms: 0,
                })
                .await
                .map(drop),
        }
    }
}

/// Runs `ops` random operations from `seed`, killing agents along the
/// way, and checks the invariants after every restart and at the end.
async fn run(seed: u64, ops: usize) {
    eprintln!(
        "crash harness: seed {seed} (replay with KVM_AGENT_CRASH_SEED={seed}), {ops} operations"
    );
    let mut rng = Rng(seed);
    let mut world = World::new().await;
    let mut journal = Journal {
        seed,
        lines: Vec::new(),
        logs: world.agents.iter().map(TestAgent::log_path).collect(),
    };
    let started = Instant::now();
    let mut kills = 0;
    for i in 0..ops {
        let name = INSTANCES[rng.below(INSTANCES.len())];
        let (label, node, handle) = world.operation(&mut rng, name).await;
        // Keep up with the kills a run must have.
        let behind = kills * ops < MIN_KILLS * i;
        let kill = behind || rng.chance(8);
        journal.note(format!("{i}: {name} on node {node}: {label}"));
        if kill {
            let delay = Duration::from_millis(rng.below(400) as u64);
            let victim = if label.starts_with("migrate") && rng.chance(2) {
                1 - node
            } else {
                node
            };
            let fault = rng
                .chance(4)
                .then(|| FAULT_POINTS[rng.below(FAULT_POINTS.len())]);
            tokio::time::sleep(delay).await;
            journal.note(format!("  after {delay:?}:"));
            world.crash(victim, fault, &mut journal).await;
            kills += 1;
            let outcome = tokio::time::timeout(HUNG, handle).await;
            let hung = outcome.is_err();
            journal.note(format!("  -> {}", describe(outcome)));
            // The other node may sit at a fault point, mid-operation.
            if hung {
                kills += world.crash_the_stopped(&mut journal).await;
            }
            world.check(&journal).await;
        } else {
            match tokio::time::timeout(HUNG, handle).await {
                Ok(outcome) => journal.note(format!("  -> {}", describe(Ok(outcome)))),
                Err(_) => {
                    journal.note("  -> hung at a fault point".into());
                    kills += world.crash_the_stopped(&mut journal).await;
                    world.check(&journal).await;
                }
            }
        }
    }
    // Whatever fault points are left, the end state must hold too.
    for node in 0..2 {
        world.crash(node, None, &mut journal).await;
    }
    world.check(&journal).await;
    eprintln!(
        "crash harness: seed {seed}: {ops} operations, {kills} kills, {:?}",
        started.elapsed()
    );
    assert!(kills >= MIN_KILLS, "only {kills} kills with seed {seed}");
}

fn describe(
    outcome: Result<
        Result<Result<(), tonic::Status>, tokio::task::JoinError>,
        tokio::time::error::Elapsed,
    >,
) -> String {
    match outcome {
        Ok(Ok(Ok(()))) => "ok".into(),
        Ok(Ok(Err(status))) => format!(
            "{:?}: {}",
            status.code(),
            status.message().lines().next().unwrap_or("")
        ),
        Ok(Err(e)) => format!("task failed: {e}"),
        Err(_) => "still running".into(),
    }
}

fn ops() -> usize {
    std::env::var("KVM_AGENT_CRASH_OPS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(OPS)
}

#[tokio::test]
async fn random_operations_and_kills_keep_every_invariant_with_a_fixed_seed() {
    let seed = std::env::var("KVM_AGENT_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_c0de);
    run(seed, ops()).await;
}

#[tokio::test]
async fn random_operations_and_kills_keep_every_invariant_with_a_fresh_seed() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    run(seed, ops()).await;
}
