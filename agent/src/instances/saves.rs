//! Save and restore: a guest's state into a self-describing file on this
//! node, and back.
//!
//! Saving, QEMU's migration stream goes through a pipe the agent owns (no
//! shell, no `exec:`), so the agent checksums it on the way and QEMU never
//! opens the file itself. Restoring, QEMU reads an fd the agent opened on
//! the file while the agent checks the checksum beside it.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hypervisor::lifecycle;
use hypervisor::migration::{
    self as qemu_migration, MigrationParameters, MigrationPhase, StreamWatch,
};
use hypervisor::qmp::QmpError;
use hypervisor::runtime::format;
use runtime_store::savefile::{SaveFile, SaveFileError, SaveHeader, SaveWriter};

use super::{Agent, Instance, InstanceView, Process, RecordedState, State, lock};
use crate::error::AgentError;
use crate::model::SaveOutcome;

/// How often a save or restore checks on QEMU while it says nothing; its
/// `MIGRATION` events wake the check sooner.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// A pipe this large lets QEMU and the agent's copy overlap.
const PIPE_SIZE: i32 = 1 << 20;

fn save_error(path: &Path) -> impl FnOnce(SaveFileError) -> AgentError + '_ {
    move |source| AgentError::SaveFile {
        path: path.to_owned(),
        source,
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd), AgentError> {
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| AgentError::Internal(format!("can't make a pipe: {e}")))?;
    // Best effort: a small pipe only costs speed.
    let _ = nix::fcntl::fcntl(&write, nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
    Ok((read, write))
}

fn absolute(path: &str) -> Result<PathBuf, AgentError> {
    let path = PathBuf::from(path);
    if !path.is_absolute() {
        return Err(AgentError::BadRequest(format!(
            "save file path {} must be absolute",
            path.display()
        )));
    }
    Ok(path)
}

/// Whether `path`, or where its symlinks lead, lies in `state_dir`. A
/// file that doesn't exist yet is judged by its directory.
fn inside_state_dir(path: &Path, state_dir: &Path) -> bool {
    let real = std::fs::canonicalize(path).or_else(|e| match (path.parent(), path.file_name()) {
        (Some(dir), Some(file)) => std::fs::canonicalize(dir).map(|d| d.join(file)),
        _ => Err(e),
    });
    let real_state = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_owned());
    path.starts_with(state_dir) || real.is_ok_and(|real| real.starts_with(&real_state))
}

impl Agent {
    /// Checks the path of a save file: absolute, under the allowed roots,
    /// and outside the agent's own state, where a file would pass for one
    /// of its records.
    fn save_file_path(&self, path: &str) -> Result<PathBuf, AgentError> {
        let path = absolute(path)?;
        self.cfg.allowed_roots.check("save file", &path)?;
        if inside_state_dir(&path, &self.cfg.state_dir) {
            return Err(AgentError::BadRequest(format!(
                "save file {} lies in the agent's state directory {}; choose a path outside it",
                path.display(),
                self.cfg.state_dir.display()
            )));
        }
        Ok(path)
    }

    /// Opens a save file to restore beneath the allowed roots: a regular
    /// file, never a FIFO or a device that would hold the call.
    fn open_save_file(&self, path: &Path) -> Result<File, AgentError> {
        use nix::fcntl::OFlag;
        let unusable = |reason: String| {
            AgentError::BadRequest(format!("save file {}: {reason}", path.display()))
        };
        let file = self
            .cfg
            .allowed_roots
            .open(path, OFlag::O_RDONLY, nix::sys::stat::Mode::empty())
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => AgentError::SaveFile {
                    path: path.to_owned(),
                    source: SaveFileError::Io {
                        op: "open",
                        path: path.to_owned(),
                        source: e,
                    },
                },
                _ => unusable(e.to_string()),
            })?;
        let meta = file.metadata().map_err(|e| unusable(e.to_string()))?;
        if !meta.is_file() {
            return Err(unusable("not a regular file".into()));
        }
        hypervisor::host_files::blocking(&file).map_err(|e| unusable(e.to_string()))?;
        Ok(file)
    }

    /// Saves a running or paused guest's state to a new file at `path`,
    /// then ends its QEMU. On any failure the file is gone and the guest
    /// runs (or stays paused) as before.
    pub async fn save(self: &Arc<Self>, name: &str, path: &str) -> Result<SaveOutcome, AgentError> {
        let path = self.save_file_path(path)?;
        let started = Instant::now();
        let inst = self.instance(name)?;
        let _op = inst.lock_ops().await?;
        let (process, record) = inst.process_and_record();
        let before = lock(&inst.status).state;
        let (Some(process), Some(mut record)) = (process, record) else {
            return Err(AgentError::NotRunning(name.to_owned()));
        };
        if !matches!(before, State::Running | State::Paused) {
            return Err(AgentError::NotRunning(name.to_owned()));
        }
        let qmp_error = |source: QmpError| AgentError::Qmp {
            instance: name.to_owned(),
            source,
        };
        let was_running = qemu_migration::guest_running(&process.qmp)
            .await
            .map_err(qmp_error)?;
        let header = SaveHeader {
            instance_name: name.to_owned(),
            instance_uuid: record.runtime.uuid.to_string(),
            was_running,
            saved_at_unix: super::unix_now(),
            runtime: (*record.runtime).clone(),
        };
        let writer = {
            let target = path.clone();
            tokio::task::spawn_blocking(move || SaveWriter::create(&target, &header))
                .await
                .map_err(|e| AgentError::Internal(e.to_string()))?
                .map_err(save_error(&path))?
        };
        inst.set_state(State::Migrating, format!("saving to {}", path.display()));
        let written = self.write_state(&inst, &process, writer, was_running).await;
        let file_bytes = match written {
            Ok(bytes) => bytes,
            Err(e) => {
                if !process.pidfd.has_exited() {
                    if was_running && let Err(resume) = qemu_migration::resume(&process.qmp).await {
                        tracing::error!(instance = %name, error = %resume, "can't resume after a failed save");
                    }
                    inst.set_state(before, format!("save failed: {e}"));
                }
                return Err(e);
            }
        };

        // The file is durable: QEMU can go.
        process.stop_requested.store(true, Ordering::SeqCst);
        if let Err(e) = lifecycle::quit(Some(&process.qmp), &process.pidfd, self.cfg.stop).await {
            tracing::error!(instance = %name, error = %e, "can't end QEMU after a save");
        }
        process.reap();
        lifecycle::remove_run_files(&self.cfg.run_dir(name)).await;
        let detail = format!("saved to {}", path.display());
        record.state = RecordedState::Saved;
        record.detail = detail.clone();
        {
            let mut st = lock(&inst.status);
            st.process = None;
        }
        self.write_record(&inst, &record).await?;
        inst.set_state(State::Saved, detail);
        let duration = started.elapsed();
        tracing::info!(instance = %name, path = %path.display(), file_bytes, ?duration, "instance saved");
        Ok(SaveOutcome {
            view: inst.view(),
            file_bytes,
            was_running,
            duration,
        })
    }

    /// Pauses the guest and streams its state into `writer`. Returns the
    /// file's size once it is durable under its name.
    async fn write_state(
        &self,
        inst: &Instance,
        process: &Process,
        mut writer: SaveWriter,
        was_running: bool,
    ) -> Result<u64, AgentError> {
        let path = writer.path().to_owned();
        let qmp = &process.qmp;
        let qmp_error = |source: QmpError| AgentError::Qmp {
            instance: inst.name.clone(),
            source,
        };
        if was_running {
            qemu_migration::pause(qmp).await.map_err(qmp_error)?;
        }
        let params = MigrationParameters {
            auto_converge: false,
            ..MigrationParameters::default()
        };
        qemu_migration::configure(qmp, &params, None)
            .await
            .map_err(qmp_error)?;
        let (read, write) = pipe()?;
        let copy = tokio::task::spawn_blocking(move || {
            let mut source = File::from(read);
            writer.copy_stream(&mut source).map(|()| writer)
        });
        let watch = StreamWatch::new(qmp);
        let started = qemu_migration::start_outgoing_to_fd(qmp, write.as_fd()).await;
        // QEMU holds its own copy now; ours must go for the copy to see EOF.
        drop(write);
        if let Err(e) = started {
            copy.abort();
            return Err(qmp_error(e));
        }
        let status = qemu_migration::wait_until_final(qmp, watch, POLL_INTERVAL)
            .await
            .map_err(qmp_error)?;
        let copied = copy
            .await
            .map_err(|e| AgentError::Internal(e.to_string()))?;
        // The copy's own failure (a full disk) says more than QEMU's
        // broken pipe that follows from it.
        let writer = copied.map_err(save_error(&path))?;
        if status.phase != MigrationPhase::Completed {
            return Err(AgentError::MigrationFailed {
                instance: inst.name.clone(),
                reason: status
                    .error
                    .unwrap_or_else(|| format!("QEMU ended the save {}", status.status)),
            });
        }
        tokio::task::spawn_blocking(move || writer.finish())
            .await
            .map_err(|e| AgentError::Internal(e.to_string()))?
            .map_err(save_error(&path))
    }

    /// Starts an instance from a save file, running unless `paused` (or
    /// the guest was paused when saved). A damaged header or a truncated
    /// file starts nothing; a damaged stream is caught while it is fed,
    /// before the guest runs, and its QEMU is killed. The file is only
    /// ever read.
    pub async fn restore(
        self: &Arc<Self>,
        path: &str,
        paused: bool,
    ) -> Result<(InstanceView, Duration), AgentError> {
        let path = self.save_file_path(path)?;
        let started = Instant::now();
        let opened = self.open_save_file(&path)?;
        let file = {
            let source = path.clone();
            tokio::task::spawn_blocking(move || {
                SaveFile::<format::Stored>::from_file(opened, &source)
            })
            .await
            .map_err(|e| AgentError::Internal(e.to_string()))?
            .map_err(save_error(&path))?
        };
        let saved = &file.header.runtime.0;
        if file.header.instance_uuid != saved.uuid.to_string()
            || file.header.instance_name != saved.name
        {
            return Err(AgentError::BadRequest(format!(
                "save file {} names instance {:?} ({}) but holds the runtime of {:?} ({})",
                path.display(),
                file.header.instance_name,
                file.header.instance_uuid,
                saved.name,
                saved.uuid
            )));
        }
        let runtime = self.adopt_runtime(saved).await?;
        self.check_host_files(&runtime.to_spec())?;
        let resume = file.header.was_running && !paused;
        let inst = self.register_incoming(&runtime)?;
        let _op = self.lock_incoming(&inst).await?;
        let previous = self.check_incoming(&inst, &runtime)?;
        let detail = format!("restore from {}", path.display());
        let (mut record, process) = self
            .launch_incoming(&inst, runtime, detail, &previous)
            .await?;
        if let Err(e) = self.read_state(&inst, &process, file, &path).await {
            self.end_incoming_qemu(&inst, &process).await;
            self.forget_incoming(&inst, previous).await;
            return Err(e);
        }
        record.state = RecordedState::Running;
        record.detail = String::new();
        self.write_record(&inst, &record).await?;
        process.read_balloon().await;
        let state = if resume {
            qemu_migration::resume(&process.qmp)
                .await
                .map_err(|source| AgentError::Qmp {
                    instance: inst.name.clone(),
                    source,
                })?;
            State::Running
        } else {
            State::Paused
        };
        inst.set_state(state, "");
        let duration = started.elapsed();
        tracing::info!(instance = %inst.name, path = %path.display(), ?duration, resumed = resume, "instance restored");
        Ok((inst.view(), duration))
    }

    /// Lets QEMU load the file's stream straight from the file while
    /// another thread checks its checksum, and waits for both. QEMU reads
    /// at its own pace and nothing copies the stream; the guest can't run
    /// before the caller resumes it, which happens only if the check passed.
    async fn read_state(
        &self,
        inst: &Instance,
        process: &Process,
        mut file: SaveFile<format::Stored>,
        path: &Path,
    ) -> Result<(), AgentError> {
        let qmp_error = |source: QmpError| AgentError::Qmp {
            instance: inst.name.clone(),
            source,
        };
        let stream = file.open_stream().map_err(save_error(path))?;
        let watch = StreamWatch::new(&process.qmp);
        qemu_migration::start_incoming_from_fd(&process.qmp, stream.as_fd())
            .await
            .map_err(qmp_error)?;
        drop(stream);
        let check = tokio::task::spawn_blocking(move || file.verify());
        let status = qemu_migration::wait_until_final(&process.qmp, watch, POLL_INTERVAL).await;
        // A damaged file explains whatever QEMU made of it.
        check
            .await
            .map_err(|e| AgentError::Internal(e.to_string()))?
            .map_err(save_error(path))?;
        let status = status.map_err(qmp_error)?;
        if status.phase != MigrationPhase::Completed {
            return Err(AgentError::MigrationFailed {
                instance: inst.name.clone(),
                reason: status
                    .error
                    .unwrap_or_else(|| format!("QEMU ended the restore {}", status.status)),
            });
        }
        Ok(())
    }

    /// Stops a running guest's vCPUs.
    pub async fn pause(&self, name: &str) -> Result<InstanceView, AgentError> {
        self.set_paused(name, true).await
    }

    /// Lets a paused guest run.
    pub async fn resume(&self, name: &str) -> Result<InstanceView, AgentError> {
        self.set_paused(name, false).await
    }

    async fn set_paused(&self, name: &str, pause: bool) -> Result<InstanceView, AgentError> {
        let inst = self.instance(name)?;
        let _op = inst.lock_ops().await?;
        let state = lock(&inst.status).state;
        let Some(process) = inst
            .process()
            .filter(|_| matches!(state, State::Running | State::Paused))
        else {
            return Err(AgentError::NotRunning(name.to_owned()));
        };
        let result = if pause {
            qemu_migration::pause(&process.qmp).await
        } else {
            qemu_migration::resume(&process.qmp).await
        };
        result.map_err(|source| AgentError::Qmp {
            instance: name.to_owned(),
            source,
        })?;
        let next = if pause { State::Paused } else { State::Running };
        if next != state {
            inst.set_state(next, "");
        }
        Ok(inst.view())
    }
}
