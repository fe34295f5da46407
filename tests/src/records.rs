//! Reading the agent's record files the way the agent does, for tests
//! that look at or tamper with them.

use std::path::Path;

use serde_json::Value;

/// The newest envelope in a record file: of the two copies a record file
/// holds, the one with the higher revision (a blank copy is skipped). A
/// file of the one-envelope layout is its own newest copy.
pub fn newest_record_envelope(path: &Path) -> Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    if let Ok(whole) = serde_json::from_slice::<Value>(&bytes) {
        return whole;
    }
    let half = bytes.len() / 2;
    [&bytes[..half], &bytes[half..]]
        .into_iter()
        .filter_map(|copy| serde_json::from_slice::<Value>(copy).ok())
        .max_by_key(|envelope| envelope["revision"].as_u64())
        .unwrap_or_else(|| panic!("{}: no readable copy", path.display()))
}
