//! Prometheus metrics: operation counts and latencies, the time each step
//! of an operation took, QMP failures, instances by state, and instances
//! whose QEMU runs unconfined. Off unless `serve --metrics-listen` is
//! given.

use std::net::SocketAddr;
use std::time::Instant;

use hypervisor::qmp::QmpError;
use metrics_exporter_prometheus::PrometheusBuilder;
use tracing::Subscriber;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

use crate::error::AgentError;
use crate::events::{Event, EventKind, Watch};
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
/// gives every instance, asked again after state events `watch` brings.
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
    tokio::spawn(keep_counting(watch, states));
    Ok(())
}

/// Counts the instances again after each burst of state events: a stop of
/// every instance at once brings two events per instance, and a count per
/// event would grow with the square of the instances.
async fn keep_counting(watch: Watch, states: impl Fn() -> Vec<Counted>) {
    use tokio::sync::broadcast::error::{RecvError, TryRecvError};
    let (mut events, _place) = (watch.live, watch.permit);
    let changes_count =
        |e: &Event| matches!(e.kind, EventKind::State { .. } | EventKind::Deleted { .. });
    loop {
        let mut recount = match events.recv().await {
            Ok(e) => changes_count(&e),
            // Missed events only mean a recount.
            Err(RecvError::Lagged(_)) => true,
            Err(RecvError::Closed) => return,
        };
        loop {
            match events.try_recv() {
                Ok(e) => recount |= changes_count(&e),
                Err(TryRecvError::Lagged(_)) => recount = true,
                Err(TryRecvError::Empty | TryRecvError::Closed) => break,
            }
        }
        if recount {
            count_instances(&states());
        }
    }
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

/// The histogram of step durations, labelled by operation and step.
pub const STEP_METRIC: &str = "kvm_agent_step_duration_seconds";

/// Times the `step` spans that the crates open around the parts of an
/// operation (`tracing::debug_span!("step", step = "spawn")`: at debug
/// level, so an info log's lines keep the operation's span), and records
/// each in [`STEP_METRIC`] under the enclosing `op` span's operation. A
/// step inside another is named by both, `launch / spawn`. Steps outside
/// an operation (supervision, recovery) aren't timed.
pub struct StepTimer;

/// The name of the operation an `op` span runs.
struct Operation(String);

/// When a step began, and what it is called.
struct StepStarted {
    op: String,
    step: String,
    at: Instant,
}

impl<S> Layer<S> for StepTimer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let kind = attrs.metadata().name();
        if kind != "op" && kind != "step" {
            return;
        }
        let Some(span) = ctx.span(id) else { return };
        let mut name = FieldText {
            field: kind,
            text: None,
        };
        attrs.record(&mut name);
        let Some(name) = name.text else { return };
        if kind == "op" {
            span.extensions_mut().insert(Operation(name));
            return;
        }
        let within = span.scope().skip(1).find_map(|outer| {
            let extensions = outer.extensions();
            if let Some(step) = extensions.get::<StepStarted>() {
                Some((step.op.clone(), format!("{} / {name}", step.step)))
            } else {
                extensions
                    .get::<Operation>()
                    .map(|op| (op.0.clone(), name.clone()))
            }
        });
        if let Some((op, step)) = within {
            span.extensions_mut().insert(StepStarted {
                op,
                step,
                at: Instant::now(),
            });
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        if let Some(step) = span.extensions().get::<StepStarted>() {
            let seconds = step.at.elapsed().as_secs_f64();
            metrics::histogram!(STEP_METRIC, "op" => step.op.clone(), "step" => step.step.clone())
                .record(seconds);
        }
    }
}

/// Reads one text field of a span.
struct FieldText<'a> {
    field: &'a str,
    text: Option<String>,
}

impl Visit for FieldText<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == self.field {
            self.text = Some(value.to_owned());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == self.field && self.text.is_none() {
            self.text = Some(format!("{value:?}"));
        }
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, SharedString, Unit};
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    type Labels = Vec<(String, String)>;
    type Values = Arc<Mutex<Vec<(Labels, f64)>>>;

    /// Every histogram value recorded, with its labels.
    #[derive(Default)]
    struct Recording(Values);

    struct Sink {
        labels: Labels,
        into: Values,
    }

    impl metrics::HistogramFn for Sink {
        fn record(&self, value: f64) {
            self.into.lock().unwrap().push((self.labels.clone(), value));
        }
    }

    impl metrics::Recorder for Recording {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
            Counter::noop()
        }
        fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::noop()
        }
        fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
            assert_eq!(key.name(), STEP_METRIC);
            let labels = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            Histogram::from_arc(Arc::new(Sink {
                labels,
                into: self.0.clone(),
            }))
        }
    }

    #[test]
    fn steps_are_timed_under_their_operation_and_the_step_they_are_in() {
        let recording = Recording::default();
        let subscriber = tracing_subscriber::registry().with(StepTimer);
        metrics::with_local_recorder(&recording, || {
            tracing::subscriber::with_default(subscriber, || {
                tracing::info_span!("op", op = "start").in_scope(|| {
                    tracing::debug_span!("step", step = "launch").in_scope(|| {
                        tracing::debug_span!("step", step = "spawn")
                            .in_scope(|| std::thread::sleep(Duration::from_millis(2)));
                    });
                });
                // Work nobody asked for isn't an operation's step.
                tracing::debug_span!("step", step = "supervise").in_scope(|| {});
            });
        });
        let recorded = recording.0.lock().unwrap();
        let labels = |op: &str, step: &str| {
            vec![
                ("op".to_owned(), op.to_owned()),
                ("step".to_owned(), step.to_owned()),
            ]
        };
        let seconds: Vec<f64> = recorded.iter().map(|(_, s)| *s).collect();
        let names: Vec<_> = recorded.iter().map(|(l, _)| l.clone()).collect();
        assert_eq!(
            names,
            [labels("start", "launch / spawn"), labels("start", "launch")]
        );
        assert!(
            seconds[0] >= 0.002 && seconds[1] >= seconds[0],
            "{seconds:?}"
        );
    }

    #[tokio::test]
    async fn a_burst_of_state_events_is_counted_once() {
        let bus = crate::events::EventBus::new(256);
        let watch = bus.watch(None).unwrap();
        let stopped = || EventKind::State {
            state: State::Stopped,
            detail: String::new(),
            guest_initiated: false,
        };
        for i in 0..100 {
            bus.publish(&format!("vm{i}"), stopped());
        }
        let counts = Arc::new(Mutex::new(0));
        let counted = counts.clone();
        let counting = tokio::spawn(keep_counting(watch, move || {
            *counted.lock().unwrap() += 1;
            Vec::new()
        }));
        let settled = || async {
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            *counts.lock().unwrap()
        };
        assert_eq!(settled().await, 1, "one count for the hundred events");
        bus.publish("vm0", stopped());
        assert_eq!(settled().await, 2, "and one for a later event");
        drop(bus);
        counting.await.unwrap();
    }
}
