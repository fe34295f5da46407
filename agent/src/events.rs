//! The agent's event stream: every state change, device change and reboot
//! gets a sequence number and goes into a bounded buffer, so a watcher can
//! resume after the last event it saw.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast};

use crate::model::{MigrationReport, State};

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
        /// Its slot on pci.0; none for a disk on SCSI.
        slot: Option<u8>,
        /// Its SCSI target, for a disk on SCSI.
        scsi_target: Option<u8>,
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
    /// The agent forgot the instance.
    Deleted {
        /// Why: deleted, or renamed to another name.
        detail: String,
    },
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

/// Watchers that may follow the events at once. Each costs a task and a
/// place in the channel's accounting, so their number is bounded.
pub const MAX_WATCHERS: usize = 256;

/// Why a watch can't start, or can't go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WatchError {
    /// The buffer no longer has the events asked for.
    #[error(
        "events after {asked} are no longer kept (the oldest kept is {oldest}); re-read the state with ListInstances, then watch from there"
    )]
    TooOld {
        /// The sequence asked for.
        asked: u64,
        /// The oldest sequence still kept.
        oldest: u64,
    },
    /// The sequence asked for hasn't been given out yet: the watcher's
    /// numbers come from an agent that has since restarted.
    #[error(
        "there is no event {asked} yet (the newest is {newest}); the agent may have restarted: re-read the state with ListInstances, then watch from there"
    )]
    Ahead {
        /// The sequence asked for.
        asked: u64,
        /// The newest sequence given out.
        newest: u64,
    },
    /// Too many watchers already.
    #[error("{MAX_WATCHERS} watchers are following the events already; close one first")]
    TooManyWatchers,
    /// A watcher read too slowly and missed events.
    #[error(
        "this watcher fell {missed} events behind; resume after the last sequence number it saw"
    )]
    Lagged {
        /// How many events it missed.
        missed: u64,
    },
}

struct Buffer {
    next: u64,
    kept: VecDeque<Arc<Event>>,
}

/// Publishes events to live watchers and keeps the last ones for resumes.
/// Watchers share the kept events rather than copy them.
pub struct EventBus {
    buffer: Mutex<Buffer>,
    capacity: usize,
    live: broadcast::Sender<Arc<Event>>,
    watchers: Arc<Semaphore>,
}

/// A watcher's view of the events: the kept ones it asked for, then what
/// comes next. Holds the watcher's place until dropped.
#[derive(Debug)]
pub struct Watch {
    /// Kept events after the sequence asked for, oldest first.
    pub backlog: Vec<Arc<Event>>,
    /// What comes next, with no gap and no repeat after the backlog.
    pub live: broadcast::Receiver<Arc<Event>>,
    /// The watcher's place among [`MAX_WATCHERS`].
    pub permit: OwnedSemaphorePermit,
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
            watchers: Arc::new(Semaphore::new(MAX_WATCHERS)),
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
        let event = Arc::new(Event {
            sequence: buffer.next,
            unix_millis,
            instance: instance.to_owned(),
            kind,
        });
        buffer.next += 1;
        if buffer.kept.len() == self.capacity {
            buffer.kept.pop_front();
        }
        buffer.kept.push_back(event.clone());
        // Sent under the lock, so the order on the channel is the order of
        // the sequence numbers. No watcher is fine.
        let sequence = event.sequence;
        let _ = self.live.send(event);
        tracing::debug!(sequence, instance, "event");
        sequence
    }

    /// The kept events after `after` (none for `None`: only new ones), and
    /// a receiver for what comes next, with no gap and no repeat between
    /// them.
    pub fn watch(&self, after: Option<u64>) -> Result<Watch, WatchError> {
        let permit = self
            .watchers
            .clone()
            .try_acquire_owned()
            .map_err(|_| WatchError::TooManyWatchers)?;
        let buffer = self.lock();
        let live = self.live.subscribe();
        let Some(after) = after else {
            return Ok(Watch {
                backlog: Vec::new(),
                live,
                permit,
            });
        };
        let newest = buffer.next - 1;
        if after > newest {
            return Err(WatchError::Ahead {
                asked: after,
                newest,
            });
        }
        let oldest = buffer.kept.front().map_or(buffer.next, |e| e.sequence);
        if after < oldest.saturating_sub(1) {
            return Err(WatchError::TooOld {
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
        Ok(Watch {
            backlog,
            live,
            permit,
        })
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

        let watch = bus.watch(Some(3)).unwrap();

        assert_eq!(
            watch.backlog.iter().map(|e| e.sequence).collect::<Vec<_>>(),
            vec![4, 5]
        );
        assert!(bus.watch(Some(5)).unwrap().backlog.is_empty());
    }

    #[test]
    fn resume_before_the_oldest_kept_event_is_too_old() {
        let bus = EventBus::new(3);
        for _ in 0..6 {
            bus.publish("a", state(State::Running));
        }

        assert_eq!(
            bus.watch(Some(1)).unwrap_err(),
            WatchError::TooOld {
                asked: 1,
                oldest: 4
            }
        );
        assert_eq!(bus.watch(Some(3)).unwrap().backlog.len(), 3);
        assert_eq!(
            bus.watch(Some(0)).map(|_| ()).unwrap_err(),
            WatchError::TooOld {
                asked: 0,
                oldest: 4
            }
        );
    }

    #[test]
    fn a_sequence_not_given_out_yet_is_refused_even_the_largest() {
        let bus = EventBus::new(3);
        bus.publish("a", state(State::Running));

        for asked in [2, u64::MAX] {
            assert_eq!(
                bus.watch(Some(asked)).unwrap_err(),
                WatchError::Ahead { asked, newest: 1 }
            );
        }
        assert!(
            EventBus::new(3).watch(Some(0)).is_ok(),
            "nothing yet, nothing missed"
        );
    }

    #[test]
    fn watchers_share_the_kept_events_and_are_bounded() {
        let bus = EventBus::new(4);
        bus.publish("a", state(State::Running));
        let watches: Vec<Watch> = (0..MAX_WATCHERS)
            .map(|_| bus.watch(Some(0)).unwrap())
            .collect();

        assert!(Arc::ptr_eq(&watches[0].backlog[0], &watches[1].backlog[0]));
        assert_eq!(bus.watch(None).unwrap_err(), WatchError::TooManyWatchers);
        drop(watches);
        assert!(bus.watch(None).is_ok());
    }

    #[test]
    fn live_watch_sees_only_new_events() {
        let bus = EventBus::new(8);
        bus.publish("a", state(State::Running));
        let mut watch = bus.watch(None).unwrap();

        bus.publish("a", state(State::Stopped));

        assert!(watch.backlog.is_empty());
        assert_eq!(watch.live.try_recv().unwrap().sequence, 2);
    }
}
