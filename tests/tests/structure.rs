//! The shape rules ARCHITECTURE.md states (no module cycle, no oversized
//! file or function, grouped imports), checked on the sources by
//! `scripts/check-structure`.

use std::path::PathBuf;
use std::process::{Command, Output};

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace")
        .to_owned()
}

fn check_structure(args: &[&str]) -> Output {
    let root = workspace();
    Command::new("python3")
        .arg(root.join("scripts/check-structure"))
        .args(args)
        .current_dir(&root)
        .output()
        .expect("run python3 (install python3)")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn the_checker_catches_each_broken_rule() {
    let output = check_structure(&["--self-test"]);
    assert!(output.status.success(), "{}", text(&output));
}

#[test]
fn the_sources_keep_the_shape_rules() {
    let output = check_structure(&[]);
    assert!(
        output.status.success(),
        "scripts/check-structure found:\n{}",
        text(&output)
    );
}
