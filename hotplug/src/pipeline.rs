//! The shape every hot-add shares: steps that go out to QEMU as one
//! pipeline, each with what takes it back, and one rollback rule.
//!
//! QEMU runs every command of a pipeline, so the first step that failed
//! decides the error, and the steps before it are taken back in reverse.

use hypervisor::qmp::{Command, QmpClient, QmpError};
use serde_json::Value;

use crate::HotplugError;

/// How a step is taken back.
#[derive(Debug)]
pub(crate) enum Undo {
    /// Nothing to take back (a query).
    Nothing,
    /// Taken back once it has succeeded.
    IfDone(Vec<(&'static str, Value)>),
    /// Taken back even when it failed: its commands run independently
    /// (one `getfd` per queue), so part of it may have happened.
    Always(Vec<(&'static str, Value)>),
    /// Taken back once it has succeeded; it took over what the steps
    /// before it made (`netdev_add` takes the fds `getfd` named), so
    /// taking it back takes those back too.
    TakesOver(Vec<(&'static str, Value)>),
}

/// One step of a hot-add.
#[derive(Debug)]
pub(crate) struct Step<'a> {
    /// What an error calls the step, e.g. `device_add`.
    pub(crate) name: &'static str,
    /// Its QMP commands, usually one.
    pub(crate) commands: Vec<Command<'a>>,
    /// What takes it back.
    pub(crate) undo: Undo,
}

impl<'a> Step<'a> {
    /// A step of one command.
    pub(crate) fn new(name: &'static str, command: Command<'a>, undo: Undo) -> Self {
        Step {
            name,
            commands: vec![command],
            undo,
        }
    }
}

/// Sends the commands of `steps`, then `cleanup`, as one pipeline. The
/// first failed step is the error, and the steps before it are taken back
/// (see [`Undo`]) in reverse. `cleanup` goes out whatever happens, and its
/// failure is only logged.
pub(crate) async fn run(
    qmp: &QmpClient,
    steps: Vec<Step<'_>>,
    cleanup: Option<Command<'_>>,
) -> Result<(), HotplugError> {
    run_checked(qmp, steps, cleanup, |_| Ok(())).await
}

/// [`run`], and when every step succeeds, `verify` looks at their replies
/// in order; its error takes every step back.
pub(crate) async fn run_checked(
    qmp: &QmpClient,
    steps: Vec<Step<'_>>,
    cleanup: Option<Command<'_>>,
    verify: impl FnOnce(&[Value]) -> Result<(), HotplugError>,
) -> Result<(), HotplugError> {
    let (undos, step_results) = send(qmp, steps, cleanup).await;
    let (failed_at, error) = match first_failure(step_results) {
        Err(failure) => failure,
        Ok(values) => match verify(&values) {
            Ok(()) => return Ok(()),
            Err(error) => (undos.len(), error),
        },
    };
    take_back(qmp, undos, failed_at).await;
    Err(error)
}

/// [`run`], with work on the host that the steps from `later` on need,
/// done while QEMU runs the steps before: a NIC's tap is made while QEMU
/// takes its fds. If that work fails, the steps before are taken back and
/// the later ones never sent; otherwise its result is returned once every
/// step has succeeded.
pub(crate) async fn run_beside<T>(
    qmp: &QmpClient,
    mut steps: Vec<Step<'_>>,
    later: usize,
    host: impl Future<Output = Result<T, HotplugError>>,
) -> Result<T, HotplugError> {
    let rest = steps.split_off(later);
    let ((mut undos, results), made) = tokio::join!(send(qmp, steps, None), host);
    if let Err((failed_at, error)) = first_failure(results) {
        take_back(qmp, undos, failed_at).await;
        return Err(error);
    }
    let made = match made {
        Ok(made) => made,
        Err(error) => {
            let past_the_last = undos.len();
            take_back(qmp, undos, past_the_last).await;
            return Err(error);
        }
    };
    let (rest_undos, results) = send(qmp, rest, None).await;
    undos.extend(rest_undos);
    match first_failure(results) {
        Ok(_) => Ok(made),
        Err((failed_at, error)) => {
            take_back(qmp, undos, later + failed_at).await;
            Err(error)
        }
    }
}

/// Each step's results, by step name.
type StepResults = Vec<(&'static str, Vec<Result<Value, QmpError>>)>;

/// Sends the commands of `steps`, then `cleanup`, as one pipeline; returns
/// each step's undo and results. A failed `cleanup` is only logged.
async fn send(
    qmp: &QmpClient,
    steps: Vec<Step<'_>>,
    cleanup: Option<Command<'_>>,
) -> (Vec<Undo>, StepResults) {
    let mut undos = Vec::with_capacity(steps.len());
    let mut commands = Vec::new();
    let mut shape = Vec::with_capacity(steps.len());
    for step in steps {
        shape.push((step.name, step.commands.len()));
        commands.extend(step.commands);
        undos.push(step.undo);
    }
    let cleanup_name = cleanup.as_ref().map(|c| (c.name, c.arguments.clone()));
    commands.extend(cleanup);

    let mut results = qmp.pipeline(commands).await.into_iter();
    let mut next = || {
        results
            .next()
            .unwrap_or(Err(QmpError::Disconnected { reason: None }))
    };
    let step_results = shape
        .into_iter()
        .map(|(name, count)| (name, (0..count).map(|_| next()).collect()))
        .collect();
    if let Some((command, arguments)) = cleanup_name
        && let Err(e) = next()
    {
        // It costs QEMU a leftover, not the operation.
        tracing::warn!(command, ?arguments, error = %e, "cleanup after hot-add failed");
    }
    (undos, step_results)
}

/// Takes back the steps before `failed_at`, and the failed one if its
/// undo says so (see [`rollback`]).
async fn take_back(qmp: &QmpClient, undos: Vec<Undo>, failed_at: usize) {
    for (command, arguments) in rollback(undos, failed_at) {
        undo(qmp, command, arguments).await;
    }
}

/// The replies of every step in order, or the index and error of the
/// first step that failed.
fn first_failure(steps: StepResults) -> Result<Vec<Value>, (usize, HotplugError)> {
    let mut values = Vec::new();
    for (index, (step, results)) in steps.into_iter().enumerate() {
        for result in results {
            match result {
                Ok(value) => values.push(value),
                Err(source) => return Err((index, HotplugError::Qmp { step, source })),
            }
        }
    }
    Ok(values)
}

/// The commands that take back the steps of a hot-add that failed at step
/// `failed_at` (past the last step when a check failed), in the order they
/// run. Pure.
pub(crate) fn rollback(mut undos: Vec<Undo>, failed_at: usize) -> Vec<(&'static str, Value)> {
    undos.truncate(failed_at + 1);
    let failed = if undos.len() > failed_at {
        undos.pop()
    } else {
        None
    };
    let mut out = match failed {
        Some(Undo::Always(commands)) => commands,
        _ => Vec::new(),
    };
    for undo in undos.into_iter().rev() {
        match undo {
            Undo::Nothing => {}
            Undo::IfDone(mut commands) | Undo::Always(mut commands) => out.append(&mut commands),
            Undo::TakesOver(mut commands) => {
                out.append(&mut commands);
                break;
            }
        }
    }
    out
}

/// Runs a rollback step; a failure there is logged, never raised, so the
/// original error reaches the caller.
pub(crate) async fn undo(qmp: &QmpClient, command: &str, arguments: Value) {
    if let Err(e) = qmp.execute(command, Some(arguments.clone())).await {
        tracing::warn!(command, %arguments, error = %e, "rollback step failed");
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use hypervisor::qmp::QmpConfig;
    use serde_json::json;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::UnixStream;

    use super::*;

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}"#;
    const COMMANDS: [&str; 16] = [
        "step-a",
        "step-b",
        "step-c",
        "step-d",
        "undo-a",
        "undo-b",
        "undo-c",
        "cleanup",
        "blockdev-add",
        "blockdev-del",
        "device_add",
        "device_del",
        "query-pci",
        "query-block",
        "add-fd",
        "remove-fd",
    ];

    /// What a fake QEMU was asked, `execute` and `arguments`, in order.
    pub(crate) type Requests = Arc<Mutex<Vec<(String, Value)>>>;

    /// A QMP peer that fails the commands named in `failing`, answers the
    /// others with `{}` and records every command after the handshake.
    pub(crate) async fn fake_qemu(failing: &'static [&'static str]) -> (QmpClient, Requests) {
        let (client, server) = UnixStream::pair().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            let (read, mut write) = server.into_split();
            let mut lines = BufReader::new(read).lines();
            write
                .write_all(format!("{GREETING}\n").as_bytes())
                .await
                .unwrap();
            while let Ok(Some(line)) = lines.next_line().await {
                let request: Value = serde_json::from_str(&line).unwrap();
                let (id, name) = (
                    request["id"].clone(),
                    request["execute"].as_str().unwrap().to_owned(),
                );
                let reply = match name.as_str() {
                    "qmp_capabilities" => json!({ "return": {}, "id": id }),
                    "query-commands" => {
                        let list: Vec<Value> =
                            COMMANDS.iter().map(|c| json!({ "name": c })).collect();
                        json!({ "return": list, "id": id })
                    }
                    _ => {
                        let failed = failing.contains(&name.as_str());
                        let arguments = request["arguments"].clone();
                        log.lock().unwrap().push((name, arguments));
                        if failed {
                            json!({ "error": { "class": "GenericError", "desc": "no" }, "id": id })
                        } else {
                            json!({ "return": {}, "id": id })
                        }
                    }
                };
                if write
                    .write_all(format!("{reply}\n").as_bytes())
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        let config = QmpConfig {
            greeting_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(5),
            max_line_bytes: 4096,
            out_of_band: false,
        };
        (QmpClient::handshake(client, config).await.unwrap(), seen)
    }

    /// The commands a fake QEMU ran since last asked.
    pub(crate) fn executed(seen: &Requests) -> Vec<String> {
        seen.lock()
            .unwrap()
            .drain(..)
            .map(|(name, _)| name)
            .collect()
    }

    fn undo_by(command: &'static str) -> Vec<(&'static str, Value)> {
        vec![(command, json!({}))]
    }

    fn steps() -> Vec<Step<'static>> {
        vec![
            Step::new(
                "a",
                Command::new("step-a", json!({})),
                Undo::IfDone(undo_by("undo-a")),
            ),
            Step::new(
                "b",
                Command::new("step-b", json!({})),
                Undo::IfDone(undo_by("undo-b")),
            ),
            Step::new(
                "c",
                Command::new("step-c", json!({})),
                Undo::IfDone(undo_by("undo-c")),
            ),
            Step::new("d", Command::bare("step-d"), Undo::Nothing),
        ]
    }

    fn names(commands: Vec<(&'static str, Value)>) -> Vec<&'static str> {
        commands.into_iter().map(|(name, _)| name).collect()
    }

    #[tokio::test]
    async fn a_failed_step_takes_back_the_ones_before_it_in_reverse() {
        let (qmp, seen) = fake_qemu(&["step-c"]).await;

        let result = run(&qmp, steps(), Some(Command::bare("cleanup"))).await;

        assert!(
            matches!(result, Err(HotplugError::Qmp { step: "c", .. })),
            "{result:?}"
        );
        assert_eq!(
            executed(&seen),
            [
                "step-a", "step-b", "step-c", "step-d", "cleanup", "undo-b", "undo-a"
            ]
        );
    }

    #[tokio::test]
    async fn a_failed_check_takes_back_every_step_and_success_none() {
        let (qmp, seen) = fake_qemu(&[]).await;
        let refuse = |replies: &[Value]| {
            assert_eq!(replies.len(), 4);
            Err(HotplugError::Unsupported("check".into()))
        };

        let result = run_checked(&qmp, steps(), None, refuse).await;

        assert!(
            matches!(result, Err(HotplugError::Unsupported(_))),
            "{result:?}"
        );
        assert_eq!(
            executed(&seen),
            [
                "step-a", "step-b", "step-c", "step-d", "undo-c", "undo-b", "undo-a"
            ]
        );

        run(&qmp, steps(), None).await.unwrap();
        assert_eq!(executed(&seen), ["step-a", "step-b", "step-c", "step-d"]);
    }

    #[tokio::test]
    async fn host_work_runs_while_the_first_steps_go_and_its_failure_takes_them_back() {
        let (qmp, seen) = fake_qemu(&[]).await;
        let failing = async {
            // The first steps were already sent when the host work runs.
            tokio::task::yield_now().await;
            Err::<(), _>(HotplugError::Unsupported("host".into()))
        };

        let result = run_beside(&qmp, steps(), 2, failing).await;

        assert!(
            matches!(result, Err(HotplugError::Unsupported(_))),
            "{result:?}"
        );
        assert_eq!(executed(&seen), ["step-a", "step-b", "undo-b", "undo-a"]);
    }

    #[tokio::test]
    async fn with_host_work_done_the_later_steps_go_and_their_failure_takes_back_all() {
        let (qmp, seen) = fake_qemu(&["step-d"]).await;

        let made = run_beside(&qmp, steps(), 2, async { Ok(7) }).await;

        assert!(
            matches!(made, Err(HotplugError::Qmp { step: "d", .. })),
            "{made:?}"
        );
        assert_eq!(
            executed(&seen),
            [
                "step-a", "step-b", "step-c", "step-d", "undo-c", "undo-b", "undo-a"
            ]
        );

        let (qmp, seen) = fake_qemu(&[]).await;
        let made = run_beside(&qmp, steps(), 2, async { Ok(7) }).await;
        assert_eq!(made.unwrap(), 7);
        assert_eq!(executed(&seen), ["step-a", "step-b", "step-c", "step-d"]);
    }

    #[tokio::test]
    async fn a_first_step_that_fails_is_taken_back_whatever_the_host_work_did() {
        let (qmp, seen) = fake_qemu(&["step-b"]).await;

        let made = run_beside(&qmp, steps(), 2, async { Ok(7) }).await;

        assert!(
            matches!(made, Err(HotplugError::Qmp { step: "b", .. })),
            "{made:?}"
        );
        assert_eq!(executed(&seen), ["step-a", "step-b", "undo-a"]);
    }

    #[test]
    fn a_step_that_may_have_half_happened_is_taken_back_too() {
        let undos = || {
            vec![
                Undo::IfDone(undo_by("undo-a")),
                Undo::Always(undo_by("close-b")),
                Undo::IfDone(undo_by("undo-c")),
            ]
        };
        assert_eq!(names(rollback(undos(), 1)), ["close-b", "undo-a"]);
        assert_eq!(names(rollback(undos(), 2)), ["close-b", "undo-a"]);
        assert_eq!(names(rollback(undos(), 0)), Vec::<&str>::new());
    }

    #[test]
    fn a_step_that_took_over_the_earlier_ones_takes_them_back_alone() {
        let undos = || {
            vec![
                Undo::Always(undo_by("closefd")),
                Undo::TakesOver(undo_by("netdev_del")),
                Undo::IfDone(undo_by("device_del")),
                Undo::Nothing,
            ]
        };
        assert_eq!(names(rollback(undos(), 0)), ["closefd"]);
        assert_eq!(names(rollback(undos(), 1)), ["closefd"]);
        assert_eq!(names(rollback(undos(), 2)), ["netdev_del"]);
        assert_eq!(names(rollback(undos(), 4)), ["device_del", "netdev_del"]);
    }
}
