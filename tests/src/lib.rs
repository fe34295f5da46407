//! Fixtures for the end-to-end tests: an agent process with its own state
//! directory, a gRPC client on its socket, an independent QMP client for
//! checking what QEMU really has, disk images, bridges and process helpers.
//!
//! Every QEMU a test starts is killed on drop, even when the test panics.

pub mod capture;
pub mod guest;
pub mod hosts;
pub mod migration;
pub mod proxy;
pub mod qmp;
pub mod records;
pub mod tls;

pub use qmp::{Qmp, operator_qmp};

use std::collections::HashSet;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use kvm_agent_proto::v1 as pb;
use kvm_agent_proto::v1::node_agent_client::NodeAgentClient;
use serde_json::Value;
use tonic::transport::{Channel, Endpoint, Uri};
use uuid::Uuid;

/// Names the QEMU the end-to-end tests run on, when it isn't the system's
/// `qemu-system-x86_64` (`scripts/test` runs the QEMU-dependent suites
/// again on a second version).
pub const TEST_QEMU_ENV: &str = "KVM_AGENT_TEST_QEMU";

/// The QEMU binary the tests run on. Panics with what to install if missing.
pub fn require_qemu() -> PathBuf {
    if let Some(chosen) = std::env::var_os(TEST_QEMU_ENV) {
        let chosen = PathBuf::from(chosen);
        assert!(
            chosen.is_file(),
            "{TEST_QEMU_ENV} names {}, which is not there; scripts/qemu-env unpacks the second QEMU",
            chosen.display()
        );
        return chosen;
    }
    system_qemu()
}

/// The system's `qemu-system-x86_64`, whatever the tests run on.
pub fn system_qemu() -> PathBuf {
    let found = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("qemu-system-x86_64"))
                .find(|p| p.is_file())
        })
        .unwrap_or_default();
    found.unwrap_or_else(|| {
        panic!("qemu-system-x86_64 is not installed; install the qemu-system-x86 package (scripts/test does)")
    })
}

/// The newer QEMU the cross-version tests run beside the system's, as
/// `scripts/qemu-env` unpacks it and `scripts/test` names it.
pub fn newer_qemu() -> PathBuf {
    let newer = prepared_path("KVM_AGENT_NEWER_QEMU", "qemu-env");
    let (system, unpacked) = (qemu_version(&system_qemu()), qemu_version(&newer));
    assert!(
        unpacked > system,
        "{} is QEMU {unpacked:?}, not newer than the system's {system:?}",
        newer.display()
    );
    newer
}

/// A QEMU binary's (major, minor) version, from `-version`.
pub fn qemu_version(binary: &Path) -> (u32, u32) {
    let out = Command::new(binary)
        .arg("-version")
        .output()
        .expect("run QEMU");
    let text = String::from_utf8_lossy(&out.stdout);
    let version = hypervisor::probe::parse_version(&text)
        .unwrap_or_else(|| panic!("{} printed no version: {text}", binary.display()));
    (version.major, version.minor)
}

/// The agent binary built next to the test binary.
pub fn agent_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("KVM_AGENT_BIN") {
        return p.into();
    }
    workspace_binary("kvm-agent")
}

/// A binary of package `name` built next to the test binary.
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join(name))
        .expect("target directory");
    assert!(
        bin.is_file(),
        "{} is missing; build it first with `cargo build -p {name}` (scripts/test does)",
        bin.display()
    );
    bin
}

/// Options of a test agent.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Extra `serve` arguments.
    pub args: Vec<String>,
    /// QEMU binary override.
    pub qemu_binary: Option<PathBuf>,
    /// State directory override (default: inside the fixture's temp dir).
    pub state_dir: Option<PathBuf>,
    /// A command the agent runs under, such as `ip netns exec NS`; it
    /// must exec the agent so the pid stays the agent's.
    pub wrapper: Vec<String>,
}

impl Default for AgentOptions {
    fn default() -> Self {
        Self {
            args: vec![
                "--powerdown-timeout-ms".into(),
                "1000".into(),
                "--quit-timeout-ms".into(),
                "2000".into(),
                "--kill-timeout-ms".into(),
                "5000".into(),
            ],
            qemu_binary: std::env::var_os(TEST_QEMU_ENV).map(PathBuf::from),
            state_dir: None,
            wrapper: Vec::new(),
        }
    }
}

/// A `kvm-agent serve` process with its own state directory.
pub struct TestAgent {
    dir: tempfile::TempDir,
    child: Option<Child>,
    options: AgentOptions,
    tap_prefix: String,
    uuids: Mutex<HashSet<Uuid>>,
}

impl TestAgent {
    /// Starts an agent with default test options.
    pub async fn start() -> TestAgent {
        Self::start_with(AgentOptions::default()).await
    }

    /// Starts an agent with `options`.
    pub async fn start_with(options: AgentOptions) -> TestAgent {
        require_qemu();
        let dir = tempfile::Builder::new()
            .prefix("ka")
            .tempdir()
            .expect("temp dir");
        // A tap prefix of its own, so parallel tests can tell their taps apart.
        let tap_prefix = format!("kt{}", &Uuid::new_v4().simple().to_string()[..6]);
        let mut agent = TestAgent {
            dir,
            child: None,
            options,
            tap_prefix,
            uuids: Mutex::new(HashSet::new()),
        };
        agent.spawn().await;
        agent
    }

    async fn spawn(&mut self) {
        let mut cmd = match self.options.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(agent_binary());
                c
            }
            None => Command::new(agent_binary()),
        };
        cmd.arg("serve")
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--operator-qmp")
            .arg("--tap-template")
            .arg(format!("{}%d", self.tap_prefix));
        // An empty config file of its own: a node's /etc/kvm-agent/config.toml
        // (the package installs one) must not change what a test runs.
        if !self.options.args.iter().any(|a| a == "--config") {
            let config = self.dir.path().join("config.toml");
            std::fs::write(&config, "").expect("write an empty config");
            cmd.arg("--config").arg(config);
        }
        // A cgroup parent of its own, so parallel tests' instances of the
        // same name don't share a cgroup.
        if !self.options.args.iter().any(|a| a == "--cgroup-parent") {
            cmd.arg("--cgroup-parent").arg(self.cgroup_parent());
        }
        cmd.args(&self.options.args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.path().join("agent.log")).expect("agent log"));
        if let Some(q) = &self.options.qemu_binary
            && !self.options.args.iter().any(|a| a == "--qemu-binary")
        {
            cmd.arg("--qemu-binary").arg(q);
        }
        self.child = Some(cmd.spawn().expect("spawn kvm-agent"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if StdUnixStream::connect(self.socket()).is_ok() {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("kvm-agent exited with {status}; log:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("kvm-agent did not listen within 20 s; log:\n{}", self.log());
    }

    /// The agent's cgroup parent, under each hierarchy's root.
    pub fn cgroup_parent(&self) -> String {
        format!("kvm-agent-test/{}", self.tap_prefix)
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Where the agent's log goes.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    /// The state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.options
            .state_dir
            .clone()
            .unwrap_or_else(|| self.dir.path().join("state"))
    }

    /// The agent's pid while it runs.
    pub fn agent_pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// A scratch directory for images.
    pub fn scratch(&self) -> PathBuf {
        let p = self.dir.path().join("scratch");
        std::fs::create_dir_all(&p).expect("scratch dir");
        p
    }

    /// The agent's socket.
    pub fn socket(&self) -> PathBuf {
        self.state_dir().join("agent.sock")
    }

    /// The agent's address for another agent (a migration target).
    pub fn address(&self) -> String {
        format!("unix:{}", self.socket().display())
    }

    /// An instance's run directory.
    pub fn run_dir(&self, name: &str) -> PathBuf {
        self.state_dir().join("run").join(name)
    }

    /// An instance's runtime record file.
    pub fn record_path(&self, name: &str) -> PathBuf {
        self.state_dir()
            .join("runtime")
            .join(format!("{name}.json"))
    }

    /// Tap interfaces on the host made by this agent.
    pub fn taps(&self) -> Vec<String> {
        let mut taps: Vec<String> = std::fs::read_dir("/sys/class/net")
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| n.starts_with(&self.tap_prefix))
                    .collect()
            })
            .unwrap_or_default();
        taps.sort();
        taps
    }

    /// A gRPC channel on the agent's socket.
    pub async fn channel(&self) -> Channel {
        self.try_channel().await.expect("connect to agent")
    }

    /// A gRPC channel on the agent's socket, or why it can't be had.
    pub async fn try_channel(&self) -> Result<Channel, tonic::transport::Error> {
        let socket = self.socket();
        Endpoint::try_from("http://localhost")
            .expect("endpoint")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let socket = socket.clone();
                async move {
                    tokio::net::UnixStream::connect(socket)
                        .await
                        .map(TokioIo::new)
                }
            }))
            .await
    }

    /// A NodeAgent client on the agent's socket.
    pub async fn client(&self) -> NodeAgentClient<Channel> {
        NodeAgentClient::new(self.channel().await)
    }

    /// A spec with a fresh uuid that this fixture will clean up after.
    pub fn spec(&self, name: &str, memory_mib: u64) -> pb::InstanceSpec {
        let uuid = Uuid::new_v4();
        self.track(uuid);
        pb::InstanceSpec {
            name: name.into(),
            uuid: uuid.to_string(),
            memory_mib,
            vcpus: 1,
            ..Default::default()
        }
    }

    /// Remembers a uuid whose QEMU must die with the fixture.
    pub fn track(&self, uuid: Uuid) {
        self.uuids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(uuid);
    }

    /// A sparse raw image.
    pub fn raw_image(&self, name: &str, size_mib: u64) -> PathBuf {
        let path = self.scratch().join(name);
        let f = std::fs::File::create(&path).expect("create image");
        f.set_len(size_mib << 20).expect("size image");
        path
    }

    /// Runs the agent on `qemu` from its next (re)start on.
    pub fn set_qemu_binary(&mut self, qemu: &Path) {
        if let Some(at) = self.options.args.iter().position(|a| a == "--qemu-binary") {
            self.options.args.drain(at..at + 2);
        }
        self.options.qemu_binary = Some(qemu.to_owned());
    }

    /// The `serve` arguments the next (re)start uses.
    pub fn args_mut(&mut self) -> &mut Vec<String> {
        &mut self.options.args
    }

    /// Kills the agent with SIGKILL; its instances keep running.
    pub fn kill_agent(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the agent again on the same state directory and waits until
    /// it has reconciled every instance.
    pub async fn restart(&mut self) {
        self.restart_unsettled().await;
        self.wait_reconciled(Duration::from_secs(30)).await;
    }

    /// Starts the agent again on the same state directory, returning as
    /// soon as it listens (instances may still be reconciling).
    pub async fn restart_unsettled(&mut self) {
        self.kill_agent();
        self.spawn().await;
    }

    /// Waits until no instance is marked reconciling.
    pub async fn wait_reconciled(&self, limit: Duration) {
        let mut client = self.client().await;
        let settled = wait_for(limit, async || {
            let list = client
                .list_instances(pb::ListInstancesRequest {})
                .await
                .ok()?
                .into_inner();
            list.instances.iter().all(|i| !i.reconciling).then_some(())
        })
        .await;
        assert!(
            settled.is_some(),
            "instances still reconciling after {limit:?}; log:\n{}",
            self.log()
        );
    }

    /// pids of live QEMUs of tracked instances.
    pub fn live_qemus(&self) -> Vec<u32> {
        let uuids = self.uuids.lock().unwrap_or_else(|p| p.into_inner()).clone();
        qemu_pids_with_uuids(&uuids)
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.kill_agent();
        // Instances a test made through the CLI have uuids it never saw:
        // their QEMUs are found by the log they write under the state dir.
        let mut pids = self.live_qemus();
        pids.extend(pids_logging_under(self.dir.path()));
        for pid in pids {
            send_signal(pid, libc::SIGKILL);
        }
        for hierarchy in ["", "memory", "cpu"] {
            let parent = Path::new("/sys/fs/cgroup")
                .join(hierarchy)
                .join(self.cgroup_parent());
            remove_cgroup_tree(&parent);
        }
    }
}

/// Removes a cgroup directory and the ones below it, once their processes
/// are gone.
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(children) = std::fs::read_dir(dir) {
        for child in children.filter_map(Result::ok) {
            if child.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&child.path());
            }
        }
    }
    for _ in 0..100 {
        match std::fs::remove_dir(dir) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(Duration::from_millis(10));
            }
            _ => return,
        }
    }
}

/// pids of processes whose command line has `-uuid <one of uuids>`.
pub fn qemu_pids_with_uuids(uuids: &HashSet<Uuid>) -> Vec<u32> {
    all_pids()
        .filter(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            args.windows(2).any(|w| {
                w[0] == b"-uuid"
                    && std::str::from_utf8(w[1])
                        .ok()
                        .and_then(|s| Uuid::parse_str(s).ok())
                        .is_some_and(|u| uuids.contains(&u))
            })
        })
        .collect()
}

/// The processes whose standard output is a file under `dir`.
fn pids_logging_under(dir: &Path) -> Vec<u32> {
    all_pids()
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/fd/1")).is_ok_and(|out| out.starts_with(dir))
        })
        .collect()
}

/// Every process's pid.
fn all_pids() -> impl Iterator<Item = u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
}

/// True while `pid` exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Sends `signal` to `pid` (a process the test started). One that is
/// already gone is no error: the signal was to end it anyway.
pub fn send_signal(pid: u32, signal: libc::c_int) {
    let signal = nix::sys::signal::Signal::try_from(signal).expect("a known signal");
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
}

/// Lets unprivileged QEMUs handle their own page faults, which a QEMU
/// receiving a migration in postcopy needs (`vm.unprivileged_userfaultfd`).
pub fn allow_postcopy() {
    let setting = "/proc/sys/vm/unprivileged_userfaultfd";
    std::fs::write(setting, "1\n").unwrap_or_else(|e| {
        panic!("postcopy tests need {setting} set to 1 (root), and it can't be: {e}")
    });
}

/// A Linux bridge that exists for the life of the value.
pub struct Bridge {
    /// Its name.
    pub name: String,
}

impl Bridge {
    /// Creates a bridge with a unique name.
    pub fn create() -> Bridge {
        let name = format!("kb{}", &Uuid::new_v4().simple().to_string()[..8]);
        let status = Command::new("ip")
            .args(["link", "add", &name, "type", "bridge"])
            .status()
            .expect("run ip (install iproute2)");
        assert!(status.success(), "ip link add {name} type bridge failed");
        Bridge { name }
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.name])
            .status();
    }
}

/// Polls `check` every 20 ms until it returns `Some` or `limit` passes.
pub async fn wait_for<T>(limit: Duration, mut check: impl AsyncFnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Number of open fds of a process.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Opens a new tap interface `name` the way the agent opens one. It is
/// not persistent: it goes away with the last fd on it.
pub fn open_tap(name: &str) -> hypervisor::tap::Tap {
    hypervisor::tap::Tap::create(name, 1).unwrap_or_else(|e| panic!("tap {name}: {e}"))
}

/// The files `pid` holds open, by the paths their fds lead to.
pub fn open_files(pid: u32) -> Vec<PathBuf> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Real, effective, saved and filesystem uids (or gids, with `Gid`) of a
/// process, from /proc/<pid>/status.
pub fn status_ids(pid: u32, field: &str) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .split_whitespace()
        .map(|id| id.parse().unwrap())
        .collect()
}

/// How many fds `pid` holds on the tap interface `tap` (one per queue).
pub fn tap_queue_fds(pid: u32, tap: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    std::fs::read_to_string(e.path()).is_ok_and(|info| {
                        info.lines()
                            .any(|l| l.strip_prefix("iff:").map(str::trim) == Some(tap))
                    })
                })
                .count()
        })
        .unwrap_or(0)
}

/// A NIC spec with defaults.
pub fn nic(name: &str, mac: &str) -> pb::NicSpec {
    pb::NicSpec {
        name: name.into(),
        mac: mac.into(),
        ..Default::default()
    }
}

/// A StartInstance request that boots the guest running.
pub fn start_request(spec: pb::InstanceSpec) -> pb::StartInstanceRequest {
    pb::StartInstanceRequest {
        spec: Some(spec),
        paused: false,
    }
}

/// A disk spec with the writeback cache: test images live on whatever
/// filesystem the temp dir is on, which may not do O_DIRECT.
pub fn disk(name: &str, path: &Path) -> pb::DiskSpec {
    pb::DiskSpec {
        name: name.into(),
        path: path.display().to_string(),
        cache: pb::DiskCache::Writeback as i32,
        ..Default::default()
    }
}

impl TestAgent {
    /// Starts an instance; panics with the agent's log when that fails.
    pub async fn start_spec(&self, spec: pb::InstanceSpec) -> pb::InstanceInfo {
        self.client()
            .await
            .start_instance(start_request(spec))
            .await
            .unwrap_or_else(|s| panic!("start failed: {s:?}\nagent log:\n{}", self.log()))
            .into_inner()
    }

    /// Starts an instance that must be refused, and returns the refusal;
    /// panics if it starts.
    pub async fn start_refused(&self, spec: pb::InstanceSpec) -> tonic::Status {
        let name = spec.name.clone();
        match self
            .client()
            .await
            .start_instance(start_request(spec))
            .await
        {
            Ok(_) => panic!("{name} started, but must have been refused"),
            Err(status) => status,
        }
    }

    /// A forced StopInstance; panics if it is refused.
    pub async fn force_stop(&self, name: &str) {
        self.client()
            .await
            .stop_instance(pb::StopInstanceRequest {
                name: name.into(),
                force: true,
                powerdown_timeout_ms: 0,
            })
            .await
            .unwrap_or_else(|s| panic!("forced stop of {name} failed: {s:?}"));
    }

    /// Returns once the instance's last operation is wholly done, the work
    /// it does after its reply included (a stop removes QEMU's run files
    /// then): a forced stop of the stopped instance waits for it, then has
    /// nothing to do.
    pub async fn settled(&self, name: &str) {
        self.force_stop(name).await;
    }

    /// GetInstance.
    pub async fn instance(&self, name: &str) -> pb::InstanceInfo {
        self.client()
            .await
            .get_instance(pb::GetInstanceRequest { name: name.into() })
            .await
            .expect("get instance")
            .into_inner()
    }

    /// The instance's runtime as the agent returns it.
    pub async fn runtime_json(&self, name: &str) -> Value {
        let reply = self
            .client()
            .await
            .get_runtime(pb::GetRuntimeRequest { name: name.into() })
            .await
            .expect("get runtime")
            .into_inner();
        serde_json::from_str(&reply.runtime_json).expect("runtime JSON")
    }

    /// Whether the agent has no instance `name` at all (NOT_FOUND).
    pub async fn absent(&self, name: &str) -> bool {
        let reply = self
            .client()
            .await
            .get_instance(pb::GetInstanceRequest { name: name.into() })
            .await;
        matches!(reply, Err(s) if s.code() == tonic::Code::NotFound)
    }

    /// Migrates `name` to `target` with default options, following the
    /// progress to its end (at most two minutes).
    pub async fn migrate_to(&self, name: &str, target: &TestAgent) -> Result<(), tonic::Status> {
        self.migrate_with(name, target.address(), Default::default())
            .await
            .1
    }

    /// Migrates `name` to the agent at `target` with `options`, following
    /// the progress to its end (at most two minutes); returns every report
    /// and the outcome.
    pub async fn migrate_with(
        &self,
        name: &str,
        target: String,
        options: pb::MigrationOptions,
    ) -> (Vec<pb::MigrationProgress>, Result<(), tonic::Status>) {
        let request = pb::MigrateInstanceRequest {
            name: name.into(),
            target,
            options: Some(options),
        };
        let mut stream = match self.client().await.migrate_instance(request).await {
            Ok(stream) => stream.into_inner(),
            Err(status) => return (Vec::new(), Err(status)),
        };
        let mut seen = Vec::new();
        let ended = tokio::time::timeout(Duration::from_secs(120), async {
            while let Some(progress) = tokio_stream::StreamExt::next(&mut stream).await {
                seen.push(progress?);
            }
            Ok(())
        })
        .await;
        (seen, ended.expect("the migration ends within two minutes"))
    }

    /// AddNic.
    pub async fn add_nic(
        &self,
        name: &str,
        nic: pb::NicSpec,
    ) -> Result<pb::DeviceChangeResponse, tonic::Status> {
        self.client()
            .await
            .add_nic(pb::AddNicRequest {
                name: name.into(),
                nic: Some(nic),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// RemoveDevice.
    pub async fn remove_device(
        &self,
        name: &str,
        device: &str,
    ) -> Result<pb::DeviceChangeResponse, tonic::Status> {
        self.client()
            .await
            .remove_device(pb::RemoveDeviceRequest {
                name: name.into(),
                device: device.into(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// AddDisk.
    pub async fn add_disk(
        &self,
        name: &str,
        disk: pb::DiskSpec,
    ) -> Result<pb::DeviceChangeResponse, tonic::Status> {
        self.client()
            .await
            .add_disk(pb::AddDiskRequest {
                name: name.into(),
                disk: Some(disk),
            })
            .await
            .map(tonic::Response::into_inner)
    }
}

/// `(thread name, Cpus_allowed_list)` of every thread of a process.
pub fn thread_affinities(pid: u32) -> Vec<(String, String)> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let (Ok(comm), Ok(status)) = (
            std::fs::read_to_string(dir.join("comm")),
            std::fs::read_to_string(dir.join("status")),
        ) else {
            continue; // the thread ended meanwhile
        };
        let allowed = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .expect("Cpus_allowed_list in status")
            .trim()
            .to_owned();
        threads.push((comm.trim().to_owned(), allowed));
    }
    threads
}

/// The allowed CPUs of vCPU `index`, named by QEMU's debug-threads
/// ("CPU 0/KVM", "CPU 0/TCG").
pub fn vcpu_affinity(threads: &[(String, String)], index: usize) -> &str {
    let prefix = format!("CPU {index}/");
    let found: Vec<_> = threads
        .iter()
        .filter(|(name, _)| name.starts_with(&prefix))
        .collect();
    assert_eq!(found.len(), 1, "one thread for vCPU {index} in {threads:?}");
    &found[0].1
}

/// A TCP port on loopback that is free now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A path that scripts/test prepares and names in the environment
/// variable `var`, from what `scripts/<script>` prints.
pub fn prepared_path(var: &str, script: &str) -> PathBuf {
    let path = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        panic!("{var} is not set; run scripts/test, or set it to what scripts/{script} prints")
    });
    assert!(
        path.exists(),
        "{} is missing; run scripts/{script}",
        path.display()
    );
    path
}

/// Runs the Python unittest files in `dir` with `env` in the Python of
/// `KVM_AGENT_PYTHON`, and asserts that exactly `expected` tests ran,
/// none skipped, all passed. `logs` adds the agents' logs to a failure.
pub async fn run_python_tests(
    dir: &Path,
    env: &[(&str, std::ffi::OsString)],
    expected: usize,
    logs: impl Fn() -> String,
) {
    let python = prepared_path("KVM_AGENT_PYTHON", "python-env");
    run_python_tests_with(&python, dir, env, expected, logs).await;
}

/// [`run_python_tests`] in the Python `python`.
pub async fn run_python_tests_with(
    python: &Path,
    dir: &Path,
    env: &[(&str, std::ffi::OsString)],
    expected: usize,
    logs: impl Fn() -> String,
) {
    let out = tokio::process::Command::new(python)
        .args(["-m", "unittest", "discover", "-v", "-s"])
        .arg(dir)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .await
        .expect("run python");
    let report = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "Python tests in {} failed with {}:\n{report}\n{}",
        dir.display(),
        python.display(),
        logs()
    );
    assert!(
        report.contains(&format!("Ran {expected} tests")),
        "{report}"
    );
    assert!(!report.contains("skipped"), "{report}");
}
