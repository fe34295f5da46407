//! Taking over QEMUs that Ganeti's own KVM driver started, while they run:
//! the guest neither stops nor notices. Each is checked first (its pid is
//! the QEMU its files name, its command line is one the agent can launch
//! again with the same hardware, QEMU shows the devices the runtime file
//! places), and left as it is when anything doesn't hold.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use hypervisor::Runtime;
use hypervisor::lifecycle::files;
use hypervisor::process::PidFd;
use hypervisor::qmp::QmpClient;
use hypervisor::runtime::{QemuIdentity, ResolvedAccelerator};
use serde_json::json;

use super::incoming::Listen;
use super::{Agent, Instance, InstanceRecord, InstanceView, RecordedState, State, lock};
use crate::error::AgentError;
use crate::ganeti::{self, GanetiRuntime, LiveFacts};
use crate::model::{Takeover, TakeoverOutcome};

/// An instance's files under Ganeti's directory.
struct GanetiFiles {
    runtime: PathBuf,
    pidfile: PathBuf,
    qmp: PathBuf,
    serial: PathBuf,
}

impl GanetiFiles {
    fn of(dir: &Path, name: &str) -> Self {
        GanetiFiles {
            runtime: dir.join("conf").join(format!("{name}.runtime")),
            pidfile: dir.join("pid").join(name),
            qmp: dir.join("ctrl").join(format!("{name}.qmp")),
            serial: dir.join("ctrl").join(format!("{name}.serial")),
        }
    }
}

impl Agent {
    /// Takes over every instance Ganeti's KVM driver runs from `dir` (or
    /// only `only`), or with `dry_run` says what it would do.
    pub async fn adopt_ganeti(
        self: &Arc<Self>,
        dir: &Path,
        only: Option<&str>,
        dry_run: bool,
    ) -> Result<Vec<Takeover>, AgentError> {
        let names = match only {
            Some(name) => vec![name.to_owned()],
            None => runtime_files(dir)?,
        };
        let mut results = Vec::with_capacity(names.len());
        for name in names {
            let (pid, outcome) = match self.take_over(dir, &name, dry_run).await {
                Ok((pid, outcome)) => (Some(pid), outcome),
                Err((pid, reason)) => {
                    tracing::warn!(instance = %name, %reason, "not taking over Ganeti's instance");
                    (pid, TakeoverOutcome::Refused(reason))
                }
            };
            results.push(Takeover { name, pid, outcome });
        }
        Ok(results)
    }

    async fn take_over(
        self: &Arc<Self>,
        dir: &Path,
        name: &str,
        dry_run: bool,
    ) -> Result<(u32, TakeoverOutcome), (Option<u32>, String)> {
        if !hypervisor::spec::is_safe_identifier(name, hypervisor::spec::MAX_INSTANCE_NAME) {
            return Err((None, format!("{name:?} is not a name the agent accepts")));
        }
        let paths = GanetiFiles::of(dir, name);
        let (pid, pidfd, cmdline) = ganeti_qemu(&paths, name).map_err(|e| (None, e))?;
        let refuse = |reason: String| (Some(pid), reason);
        if let Ok(inst) = self.instance(name) {
            return match inst.view().pid {
                Some(p) if p == pid => Ok((pid, TakeoverOutcome::AlreadyAdopted)),
                _ => Err(refuse(format!(
                    "the agent already has an instance called {name:?}"
                ))),
            };
        }
        let text = read_runtime_file(&paths.runtime).map_err(refuse)?;
        let ganeti = GanetiRuntime::parse(&text)
            .map_err(|e| refuse(format!("{}: {e}", paths.runtime.display())))?;
        let live = self.live_facts(&paths.qmp).await.map_err(refuse)?;
        let translated = ganeti::translate(name, &ganeti, &cmdline, &live).map_err(refuse)?;
        let runtime = self
            .adopt_runtime(&translated)
            .await
            .map_err(|e| refuse(e.to_string()))?;
        self.check_host_files(&runtime.to_spec())
            .map_err(|e| refuse(e.to_string()))?;
        if dry_run {
            return Ok((pid, TakeoverOutcome::WouldAdopt(Box::new(runtime))));
        }
        let view = self
            .register_taken_over(name, pid, pidfd, &paths, runtime)
            .await
            .map_err(refuse)?;
        Ok((pid, TakeoverOutcome::Adopted(Box::new(view))))
    }

    /// The target's side of a migration from a node still on Ganeti's KVM
    /// driver: a QEMU from the runtime file that driver sent, with the
    /// same hardware, waiting for the stream on `host:port` (where that
    /// driver sends, its migration port). FinalizeMigration ends it.
    pub async fn accept_ganeti_migration(
        self: &Arc<Self>,
        name: &str,
        runtime_file: &str,
        host: &str,
        port: u16,
    ) -> Result<String, AgentError> {
        let refuse = |reason: String| AgentError::GanetiMigrationRefused {
            instance: name.to_owned(),
            reason,
        };
        let ganeti = GanetiRuntime::parse(runtime_file)
            .map_err(|e| refuse(format!("the runtime Ganeti sent: {e}")))?;
        let qemu = self.qemu_info().await?;
        let asked = ganeti::execution::machine(&ganeti)
            .ok_or_else(|| refuse("the runtime Ganeti sent names no machine".into()))?;
        let machine_type = qemu
            .resolve_machine(asked)
            .ok_or_else(|| refuse(format!("this node's QEMU has no machine type {asked}")))?;
        let live = LiveFacts {
            machine_type,
            accelerator: ganeti::execution::accelerator(&ganeti),
            qemu: QemuIdentity {
                version: qemu.version,
            },
        };
        let cmdline = ganeti::execution::command_line(&ganeti);
        let runtime = ganeti::translate(name, &ganeti, &cmdline, &live).map_err(refuse)?;
        let listen = Listen::At {
            host: host.to_owned(),
            port,
        };
        self.accept_runtime(&runtime, "Ganeti's KVM driver", listen)
            .await
    }

    /// What QEMU says about itself that its command line may not: the
    /// machine an alias resolved to, and whether KVM runs it.
    async fn live_facts(&self, qmp_socket: &Path) -> Result<LiveFacts, String> {
        let qmp = QmpClient::connect(qmp_socket, self.cfg.launch.qmp)
            .await
            .map_err(|e| format!("QMP on {} didn't answer: {e}", qmp_socket.display()))?;
        let failed = |e: hypervisor::qmp::QmpError| format!("QEMU didn't answer: {e}");
        let kvm = qmp.execute("query-kvm", None).await.map_err(failed)?;
        let machine = qmp
            .execute(
                "qom-get",
                Some(json!({ "path": "/machine", "property": "type" })),
            )
            .await
            .map_err(failed)?;
        let machine_type = machine
            .as_str()
            .and_then(|t| t.strip_suffix("-machine"))
            .ok_or_else(|| format!("QEMU names its machine {machine}"))?
            .to_owned();
        let qemu = self.qemu_info().await.map_err(|e| e.to_string())?;
        Ok(LiveFacts {
            machine_type,
            accelerator: if kvm["enabled"] == json!(true) {
                ResolvedAccelerator::Kvm
            } else {
                ResolvedAccelerator::Tcg
            },
            qemu: QemuIdentity {
                version: qemu.version,
            },
        })
    }

    /// Records a checked instance and starts supervising its QEMU. The run
    /// directory reaches Ganeti's sockets through links, so an agent that
    /// restarts finds the QEMU the way it finds its own.
    async fn register_taken_over(
        self: &Arc<Self>,
        name: &str,
        pid: u32,
        pidfd: PidFd,
        paths: &GanetiFiles,
        runtime: Runtime,
    ) -> Result<InstanceView, String> {
        let inst = {
            let mut registry = self.registry_mut();
            if registry.contains_key(name) {
                return Err(format!("the agent already has an instance called {name:?}"));
            }
            let inst = Instance::new(
                name,
                None,
                State::Starting,
                "being taken over from Ganeti's KVM driver".into(),
                self.events.clone(),
            );
            registry.insert(name.to_owned(), inst.clone());
            inst
        };
        let result = self
            .link_and_record(&inst, pid, pidfd, paths, runtime)
            .await;
        if result.is_err() {
            self.forget_if_unrecorded(&inst);
            let _ = std::fs::remove_dir_all(self.cfg.run_dir(name));
        }
        result
    }

    async fn link_and_record(
        self: &Arc<Self>,
        inst: &Arc<Instance>,
        pid: u32,
        pidfd: PidFd,
        paths: &GanetiFiles,
        runtime: Runtime,
    ) -> Result<InstanceView, String> {
        let _op = inst.lock_ops().await.map_err(|e| e.to_string())?;
        let run_dir = self.cfg.run_dir(&inst.name);
        link_run_dir(&run_dir, pid, paths, runtime.serial_console)
            .map_err(|e| format!("can't prepare {}: {e}", run_dir.display()))?;
        let (process, events) = self.adopt(pid, &run_dir, &runtime).await?;
        drop(pidfd);
        super::quarantine::devices_match(&runtime, &process.qmp).await?;
        let record = InstanceRecord {
            runtime: Arc::new(runtime),
            state: RecordedState::Running,
            detail: String::new(),
            outgoing: None,
        };
        self.write_record(inst, &record)
            .await
            .map_err(|e| e.to_string())?;
        let state = match hypervisor::migration::guest_running(&process.qmp).await {
            Ok(false) => State::Paused,
            _ => State::Running,
        };
        self.supervise(inst, process, events, state);
        let note = lock(&inst.status)
            .process
            .as_ref()
            .and_then(|p| p.unconfined.clone())
            .unwrap_or_default();
        tracing::info!(instance = %inst.name, pid, unconfined = %note, "took over a QEMU that Ganeti's KVM driver started");
        Ok(inst.view())
    }
}

/// The names of Ganeti's runtime files in `dir`, sorted.
fn runtime_files(dir: &Path) -> Result<Vec<String>, AgentError> {
    let conf = dir.join("conf");
    let entries = std::fs::read_dir(&conf).map_err(|e| {
        AgentError::BadRequest(format!(
            "can't read {}: {e}; is this a node where Ganeti's KVM driver ran instances?",
            conf.display()
        ))
    })?;
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".runtime")
                .map(str::to_owned)
        })
        .collect();
    names.sort();
    Ok(names)
}

fn read_runtime_file(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut text = String::new();
    file.take(ganeti::runtime_file::MAX_RUNTIME_FILE)
        .read_to_string(&mut text)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(text)
}

/// The QEMU Ganeti's pidfile names, held by a pidfd so its pid can't be
/// reused while it is checked, and its command line, once that shows it
/// is this instance's: `-name <name>` and Ganeti's pidfile.
fn ganeti_qemu(paths: &GanetiFiles, name: &str) -> Result<(u32, PidFd, Vec<String>), String> {
    let text = std::fs::read_to_string(&paths.pidfile)
        .map_err(|e| format!("{}: {e}", paths.pidfile.display()))?;
    let pid: u32 = text
        .trim()
        .parse()
        .map_err(|_| format!("{} holds no pid", paths.pidfile.display()))?;
    let pidfd = PidFd::open(pid).map_err(|_| format!("its QEMU (pid {pid}) is not running"))?;
    let cmdline: Vec<String> = std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let pidfile = paths.pidfile.to_string_lossy();
    let has =
        |option: &str, value: &str| cmdline.windows(2).any(|w| w[0] == option && w[1] == value);
    if !has("-name", name) || !has("-pidfile", &pidfile) {
        return Err(format!(
            "pid {pid} is not the QEMU of {name:?} that Ganeti started (its command line has no -name {name} -pidfile {pidfile})"
        ));
    }
    // Checked after the pidfd was open: the pid can't have been reused
    // between the check and the take-over.
    if pidfd.has_exited() {
        return Err(format!("its QEMU (pid {pid}) exited"));
    }
    Ok((pid, pidfd, cmdline))
}

/// The agent's pidfile and links to Ganeti's QMP and serial sockets.
fn link_run_dir(
    run_dir: &Path,
    pid: u32,
    paths: &GanetiFiles,
    serial: bool,
) -> std::io::Result<()> {
    std::fs::create_dir_all(run_dir)?;
    std::os::unix::fs::symlink(&paths.qmp, run_dir.join(files::QMP))?;
    if serial {
        std::os::unix::fs::symlink(&paths.serial, run_dir.join(files::SERIAL))?;
    }
    std::fs::write(run_dir.join(files::PIDFILE), format!("{pid}\n"))
}
