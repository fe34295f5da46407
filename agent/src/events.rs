//! The agent's event stream: every state change, device change and reboot
//! gets a sequence number and goes into a bounded buffer, so a watcher can
//! resume after the last event it saw.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::broadcast;

use crate::instances::{MigrationReport, State};

/// Events kept for watchers that resume.
pub const DEFAULT_EVENT_BUFFER: usize = 4096;

/// What happened.
#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    /// The instance entered a state.
    State {
        /// The new state.
        state: State,
        /// Why, as in GetInstance.
        detail: String,
        /// The guest did it itself (a power-off from inside).
        guest_initiated: bool,
    },
    /// A device was hot-added.
    DeviceAdded {
        /// Device name.
        device: String,
        /// Its slot on pci.0.
        slot: u8,
    },
    /// A device was hot-removed.
    DeviceRemoved {
        /// Device name.
        device: String,
    },
    /// The guest was reset or rebooted.
    Rebooted {
        /// `soft`, `hard`, `reset`, or `guest` when the guest did it.
        how: &'static str,
        /// The guest did it itself.
        guest_initiated: bool,
    },
    /// A migration moved on.
    MigrationProgress(MigrationReport),
}

/// One event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Grows by one per event, from 1.
    pub sequence: u64,
    /// Milliseconds since the Unix epoch.
    pub unix_millis: u64,
    /// Instance name.
    pub instance: String,
    /// What happened.
    pub kind: EventKind,
}

/// A watcher asked for events the buffer no longer has.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "events after {asked} are no longer kept (the oldest kept is {oldest}); re-read the state with ListInstances, then watch from there"
)]
pub struct TooOld {
    /// The sequence asked for.
    pub asked: u64,
    /// The oldest sequence still kept.
    pub oldest: u64,
}

struct Buffer {
    next: u64,
    kept: VecDeque<Event>,
}

/// Publishes events to live watchers and keeps the last ones for resumes.
pub struct EventBus {
    buffer: Mutex<Buffer>,
    capacity: usize,
    live: broadcast::Sender<Event>,
}

impl std::fmt::Debug for EventBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventBus")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl EventBus {
    /// A bus keeping the last `capacity` events.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        EventBus {
            buffer: Mutex::new(Buffer {
                next: 1,
                kept: VecDeque::with_capacity(capacity),
            }),
            capacity,
            live: broadcast::channel(capacity).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Buffer> {
        self.buffer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes an event and returns its sequence number.
    pub fn publish(&self, instance: &str, kind: EventKind) -> u64 {
        let unix_millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut buffer = self.lock();
        let event = Event {
            sequence: buffer.next,
            unix_millis,
            instance: instance.to_owned(),
            kind,
        };
        buffer.next += 1;
        if buffer.kept.len() == self.capacity {
            buffer.kept.pop_front();
        }
        buffer.kept.push_back(event.clone());
        // Sent under the lock, so the order on the channel is the order of
        // the sequence numbers. No watcher is fine.
        let _ = self.live.send(event.clone());
        tracing::debug!(sequence = event.sequence, instance, "event");
        event.sequence
    }

    /// The kept events after `after` (none for `None`: only new ones), and
    /// a receiver for what comes next, with no gap and no repeat between
    /// them.
    pub fn watch(
        &self,
        after: Option<u64>,
    ) -> Result<(Vec<Event>, broadcast::Receiver<Event>), TooOld> {
        let buffer = self.lock();
        let receiver = self.live.subscribe();
        let Some(after) = after else {
            return Ok((Vec::new(), receiver));
        };
        let oldest = buffer.kept.front().map_or(buffer.next, |e| e.sequence);
        if after + 1 < oldest {
            return Err(TooOld {
                asked: after,
                oldest,
            });
        }
        let backlog = buffer
            .kept
            .iter()
            .filter(|e| e.sequence > after)
            .cloned()
            .collect();
        Ok((backlog, receiver))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(s: State) -> EventKind {
        EventKind::State {
            state: s,
            detail: String::new(),
            guest_initiated: false,
        }
    }

    #[test]
    fn sequence_numbers_grow_from_one() {
        let bus = EventBus::new(8);

        assert_eq!(bus.publish("a", state(State::Starting)), 1);
        assert_eq!(bus.publish("b", state(State::Running)), 2);
    }

    #[test]
    fn resume_gets_exactly_the_events_after_the_sequence() {
        let bus = EventBus::new(8);
        for _ in 0..5 {
            bus.publish("a", state(State::Running));
        }

        let (backlog, _) = bus.watch(Some(3)).unwrap();

        assert_eq!(
            backlog.iter().map(|e| e.sequence).collect::<Vec<_>>(),
            vec![4, 5]
        );
    }

    #[test]
    fn resume_before_the_oldest_kept_event_is_too_old() {
        let bus = EventBus::new(3);
        for _ in 0..6 {
            bus.publish("a", state(State::Running));
        }

        assert_eq!(
            bus.watch(Some(1)).unwrap_err(),
            TooOld {
                asked: 1,
                oldest: 4
            }
        );
        assert_eq!(bus.watch(Some(3)).unwrap().0.len(), 3);
    }

    #[test]
    fn live_watch_sees_only_new_events() {
        let bus = EventBus::new(8);
        bus.publish("a", state(State::Running));
        let (backlog, mut rx) = bus.watch(None).unwrap();

        bus.publish("a", state(State::Stopped));

        assert!(backlog.is_empty());
        assert_eq!(rx.try_recv().unwrap().sequence, 2);
    }
}
