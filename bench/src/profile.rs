//! Where the time of a start and of a hot-add goes: the agent's own step
//! timings, read from its metrics endpoint before and after the operation
//! rounds, beside the raw driver's timing of its own steps.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The histogram the agent times its steps in.
const STEP_METRIC: &str = "kvm_agent_step_duration_seconds";
/// The histogram the agent times its whole operations in, from the
/// request's arrival in the operation's task to its result.
const OPERATION_METRIC: &str = "kvm_agent_operation_duration_seconds";
/// The name [`step_sums`] gives an operation's own time among its steps.
const WHOLE_OPERATION: &str = "(the whole operation)";

/// The agent's steps of each profiled operation, in the order they run; a
/// step inside another follows it and is named after both.
pub const START_STEPS: &[&str] = &[
    "checks",
    "runtime",
    "record",
    "launch",
    "launch / run directory",
    "launch / host files",
    "launch / host files / taps",
    "launch / host files / chroot",
    "launch / cgroup",
    "launch / spawn",
    "launch / QMP greeting",
    "launch / vCPU pinning",
    "launch / fd sets",
];

/// The agent's steps of a NIC hot-add.
pub const NIC_STEPS: &[&str] = &[
    "checks",
    "option ROM",
    "journal",
    "slot and tap",
    "slot and tap / slot look-up",
    "slot and tap / tap fds",
    "QEMU and record",
    "QEMU and record / QEMU",
    "QEMU and record / QEMU / tap interface",
    "QEMU and record / record",
];

/// The agent's steps of a disk hot-add.
pub const DISK_STEPS: &[&str] = &[
    "checks",
    "image",
    "journal",
    "slot and add-fd",
    "slot and add-fd / slot look-up",
    "slot and add-fd / add-fd",
    "QEMU and record",
    "QEMU and record / QEMU",
    "QEMU and record / record",
];

/// The agent's steps of a device's removal: `device_del`'s reply, then the
/// guest's release (DEVICE_DELETED), the backend, the record.
pub const REMOVAL_STEPS: &[&str] = &[
    "journal",
    "device_del",
    "guest release",
    "backend",
    "record",
    "record / journal clear",
];

/// The agent's steps of a stop: QEMU's end, then its files; the record
/// of a forced stop is written beside QEMU's end; its run files are
/// removed after the reply.
pub const STOP_STEPS: &[&str] = &["QEMU", "reap", "run files", "record"];

/// The mean of `samples` in ms (0 for none).
pub fn mean_ms(samples: &[Duration]) -> f64 {
    let total: Duration = samples.iter().sum();
    total.as_secs_f64() * 1000.0 / samples.len().max(1) as f64
}

/// One step's mean over the rounds.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Step {
    pub step: String,
    pub mean_ms: f64,
    pub count: u64,
}

/// One operation's steps on both sides, with the whole operation's mean
/// as the client timed it.
#[derive(Debug, Serialize)]
pub struct Profile {
    pub operation: &'static str,
    pub agent: Vec<Step>,
    pub agent_total_ms: f64,
    /// The operation's mean as the agent timed it, without the gRPC call
    /// around it.
    pub agent_operation_ms: Option<f64>,
    pub raw: Vec<Step>,
    pub raw_total_ms: f64,
}

impl Profile {
    /// The time outside the top-level steps of one side: gRPC, locks and
    /// bookkeeping on the agent's. A step that only some operations run
    /// (an option ROM staged once per QEMU) counts by its share of them,
    /// taking the most runs of any top-level step as the operations'
    /// count.
    fn outside(steps: &[Step], total_ms: f64) -> f64 {
        let top = || steps.iter().filter(|s| !s.step.contains(" / "));
        let operations = top().map(|s| s.count).max().unwrap_or(1).max(1) as f64;
        let inside: f64 = top().map(|s| s.mean_ms * s.count as f64 / operations).sum();
        total_ms - inside
    }
}

/// Sums and counts of the step histogram, by operation and step.
pub type StepSums = BTreeMap<(String, String), (f64, u64)>;

/// Reads the agent's metrics endpoint.
pub async fn scrape(addr: SocketAddr) -> anyhow::Result<StepSums> {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("the agent's metrics endpoint {addr}"))?;
    // HTTP/1.0: the whole body, then the connection closes.
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body)
        .context("a metrics response without a body")?;
    Ok(step_sums(body))
}

/// Scrapes until `op` has run `step` `count` times since `before`: then
/// the work the operations left for after their replies (a stop's run
/// files) is done.
pub async fn scrape_when_done(
    addr: SocketAddr,
    before: &StepSums,
    (op, step): (&str, &str),
    count: u64,
) -> anyhow::Result<StepSums> {
    let key = (op.to_owned(), step.to_owned());
    let count_before = before.get(&key).map_or(0, |&(_, n)| n);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let now = scrape(addr).await?;
        let done = now
            .get(&key)
            .map_or(0, |&(_, n)| n)
            .saturating_sub(count_before);
        if done >= count {
            return Ok(now);
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("{op}: {step} ran {done} times of {count} after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The sums and counts of [`STEP_METRIC`] in Prometheus' text format,
/// with those of [`OPERATION_METRIC`] as a step of [`WHOLE_OPERATION`].
/// Pure.
pub fn step_sums(text: &str) -> StepSums {
    let mut sums = StepSums::new();
    for line in text.lines() {
        let (rest, whole) = match line.strip_prefix(STEP_METRIC) {
            Some(rest) => (rest, false),
            None => match line.strip_prefix(OPERATION_METRIC) {
                Some(rest) => (rest, true),
                None => continue,
            },
        };
        let (is_sum, rest) = match rest.strip_prefix("_sum") {
            Some(rest) => (true, rest),
            None => match rest.strip_prefix("_count") {
                Some(rest) => (false, rest),
                None => continue,
            },
        };
        let Some((labels, value)) = rest.strip_prefix('{').and_then(|r| r.rsplit_once("} ")) else {
            continue;
        };
        let labels = parse_labels(labels);
        let step = match whole {
            true => Some(WHOLE_OPERATION.to_owned()),
            false => labels.get("step").cloned(),
        };
        let (Some(op), Some(step), Ok(value)) =
            (labels.get("op"), step, value.trim().parse::<f64>())
        else {
            continue;
        };
        let entry = sums.entry((op.clone(), step)).or_default();
        if is_sum {
            entry.0 = value;
        } else {
            entry.1 = value as u64;
        }
    }
    sums
}

/// Adds the sums and counts of `more` to `into`, so that the difference
/// of two such totals is the steps of every interval between the scrapes
/// summed. Pure.
pub fn add_sums(into: &mut StepSums, more: &StepSums) {
    for (key, &(sum, count)) in more {
        let entry = into.entry(key.clone()).or_default();
        entry.0 += sum;
        entry.1 += count;
    }
}

/// `a="x",b="y \"quoted\""` as a map.
fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut chars = text.chars();
    loop {
        let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
        if key.is_empty() || chars.next() != Some('"') {
            return labels;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => value.extend(chars.next()),
                '"' => break,
                c => value.push(c),
            }
        }
        labels.insert(key.trim_start_matches(',').to_owned(), value);
    }
}

/// The agent's steps of `op` between two scrapes, in `order` and then any
/// others by name.
pub fn agent_steps(before: &StepSums, after: &StepSums, op: &str, order: &[&str]) -> Vec<Step> {
    let mut steps: Vec<Step> = after
        .iter()
        .filter(|((o, step), _)| o == op && step != WHOLE_OPERATION)
        .filter_map(|((_, step), &(sum, count))| {
            let (sum_before, count_before) = before
                .get(&(op.to_owned(), step.clone()))
                .copied()
                .unwrap_or_default();
            let count = count.checked_sub(count_before).filter(|&n| n > 0)?;
            Some(Step {
                step: step.clone(),
                mean_ms: (sum - sum_before) * 1000.0 / count as f64,
                count,
            })
        })
        .collect();
    let rank = |s: &Step| {
        order
            .iter()
            .position(|o| *o == s.step)
            .unwrap_or(order.len())
    };
    steps.sort_by(|a, b| rank(a).cmp(&rank(b)).then_with(|| a.step.cmp(&b.step)));
    steps
}

/// The mean of the operations `op` between two scrapes, as the agent timed
/// them; none when none ran.
pub fn operation_ms(before: &StepSums, after: &StepSums, op: &str) -> Option<f64> {
    let key = (op.to_owned(), WHOLE_OPERATION.to_owned());
    let (sum, count) = *after.get(&key)?;
    let (sum_before, count_before) = before.get(&key).copied().unwrap_or_default();
    let count = count.checked_sub(count_before).filter(|&n| n > 0)?;
    Some((sum - sum_before) * 1000.0 / count as f64)
}

/// The raw driver's steps, in the order first seen.
#[derive(Debug, Default)]
pub struct RawSteps(Vec<(String, Duration, u64)>);

impl RawSteps {
    /// Adds the steps of one run of the operation; a step that ran twice
    /// in it (two `blockdev-add`s) counts once, with both times.
    pub fn add(&mut self, steps: Vec<(String, Duration)>) {
        let mut run: Vec<(String, Duration)> = Vec::new();
        for (name, took) in steps {
            match run.iter_mut().find(|(n, _)| *n == name) {
                Some((_, total)) => *total += took,
                None => run.push((name, took)),
            }
        }
        for (name, took) in run {
            match self.0.iter_mut().find(|(n, _, _)| *n == name) {
                Some((_, total, count)) => {
                    *total += took;
                    *count += 1;
                }
                None => self.0.push((name, took, 1)),
            }
        }
    }

    /// Each step's mean.
    pub fn means(&self) -> Vec<Step> {
        self.0
            .iter()
            .map(|(step, total, count)| Step {
                step: step.clone(),
                mean_ms: total.as_secs_f64() * 1000.0 / *count as f64,
                count: *count,
            })
            .collect()
    }
}

/// The report's section: one table per operation.
pub fn section(md: &mut String, profiles: &[Profile]) {
    md.push_str("\n## Where the time goes\n\n");
    md.push_str("Mean time of each step in ms, over every start, hot-add and device removal of the rounds above: the agent's from its own `step` spans (its metrics endpoint's `kvm_agent_step_duration_seconds`), the raw driver's from timing its own steps, in the same run. A step inside another is named after both and is part of its time; the two inside `slot and …` and `QEMU and record` run at once. A step that not every operation runs has fewer runs (a NIC model's option ROM is staged once per QEMU). \"Outside the steps\" is the whole operation, as the client timed it, less its top-level steps, each by its share of the operations. The agent's is split in two by its own timing of the operation (`kvm_agent_operation_duration_seconds`): the time the operation spent between its steps (locks, bookkeeping, making the reply), and the gRPC call around it (the request and the reply on the socket, their decoding and encoding, the operation's task, and the wake-ups of both processes).\n");
    for profile in profiles {
        md.push_str(&format!(
            "\n### {}\n\n| side | step | mean (ms) | runs |\n|---|---|---|---|\n",
            profile.operation
        ));
        for (side, steps, total) in [
            ("agent", &profile.agent, profile.agent_total_ms),
            ("raw", &profile.raw, profile.raw_total_ms),
        ] {
            for s in steps.iter() {
                md.push_str(&format!(
                    "| {side} | {} | {:.3} | {} |\n",
                    s.step, s.mean_ms, s.count
                ));
            }
            let outside = Profile::outside(steps, total);
            md.push_str(&format!(
                "| {side} | outside the steps | {outside:.3} | |\n"
            ));
            if let (true, Some(operation)) = (side == "agent", profile.agent_operation_ms) {
                let call = total - operation;
                md.push_str(&format!(
                    "| {side} | outside the steps / in the operation | {:.3} | |\n| {side} | outside the steps / the gRPC call | {call:.3} | |\n",
                    outside - call
                ));
            }
            md.push_str(&format!(
                "| {side} | **whole operation** | {total:.3} | |\n"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_sums_come_from_the_summary_lines() {
        let text = "\
# TYPE kvm_agent_step_duration_seconds summary
kvm_agent_step_duration_seconds{op=\"start\",step=\"launch / spawn\",quantile=\"0.5\"} 0.002
kvm_agent_step_duration_seconds_sum{op=\"start\",step=\"launch / spawn\"} 0.03
kvm_agent_step_duration_seconds_count{op=\"start\",step=\"launch / spawn\"} 10
kvm_agent_step_duration_seconds_sum{op=\"add-nic\",step=\"say \\\"tap\\\"\"} 0.5
kvm_agent_operation_duration_seconds_sum{op=\"start\"} 9
";
        let sums = step_sums(text);
        assert_eq!(sums.len(), 3, "{sums:?}");
        assert_eq!(
            sums[&("start".to_owned(), WHOLE_OPERATION.to_owned())],
            (9.0, 0)
        );
        assert_eq!(
            sums[&("start".to_owned(), "launch / spawn".to_owned())],
            (0.03, 10)
        );
        assert_eq!(
            sums[&("add-nic".to_owned(), "say \"tap\"".to_owned())],
            (0.5, 0)
        );
    }

    #[test]
    fn agent_steps_are_the_difference_in_run_order() {
        let key = |s: &str| ("start".to_owned(), s.to_owned());
        let before = StepSums::from([(key("record"), (0.01, 1))]);
        let after = StepSums::from([
            (key("record"), (0.05, 5)),
            (key("checks"), (0.002, 4)),
            (key("zz new"), (0.004, 4)),
            (("add-nic".to_owned(), "tap".to_owned()), (1.0, 1)),
        ]);
        let steps = agent_steps(&before, &after, "start", START_STEPS);
        let names: Vec<&str> = steps.iter().map(|s| s.step.as_str()).collect();
        assert_eq!(names, ["checks", "record", "zz new"]);
        assert!((steps[1].mean_ms - 10.0).abs() < 1e-9, "{steps:?}");
        assert_eq!(steps[1].count, 4);
    }

    #[test]
    fn a_raw_step_run_twice_counts_once_per_run() {
        let ms = Duration::from_millis;
        let mut raw = RawSteps::default();
        for _ in 0..2 {
            raw.add(vec![
                ("open".into(), ms(1)),
                ("blockdev-add".into(), ms(2)),
                ("blockdev-add".into(), ms(4)),
            ]);
        }
        let means: Vec<(String, u64, u64)> = raw
            .means()
            .into_iter()
            .map(|s| (s.step, s.mean_ms.round() as u64, s.count))
            .collect();
        assert_eq!(
            means,
            [("open".into(), 1, 2), ("blockdev-add".into(), 6, 2)]
        );
    }

    #[test]
    fn outside_counts_only_top_level_steps() {
        let step = |name: &str, mean_ms| Step {
            step: name.to_owned(),
            mean_ms,
            count: 1,
        };
        let steps = [step("launch", 5.0), step("launch / spawn", 3.0)];
        assert!((Profile::outside(&steps, 7.0) - 2.0).abs() < 1e-9);
    }

    #[test]
    fn a_step_run_by_some_operations_counts_by_its_share() {
        let step = |name: &str, mean_ms, count| Step {
            step: name.to_owned(),
            mean_ms,
            count,
        };
        // Four hot-adds: the option ROM was staged in one of them.
        let steps = [step("checks", 1.0, 4), step("option ROM", 2.0, 1)];

        assert!((Profile::outside(&steps, 3.0) - 1.5).abs() < 1e-9);
    }

    #[test]
    fn summed_scrapes_give_the_steps_between_each_pair() {
        let key = ("start".to_owned(), "launch".to_owned());
        let scrape = |sum: f64, count: u64| StepSums::from([(key.clone(), (sum, count))]);
        let (mut before, mut after) = (StepSums::new(), StepSums::new());
        // Two timed starts, 0.010 s and 0.030 s, with an untimed one of
        // 0.5 s between them.
        for (b, a) in [
            (scrape(1.0, 4), scrape(1.01, 5)),
            (scrape(1.51, 6), scrape(1.54, 7)),
        ] {
            add_sums(&mut before, &b);
            add_sums(&mut after, &a);
        }

        let steps = agent_steps(&before, &after, "start", &["launch"]);

        assert_eq!(steps.len(), 1);
        assert_eq!(steps[0].count, 2);
        assert!((steps[0].mean_ms - 20.0).abs() < 1e-6, "{steps:?}");
    }
}
