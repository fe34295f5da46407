//! The gRPC service: each handler converts the request, calls the agent and
//! converts the answer. No lifecycle logic lives here.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use hypervisor::lifecycle::LaunchMode;
use kvm_agent_proto::v1 as pb;
use kvm_agent_proto::v1::node_agent_server::NodeAgent;
use tokio::sync::mpsc;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::{Stream, StreamExt};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::convert::{
    self, disk_from_proto, event_to_proto, nic_from_proto, report_to_proto, spec_from_proto,
    stop_method_to_proto, view_to_proto,
};
use crate::error::AgentError;
use crate::events::{Event, WatchError};
use crate::instances::{Agent, GuestAgentCall};
use crate::model::RebootStop;
use crate::peer::REQUEST_ID_HEADER;

/// How long a waiting SetMemory waits when the caller doesn't say.
const DEFAULT_SET_MEMORY_WAIT: Duration = Duration::from_secs(30);
/// The longest wait a caller may ask for (a guest's powerdown, a balloon
/// reaching its target). Longer ones would let a call hold an instance
/// for days.
pub const MAX_CALLER_WAIT: Duration = Duration::from_secs(3600);

/// A wait the caller asked for, in milliseconds: `None` for 0 (the
/// default), refused past [`MAX_CALLER_WAIT`].
fn caller_wait(field: &str, ms: u64) -> Result<Option<Duration>, AgentError> {
    let wait = Duration::from_millis(ms);
    if wait > MAX_CALLER_WAIT {
        return Err(AgentError::BadRequest(format!(
            "{field} is {ms} ms; the most is {} ms",
            MAX_CALLER_WAIT.as_millis()
        )));
    }
    Ok((ms > 0).then_some(wait))
}

/// `kvmagent.v1.NodeAgent` on top of an [`Agent`].
#[derive(Debug, Clone)]
pub struct NodeAgentService {
    agent: Arc<Agent>,
}

impl NodeAgentService {
    /// Wraps an agent.
    pub fn new(agent: Arc<Agent>) -> Self {
        Self { agent }
    }
}

type Reply<T> = Result<Response<T>, Status>;

/// The stream WatchEvents returns.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

/// The stream MigrateInstance returns.
pub type ProgressStream = Pin<Box<dyn Stream<Item = Result<pb::MigrationProgress, Status>> + Send>>;

/// The preamble every operation handler shares: the request id, the
/// request's message, and a handle on the agent, then `body` as a traced
/// operation named `op` on the instance `name`.
macro_rules! operation {
    ($service:ident, $request:ident, $op:literal, $name:expr, |$agent:ident| $body:block) => {{
        let id = request_id($request.metadata());
        let $request = $request.into_inner();
        let name: String = $name;
        let $agent = $service.agent.clone();
        traced($op, name, id, async move $body).await
    }};
}

impl NodeAgentService {
    /// The three guest agent calls, which differ only in what they ask.
    async fn guest_agent(
        &self,
        req: Request<pb::GuestAgentRequest>,
        call: GuestAgentCall,
    ) -> Reply<pb::GuestAgentResponse> {
        operation!(self, req, "guest-agent", req.name.clone(), |agent| {
            let timeout = match req.timeout_ms {
                0 => call.default_timeout(),
                ms => Duration::from_millis(ms.into()),
            };
            let filesystems = agent.guest_agent(&req.name, call, timeout).await?;
            Ok(pb::GuestAgentResponse { filesystems })
        })
    }
}

#[tonic::async_trait]
impl NodeAgent for NodeAgentService {
    async fn get_node_info(&self, _: Request<pb::GetNodeInfoRequest>) -> Reply<pb::NodeInfo> {
        let facts = self.agent.node_facts().await;
        Ok(Response::new(convert::node_info_to_proto(facts)))
    }

    /// The server answers ListInstances with `listing::NodeAgentApi`,
    /// which sends kept encodings of what this converts.
    async fn list_instances(
        &self,
        _: Request<pb::ListInstancesRequest>,
    ) -> Reply<pb::ListInstancesResponse> {
        Ok(Response::new(pb::ListInstancesResponse {
            instances: self.agent.list().into_iter().map(view_to_proto).collect(),
        }))
    }

    async fn get_instance(&self, req: Request<pb::GetInstanceRequest>) -> Reply<pb::InstanceInfo> {
        Ok(Response::new(view_to_proto(
            self.agent.get(&req.into_inner().name)?,
        )))
    }

    async fn start_instance(
        &self,
        req: Request<pb::StartInstanceRequest>,
    ) -> Reply<pb::InstanceInfo> {
        let name = |spec: &Option<pb::InstanceSpec>| spec.as_ref().map(|s| s.name.clone());
        operation!(
            self,
            req,
            "start",
            name(&req.spec).unwrap_or_default(),
            |agent| {
                let spec = req
                    .spec
                    .ok_or_else(|| AgentError::BadRequest("spec is required".into()))?;
                let mode = match req.paused {
                    true => LaunchMode::BootPaused,
                    false => LaunchMode::Boot,
                };
                Ok(view_to_proto(
                    agent.start(spec_from_proto(spec)?, mode).await?,
                ))
            }
        )
    }

    async fn stop_instance(
        &self,
        req: Request<pb::StopInstanceRequest>,
    ) -> Reply<pb::StopInstanceResponse> {
        operation!(self, req, "stop", req.name.clone(), |agent| {
            let powerdown = caller_wait("powerdown_timeout_ms", req.powerdown_timeout_ms.into())?;
            let (view, method) = agent.stop(&req.name, req.force, powerdown).await?;
            Ok(pb::StopInstanceResponse {
                instance: Some(view_to_proto(view)),
                method: stop_method_to_proto(method) as i32,
            })
        })
    }

    async fn reboot_instance(
        &self,
        req: Request<pb::RebootInstanceRequest>,
    ) -> Reply<pb::InstanceInfo> {
        operation!(self, req, "reboot", req.name.clone(), |agent| {
            let stop = RebootStop {
                force: req.force,
                powerdown_timeout: caller_wait(
                    "powerdown_timeout_ms",
                    req.powerdown_timeout_ms.into(),
                )?,
            };
            let mode = convert::reboot_mode_from_proto(req.mode, req.spec)?;
            Ok(view_to_proto(agent.reboot(&req.name, mode, stop).await?))
        })
    }

    async fn get_console_info(
        &self,
        req: Request<pb::GetConsoleInfoRequest>,
    ) -> Reply<pb::ConsoleInfo> {
        let consoles = self.agent.console_info(&req.into_inner().name)?;
        Ok(Response::new(pb::ConsoleInfo {
            serial_socket: consoles
                .serial
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            vnc_address: consoles.vnc.unwrap_or_default(),
            spice_address: consoles.spice.unwrap_or_default(),
        }))
    }

    async fn set_display_password(
        &self,
        req: Request<pb::SetDisplayPasswordRequest>,
    ) -> Reply<pb::SetDisplayPasswordResponse> {
        operation!(
            self,
            req,
            "set_display_password",
            req.name.clone(),
            |agent| {
                agent.set_display_password(&req.name, &req.password).await?;
                Ok(pb::SetDisplayPasswordResponse {})
            }
        )
    }

    type WatchEventsStream = EventStream;
    type MigrateInstanceStream = ProgressStream;

    async fn set_memory(&self, req: Request<pb::SetMemoryRequest>) -> Reply<pb::SetMemoryResponse> {
        operation!(self, req, "set_memory", req.name.clone(), |agent| {
            let asked = caller_wait("timeout_ms", req.timeout_ms)?;
            let wait = req.wait.then(|| asked.unwrap_or(DEFAULT_SET_MEMORY_WAIT));
            let report = agent.set_memory(&req.name, req.memory_mib, wait).await?;
            Ok(convert::memory_report_to_proto(report))
        })
    }

    async fn pause_instance(
        &self,
        req: Request<pb::PauseInstanceRequest>,
    ) -> Reply<pb::InstanceInfo> {
        operation!(self, req, "pause", req.name.clone(), |agent| {
            Ok(view_to_proto(agent.pause(&req.name).await?))
        })
    }

    async fn resume_instance(
        &self,
        req: Request<pb::ResumeInstanceRequest>,
    ) -> Reply<pb::InstanceInfo> {
        operation!(self, req, "resume", req.name.clone(), |agent| {
            Ok(view_to_proto(agent.resume(&req.name).await?))
        })
    }

    async fn adopt_instance(
        &self,
        req: Request<pb::AdoptInstanceRequest>,
    ) -> Reply<pb::InstanceInfo> {
        operation!(self, req, "adopt", req.name.clone(), |agent| {
            Ok(view_to_proto(agent.adopt_quarantined(&req.name).await?))
        })
    }

    async fn adopt_ganeti_instances(
        &self,
        req: Request<pb::AdoptGanetiInstancesRequest>,
    ) -> Reply<pb::AdoptGanetiInstancesResponse> {
        operation!(self, req, "adopt-ganeti", req.name.clone(), |agent| {
            let dir = match req.ganeti_dir.as_str() {
                "" => crate::ganeti::DEFAULT_DIR,
                dir => dir,
            };
            let only = Some(req.name.as_str()).filter(|n| !n.is_empty());
            let takeovers = agent
                .adopt_ganeti(std::path::Path::new(dir), only, req.dry_run)
                .await?;
            Ok(convert::takeovers_to_proto(takeovers))
        })
    }

    async fn accept_ganeti_migration(
        &self,
        req: Request<pb::AcceptGanetiMigrationRequest>,
    ) -> Reply<pb::AcceptMigrationResponse> {
        operation!(
            self,
            req,
            "accept-ganeti-migration",
            req.name.clone(),
            |agent| {
                let port = u16::try_from(req.port)
                    .ok()
                    .filter(|&p| p != 0)
                    .ok_or_else(|| {
                        AgentError::BadRequest(format!("port {} is not a TCP port", req.port))
                    })?;
                let address = agent
                    .accept_ganeti_migration(&req.name, &req.ganeti_runtime, &req.host, port)
                    .await?;
                Ok(pb::AcceptMigrationResponse { address })
            }
        )
    }

    async fn save_instance(
        &self,
        req: Request<pb::SaveInstanceRequest>,
    ) -> Reply<pb::SaveInstanceResponse> {
        operation!(self, req, "save", req.name.clone(), |agent| {
            let saved = agent.save(&req.name, &req.path).await?;
            Ok(convert::save_outcome_to_proto(saved))
        })
    }

    async fn restore_instance(
        &self,
        req: Request<pb::RestoreInstanceRequest>,
    ) -> Reply<pb::RestoreInstanceResponse> {
        operation!(self, req, "restore", String::new(), |agent| {
            let (view, duration) = agent.restore(&req.path, req.paused).await?;
            Ok(pb::RestoreInstanceResponse {
                instance: Some(view_to_proto(view)),
                duration_ms: duration.as_millis() as u64,
            })
        })
    }

    async fn migrate_instance(
        &self,
        req: Request<pb::MigrateInstanceRequest>,
    ) -> Reply<ProgressStream> {
        let id = request_id(req.metadata());
        let req = req.into_inner();
        let options = convert::migrate_options_from_proto(req.options.unwrap_or_default())?;
        let (progress_tx, mut progress_rx) = mpsc::channel(16);
        let (out_tx, out_rx) = mpsc::channel(64);
        let agent = self.agent.clone();
        // The migration runs to its end even if the caller goes away: its
        // outcome must not depend on a client's connection.
        tokio::spawn(async move {
            let name = req.name.clone();
            let work = traced("migrate", name, id, async move {
                agent
                    .migrate(&req.name, &req.target, options, progress_tx)
                    .await
            });
            tokio::pin!(work);
            let result = loop {
                tokio::select! {
                    result = &mut work => break result,
                    Some(report) = progress_rx.recv() => {
                        let _ = out_tx.try_send(Ok(report_to_proto(&report)));
                    }
                }
            };
            while let Ok(report) = progress_rx.try_recv() {
                let _ = out_tx.try_send(Ok(report_to_proto(&report)));
            }
            if let Err(status) = result {
                let _ = out_tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }

    async fn accept_migration(
        &self,
        req: Request<pb::AcceptMigrationRequest>,
    ) -> Reply<pb::AcceptMigrationResponse> {
        operation!(self, req, "accept_migration", String::new(), |agent| {
            let address = agent
                .accept_migration(
                    &req.runtime_json,
                    &req.source,
                    req.protocol_version,
                    convert::stream_request_from_proto(&req)?,
                )
                .await?;
            Ok(pb::AcceptMigrationResponse { address })
        })
    }

    async fn finalize_migration(
        &self,
        req: Request<pb::FinalizeMigrationRequest>,
    ) -> Reply<pb::InstanceInfo> {
        operation!(self, req, "finalize_migration", req.name.clone(), |agent| {
            let view = agent
                .finalize_migration(&req.name, &req.uuid, req.resume)
                .await?;
            Ok(view_to_proto(view))
        })
    }

    async fn cancel_migration(
        &self,
        req: Request<pb::CancelMigrationRequest>,
    ) -> Reply<pb::CancelMigrationResponse> {
        operation!(self, req, "cancel_migration", req.name.clone(), |agent| {
            let cancelled = agent.cancel_migration(&req.name).await?;
            Ok(pb::CancelMigrationResponse {
                cancelled: cancelled.into(),
            })
        })
    }

    async fn switch_to_postcopy(
        &self,
        req: Request<pb::SwitchToPostcopyRequest>,
    ) -> Reply<pb::SwitchToPostcopyResponse> {
        operation!(self, req, "switch_to_postcopy", req.name.clone(), |agent| {
            agent.switch_to_postcopy(&req.name)?;
            Ok(pb::SwitchToPostcopyResponse {})
        })
    }

    async fn recover_postcopy(
        &self,
        req: Request<pb::RecoverPostcopyRequest>,
    ) -> Reply<pb::AcceptMigrationResponse> {
        operation!(self, req, "recover_postcopy", req.name.clone(), |agent| {
            let address = agent.recover_postcopy(&req.name).await?;
            Ok(pb::AcceptMigrationResponse { address })
        })
    }

    async fn watch_events(&self, req: Request<pb::WatchEventsRequest>) -> Reply<EventStream> {
        let req = req.into_inner();
        let watch = self.agent.watch_events(req.after_sequence)?;
        let filter = req.name;
        let wanted = move |e: &Event| filter.is_empty() || e.instance == filter;
        let backlog = watch
            .backlog
            .into_iter()
            .filter({
                let wanted = wanted.clone();
                move |e| wanted(e)
            })
            .map(|e| Ok(event_to_proto(&e)));
        let live = BroadcastStream::new(watch.live).filter_map(move |item| match item {
            Ok(e) if wanted(&e) => Some(Ok(event_to_proto(&e))),
            Ok(_) => None,
            Err(BroadcastStreamRecvError::Lagged(missed)) => {
                Some(Err(Status::from(WatchError::Lagged { missed })))
            }
        });
        // A lagging watcher gets one error and the stream ends, so it
        // resumes instead of silently missing events.
        let mut failed = false;
        let permit = watch.permit;
        let stream = tokio_stream::iter(backlog)
            .chain(live)
            .map_while(move |item| {
                // The watcher's place goes with its stream.
                let _place = &permit;
                if failed {
                    return None;
                }
                failed = item.is_err();
                Some(item)
            });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn hotplug_support(
        &self,
        req: Request<pb::HotplugSupportRequest>,
    ) -> Reply<pb::HotplugSupportResponse> {
        let support = self.agent.hotplug_support(&req.into_inner().name)?;
        Ok(Response::new(convert::support_to_proto(&support)))
    }

    async fn add_nic(&self, req: Request<pb::AddNicRequest>) -> Reply<pb::DeviceChangeResponse> {
        operation!(self, req, "add-nic", req.name.clone(), |agent| {
            let nic = req
                .nic
                .as_ref()
                .ok_or_else(|| AgentError::BadRequest("nic is required".into()))?;
            let changed = agent.add_nic(&req.name, nic_from_proto(nic)?).await?;
            Ok(convert::device_change_to_proto(changed))
        })
    }

    async fn add_disk(&self, req: Request<pb::AddDiskRequest>) -> Reply<pb::DeviceChangeResponse> {
        operation!(self, req, "add-disk", req.name.clone(), |agent| {
            let disk = req
                .disk
                .as_ref()
                .ok_or_else(|| AgentError::BadRequest("disk is required".into()))?;
            let changed = agent.add_disk(&req.name, disk_from_proto(disk)?).await?;
            Ok(convert::device_change_to_proto(changed))
        })
    }

    async fn remove_device(
        &self,
        req: Request<pb::RemoveDeviceRequest>,
    ) -> Reply<pb::DeviceChangeResponse> {
        operation!(self, req, "remove-device", req.name.clone(), |agent| {
            let changed = agent.remove_device(&req.name, &req.device).await?;
            Ok(convert::device_change_to_proto(changed))
        })
    }

    async fn delete_instance(
        &self,
        req: Request<pb::DeleteInstanceRequest>,
    ) -> Reply<pb::DeleteInstanceResponse> {
        operation!(self, req, "delete", req.name.clone(), |agent| {
            agent.delete(&req.name).await?;
            Ok(pb::DeleteInstanceResponse {})
        })
    }

    async fn rename_instance(
        &self,
        req: Request<pb::RenameInstanceRequest>,
    ) -> Reply<pb::InstanceInfo> {
        operation!(self, req, "rename", req.name.clone(), |agent| {
            Ok(view_to_proto(agent.rename(&req.name, &req.new_name).await?))
        })
    }

    async fn set_nic_bridge(
        &self,
        req: Request<pb::SetNicBridgeRequest>,
    ) -> Reply<pb::DeviceChangeResponse> {
        operation!(self, req, "set-nic-bridge", req.name.clone(), |agent| {
            let bridge = Some(req.bridge).filter(|b| !b.is_empty());
            let changed = agent.set_nic_bridge(&req.name, &req.device, bridge).await?;
            Ok(convert::device_change_to_proto(changed))
        })
    }

    async fn change_medium(
        &self,
        req: Request<pb::ChangeMediumRequest>,
    ) -> Reply<pb::InstanceInfo> {
        operation!(self, req, "change-medium", req.name.clone(), |agent| {
            let image = Some(req.image).filter(|i| !i.is_empty()).map(PathBuf::from);
            let view = agent.change_medium(&req.name, &req.drive, image).await?;
            Ok(view_to_proto(view))
        })
    }

    async fn ping_guest_agent(
        &self,
        req: Request<pb::GuestAgentRequest>,
    ) -> Reply<pb::GuestAgentResponse> {
        self.guest_agent(req, GuestAgentCall::Ping).await
    }

    async fn freeze_guest_filesystems(
        &self,
        req: Request<pb::GuestAgentRequest>,
    ) -> Reply<pb::GuestAgentResponse> {
        self.guest_agent(req, GuestAgentCall::Freeze).await
    }

    async fn thaw_guest_filesystems(
        &self,
        req: Request<pb::GuestAgentRequest>,
    ) -> Reply<pb::GuestAgentResponse> {
        self.guest_agent(req, GuestAgentCall::Thaw).await
    }

    async fn get_runtime(
        &self,
        req: Request<pb::GetRuntimeRequest>,
    ) -> Reply<pb::GetRuntimeResponse> {
        let (record, _) = self.agent.record(&req.into_inner().name).await?;
        let runtime_json = serde_json::to_string_pretty(&*record.runtime)
            .map_err(|e| AgentError::Internal(e.to_string()))?;
        Ok(Response::new(pb::GetRuntimeResponse {
            runtime_json,
            generation: record.runtime.generation,
        }))
    }
}

/// The caller's request id when it sent a sane one, a new one otherwise.
fn request_id(metadata: &MetadataMap) -> String {
    metadata
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|id| {
            !id.is_empty()
                && id.len() <= 64
                && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
        .map_or_else(
            || uuid::Uuid::new_v4().simple().to_string()[..16].to_owned(),
            str::to_owned,
        )
}

/// Runs one operation in a span carrying its name, the instance and the
/// request id, logs how it ended, and returns the request id in the reply
/// (or in the error's) metadata so a caller can find the operation's lines.
async fn traced<T: Send + 'static>(
    op: &'static str,
    instance: String,
    request_id: String,
    work: impl Future<Output = Result<T, AgentError>> + Send + 'static,
) -> Reply<T> {
    let header = MetadataValue::try_from(request_id.as_str()).ok();
    // Names are checked later, inside the operation: the log gets what
    // the caller sent, but never more than a name's worth of it.
    let logged_name = crate::error::bounded(&instance, 2 * hypervisor::spec::MAX_INSTANCE_NAME);
    let span = tracing::info_span!("op", op, instance = %logged_name, request_id = %request_id);
    // A task of its own: a caller that goes away, or whose deadline
    // passes, ends its wait, not the operation halfway through a QMP
    // sequence or a stop escalation. One still waiting for the instance
    // when the caller leaves is dropped instead (`present` goes with the
    // caller).
    let (present, presence) = tokio::sync::watch::channel(());
    let operation = tokio::spawn(crate::instances::for_caller(
        presence,
        async move {
            let started = Instant::now();
            let result = work.await;
            let seconds = started.elapsed().as_secs_f64();
            crate::telemetry::record_operation(op, seconds, result.as_ref().err());
            let elapsed_ms = seconds * 1000.0;
            match &result {
                Ok(_) => tracing::info!(elapsed_ms, "operation done"),
                Err(e) => {
                    let error = e.to_string();
                    let error = crate::error::bounded(&error, crate::error::MAX_STATUS_MESSAGE);
                    tracing::error!(elapsed_ms, %error, "operation failed");
                }
            }
            result
        }
        .instrument(span),
    ));
    let result = operation.await.unwrap_or_else(|e| {
        Err(AgentError::Internal(format!(
            "the {op} operation ended abnormally: {e}"
        )))
    });
    drop(present);
    match result {
        Ok(value) => {
            let mut response = Response::new(value);
            if let Some(h) = header {
                response.metadata_mut().insert(REQUEST_ID_HEADER, h);
            }
            Ok(response)
        }
        Err(e) => {
            let mut status = Status::from(e);
            if let Some(h) = header {
                status.metadata_mut().insert(REQUEST_ID_HEADER, h);
            }
            Err(status)
        }
    }
}
