//! A writer killed with SIGKILL at a random moment leaves the last complete
//! revision intact: never a torn or empty record, nor an older one.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use runtime_store::RecordStore;
use serde::{Deserialize, Serialize};

const CHILD_ENV: &str = "RUNTIME_STORE_WRITER_DIR";

#[derive(Serialize, Deserialize)]
struct Big {
    counter: u64,
    filler: Vec<String>,
}

/// The child side: writes revisions as fast as it can until killed.
#[test]
fn writer_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return; // only does work when spawned by the test below
    };
    let store = RecordStore::open(dir.as_ref(), "runtime").unwrap();
    let filler: Vec<String> = (0..2000).map(|i| format!("entry-{i:08}")).collect();
    for counter in 2.. {
        store
            .save(
                "victim",
                &Big {
                    counter,
                    filler: filler.clone(),
                },
            )
            .unwrap();
    }
}

#[test]
fn killing_a_writer_midway_keeps_a_complete_generation() {
    let dir = tempfile::tempdir().unwrap();
    let store = RecordStore::open(dir.path(), "runtime").unwrap();
    store
        .save(
            "victim",
            &Big {
                counter: 1,
                filler: vec![],
            },
        )
        .unwrap();

    let mut newest_seen = 0;
    for round in 0..5u64 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "writer_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Let it get well into its write loop, at a different point each round.
        let until = Instant::now() + Duration::from_millis(150 + round * 37);
        while Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
        child.wait().unwrap();

        let fresh = RecordStore::open(dir.path(), "runtime").unwrap();
        let record = fresh.load::<Big>("victim").unwrap().expect("record kept");
        assert!(record.value.counter >= 1);
        assert!(
            record.revision >= newest_seen,
            "round {round}: revision {} read after {newest_seen}",
            record.revision
        );
        newest_seen = record.revision;
        let quarantined = std::fs::read_dir(dir.path().join("quarantine"))
            .unwrap()
            .count();
        assert_eq!(
            quarantined, 0,
            "round {round}: a killed writer must not corrupt the record"
        );
    }
    // The writers really ran: the record moved past the first generation.
    let last = store.load::<Big>("victim").unwrap().unwrap();
    assert!(last.value.counter > 1, "the child writer never wrote");
}
