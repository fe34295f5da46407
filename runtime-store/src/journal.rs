//! The intent journal: one small file per name saying which operation is
//! under way, written before the operation touches anything.
//!
//! Unlike records, an intent is written in place and never synced. An intent
//! only matters to an agent that restarts under a QEMU that kept running,
//! and the page cache survives that: a QEMU never outlives its host, so
//! after a host crash there is nothing left for an intent to reconcile.
//! Keeping fsync off this path keeps it off every hotplug's latency. A torn
//! or stale intent only makes recovery compare the record with what QEMU
//! has, which it must be able to do anyway.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{StoreError, check_name};

const JOURNAL_SUFFIX: &str = ".intent";

/// A directory of intents.
#[derive(Debug)]
pub struct IntentJournal {
    dir: PathBuf,
}

/// What a journal file held.
#[derive(Debug, PartialEq)]
pub enum Intent<T> {
    /// Nothing under way.
    None,
    /// An operation was under way.
    Pending(T),
    /// Something was being written when the writer died.
    Unreadable(String),
}

impl IntentJournal {
    /// Opens (creating) `state_dir/kind/`.
    pub fn open(state_dir: &Path, kind: &str) -> Result<Self, StoreError> {
        let dir = state_dir.join(kind);
        fs::create_dir_all(&dir).map_err(|source| StoreError::Io {
            op: "create directory",
            path: dir.clone(),
            source,
        })?;
        Ok(Self { dir })
    }

    fn path_of(&self, name: &str) -> Result<PathBuf, StoreError> {
        check_name(name)?;
        Ok(self.dir.join(format!("{name}{JOURNAL_SUFFIX}")))
    }

    /// Records `intent` for `name` (in the page cache; see the module docs).
    pub fn record<T: Serialize>(&self, name: &str, intent: &T) -> Result<(), StoreError> {
        let path = self.path_of(name)?;
        let bytes = serde_json::to_vec(intent).map_err(|source| StoreError::Serialize {
            name: name.to_owned(),
            source,
        })?;
        let io_err = |op| {
            let path = path.clone();
            move |source| StoreError::Io { op, path, source }
        };
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(io_err("open"))?;
        file.write_all(&bytes).map_err(io_err("write"))
    }

    /// Clears the intent of `name`.
    pub fn clear(&self, name: &str) -> Result<(), StoreError> {
        let path = self.path_of(name)?;
        match File::options().write(true).open(&path) {
            Ok(f) => f.set_len(0).map_err(|source| StoreError::Io {
                op: "truncate",
                path,
                source,
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StoreError::Io {
                op: "open",
                path,
                source,
            }),
        }
    }

    /// Reads the intent of `name`.
    pub fn load<T: DeserializeOwned>(&self, name: &str) -> Result<Intent<T>, StoreError> {
        let path = self.path_of(name)?;
        match fs::read(&path) {
            Ok(bytes) if bytes.is_empty() => Ok(Intent::None),
            Ok(bytes) => Ok(serde_json::from_slice(&bytes)
                .map_or_else(|e| Intent::Unreadable(e.to_string()), Intent::Pending)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Intent::None),
            Err(source) => Err(StoreError::Io {
                op: "read",
                path,
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_intent_is_loaded_until_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let journal = IntentJournal::open(dir.path(), "journal").unwrap();

        journal.record("web1", &"add nic eth1").unwrap();
        let pending: Intent<String> = journal.load("web1").unwrap();
        journal.clear("web1").unwrap();
        let cleared: Intent<String> = journal.load("web1").unwrap();

        assert_eq!(pending, Intent::Pending("add nic eth1".to_owned()));
        assert_eq!(cleared, Intent::None);
    }

    #[test]
    fn missing_journal_is_nothing_pending() {
        let dir = tempfile::tempdir().unwrap();
        let journal = IntentJournal::open(dir.path(), "journal").unwrap();

        assert_eq!(journal.load::<String>("web1").unwrap(), Intent::None);
    }

    #[test]
    fn torn_intent_is_reported_unreadable() {
        let dir = tempfile::tempdir().unwrap();
        let journal = IntentJournal::open(dir.path(), "journal").unwrap();
        journal.record("web1", &vec!["a", "b"]).unwrap();
        fs::write(dir.path().join("journal/web1.intent"), b"[\"a\", \"b").unwrap();

        assert!(matches!(
            journal.load::<Vec<String>>("web1").unwrap(),
            Intent::Unreadable(_)
        ));
    }

    #[test]
    fn a_shorter_intent_replaces_a_longer_one_whole() {
        let dir = tempfile::tempdir().unwrap();
        let journal = IntentJournal::open(dir.path(), "journal").unwrap();
        journal
            .record("web1", &"a much longer intent than the next")
            .unwrap();

        journal.record("web1", &"short").unwrap();

        assert_eq!(
            journal.load::<String>("web1").unwrap(),
            Intent::Pending("short".to_owned())
        );
    }
}
