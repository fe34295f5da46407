//! Fuzzing of the decoders that read files from disk: record envelopes and
//! save-file headers. Any bytes give a value or a typed error, never a
//! panic or an allocation the input asks for; and a flipped byte in a
//! valid file is caught unless it left the contents as they were.
//! `KVM_AGENT_FUZZ_CASES` sets the case count.

use proptest::prelude::*;
use serde_json::{Value, json};

use crate::savefile::{SaveFileError, SaveHeader, decode_header, encode_header};
use crate::{decode_envelope, decode_file, encode_envelope, slots};

fn config() -> ProptestConfig {
    let cases = std::env::var("KVM_AGENT_FUZZ_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(3000);
    ProptestConfig::with_cases(cases)
}

fn record() -> Value {
    json!({ "runtime": { "name": "web1", "memory_mib": 128, "argv": ["-m", "size=128M"] },
            "state": "running", "detail": "" })
}

fn header() -> SaveHeader<Value> {
    SaveHeader {
        instance_name: "web1".into(),
        instance_uuid: "6a1c1f40-5a43-4a0c-9a6b-0f0ad6d4b7a1".into(),
        was_running: true,
        saved_at_unix: 1_700_000_000,
        runtime: record(),
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_bytes_as_a_record_are_refused_or_read(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
        let _ = decode_envelope::<Value>(&bytes);
    }

    #[test]
    fn a_flipped_byte_in_a_record_is_caught(at in any::<prop::sample::Index>(), xor in 1u8..=255) {
        let mut bytes = encode_envelope("web1", 7, &record()).unwrap();
        let i = at.index(bytes.len());
        bytes[i] ^= xor;
        if let Ok((revision, value)) = decode_envelope::<Value>(&bytes) {
            // Only a change the checksum doesn't cover, such as spacing
            // between the envelope's fields, may pass, and it changes nothing.
            prop_assert_eq!(revision, 7);
            prop_assert_eq!(value, record());
        }
    }

    #[test]
    fn a_flipped_byte_in_a_record_file_leaves_one_copy_read(at in any::<prop::sample::Index>(), xor in 1u8..=255) {
        let older = record();
        let newer = json!({ "runtime": older["runtime"], "state": "stopped", "detail": "" });
        let (mut bytes, at_slots) = slots::new_file(&encode_envelope("web1", 7, &older).unwrap());
        let second = slots::fill(&encode_envelope("web1", 8, &newer).unwrap(), at_slots.size).unwrap();
        bytes[at_slots.size..].copy_from_slice(&second);
        let i = at.index(bytes.len());
        bytes[i] ^= xor;
        let copy = match decode_file::<Value>(&bytes) {
            Ok(copy) => copy,
            // The checksum doesn't cover the format and version, and a copy
            // that claims another one is refused, not passed over.
            Err(e) if e.contains("unknown format") || e.contains("envelope version") => return Ok(()),
            Err(e) => return Err(TestCaseError::fail(format!("byte {i} flipped and neither copy read: {e}"))),
        };
        let expected = if copy.revision == 8 { &newer } else { &older };
        prop_assert!(copy.revision == 7 || copy.revision == 8);
        prop_assert_eq!(&copy.value, expected);
    }

    #[test]
    fn any_bytes_as_a_save_header_are_refused_or_read(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
        let _ = decode_header::<Value>(&mut bytes.as_slice());
    }

    #[test]
    fn a_flipped_byte_in_a_save_header_is_caught(at in any::<prop::sample::Index>(), xor in 1u8..=255) {
        let mut bytes = encode_header(&header());
        let i = at.index(bytes.len());
        bytes[i] ^= xor;
        let decoded = decode_header::<Value>(&mut bytes.as_slice());
        prop_assert!(decoded.is_err(), "byte {} flipped and still read", i);
    }

    #[test]
    fn a_cut_save_header_is_truncated(keep in any::<prop::sample::Index>()) {
        let bytes = encode_header(&header());
        let cut = &bytes[..keep.index(bytes.len())];
        let decoded = decode_header::<Value>(&mut &cut[..]);
        prop_assert!(
            matches!(decoded, Err(SaveFileError::Truncated(_)) | Err(SaveFileError::NotASaveFile)),
            "{:?}", decoded.err()
        );
    }
}
