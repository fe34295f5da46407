//! The benchmark's quick mode, run end to end: every row of the report is
//! there and every ratio is a number. Slowness doesn't fail it (these are
//! debug builds on shared machines); a missing or broken measurement does.

use std::process::Command;

use kvm_agent_tests::guest::guest_image;
use kvm_agent_tests::{agent_binary, newer_qemu, require_qemu, workspace_binary};
use serde_json::Value;

const OPERATIONS: [&str; 26] = [
    "start → QMP ready",
    "stop (force)",
    "stop (powerdown, quit)",
    "soft reboot",
    "reset (system_reset → RESET)",
    "GetInstance vs query-status round trip",
    "GetInstance vs query-status after 50 ms idle",
    "NIC hot-add",
    "disk hot-add",
    "device removal (disk, test guest)",
    "busy guest, auto-converge (total)",
    "busy guest, auto-converge: downtime",
    "busy guest, postcopy after a stall (total)",
    "busy guest, postcopy: downtime",
    "save 256 MiB random RAM (file fsynced, QEMU quit)",
    "restore 256 MiB random RAM (to running)",
    "migrate 256 MiB random RAM (total)",
    "migrate 256 MiB: downtime",
    "migrate 1 GiB random RAM (total)",
    "migrate 1 GiB: downtime",
    "migrate 1 GiB random RAM, multifd 4 (total)",
    "migrate 256 MiB random RAM to a newer QEMU (total)",
    "migrate 1 GiB random RAM, encrypted (total)",
    "TLS cost: migrate 1 GiB encrypted ÷ unencrypted, both through the agent",
    "take over one hv_kvm QEMU",
    "take over 20 hv_kvm QEMUs at once",
];

/// The steps the agent times in each profiled operation, by the
/// operation's row: the names the report's profile shows.
const PROFILED: [(&str, &[&str]); 4] = [
    (
        "start → QMP ready",
        &[
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
        ],
    ),
    (
        "NIC hot-add",
        &[
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
        ],
    ),
    (
        "disk hot-add",
        &[
            "checks",
            "image",
            "journal",
            "slot and add-fd",
            "slot and add-fd / slot look-up",
            "slot and add-fd / add-fd",
            "QEMU and record",
            "QEMU and record / QEMU",
            "QEMU and record / record",
        ],
    ),
    (
        "device removal (disk, test guest)",
        &[
            "journal",
            "device_del",
            "guest release",
            "backend",
            "record",
            "record / journal clear",
        ],
    ),
];

#[test]
fn the_quick_benchmark_reports_every_row_with_a_ratio() {
    require_qemu();
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(workspace_binary("bench"))
        .arg("--quick")
        .arg("--out")
        .arg(out.path())
        .arg("--agent")
        .arg(agent_binary())
        .arg("--guest")
        .arg(guest_image().kernel.parent().unwrap())
        .arg("--newer-qemu")
        .arg(newer_qemu())
        .output()
        .expect("run the benchmark");
    assert!(
        run.status.success(),
        "bench --quick failed:\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report: Value =
        serde_json::from_slice(&std::fs::read(out.path().join("report.json")).unwrap()).unwrap();
    assert!(out.path().join("report.md").is_file());

    let rows = report["operations"].as_array().expect("operations");
    let names: Vec<&str> = rows
        .iter()
        .map(|r| r["operation"].as_str().unwrap())
        .collect();
    assert_eq!(names, OPERATIONS);
    for row in rows {
        let ratio = row["ratio_p50"].as_f64();
        // QEMU reports downtime in whole milliseconds. The benchmark's
        // guest has no OS, and where KVM can't run guest code QEMU may
        // stop its vCPUs; a guest that doesn't run switches over in less
        // than a millisecond, so 0 is a measurement there.
        let downtime = row["operation"].as_str().unwrap().contains("downtime");
        let least = if downtime { 0.0 } else { f64::MIN_POSITIVE };
        assert!(
            ratio.is_some_and(|r| r.is_finite() && r >= least),
            "{}: ratio {:?}",
            row["operation"],
            row["ratio_p50"]
        );
        for side in ["agent", "raw"] {
            let n = row[side]["n"].as_u64().unwrap();
            assert!(n > 0, "{row}");
            // Every round is kept, in the order run, so a slow one can be
            // found again.
            let rounds: Vec<f64> = row[side]["rounds_ms"]
                .as_array()
                .expect("each round's time")
                .iter()
                .map(|t| t.as_f64().unwrap())
                .collect();
            assert_eq!(rounds.len() as u64, n, "{row}");
            let slowest = rounds.iter().copied().fold(f64::MIN, f64::max);
            assert_eq!(slowest, row[side]["max_ms"].as_f64().unwrap(), "{row}");
        }
        if !downtime {
            let interval = row["ratio_ci95"].as_array().expect("a 95% interval");
            let (low, high) = (interval[0].as_f64(), interval[1].as_f64());
            assert!(
                low.zip(high)
                    .is_some_and(|(l, h)| 0.0 < l && l <= h && h.is_finite()),
                "{row}"
            );
        }
    }

    check_profiles(&report["profiles"]);

    // Taking a QEMU over from Ganeti's driver never stops its guest.
    let pauses = &report["takeover_pauses"];
    assert!(pauses["watched"].as_u64().unwrap() > 0, "{pauses}");
    assert_eq!(pauses["stops"], 0, "{pauses}");

    let load = &report["load"];
    assert_eq!(load["clients"], 200);
    assert_eq!(load["instances"], 20);
    for call in ["get_instance", "list_instances"] {
        assert!(load[call]["calls"].as_u64().unwrap() > 0, "{load}");
        assert_eq!(load[call]["errors"], 0, "{load}");
        assert!(load[call]["p99_ms"].as_f64().is_some_and(f64::is_finite));
    }
    assert!(load["agent_peak_rss_mib"].as_f64().unwrap() > 0.0);

    let levels = report["scale"].as_array().expect("scale");
    let counts: Vec<u64> = levels
        .iter()
        .map(|l| l["instances"].as_u64().unwrap())
        .collect();
    assert_eq!(counts, [5, 10]);
    let positive = |v: &Value| v.as_f64().is_some_and(|x| x.is_finite() && x > 0.0);
    for level in levels {
        for pair in ["start_all", "stop_all"] {
            for field in ["agent_ms", "raw_ms", "ratio"] {
                assert!(positive(&level[pair][field]), "{pair}.{field}: {level}");
            }
        }
        for call in [
            "get_instance",
            "list_instances",
            "get_instance_paced",
            "list_instances_paced",
        ] {
            assert!(
                level[call]["calls"].as_u64().unwrap() > 0,
                "{call}: {level}"
            );
            assert_eq!(level[call]["errors"], 0, "{call}: {level}");
            assert!(positive(&level[call]["p99_ms"]), "{call}: {level}");
            // Each percentile comes with its interval over the run's
            // seconds, inside the range of the calls.
            let max = level[call]["max_ms"].as_f64().unwrap();
            for q in ["p50", "p99"] {
                let ci = &level[call][format!("{q}_interval_ms")];
                assert!(positive(&ci[0]) && positive(&ci[1]), "{call} {q}: {level}");
                let (low, high) = (ci[0].as_f64().unwrap(), ci[1].as_f64().unwrap());
                assert!(low <= high && high <= max, "{call} {q}: {level}");
            }
        }
        for field in [
            "agent_rss_mib",
            "agent_peak_rss_mib",
            "agent_open_fds",
            "restart_first_answer_ms",
            "reconcile_ms",
        ] {
            assert!(positive(&level[field]), "{field}: {level}");
        }
        check_stop_profile(level);
    }
    // Each chart has a point per level for each of its series.
    for (chart, series) in [
        ("scale-latency-paced.svg", 4),
        ("scale-latency-saturated.svg", 4),
        ("scale-start.svg", 2),
        ("scale-stop-adopt.svg", 3),
    ] {
        let svg = std::fs::read_to_string(out.path().join(chart)).unwrap();
        assert_eq!(
            svg.matches("<circle").count(),
            series * levels.len(),
            "{chart}"
        );
    }
    let md = std::fs::read_to_string(out.path().join("report.md")).unwrap();
    for section in [
        "## Where the time goes",
        "## Read load",
        "## Scale",
        "### One stop among all at once",
        "## Goals",
    ] {
        assert!(md.contains(section), "report.md lacks {section}");
    }
}

/// Every profiled operation has each of the agent's steps, in order, and
/// the raw driver's, each with a mean time from every run, and the
/// agent's own time for the whole operation.
fn check_profiles(profiles: &Value) {
    let profiles = profiles.as_array().expect("profiles");
    let operations: Vec<&str> = profiles
        .iter()
        .map(|p| p["operation"].as_str().unwrap())
        .collect();
    assert_eq!(operations, PROFILED.map(|(operation, _)| operation));
    let timed = |step: &Value| {
        step["mean_ms"]
            .as_f64()
            .is_some_and(|m| m.is_finite() && m >= 0.0)
            && step["count"].as_u64().is_some_and(|n| n > 0)
    };
    for (profile, (_, steps)) in profiles.iter().zip(PROFILED) {
        let agent = profile["agent"].as_array().unwrap();
        let names: Vec<&str> = agent.iter().map(|s| s["step"].as_str().unwrap()).collect();
        assert_eq!(names, steps, "{profile}");
        assert!(agent.iter().all(timed), "{profile}");
        let raw = profile["raw"].as_array().unwrap();
        assert!(!raw.is_empty() && raw.iter().all(timed), "{profile}");
        for total in ["agent_total_ms", "raw_total_ms"] {
            assert!(
                profile[total].as_f64().is_some_and(|t| t > 0.0),
                "{profile}"
            );
        }
        // The agent's own timing of the operation lies inside the call
        // its client timed.
        let operation = profile["agent_operation_ms"].as_f64();
        let total = profile["agent_total_ms"].as_f64().unwrap();
        assert!(operation.is_some_and(|t| t > 0.0 && t < total), "{profile}");
    }
}

/// Each of a level's forced stops has the agent's steps, each timed once
/// per instance, beside the call and the raw kill, and the CPU they took.
fn check_stop_profile(level: &Value) {
    let each = &level["stop_each"];
    let instances = level["instances"].as_u64().unwrap();
    let steps = each["agent_steps"].as_array().expect("agent_steps");
    let names: Vec<&str> = steps.iter().map(|s| s["step"].as_str().unwrap()).collect();
    assert_eq!(names, ["QEMU", "reap", "run files", "record"], "{each}");
    for step in steps {
        assert_eq!(step["count"].as_u64(), Some(instances), "{each}");
        assert!(
            step["mean_ms"].as_f64().is_some_and(f64::is_finite),
            "{each}"
        );
    }
    for field in ["agent_call_ms", "raw_kill_ms"] {
        assert!(
            each[field].as_f64().is_some_and(|t| t > 0.0),
            "{field}: {each}"
        );
    }
    // Counted in 10 ms ticks, so a few quick stops may round to none.
    for field in ["agent_cpu_ms", "machine_cpu_agent_ms", "machine_cpu_raw_ms"] {
        assert!(
            each[field]
                .as_f64()
                .is_some_and(|t| t.is_finite() && t >= 0.0),
            "{field}: {each}"
        );
    }
}
