//! The benchmark's quick mode, run end to end: every row of the report is
//! there and every ratio is a number. Slowness doesn't fail it (these are
//! debug builds on shared machines); a missing or broken measurement does.

use std::process::Command;

use kvm_agent_tests::{agent_binary, require_qemu, workspace_binary};
use serde_json::Value;

const OPERATIONS: [&str; 14] = [
    "start → QMP ready",
    "stop (force)",
    "stop (powerdown, quit)",
    "soft reboot",
    "reset (system_reset → RESET)",
    "GetInstance vs query-status round trip",
    "NIC hot-add",
    "disk hot-add",
    "save 256 MiB random RAM (file fsynced, QEMU quit)",
    "restore 256 MiB random RAM (to running)",
    "migrate 256 MiB random RAM (total)",
    "migrate 256 MiB: downtime",
    "migrate 1 GiB random RAM (total)",
    "migrate 1 GiB: downtime",
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
        assert!(
            ratio.is_some_and(|r| r.is_finite() && r > 0.0),
            "{}: ratio {:?}",
            row["operation"],
            row["ratio_p50"]
        );
        for side in ["agent", "raw"] {
            assert!(row[side]["n"].as_u64().unwrap() > 0, "{row}");
        }
    }

    let load = &report["load"];
    assert_eq!(load["clients"], 200);
    assert_eq!(load["instances"], 20);
    for call in ["get_instance", "list_instances"] {
        assert!(load[call]["calls"].as_u64().unwrap() > 0, "{load}");
        assert_eq!(load[call]["errors"], 0, "{load}");
        assert!(load[call]["p99_ms"].as_f64().is_some_and(f64::is_finite));
    }
    assert!(load["agent_peak_rss_mib"].as_f64().unwrap() > 0.0);
}
