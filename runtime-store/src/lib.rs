//! Durable per-instance records: any serde type, stored one file per name in
//! a versioned, checksummed envelope, written atomically.
//!
//! This crate knows files and nothing about QEMU. A record file holds two
//! copies (see [`slots`]): a save overwrites the older one in place and
//! syncs its data, so a crash at any point leaves either the old or the new
//! record. A new file, or one whose record outgrew it, is written to a
//! temporary file, fsynced, renamed over the old one and the directory is
//! fsynced. A record that can't be read is moved to `quarantine/` and
//! reported; it is never deleted. [`journal`] keeps the cheaper intent
//! files that say which operation is under way, and [`savefile`] the
//! self-describing files a saved guest's state goes into.
#![deny(missing_docs)]

#[cfg(test)]
mod fuzz;
pub mod journal;
pub mod savefile;
mod slots;

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::{DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use xxhash_rust::xxh3::xxh3_64;

pub use journal::{Intent, IntentJournal};
use slots::Slots;

/// Written into every envelope so a stray JSON file is never taken for a record.
const ENVELOPE_FORMAT: &str = "kvm-agent-record";
/// Envelope layout version. Bump it when the envelope (not the payload) changes.
/// Version 2 checksums the revision with the payload; version 1 checksummed
/// the payload alone and is still read.
pub const ENVELOPE_VERSION: u32 = 2;
const RECORD_SUFFIX: &str = ".json";
const QUARANTINE_DIR: &str = "quarantine";

/// What can go wrong with a record.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The record name can't be a file name.
    #[error(
        "invalid record name {0:?}: use letters, digits, '-', '_' and '.', not starting with '.'"
    )]
    InvalidName(String),
    /// Reading or writing failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The payload could not be serialized.
    #[error("record {name:?} can't be serialized")]
    Serialize {
        /// Record name.
        name: String,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
    /// The record was unreadable and has been moved aside.
    #[error("record {name:?} is unreadable ({reason}); moved to {}", quarantined_to.display())]
    Corrupt {
        /// Record name.
        name: String,
        /// What was wrong with it.
        reason: String,
        /// Where the file now is.
        quarantined_to: PathBuf,
    },
}

impl StoreError {
    /// True when the underlying cause is a full disk or an exhausted quota,
    /// which callers report as a resource problem rather than a bug.
    pub fn is_out_of_space(&self) -> bool {
        match self {
            StoreError::Io { source, .. } => matches!(
                source.raw_os_error(),
                Some(libc_errno::ENOSPC) | Some(libc_errno::EDQUOT)
            ),
            _ => false,
        }
    }
}

/// The two errno values `is_out_of_space` looks for (Linux numbering).
mod libc_errno {
    pub const ENOSPC: i32 = 28;
    pub const EDQUOT: i32 = 122;
}

/// A record as loaded: its payload and the revision it was written with.
#[derive(Debug, Clone, PartialEq)]
pub struct Record<T> {
    /// Record name (file stem).
    pub name: String,
    /// Counts the writes of this name, starting at 1.
    pub revision: u64,
    /// The stored value.
    pub value: T,
}

#[derive(Serialize)]
struct EnvelopeOut<'a> {
    format: &'static str,
    version: u32,
    revision: u64,
    sha256: String,
    payload: &'a RawValue,
}

#[derive(Deserialize)]
struct EnvelopeIn {
    format: String,
    version: u32,
    revision: u64,
    sha256: String,
    payload: Box<RawValue>,
}

/// A directory of records of one kind.
#[derive(Debug)]
pub struct RecordStore {
    dir: PathBuf,
    quarantine: PathBuf,
    /// One entry per name read or written, `None` until its file was
    /// looked at; its lock serializes the saves of that name, which must
    /// never write the same slot at once.
    known: Mutex<HashMap<String, Arc<Mutex<Option<Known>>>>>,
    temp_counter: AtomicU64,
}

/// What the store knows of a record's file.
#[derive(Debug)]
struct Known {
    /// The newest revision, 0 when there is none.
    revision: u64,
    /// The file, when it has slots and the newest copy was readable.
    file: Option<SlottedFile>,
}

/// A slotted record file as the store last read or wrote it. A save
/// writes in place only while the copy it keeps is the one it knows: a
/// file changed behind its back (by another store on the same directory)
/// is written anew. Inode numbers are reused and change times are coarse,
/// so the copy itself is compared.
#[derive(Debug, Clone, Copy)]
struct SlottedFile {
    slots: Slots,
    /// The xxh3 of the slot holding the newest copy.
    newest_copy: u64,
}

impl SlottedFile {
    /// The file `bytes` are, its newest copy where `slots` says.
    fn of(slots: Slots, bytes: &[u8]) -> Self {
        let start = slots.offset(slots.newest) as usize;
        SlottedFile {
            slots,
            newest_copy: xxh3_64(&bytes[start..start + slots.size]),
        }
    }
}

/// The newest readable copy in a record file.
struct Copy<T> {
    revision: u64,
    value: T,
    slots: Option<Slots>,
    /// What was wrong with the other copy, when it was damaged.
    damaged: Option<String>,
}

impl RecordStore {
    /// Opens (creating if needed) `state_dir/kind/`, with quarantined files
    /// going to `state_dir/quarantine/`.
    pub fn open(state_dir: &Path, kind: &str) -> Result<Self, StoreError> {
        let dir = state_dir.join(kind);
        let quarantine = state_dir.join(QUARANTINE_DIR);
        for d in [&dir, &quarantine] {
            fs::create_dir_all(d).map_err(|source| StoreError::Io {
                op: "create directory",
                path: d.clone(),
                source,
            })?;
        }
        Ok(Self {
            dir,
            quarantine,
            known: Mutex::new(HashMap::new()),
            temp_counter: AtomicU64::new(0),
        })
    }

    /// The directory holding the records.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where a record of this name lives.
    pub fn path_of(&self, name: &str) -> Result<PathBuf, StoreError> {
        check_name(name)?;
        Ok(self.dir.join(format!("{name}{RECORD_SUFFIX}")))
    }

    /// Writes `value` as the next revision of `name`, durably.
    ///
    /// Returns the new revision. On error the previous record is still
    /// the one read, unless the disk failed after taking the new one.
    pub fn save<T: Serialize>(&self, name: &str, value: &T) -> Result<u64, StoreError> {
        let path = self.path_of(name)?;
        let entry = self.entry(name);
        let mut entry = lock(&entry);
        let known = entry.get_or_insert_with(|| probe(&path));
        let revision = known.revision + 1;
        let envelope = encode_envelope(name, revision, value)?;
        let in_place = known
            .file
            .and_then(|at| Some((at, slots::fill(&envelope, at.slots.size)?)));
        let written = match in_place {
            Some((at, slot)) if write_in_place(&path, at, &slot)? => SlottedFile {
                slots: Slots {
                    newest: at.slots.next(),
                    ..at.slots
                },
                newest_copy: xxh3_64(&slot),
            },
            _ => self.write_new_file(name, &path, &envelope)?,
        };
        *known = Known {
            revision,
            file: Some(written),
        };
        Ok(revision)
    }

    /// Writes a new file holding `envelope` in its first slot.
    fn write_new_file(
        &self,
        name: &str,
        path: &Path,
        envelope: &[u8],
    ) -> Result<SlottedFile, StoreError> {
        let (bytes, slots) = slots::new_file(envelope);
        let temp = self.dir.join(format!(
            ".{name}.tmp.{}.{}",
            std::process::id(),
            self.temp_counter.fetch_add(1, Ordering::Relaxed)
        ));
        let result = write_durably(&temp, path, &self.dir, &bytes);
        if result.is_err() {
            // Best effort: the temp file is garbage either way.
            let _ = fs::remove_file(&temp);
        }
        result.map(|()| SlottedFile::of(slots, &bytes))
    }

    /// Loads `name`. `Ok(None)` when there is no record. A record that fails
    /// its checks is quarantined and returned as [`StoreError::Corrupt`].
    pub fn load<T: DeserializeOwned>(&self, name: &str) -> Result<Option<Record<T>>, StoreError> {
        let path = self.path_of(name)?;
        let bytes = match read_file(&path) {
            Ok(Some(read)) => read,
            Ok(None) => return Ok(None),
            Err(source) => {
                return Err(StoreError::Io {
                    op: "read",
                    path,
                    source,
                });
            }
        };
        match decode_file::<T>(&bytes) {
            Ok(Copy {
                revision,
                value,
                slots,
                damaged,
            }) => {
                if let Some(problem) = damaged {
                    tracing::warn!(record = name, revision, %problem, "reading the record's other copy");
                }
                let entry = self.entry(name);
                let mut known = lock(&entry);
                // A save since the read knows better.
                if known.as_ref().is_none_or(|k| k.revision < revision) {
                    *known = Some(Known {
                        revision,
                        file: slots.map(|slots| SlottedFile::of(slots, &bytes)),
                    });
                }
                Ok(Some(Record {
                    name: name.to_owned(),
                    revision,
                    value,
                }))
            }
            Err(reason) => Err(self.quarantine(name, &path, reason)),
        }
    }

    /// The names of the records that were set aside, sorted, each once.
    pub fn quarantined_names(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(&self.quarantine)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter_map(|e| {
                        let file = e.file_name().into_string().ok()?;
                        let (stem, _) = file.rsplit_once(RECORD_SUFFIX)?;
                        check_name(stem).ok()?;
                        Some(stem.to_owned())
                    })
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names.dedup();
        names
    }

    /// What is left of the newest record of `name` that was set aside:
    /// its payload, read without the checksum that failed, with the path
    /// of the file. Only for a caller that checks the value against
    /// something else it trusts.
    pub fn salvage<T: DeserializeOwned>(&self, name: &str) -> Result<(PathBuf, T), String> {
        check_name(name).map_err(|e| e.to_string())?;
        let prefix = format!("{name}{RECORD_SUFFIX}.");
        let newest = fs::read_dir(&self.quarantine)
            .map_err(|e| format!("can't list {}: {e}", self.quarantine.display()))?
            .filter_map(Result::ok)
            .filter_map(|e| {
                let file = e.file_name().into_string().ok()?;
                let stamp: u64 = file.strip_prefix(&prefix)?.parse().ok()?;
                Some((stamp, e.path()))
            })
            .max()
            .map(|(_, path)| path)
            .ok_or_else(|| format!("no record of {name:?} was set aside"))?;
        let bytes = fs::read(&newest).map_err(|e| format!("{}: {e}", newest.display()))?;
        let envelope = newest_envelope_unchecked(&bytes)
            .map_err(|e| format!("{}: not a record envelope: {e}", newest.display()))?;
        let value = serde_json::from_str(envelope.payload.get())
            .map_err(|e| format!("{}: {e}", newest.display()))?;
        Ok((newest, value))
    }

    /// Loads every record. Unreadable ones are quarantined and returned as
    /// errors beside the good ones, so one bad file never hides the others.
    pub fn load_all<T: DeserializeOwned>(&self) -> (Vec<Record<T>>, Vec<StoreError>) {
        let mut records = Vec::new();
        let mut errors = Vec::new();
        let names = match self.names() {
            Ok(n) => n,
            Err(e) => return (records, vec![e]),
        };
        for name in names {
            match self.load(&name) {
                Ok(Some(r)) => records.push(r),
                Ok(None) => {}
                Err(e) => errors.push(e),
            }
        }
        (records, errors)
    }

    /// Names of all records present, sorted.
    pub fn names(&self) -> Result<Vec<String>, StoreError> {
        let entries = fs::read_dir(&self.dir).map_err(|source| StoreError::Io {
            op: "list",
            path: self.dir.clone(),
            source,
        })?;
        let mut names: Vec<String> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let file = e.file_name().into_string().ok()?;
                let stem = file.strip_suffix(RECORD_SUFFIX)?;
                check_name(stem).ok()?;
                Some(stem.to_owned())
            })
            .collect();
        names.sort();
        Ok(names)
    }

    /// Removes the record of `name`, durably. Missing records are fine.
    pub fn remove(&self, name: &str) -> Result<(), StoreError> {
        let path = self.path_of(name)?;
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(StoreError::Io {
                    op: "remove",
                    path,
                    source,
                });
            }
        }
        sync_dir(&self.dir)?;
        lock(&self.known).remove(name);
        Ok(())
    }

    fn entry(&self, name: &str) -> Arc<Mutex<Option<Known>>> {
        lock(&self.known)
            .entry(name.to_owned())
            .or_default()
            .clone()
    }

    fn quarantine(&self, name: &str, path: &Path, reason: String) -> StoreError {
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let target = self
            .quarantine
            .join(format!("{name}{RECORD_SUFFIX}.{stamp}"));
        tracing::warn!(record = name, %reason, to = %target.display(), "quarantining unreadable record");
        if let Err(source) =
            fs::rename(path, &target).and_then(|()| sync_dir(&self.dir).map_err(io_of))
        {
            return StoreError::Io {
                op: "quarantine",
                path: path.to_owned(),
                source,
            };
        }
        lock(&self.known).remove(name);
        StoreError::Corrupt {
            name: name.to_owned(),
            reason,
            quarantined_to: target,
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the store needs to know of a file it hasn't read: the revision to
/// go on from, so revisions keep growing across agent restarts, and the
/// slots, where the newest copy is readable. A file that isn't is
/// rewritten whole at the next save.
fn probe(path: &Path) -> Known {
    let Ok(Some(bytes)) = read_file(path) else {
        return Known {
            revision: 0,
            file: None,
        };
    };
    match decode_file::<IgnoredAny>(&bytes) {
        Ok(copy) => Known {
            revision: copy.revision,
            file: copy.slots.map(|slots| SlottedFile::of(slots, &bytes)),
        },
        Err(_) => Known {
            revision: newest_envelope_unchecked(&bytes).map_or(0, |e| e.revision),
            file: None,
        },
    }
}

/// A record file's bytes, or `None` when there is no file.
fn read_file(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Reads a record file of either layout: its newest intact copy. A
/// slotted file's other copy may be damaged by a write a crash cut short;
/// that is expected, and only said in the copy read. An intact copy this
/// agent can't read (a newer format, another payload type) is an error,
/// never a reason to fall back to an older one. Pure.
fn decode_file<T: DeserializeOwned>(bytes: &[u8]) -> Result<Copy<T>, String> {
    let Some(halves) = slots::split(bytes) else {
        let (revision, value) = decode_envelope(bytes)?;
        return Ok(Copy {
            revision,
            value,
            slots: None,
            damaged: None,
        });
    };
    let mut newest: Option<(usize, EnvelopeIn)> = None;
    let mut damaged = Vec::new();
    for (slot, half) in halves.iter().enumerate() {
        if slots::is_blank(half) {
            continue;
        }
        match verify_envelope(half) {
            Ok(envelope) => {
                if newest
                    .as_ref()
                    .is_none_or(|(_, n)| envelope.revision > n.revision)
                {
                    newest = Some((slot, envelope));
                }
            }
            Err(problem) if problem.damaged => {
                damaged.push(format!("copy {}: {}", slot + 1, problem.reason));
            }
            Err(problem) => return Err(format!("copy {}: {}", slot + 1, problem.reason)),
        }
    }
    let Some((slot, envelope)) = newest else {
        // A file of the one-envelope layout whose size happens to split.
        return decode_envelope(bytes)
            .map(|(revision, value)| Copy {
                revision,
                value,
                slots: None,
                damaged: None,
            })
            .map_err(|_| match damaged.is_empty() {
                true => "both copies are blank".to_owned(),
                false => damaged.join("; "),
            });
    };
    Ok(Copy {
        revision: envelope.revision,
        value: payload_of(&envelope)?,
        slots: Some(Slots {
            size: halves[0].len(),
            newest: slot,
        }),
        damaged: (!damaged.is_empty()).then(|| damaged.join("; ")),
    })
}

/// The newest envelope in a file of either layout, read without its
/// checksum: for salvage, and for the revision to go on from.
fn newest_envelope_unchecked(bytes: &[u8]) -> Result<EnvelopeIn, serde_json::Error> {
    let Some(halves) = slots::split(bytes) else {
        return serde_json::from_slice(bytes);
    };
    let [first, second] = halves.map(serde_json::from_slice::<EnvelopeIn>);
    match (first, second) {
        (Ok(a), Ok(b)) => Ok(if b.revision > a.revision { b } else { a }),
        (Ok(one), Err(_)) | (Err(_), Ok(one)) => Ok(one),
        (Err(_), Err(_)) => serde_json::from_slice(bytes),
    }
}

/// Overwrites the older copy of a slotted file with `slot` and syncs its
/// data. `Ok(false)` when the file is no longer the one `at` describes
/// (gone or replaced), for the caller to write anew.
fn write_in_place(path: &Path, at: SlottedFile, slot: &[u8]) -> Result<bool, StoreError> {
    let io_err = |op| {
        let path = path.to_owned();
        move |source| StoreError::Io { op, path, source }
    };
    let file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(source) => return Err(io_err("open")(source)),
    };
    let size = file.metadata().map_err(io_err("stat"))?.len();
    if size != 2 * at.slots.size as u64 {
        return Ok(false);
    }
    let mut kept = vec![0; at.slots.size];
    file.read_exact_at(&mut kept, at.slots.offset(at.slots.newest))
        .map_err(io_err("read"))?;
    if xxh3_64(&kept) != at.newest_copy {
        return Ok(false);
    }
    file.write_all_at(slot, at.slots.offset(at.slots.next()))
        .map_err(io_err("write"))?;
    file.sync_data().map_err(io_err("fdatasync"))?;
    Ok(true)
}

fn io_of(e: StoreError) -> io::Error {
    match e {
        StoreError::Io { source, .. } => source,
        other => io::Error::other(other.to_string()),
    }
}

/// Record names become file names, so they are held to a safe alphabet.
pub(crate) fn check_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::InvalidName(name.to_owned()))
    }
}

fn checksum(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The checksum an envelope of `version` carries.
fn envelope_digest(version: u32, revision: u64, payload: &str) -> String {
    match version {
        1 => checksum(payload.as_bytes()),
        _ => {
            let mut covered = revision.to_le_bytes().to_vec();
            covered.extend_from_slice(payload.as_bytes());
            checksum(&covered)
        }
    }
}

/// Encodes a value into the on-disk envelope. Pure; exposed for tests and
/// tools that inspect records.
pub fn encode_envelope<T: Serialize>(
    name: &str,
    revision: u64,
    value: &T,
) -> Result<Vec<u8>, StoreError> {
    let serialize_err = |source| StoreError::Serialize {
        name: name.to_owned(),
        source,
    };
    let payload = serde_json::to_string(value).map_err(serialize_err)?;
    let raw = RawValue::from_string(payload).map_err(serialize_err)?;
    let envelope = EnvelopeOut {
        format: ENVELOPE_FORMAT,
        version: ENVELOPE_VERSION,
        revision,
        sha256: envelope_digest(ENVELOPE_VERSION, revision, raw.get()),
        payload: &raw,
    };
    let mut bytes = serde_json::to_vec_pretty(&envelope).map_err(serialize_err)?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// Decodes and verifies an envelope. Pure; the error says what was wrong.
pub fn decode_envelope<T: DeserializeOwned>(bytes: &[u8]) -> Result<(u64, T), String> {
    let envelope = verify_envelope(bytes).map_err(|problem| problem.reason)?;
    Ok((envelope.revision, payload_of(&envelope)?))
}

/// Why an envelope didn't pass its checks.
struct EnvelopeProblem {
    /// Whether the bytes are damaged (not JSON, or a checksum that fails),
    /// as a write cut short leaves them, rather than intact but of a
    /// format this agent doesn't read.
    damaged: bool,
    reason: String,
}

/// Parses an envelope and checks its format, version and checksum.
fn verify_envelope(bytes: &[u8]) -> Result<EnvelopeIn, EnvelopeProblem> {
    let problem = |damaged, reason| EnvelopeProblem { damaged, reason };
    let envelope: EnvelopeIn = serde_json::from_slice(bytes)
        .map_err(|e| problem(true, format!("not a record envelope: {e}")))?;
    if envelope.format != ENVELOPE_FORMAT {
        return Err(problem(
            false,
            format!("unknown format {:?}", envelope.format),
        ));
    }
    if !(1..=ENVELOPE_VERSION).contains(&envelope.version) {
        return Err(problem(
            false,
            format!(
                "envelope version {} is not supported (this agent reads {ENVELOPE_VERSION})",
                envelope.version
            ),
        ));
    }
    let actual = envelope_digest(envelope.version, envelope.revision, envelope.payload.get());
    if actual != envelope.sha256 {
        return Err(problem(
            true,
            format!(
                "checksum mismatch: stored {}, computed {actual}",
                envelope.sha256
            ),
        ));
    }
    Ok(envelope)
}

fn payload_of<T: DeserializeOwned>(envelope: &EnvelopeIn) -> Result<T, String> {
    serde_json::from_str(envelope.payload.get())
        .map_err(|e| format!("payload doesn't match the expected type: {e}"))
}

fn write_durably(temp: &Path, target: &Path, dir: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let io_err = |op, path: &Path| {
        let path = path.to_owned();
        move |source| StoreError::Io { op, path, source }
    };
    let mut file: File = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(temp)
        .map_err(io_err("create", temp))?;
    file.write_all(bytes).map_err(io_err("write", temp))?;
    file.sync_all().map_err(io_err("fsync", temp))?;
    drop(file);
    fs::rename(temp, target).map_err(io_err("rename", target))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| StoreError::Io {
            op: "fsync directory",
            path: dir.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Sample {
        memory: u64,
        label: String,
    }

    fn sample(memory: u64) -> Sample {
        Sample {
            memory,
            label: "web, \"quoted\"".into(),
        }
    }

    #[test]
    fn save_then_load_round_trips_and_counts_revisions() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::open(dir.path(), "runtime").unwrap();

        assert_eq!(store.save("web1", &sample(128)).unwrap(), 1);
        assert_eq!(store.save("web1", &sample(256)).unwrap(), 2);

        let rec: Record<Sample> = store.load("web1").unwrap().unwrap();
        assert_eq!(rec.revision, 2);
        assert_eq!(rec.value, sample(256));
    }

    #[test]
    fn revisions_continue_across_store_instances() {
        let dir = tempfile::tempdir().unwrap();
        RecordStore::open(dir.path(), "runtime")
            .unwrap()
            .save("a", &sample(1))
            .unwrap();

        let reopened = RecordStore::open(dir.path(), "runtime").unwrap();

        assert_eq!(reopened.save("a", &sample(2)).unwrap(), 2);
    }

    #[test]
    fn missing_record_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::open(dir.path(), "runtime").unwrap();

        assert!(store.load::<Sample>("nope").unwrap().is_none());
    }

    #[test]
    fn flipped_byte_is_quarantined_not_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::open(dir.path(), "runtime").unwrap();
        store.save("web1", &sample(128)).unwrap();
        let path = store.path_of("web1").unwrap();
        let text = fs::read_to_string(&path).unwrap().replace("128", "129");
        fs::write(&path, &text).unwrap();

        let err = store.load::<Sample>("web1").unwrap_err();

        let StoreError::Corrupt {
            quarantined_to,
            reason,
            ..
        } = err
        else {
            panic!("expected Corrupt, got {err:?}");
        };
        assert!(reason.contains("checksum mismatch"), "{reason}");
        assert!(!path.exists());
        assert_eq!(fs::read_to_string(quarantined_to).unwrap(), text);
    }

    #[test]
    fn truncated_record_is_quarantined() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::open(dir.path(), "runtime").unwrap();
        store.save("web1", &sample(128)).unwrap();
        let path = store.path_of("web1").unwrap();
        let text = fs::read_to_string(&path).unwrap();
        let envelope = text.trim_end();
        fs::write(&path, &envelope[..envelope.len() / 2]).unwrap();

        let err = store.load::<Sample>("web1").unwrap_err();

        assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
        assert_eq!(
            fs::read_dir(dir.path().join("quarantine")).unwrap().count(),
            1
        );
    }

    #[test]
    fn a_record_set_aside_for_its_checksum_can_be_salvaged() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::open(dir.path(), "runtime").unwrap();
        store.save("x", &sample(7)).unwrap();
        let path = store.path_of("x").unwrap();
        let text = fs::read_to_string(&path).unwrap();
        let digest = text.find("\"sha256\": \"").unwrap() + 11;
        let mut bytes = text.into_bytes();
        bytes[digest] = if bytes[digest] == b'0' { b'1' } else { b'0' };
        fs::write(&path, bytes).unwrap();
        assert!(store.load::<Sample>("x").is_err());

        let (from, salvaged) = store.salvage::<Sample>("x").unwrap();

        assert_eq!(salvaged, sample(7));
        assert!(from.starts_with(dir.path().join("quarantine")));
        assert_eq!(store.quarantined_names(), ["x"]);
        assert!(store.salvage::<Sample>("y").is_err());
    }

    #[test]
    fn load_all_returns_good_records_beside_bad_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::open(dir.path(), "runtime").unwrap();
        store.save("good", &sample(1)).unwrap();
        fs::write(store.path_of("bad").unwrap(), b"{not json").unwrap();

        let (records, errors) = store.load_all::<Sample>();

        assert_eq!(records.len(), 1);
        assert_eq!(records[0].name, "good");
        assert_eq!(errors.len(), 1);
    }

    #[test]
    fn wrong_payload_type_is_reported_as_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::open(dir.path(), "runtime").unwrap();
        store.save("x", &"just a string").unwrap();

        let err = store.load::<Sample>("x").unwrap_err();

        assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
    }

    #[test]
    fn newer_envelope_version_is_refused() {
        let bytes = encode_envelope("x", 1, &sample(1)).unwrap();
        let text = String::from_utf8(bytes)
            .unwrap()
            .replace("\"version\": 2", "\"version\": 9");

        let err = decode_envelope::<Sample>(text.as_bytes()).unwrap_err();

        assert!(err.contains("version 9"), "{err}");
    }

    #[test]
    fn a_version_1_envelope_is_still_read() {
        let payload = serde_json::to_string(&sample(64)).unwrap();
        let v1 = format!(
            r#"{{"format": "{ENVELOPE_FORMAT}", "version": 1, "revision": 3, "sha256": "{}", "payload": {payload}}}"#,
            checksum(payload.as_bytes())
        );

        let (revision, value) = decode_envelope::<Sample>(v1.as_bytes()).unwrap();

        assert_eq!((revision, value), (3, sample(64)));
    }

    #[test]
    fn a_changed_revision_fails_the_checksum() {
        let bytes = encode_envelope("x", 7, &sample(1)).unwrap();
        let text = String::from_utf8(bytes)
            .unwrap()
            .replace("\"revision\": 7", "\"revision\": 17");

        let err = decode_envelope::<Sample>(text.as_bytes()).unwrap_err();

        assert!(err.contains("checksum"), "{err}");
    }

    #[test]
    fn names_that_escape_the_directory_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::open(dir.path(), "runtime").unwrap();

        for bad in ["../x", "a/b", ".hidden", "", "a b"] {
            assert!(
                matches!(store.save(bad, &sample(1)), Err(StoreError::InvalidName(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn remove_deletes_and_forgets_revision() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::open(dir.path(), "runtime").unwrap();
        store.save("a", &sample(1)).unwrap();

        store.remove("a").unwrap();

        assert!(store.load::<Sample>("a").unwrap().is_none());
        assert_eq!(store.save("a", &sample(1)).unwrap(), 1);
    }

    /// The revisions of the copies in a slotted record file, in slot order.
    fn copies(path: &Path) -> [Option<u64>; 2] {
        let bytes = fs::read(path).unwrap();
        let halves = slots::split(&bytes).expect("a slotted file");
        halves.map(|half| decode_envelope::<Sample>(half).ok().map(|(r, _)| r))
    }

    #[test]
    fn saves_alternate_between_two_copies_in_the_same_file() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::open(dir.path(), "runtime").unwrap();
        store.save("web1", &sample(1)).unwrap();
        let path = store.path_of("web1").unwrap();
        let created = fs::metadata(&path).unwrap();

        assert_eq!(copies(&path), [Some(1), None]);
        store.save("web1", &sample(2)).unwrap();
        assert_eq!(copies(&path), [Some(1), Some(2)]);
        store.save("web1", &sample(3)).unwrap();
        assert_eq!(copies(&path), [Some(3), Some(2)]);

        let now = fs::metadata(&path).unwrap();
        assert_eq!((now.ino(), now.len()), (created.ino(), created.len()));
        let reopened = RecordStore::open(dir.path(), "runtime").unwrap();
        let rec: Record<Sample> = reopened.load("web1").unwrap().unwrap();
        assert_eq!((rec.revision, rec.value), (3, sample(3)));
        assert_eq!(reopened.save("web1", &sample(4)).unwrap(), 4);
        assert_eq!(copies(&path), [Some(3), Some(4)]);
    }

    #[test]
    fn a_copy_torn_by_a_crash_leaves_the_other_one_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::open(dir.path(), "runtime").unwrap();
        store.save("web1", &sample(1)).unwrap();
        store.save("web1", &sample(2)).unwrap();
        let path = store.path_of("web1").unwrap();
        // The third save was cut short halfway through the first copy.
        let mut bytes = fs::read(&path).unwrap();
        bytes[40..2048].fill(b'x');
        fs::write(&path, &bytes).unwrap();

        let reopened = RecordStore::open(dir.path(), "runtime").unwrap();
        let rec: Record<Sample> = reopened.load("web1").unwrap().unwrap();
        assert_eq!((rec.revision, rec.value), (2, sample(2)));
        assert_eq!(reopened.save("web1", &sample(3)).unwrap(), 3);
        assert_eq!(copies(&path), [Some(3), Some(2)]);
        assert_eq!(
            fs::read_dir(dir.path().join("quarantine")).unwrap().count(),
            0
        );
    }

    #[test]
    fn an_intact_newest_copy_that_cant_be_read_is_never_passed_over() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::open(dir.path(), "runtime").unwrap();
        store.save("web1", &sample(1)).unwrap();
        store
            .save(
                "web1",
                &serde_json::json!({ "written_by": "a newer agent" }),
            )
            .unwrap();

        let err = store.load::<Sample>("web1").unwrap_err();

        assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
    }

    #[test]
    fn a_file_replaced_behind_the_stores_back_is_written_anew_not_into() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::open(dir.path(), "runtime").unwrap();
        store.save("web1", &sample(1)).unwrap();
        store.save("web1", &sample(2)).unwrap();
        // Another writer makes a new file whose other copy has a higher
        // revision than this store would write.
        let other = RecordStore::open(dir.path(), "runtime").unwrap();
        other.remove("web1").unwrap();
        for memory in 10..15 {
            other.save("web1", &sample(memory)).unwrap();
        }

        store.save("web1", &sample(99)).unwrap();

        let reopened = RecordStore::open(dir.path(), "runtime").unwrap();
        let rec: Record<Sample> = reopened.load("web1").unwrap().unwrap();
        assert_eq!(rec.value, sample(99));
    }

    #[test]
    fn a_record_of_the_one_envelope_layout_is_read_then_written_in_slots() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::open(dir.path(), "runtime").unwrap();
        let path = store.path_of("old").unwrap();
        fs::write(&path, encode_envelope("old", 5, &sample(64)).unwrap()).unwrap();

        let rec: Record<Sample> = store.load("old").unwrap().unwrap();
        assert_eq!((rec.revision, rec.value), (5, sample(64)));
        assert_eq!(store.save("old", &sample(128)).unwrap(), 6);
        assert_eq!(copies(&path), [Some(6), None]);
    }

    #[test]
    fn a_record_that_outgrows_its_slots_is_written_anew() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::open(dir.path(), "runtime").unwrap();
        store.save("web1", &sample(1)).unwrap();
        let path = store.path_of("web1").unwrap();
        let small = fs::metadata(&path).unwrap().len();
        let big = Sample {
            memory: 2,
            label: "x".repeat(5000),
        };

        store.save("web1", &big).unwrap();

        assert!(fs::metadata(&path).unwrap().len() > small);
        assert_eq!(copies(&path), [Some(2), None]);
        let rec: Record<Sample> = store.load("web1").unwrap().unwrap();
        assert_eq!(rec.value, big);
    }

    #[test]
    fn concurrent_saves_of_one_name_never_spoil_both_copies() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RecordStore::open(dir.path(), "runtime").unwrap());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for i in 0..25 {
                        store.save("web1", &sample(t * 100 + i)).unwrap();
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());

        let path = store.path_of("web1").unwrap();
        assert_eq!(copies(&path), [Some(99), Some(100)]);
        let reopened = RecordStore::open(dir.path(), "runtime").unwrap();
        assert_eq!(
            reopened.load::<Sample>("web1").unwrap().unwrap().revision,
            100
        );
    }
}
