//! A client of the QEMU guest agent (`qemu-ga`) that runs inside a guest,
//! reached through the virtio-serial channel QEMU serves on a socket in the
//! instance's run directory.
//!
//! The channel is a byte pipe that outlives every client: a reply meant for
//! a client that gave up may still be in it. So each connection starts with
//! `guest-sync-delimited`, whose reply follows a 0xFF byte the agent sends
//! first, and everything before that reply is dropped.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// What the guest agent answers, or why it didn't.
#[derive(Debug, thiserror::Error)]
pub enum GuestAgentError {
    /// The instance has no guest agent channel.
    #[error("the instance has no guest agent channel; start it with the guest agent on")]
    NoChannel,
    /// The channel's socket can't be reached.
    #[error("can't reach the guest agent channel: {0}")]
    Connect(#[source] std::io::Error),
    /// Nothing answered in time: no qemu-ga runs in the guest, or it hangs.
    #[error(
        "the guest agent didn't answer {command} within {after:?}; install and start qemu-guest-agent in the guest"
    )]
    Timeout {
        /// The command.
        command: String,
        /// How long it waited.
        after: Duration,
    },
    /// The channel broke or carried something that isn't a reply.
    #[error("the guest agent channel failed during {command}: {reason}")]
    Channel {
        /// The command.
        command: String,
        /// What went wrong.
        reason: String,
    },
    /// The guest agent refused the command.
    #[error("the guest agent refused {command}: {message}")]
    Refused {
        /// The command.
        command: String,
        /// The guest's own words.
        message: String,
    },
}

/// Sends `command` to the guest agent on `socket` and returns its reply's
/// `return` value, all within `timeout`.
pub async fn execute(
    socket: &Path,
    command: &str,
    timeout: Duration,
) -> Result<Value, GuestAgentError> {
    let timed_out = || GuestAgentError::Timeout {
        command: command.to_owned(),
        after: timeout,
    };
    tokio::time::timeout(timeout, exchange(socket, command))
        .await
        .map_err(|_| timed_out())?
}

async fn exchange(socket: &Path, command: &str) -> Result<Value, GuestAgentError> {
    let channel = |reason: String| GuestAgentError::Channel {
        command: command.to_owned(),
        reason,
    };
    let stream = UnixStream::connect(socket)
        .await
        .map_err(GuestAgentError::Connect)?;
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let sync_id = u64::from(std::process::id()) << 20 | u64::from(rand_u16());
    let mut request = vec![0xFF];
    request.extend(sync_request(sync_id).to_string().into_bytes());
    request.push(b'\n');
    write
        .write_all(&request)
        .await
        .map_err(|e| channel(e.to_string()))?;
    // Whatever came before the delimiter is a reply nobody waits for.
    let mut skipped = Vec::new();
    read.read_until(0xFF, &mut skipped)
        .await
        .map_err(|e| channel(e.to_string()))?;
    let synced = read_reply(&mut read).await.map_err(channel)?;
    if reply_value(&synced, "guest-sync-delimited")? != json!(sync_id) {
        return Err(channel(format!("guest-sync answered {synced}")));
    }
    let message = json!({ "execute": command }).to_string() + "\n";
    write
        .write_all(message.as_bytes())
        .await
        .map_err(|e| channel(e.to_string()))?;
    let reply = read_reply(&mut read).await.map_err(channel)?;
    reply_value(&reply, command)
}

async fn read_reply(
    read: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
) -> Result<Value, String> {
    let mut line = Vec::new();
    let n = read
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| e.to_string())?;
    if n == 0 {
        return Err("the channel closed".into());
    }
    serde_json::from_slice(&line)
        .map_err(|e| format!("not JSON ({e}): {:?}", String::from_utf8_lossy(&line)))
}

/// The `guest-sync-delimited` request with `id`. Pure.
pub fn sync_request(id: u64) -> Value {
    json!({ "execute": "guest-sync-delimited", "arguments": { "id": id } })
}

/// The `return` value of a reply to `command`, or the guest's refusal.
/// Pure.
pub fn reply_value(reply: &Value, command: &str) -> Result<Value, GuestAgentError> {
    if let Some(value) = reply.get("return") {
        return Ok(value.clone());
    }
    let message = reply
        .pointer("/error/desc")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| reply.to_string());
    Err(GuestAgentError::Refused {
        command: command.to_owned(),
        message,
    })
}

/// A cheap varying number, so a stale sync reply from an earlier client
/// can't pass for this one's.
fn rand_u16() -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    (nanos >> 4) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_gives_its_return_and_a_refusal_the_guests_words() {
        assert_eq!(
            reply_value(&json!({"return": 2}), "guest-fsfreeze-freeze").unwrap(),
            json!(2)
        );
        let refused = reply_value(
            &json!({"error": {"class": "GenericError", "desc": "freeze hook failed"}}),
            "guest-fsfreeze-freeze",
        )
        .unwrap_err();
        assert_eq!(
            refused.to_string(),
            "the guest agent refused guest-fsfreeze-freeze: freeze hook failed"
        );
    }

    #[tokio::test]
    async fn a_stale_reply_in_the_channel_is_skipped_and_silence_times_out() {
        use tokio::io::AsyncReadExt;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qga.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let guest = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = stream.read(&mut buf).await.unwrap();
            let text = String::from_utf8_lossy(&buf[1..n]).into_owned();
            let id = serde_json::from_str::<Value>(text.trim()).unwrap()["arguments"]["id"].clone();
            // A reply left over from a client that gave up, then the sync.
            let mut bytes = b"{\"return\": {}}\n".to_vec();
            bytes.push(0xFF);
            bytes.extend(format!("{{\"return\": {id}}}\n").into_bytes());
            stream.write_all(&bytes).await.unwrap();
            let _ = stream.read(&mut buf).await.unwrap();
            stream.write_all(b"{\"return\": 1}\n").await.unwrap();
            // Then silence.
            let (_stream, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let frozen = execute(&path, "guest-fsfreeze-freeze", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(frozen, json!(1));
        let silent = execute(&path, "guest-ping", Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(
            matches!(silent, GuestAgentError::Timeout { .. }),
            "{silent}"
        );
        guest.abort();
    }
}
