//! The virtio memory balloon: asking the guest to give memory back to the
//! host (or take it again), and reading how much it has.

use serde_json::{Value, json};

use crate::qmp::{QmpClient, QmpError};

const MIB: u64 = 1 << 20;

/// Sets the guest's memory target; the guest's balloon driver then
/// inflates or deflates towards it, at its own pace.
pub async fn set_target(qmp: &QmpClient, target_mib: u64) -> Result<(), QmpError> {
    qmp.execute("balloon", Some(json!({ "value": target_mib * MIB })))
        .await
        .map(drop)
}

/// The memory the guest has now, in MiB (rounded down).
pub async fn actual_mib(qmp: &QmpClient) -> Result<u64, QmpError> {
    let reply = qmp.execute("query-balloon", None).await?;
    actual_from_reply(&reply)
        .map(|bytes| bytes / MIB)
        .ok_or_else(|| QmpError::Protocol(format!("query-balloon reply without actual: {reply}")))
}

/// `actual` (bytes) of a `query-balloon` reply. Pure.
pub fn actual_from_reply(reply: &Value) -> Option<u64> {
    reply.get("actual")?.as_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actual_is_read_in_bytes() {
        assert_eq!(
            actual_from_reply(&json!({"actual": 268435456})),
            Some(256 * MIB)
        );
        assert_eq!(actual_from_reply(&json!({})), None);
        assert_eq!(actual_from_reply(&json!({"actual": -1})), None);
    }
}
