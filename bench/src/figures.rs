//! The figures of the scale section, read off each level, and how their
//! growth from the first level to the last is judged. Pure.

use crate::scale;

/// A figure of the scale section, read off each level.
pub(crate) struct Figure {
    pub label: &'static str,
    pub value: Read,
    pub kind: FigureKind,
    /// Raw QEMU's figure for the same work, where it has one.
    raw: Option<Read>,
}

#[derive(PartialEq)]
pub(crate) enum FigureKind {
    /// The agent's: its growth with the instance count is checked.
    Agent,
    /// Context (raw QEMU, the machine): its growth is shown, not checked.
    Context,
    /// A ratio, compared with its goal at each level instead.
    Ratio,
}

/// What a level's figure is read with.
type Read = fn(&scale::Level) -> f64;

const fn figure(label: &'static str, value: Read, kind: FigureKind, raw: Option<Read>) -> Figure {
    Figure {
        label,
        value,
        kind,
        raw,
    }
}

const fn grows(label: &'static str, value: Read) -> Figure {
    figure(label, value, FigureKind::Agent, None)
}

/// An agent figure that raw QEMU's `raw` measures beside it.
const fn grows_beside(label: &'static str, value: Read, raw: Read) -> Figure {
    figure(label, value, FigureKind::Agent, Some(raw))
}

const fn context(label: &'static str, value: Read) -> Figure {
    figure(label, value, FigureKind::Context, None)
}

const fn ratio(label: &'static str, value: Read) -> Figure {
    figure(label, value, FigureKind::Ratio, None)
}

pub(crate) const FIGURES: [Figure; 21] = [
    grows_beside(
        "start all: agent (ms)",
        |l| l.start_all.agent_ms,
        |l| l.start_all.raw_ms,
    ),
    context("start all: raw (ms)", |l| l.start_all.raw_ms),
    ratio("start all: agent/raw", |l| l.start_all.ratio),
    grows("GetInstance p50, paced (ms)", |l| {
        l.get_instance_paced.p50_ms
    }),
    grows("GetInstance p99, paced (ms)", |l| {
        l.get_instance_paced.p99_ms
    }),
    grows("ListInstances p50, paced (ms)", |l| {
        l.list_instances_paced.p50_ms
    }),
    grows("ListInstances p99, paced (ms)", |l| {
        l.list_instances_paced.p99_ms
    }),
    grows("GetInstance p50, back to back (ms)", |l| {
        l.get_instance.p50_ms
    }),
    grows("GetInstance p99, back to back (ms)", |l| {
        l.get_instance.p99_ms
    }),
    grows("ListInstances p50, back to back (ms)", |l| {
        l.list_instances.p50_ms
    }),
    grows("ListInstances p99, back to back (ms)", |l| {
        l.list_instances.p99_ms
    }),
    context("QEMUs' CPU during paced reads (% of a core)", |l| {
        l.qemu_cpu_percent
    }),
    context("back to back: calls per second", |l| {
        (l.get_instance.calls + l.list_instances.calls) as f64 / l.read_seconds
    }),
    grows("agent RSS after the load (MiB)", |l| l.agent_rss_mib),
    grows("agent peak RSS (MiB)", |l| l.agent_peak_rss_mib),
    grows("agent open fds", |l| l.agent_open_fds as f64),
    grows("restart: first answer (ms)", |l| l.restart_first_answer_ms),
    grows("restart: all adopted (ms)", |l| l.reconcile_ms),
    grows_beside(
        "stop all: agent (ms)",
        |l| l.stop_all.agent_ms,
        |l| l.stop_all.raw_ms,
    ),
    context("stop all: raw (ms)", |l| l.stop_all.raw_ms),
    ratio("stop all: agent/raw", |l| l.stop_all.ratio),
];

/// How a figure grew from the first level to the last.
#[derive(Debug)]
pub(crate) struct Growth {
    pub grew: f64,
    /// How the instance count grew.
    count: f64,
    /// Raw QEMU's growth for the same work, where it has the figure.
    pub raw: Option<f64>,
}

impl Growth {
    /// No faster than the instance count, or than raw QEMU doing the
    /// same work on the same machine (then the machine sets the pace).
    pub fn linear_or_as_raw(&self) -> bool {
        self.grew <= self.count || self.raw.is_some_and(|raw| self.grew <= raw)
    }
}

pub(crate) fn growth(levels: &[scale::Level], figure: &Figure) -> Option<Growth> {
    let (first, last) = (levels.first()?, levels.last()?);
    if figure.kind == FigureKind::Ratio || levels.len() < 2 {
        return None;
    }
    let grew = |value: Read| value(last) / value(first);
    Some(Growth {
        grew: grew(figure.value),
        count: last.instances as f64 / first.instances as f64,
        raw: figure.raw.map(grew),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn growth(grew: f64, raw: Option<f64>) -> Growth {
        Growth {
            grew,
            count: 10.0,
            raw,
        }
    }

    #[test]
    fn a_figure_may_grow_as_fast_as_raw_qemus_but_no_faster() {
        assert!(growth(9.5, None).linear_or_as_raw());
        assert!(!growth(10.5, None).linear_or_as_raw());
        // The machine slows raw QEMU as much: not the agent's doing.
        assert!(growth(17.4, Some(28.6)).linear_or_as_raw());
        assert!(!growth(12.0, Some(11.0)).linear_or_as_raw());
    }
}
