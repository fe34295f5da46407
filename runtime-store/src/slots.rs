//! The layout of a record file: two slots of one size, each an envelope
//! padded with spaces, or a blank slot. A save overwrites the slot that
//! doesn't hold the newest revision, in place, and syncs only the data:
//! the file keeps its size and its blocks, so no metadata has to reach the
//! disk and the save costs one data write instead of two journal commits.
//! A write torn by a crash spoils only the older copy, whose checksum then
//! fails, and the newest one is read. A record that outgrows its slots, or
//! a file of the older one-envelope layout, is rewritten whole.
//!
//! Everything here is pure; the store does the I/O.

/// Slots are whole pages, so an in-place write never shares a page with
/// the other copy.
const SLOT_ALIGN: usize = 4096;

/// Where a record file's copies are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slots {
    /// Bytes per slot.
    pub size: usize,
    /// The slot holding the newest readable copy (0 or 1).
    pub newest: usize,
}

impl Slots {
    /// Where the next copy goes: the slot that isn't the newest.
    pub fn next(self) -> usize {
        1 - self.newest
    }

    /// The byte offset of `slot` in the file.
    pub fn offset(self, slot: usize) -> u64 {
        (slot * self.size) as u64
    }
}

/// The two slots of a file in the slotted layout, or `None` for a file of
/// the older one-envelope layout.
pub(crate) fn split(bytes: &[u8]) -> Option<[&[u8]; 2]> {
    let size = bytes.len() / 2;
    let slotted = size >= SLOT_ALIGN && size.is_multiple_of(SLOT_ALIGN) && bytes.len() == 2 * size;
    slotted.then(|| [&bytes[..size], &bytes[size..]])
}

/// Whether a slot was never written.
pub(crate) fn is_blank(slot: &[u8]) -> bool {
    slot.iter().all(u8::is_ascii_whitespace)
}

/// `envelope` padded to fill a slot of `size` bytes, or `None` when it
/// doesn't fit (the last byte is always a newline, for readers of the file).
pub(crate) fn fill(envelope: &[u8], size: usize) -> Option<Vec<u8>> {
    (envelope.len() < size).then(|| {
        let mut slot = Vec::with_capacity(size);
        slot.extend_from_slice(envelope);
        slot.resize(size - 1, b' ');
        slot.push(b'\n');
        slot
    })
}

/// A new file with `envelope` in its first slot and the second blank. The
/// slots leave the envelope room to double, so a record that grows by a
/// device or two is still written in place.
pub(crate) fn new_file(envelope: &[u8]) -> (Vec<u8>, Slots) {
    let size = (2 * envelope.len() + 1).div_ceil(SLOT_ALIGN) * SLOT_ALIGN;
    let mut bytes = fill(envelope, size).expect("a slot twice the envelope's size holds it");
    bytes.extend(fill(b"", size).expect("an empty envelope fits"));
    (bytes, Slots { size, newest: 0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_file_splits_into_the_envelope_and_a_blank_slot() {
        let envelope = b"{\"revision\": 1}\n";

        let (bytes, slots) = new_file(envelope);
        let [first, second] = split(&bytes).expect("slotted");

        assert_eq!(
            slots,
            Slots {
                size: 4096,
                newest: 0
            }
        );
        assert_eq!(bytes.len(), 8192);
        assert!(first.starts_with(envelope));
        assert!(is_blank(&first[envelope.len()..]));
        assert!(is_blank(second));
        assert_eq!((slots.next(), slots.offset(slots.next())), (1, 4096));
    }

    #[test]
    fn slots_leave_room_for_the_envelope_to_double() {
        let envelope = vec![b'x'; 3000];

        let (bytes, slots) = new_file(&envelope);

        assert_eq!(slots.size, 8192);
        assert_eq!(bytes.len(), 16384);
        assert!(fill(&vec![b'x'; 6000], slots.size).is_some());
        assert!(fill(&vec![b'x'; 8192], slots.size).is_none());
    }

    #[test]
    fn a_file_of_the_one_envelope_layout_is_not_split() {
        assert!(split(b"{\"format\": \"kvm-agent-record\"}\n").is_none());
        assert!(split(&[b' '; 4096]).is_none(), "one page is one slot short");
        assert!(split(&[b' '; 8192 + 2]).is_none(), "not whole pages");
    }
}
