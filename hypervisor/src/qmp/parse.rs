//! What QEMU's QMP lines say: the greeting, replies and events. Pure.

use serde_json::Value;

use super::{QmpError, QmpEvent};
use crate::qemu_info::QemuVersion;

/// Parses the greeting line into QEMU's version.
pub fn parse_greeting(line: &str) -> Result<QemuVersion, QmpError> {
    let value: Value = serde_json::from_str(line)
        .map_err(|e| QmpError::Protocol(format!("greeting is not JSON: {e}")))?;
    let q = value
        .pointer("/QMP/version/qemu")
        .ok_or_else(|| QmpError::Protocol(format!("not a QMP greeting: {}", shorten(line))))?;
    let field = |name| q.get(name).and_then(Value::as_u64).map(|v| v as u32);
    match (field("major"), field("minor"), field("micro")) {
        (Some(major), Some(minor), Some(micro)) => Ok(QemuVersion {
            major,
            minor,
            micro,
        }),
        _ => Err(QmpError::Protocol(format!(
            "greeting lacks a version: {}",
            shorten(line)
        ))),
    }
}

/// Whether a greeting offers out-of-band execution (capability `oob`). Pure.
pub fn offers_out_of_band(line: &str) -> bool {
    serde_json::from_str::<Value>(line)
        .ok()
        .and_then(|v| v.pointer("/QMP/capabilities")?.as_array().cloned())
        .is_some_and(|caps| caps.iter().any(|c| c == "oob"))
}

fn shorten(s: &str) -> String {
    s.chars().take(120).collect()
}

/// One parsed line from QEMU.
#[derive(Debug, PartialEq)]
pub enum Incoming {
    /// A reply.
    Reply {
        /// The id of an out-of-band command; none for an in-band one,
        /// whose reply is the next in order.
        id: Option<u64>,
        /// `return`, or QEMU's error.
        result: Result<Value, (String, String)>,
    },
    /// An event.
    Event(QmpEvent),
}

/// Classifies a line from QEMU. Pure.
pub fn parse_incoming(line: &str) -> Result<Incoming, QmpError> {
    let value: Value = serde_json::from_str(line)
        .map_err(|e| QmpError::Protocol(format!("line is not JSON ({e}): {}", shorten(line))))?;
    if let Some(name) = value.get("event").and_then(Value::as_str) {
        return Ok(Incoming::Event(QmpEvent {
            name: name.to_owned(),
            data: value.get("data").cloned().unwrap_or(Value::Null),
        }));
    }
    let id = value.get("id").and_then(Value::as_u64);
    if let Some(ret) = value.get("return") {
        return Ok(Incoming::Reply {
            id,
            result: Ok(ret.clone()),
        });
    }
    if let Some(err) = value.get("error") {
        let text = |k| {
            err.get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        return Ok(Incoming::Reply {
            id,
            result: Err((text("class"), text("desc"))),
        });
    }
    Err(QmpError::Protocol(format!(
        "reply has neither return nor error: {}",
        shorten(line)
    )))
}
