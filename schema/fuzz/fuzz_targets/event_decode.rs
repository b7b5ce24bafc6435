//! `VoteEvent::decode` reads whatever arrives on the vote stream, so any bytes must give a value or
//! an error, never a panic. What it accepts must survive a trip through `encode`: the dedup-worker
//! and audit re-read what ingest wrote, and the bytes `encode` writes are the event's one spelling.
#![no_main]

use landslide_schema::event::{WIRE_VERSION, WIRE_VERSION_1};
use landslide_schema::{DecodeError, VoteEvent};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let event = match VoteEvent::decode(data) {
        Ok(event) => event,
        Err(err) => {
            // The message becomes a dead-letter header: formatting it must not panic either.
            let _ = err.to_string();
            // A version we read is never the reason for refusing an event.
            for version in [WIRE_VERSION, WIRE_VERSION_1] {
                assert_ne!(err, DecodeError::UnsupportedVersion(u64::from(version)));
            }
            return;
        }
    };
    let bytes = event.encode();
    let again = VoteEvent::decode(&bytes);
    assert_eq!(
        again.as_ref(),
        Ok(&event),
        "encode then decode changed the event"
    );
    // Decoding is lenient (unknown fields, other UUID spellings, whitespace); encoding is not.
    if let Ok(again) = again {
        assert_eq!(again.encode(), bytes, "encode is not stable");
    }
});
