//! Prometheus metrics: operation counts and latencies, QMP failures,
//! instances by state, and instances whose QEMU runs unconfined. Off
//! unless `serve --metrics-listen` is given.

use std::net::SocketAddr;

use hypervisor::qmp::QmpError;
use metrics_exporter_prometheus::PrometheusBuilder;

use crate::error::AgentError;
use crate::events::EventKind;
use crate::events::Watch;
use crate::model::State;

/// Why the metrics endpoint couldn't start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// Only loopback is allowed: the endpoint has no authentication.
    #[error(
        "metrics address {0} is not loopback; the endpoint has no authentication, so it only listens on 127.0.0.1 or ::1"
    )]
    NotLoopback(SocketAddr),
    /// The exporter refused.
    #[error("can't start the metrics endpoint on {addr}")]
    Exporter {
        /// The address.
        addr: SocketAddr,
        /// Its error.
        #[source]
        source: metrics_exporter_prometheus::BuildError,
    },
}

/// Refuses an address beyond loopback.
pub fn check_address(addr: SocketAddr) -> Result<(), MetricsError> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(MetricsError::NotLoopback(addr))
    }
}

/// What the instance gauges count of one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counted {
    /// Its state.
    pub state: State,
    /// Whether its QEMU runs outside the confinement its runtime gives it.
    pub unconfined: bool,
}

/// Starts the endpoint and keeps the instance gauges current: `states`
/// gives every instance, asked again on each state event `watch` brings.
pub fn serve(
    addr: SocketAddr,
    watch: Watch,
    states: impl Fn() -> Vec<Counted> + Send + 'static,
) -> Result<(), MetricsError> {
    check_address(addr)?;
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|source| MetricsError::Exporter { addr, source })?;
    tracing::info!(%addr, "serving metrics");
    count_instances(&states());
    tokio::spawn(async move {
        let (mut events, _place) = (watch.live, watch.permit);
        loop {
            match events.recv().await {
                Ok(e) if matches!(e.kind, EventKind::State { .. } | EventKind::Deleted { .. }) => {
                    count_instances(&states())
                }
                Ok(_) => {}
                // Missed events only mean a recount.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    count_instances(&states())
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    Ok(())
}

fn count_instances(instances: &[Counted]) {
    for state in State::ALL {
        let n = instances.iter().filter(|i| i.state == state).count();
        metrics::gauge!("kvm_agent_instances", "state" => state.name()).set(n as f64);
    }
    let unconfined = instances.iter().filter(|i| i.unconfined).count();
    metrics::gauge!("kvm_agent_unconfined_instances").set(unconfined as f64);
}

/// Records how one operation went.
pub fn record_operation(op: &'static str, seconds: f64, error: Option<&AgentError>) {
    let outcome = if error.is_some() { "error" } else { "ok" };
    metrics::counter!("kvm_agent_operations_total", "op" => op, "outcome" => outcome).increment(1);
    metrics::histogram!("kvm_agent_operation_duration_seconds", "op" => op).record(seconds);
    if let Some(kind) = error.and_then(qmp_failure) {
        metrics::counter!("kvm_agent_qmp_errors_total", "kind" => kind).increment(1);
    }
}

/// Counts the guest memory a finished migration sent.
pub fn record_migrated_bytes(bytes: u64) {
    metrics::counter!("kvm_agent_migrated_bytes_total").increment(bytes);
}

/// The kind of QMP failure behind an error, if any.
fn qmp_failure(error: &AgentError) -> Option<&'static str> {
    let qmp = match error {
        AgentError::Qmp { source, .. } => source,
        AgentError::Hotplug {
            source: hotplug::HotplugError::Qmp { source, .. },
            ..
        } => source,
        _ => return None,
    };
    Some(match qmp {
        QmpError::Timeout { .. } | QmpError::NoGreeting(_) => "timeout",
        QmpError::Qemu { .. } => "refused",
        QmpError::Unsupported(_) => "unsupported",
        QmpError::Io(_) | QmpError::Disconnected { .. } => "disconnected",
        QmpError::Protocol(_) => "protocol",
    })
}
