//! The layout a runtime is stored and sent in, and the steps between its
//! versions. Pure.
//!
//! Every runtime read from outside the process (a record, a peer's
//! migration, a save file) comes through [`read`]: a runtime written by an
//! earlier release is brought up to this one's layout one step at a time,
//! on its JSON as stored (an older layout need not fit today's types), and
//! only then checked. A runtime sent to an older peer goes out through
//! [`write_as`], stepped down to the layout that peer reads.
//!
//! A change to the layout, or to what `argv::render_base` renders for an
//! existing runtime, is a new version with a step each way: the step
//! rewrites the stored `argv` too, so that a runtime is always checked
//! against the rendering of the layout it claims, and an agent upgrade
//! never invalidates the runtimes of running instances. The fixtures in
//! `tests/fixtures/runtimes` hold runtimes as each release wrote them.

use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

use super::Runtime;

/// The layout this agent writes.
pub const RUNTIME_FORMAT_VERSION: u32 = 2;
/// The oldest layout this agent reads.
pub const OLDEST_RUNTIME_FORMAT: u32 = 1;

/// The binary a version 1 runtime names for an older agent, which runs
/// its own binary in its place.
const V1_QEMU_BINARY: &str = "qemu-system-x86_64";

/// Why a stored runtime can't be read in, or written out for a peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// Written by a newer agent.
    #[error(
        "runtime format version {found} is newer than this agent reads ({OLDEST_RUNTIME_FORMAT} to {RUNTIME_FORMAT_VERSION}); upgrade the agent on this node"
    )]
    TooNew {
        /// Its version.
        found: u32,
    },
    /// Older than any this agent reads.
    #[error(
        "runtime format version {found} is older than this agent reads ({OLDEST_RUNTIME_FORMAT} to {RUNTIME_FORMAT_VERSION})"
    )]
    TooOld {
        /// Its version.
        found: u32,
    },
    /// Not a runtime: no object, or no format version.
    #[error("not a runtime: {0}")]
    NotARuntime(String),
    /// The layout doesn't match its version.
    #[error("runtime in format version {version} is malformed: {reason}")]
    Malformed {
        /// The version it claims.
        version: u32,
        /// What is wrong.
        reason: String,
    },
}

/// One step between two adjacent versions, on the stored JSON.
struct Step {
    /// Brings a runtime of the version before this step's up to it.
    up: fn(&mut Map<String, Value>) -> Result<(), String>,
    /// Takes a runtime of this step's version down to the one before.
    down: fn(&mut Map<String, Value>) -> Result<(), String>,
}

/// `STEPS[i]` goes between version `OLDEST_RUNTIME_FORMAT + i` and the
/// next.
const STEPS: [Step; (RUNTIME_FORMAT_VERSION - OLDEST_RUNTIME_FORMAT) as usize] = [
    // 2: the runtime names the QEMU version it was made on and no binary:
    // each node runs every runtime on its own QEMU.
    Step {
        up: |runtime| {
            let qemu = object(runtime, "qemu")?;
            qemu.remove("binary");
            Ok(())
        },
        down: |runtime| {
            let qemu = object(runtime, "qemu")?;
            qemu.insert("binary".into(), V1_QEMU_BINARY.into());
            Ok(())
        },
    },
];

fn object<'a>(
    parent: &'a mut Map<String, Value>,
    key: &str,
) -> Result<&'a mut Map<String, Value>, String> {
    parent
        .get_mut(key)
        .and_then(Value::as_object_mut)
        .ok_or_else(|| format!("no {key:?} object"))
}

/// The format version a stored runtime claims.
pub fn stored_version(value: &Value) -> Result<u32, FormatError> {
    value
        .get("format_version")
        .and_then(Value::as_u64)
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| FormatError::NotARuntime("no format_version".into()))
}

/// Reads a stored runtime of any version this agent knows, upgraded to
/// the current layout. The result still needs `Runtime::validate`.
pub fn read(mut value: Value) -> Result<Runtime, FormatError> {
    let found = stored_version(&value)?;
    if found > RUNTIME_FORMAT_VERSION {
        return Err(FormatError::TooNew { found });
    }
    if found < OLDEST_RUNTIME_FORMAT {
        return Err(FormatError::TooOld { found });
    }
    let Some(runtime) = value.as_object_mut() else {
        return Err(FormatError::NotARuntime("not an object".into()));
    };
    for version in found..RUNTIME_FORMAT_VERSION {
        let step = &STEPS[(version - OLDEST_RUNTIME_FORMAT) as usize];
        (step.up)(runtime).map_err(|reason| FormatError::Malformed { version, reason })?;
        runtime.insert("format_version".into(), (version + 1).into());
    }
    serde_json::from_value(value).map_err(|e| FormatError::Malformed {
        version: found,
        reason: e.to_string(),
    })
}

/// `runtime` in the layout of `version`, for a peer that reads no newer.
pub fn write_as(runtime: &Runtime, version: u32) -> Result<Value, FormatError> {
    if version > RUNTIME_FORMAT_VERSION {
        return Err(FormatError::TooNew { found: version });
    }
    if version < OLDEST_RUNTIME_FORMAT {
        return Err(FormatError::TooOld { found: version });
    }
    let mut value = serde_json::to_value(runtime).map_err(|e| FormatError::Malformed {
        version: RUNTIME_FORMAT_VERSION,
        reason: e.to_string(),
    })?;
    let object = value.as_object_mut().expect("a runtime is an object");
    for at in (version..RUNTIME_FORMAT_VERSION).rev() {
        let step = &STEPS[(at - OLDEST_RUNTIME_FORMAT) as usize];
        (step.down)(object).map_err(|reason| FormatError::Malformed {
            version: at + 1,
            reason,
        })?;
        object.insert("format_version".into(), at.into());
    }
    Ok(value)
}

/// For `#[serde(deserialize_with)]` on a stored runtime: reads it through
/// [`read`].
pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Runtime, D::Error> {
    read(Value::deserialize(deserializer)?).map_err(serde::de::Error::custom)
}

/// A runtime as stored in a container that deserializes its parts (a
/// save file's header), read through [`read`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored(pub Runtime);

impl<'de> Deserialize<'de> for Stored {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize(deserializer).map(Stored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::argv::render_base;
    use crate::runtime::generate;
    use crate::runtime::tests::{host, qemu_7_2};
    use crate::spec::tests::sample_spec;

    fn current() -> Runtime {
        generate(&sample_spec(), host(&qemu_7_2()), 1).unwrap()
    }

    #[test]
    fn a_version_1_runtime_reads_as_the_current_layout_and_validates() {
        let mut stored = serde_json::to_value(current()).unwrap();
        stored["format_version"] = 1.into();
        stored["qemu"]["binary"] = "/usr/bin/qemu-system-x86_64".into();

        let read = read(stored).unwrap();

        assert_eq!(read.format_version, RUNTIME_FORMAT_VERSION);
        assert_eq!(read, current());
        assert_eq!(read.argv, render_base(&read));
        assert_eq!(read.validate(), Ok(()));
    }

    #[test]
    fn a_runtime_written_for_an_older_peer_reads_back_the_same() {
        let runtime = current();

        let v1 = write_as(&runtime, 1).unwrap();

        assert_eq!(v1["format_version"], 1);
        assert_eq!(v1["qemu"]["binary"], V1_QEMU_BINARY);
        assert_eq!(read(v1).unwrap(), runtime);
        assert_eq!(
            write_as(&runtime, RUNTIME_FORMAT_VERSION).unwrap(),
            serde_json::to_value(&runtime).unwrap()
        );
    }

    #[test]
    fn versions_this_agent_does_not_know_are_refused_naming_them() {
        let mut newer = serde_json::to_value(current()).unwrap();
        newer["format_version"] = (RUNTIME_FORMAT_VERSION + 1).into();
        let refused = read(newer).unwrap_err();
        assert_eq!(
            refused,
            FormatError::TooNew {
                found: RUNTIME_FORMAT_VERSION + 1
            }
        );
        let text = refused.to_string();
        assert!(
            text.contains(&format!("{}", RUNTIME_FORMAT_VERSION + 1)),
            "{text}"
        );
        assert!(
            text.contains(&format!("1 to {RUNTIME_FORMAT_VERSION}")),
            "{text}"
        );

        let mut ancient = serde_json::to_value(current()).unwrap();
        ancient["format_version"] = 0.into();
        assert_eq!(read(ancient), Err(FormatError::TooOld { found: 0 }));
        assert!(matches!(
            read(serde_json::json!({ "name": "x" })),
            Err(FormatError::NotARuntime(_))
        ));
        assert!(write_as(&current(), RUNTIME_FORMAT_VERSION + 1).is_err());
    }

    #[test]
    fn a_version_1_runtime_without_its_qemu_is_malformed() {
        let mut stored = serde_json::to_value(current()).unwrap();
        stored["format_version"] = 1.into();
        stored.as_object_mut().unwrap().remove("qemu");

        assert!(matches!(
            read(stored),
            Err(FormatError::Malformed { version: 1, .. })
        ));
    }
}
