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
//!
//! The file never shrinks: a shorter intent is padded with blanks, and
//! clearing blanks it. Truncating frees the file's block and the next
//! intent allocates one again, two journaled metadata changes that wait
//! behind any commit the records' syncs started (half a millisecond on
//! ext4, on the path of the instance's next operation); an overwrite of a
//! block the file has is a page-cache copy.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
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
        fs::create_dir_all(&dir).map_err(|source| io_error("create directory", &dir, source))?;
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
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|source| io_error("open", &path, source))?;
        overwrite(&file, bytes).map_err(|source| io_error("write", &path, source))
    }

    /// Clears the intent of `name`.
    pub fn clear(&self, name: &str) -> Result<(), StoreError> {
        let path = self.path_of(name)?;
        match File::options().write(true).open(&path) {
            Ok(file) => {
                overwrite(&file, Vec::new()).map_err(|source| io_error("write", &path, source))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(io_error("open", &path, source)),
        }
    }

    /// Reads the intent of `name`.
    pub fn load<T: DeserializeOwned>(&self, name: &str) -> Result<Intent<T>, StoreError> {
        let path = self.path_of(name)?;
        match fs::read(&path) {
            Ok(bytes) if bytes.trim_ascii().is_empty() => Ok(Intent::None),
            Ok(bytes) => Ok(serde_json::from_slice(&bytes)
                .map_or_else(|e| Intent::Unreadable(e.to_string()), Intent::Pending)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Intent::None),
            Err(source) => Err(io_error("read", &path, source)),
        }
    }
}

/// Writes `bytes` at the start of `file`, blanking whatever of a longer
/// earlier content would be left after them (JSON allows the blanks).
fn overwrite(file: &File, mut bytes: Vec<u8>) -> io::Result<()> {
    let len = file.metadata()?.len();
    let left_over = usize::try_from(len)
        .unwrap_or(usize::MAX)
        .saturating_sub(bytes.len());
    bytes.resize(bytes.len() + left_over, b' ');
    file.write_all_at(&bytes, 0)
}

fn io_error(op: &'static str, path: &Path, source: io::Error) -> StoreError {
    StoreError::Io {
        op,
        path: path.to_owned(),
        source,
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
    fn clearing_keeps_the_files_size_and_a_file_emptied_earlier_is_clear() {
        let dir = tempfile::tempdir().unwrap();
        let journal = IntentJournal::open(dir.path(), "journal").unwrap();
        let path = dir.path().join("journal/web1.intent");
        journal.record("web1", &"add disk").unwrap();
        let written = fs::metadata(&path).unwrap().len();

        journal.clear("web1").unwrap();
        let cleared = fs::metadata(&path).unwrap().len();
        let after_clear = journal.load::<String>("web1").unwrap();
        // As an agent that truncated to clear left it.
        fs::write(&path, b"").unwrap();
        let emptied = journal.load::<String>("web1").unwrap();

        assert_eq!(cleared, written, "blanked, not truncated");
        assert_eq!(after_clear, Intent::None);
        assert_eq!(emptied, Intent::None);
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
