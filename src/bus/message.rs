//! The bus message: one committed version, in a versioned JSON envelope so
//! that hubs of two releases can share a bus during a rolling upgrade.
//!
//! Version 1: `{"v":1,"topic","epoch","version","updated_ms","deleted","state"}`
//! where `state` is the raw JSON object (or `null` for a tombstone). A hub
//! that meets a higher `v` ignores the message and resyncs from the store.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::topic::{Epoch, Snapshot, TopicName};

/// The envelope revision this release writes and reads.
pub const VERSION: u32 = 1;

/// Encodes a committed version for the bus.
pub fn encode(snapshot: &Snapshot) -> Bytes {
    let state: &[u8] = if snapshot.deleted { b"null" } else { &snapshot.state };
    let mut out = format!(
        r#"{{"v":{VERSION},"topic":"{}","epoch":"{}","version":{},"updated_ms":{},"deleted":{},"state":"#,
        snapshot.topic, snapshot.epoch, snapshot.version, snapshot.updated_ms, snapshot.deleted
    )
    .into_bytes();
    out.extend_from_slice(state);
    out.push(b'}');
    Bytes::from(out)
}

/// What a bus message says.
#[derive(Debug)]
pub enum Decoded {
    /// A version this hub can apply.
    Version(Box<Snapshot>),
    /// A message from a newer release (or garbage): resync from the store.
    Unknown,
}

#[derive(Deserialize)]
struct Envelope<'a> {
    v: u32,
    topic: &'a str,
    epoch: &'a str,
    version: u64,
    updated_ms: u64,
    deleted: bool,
    #[serde(borrow)]
    state: &'a RawValue,
}

#[derive(Deserialize)]
struct Revision {
    v: u32,
}

/// Decodes a bus message.
pub fn decode(payload: &[u8]) -> Decoded {
    match serde_json::from_slice::<Revision>(payload) {
        Ok(Revision { v: VERSION }) => {}
        _ => return Decoded::Unknown,
    }
    let Ok(envelope) = serde_json::from_slice::<Envelope<'_>>(payload) else { return Decoded::Unknown };
    let (Ok(topic), Ok(epoch)) = (TopicName::parse(envelope.topic), envelope.epoch.parse::<Epoch>()) else {
        return Decoded::Unknown;
    };
    if envelope.v != VERSION || envelope.version == 0 {
        return Decoded::Unknown;
    }
    Decoded::Version(Box::new(if envelope.deleted {
        Snapshot::tombstone(topic, epoch, envelope.version, envelope.updated_ms)
    } else {
        let state = Bytes::copy_from_slice(envelope.state.get().as_bytes());
        Snapshot::live(topic, epoch, envelope.version, envelope.updated_ms, state)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_what_it_does_not_know() {
        let name = TopicName::parse("m").expect("valid");
        let live =
            Snapshot::live(name.clone(), Epoch::from_u64(9), 4, 77, Bytes::from_static(br#"{"a":[1,{"b":null}]}"#));
        match decode(&encode(&live)) {
            Decoded::Version(s) => {
                assert_eq!((s.version, s.epoch, s.updated_ms, s.deleted), (4, Epoch::from_u64(9), 77, false));
                assert_eq!(&s.state[..], br#"{"a":[1,{"b":null}]}"#);
            }
            Decoded::Unknown => panic!("decodes"),
        }
        let tomb = Snapshot::tombstone(name, Epoch::from_u64(9), 5, 78);
        assert!(matches!(decode(&encode(&tomb)), Decoded::Version(s) if s.deleted && s.version == 5));
        assert!(matches!(decode(br#"{"v":2,"anything":true}"#), Decoded::Unknown));
        assert!(matches!(decode(b"garbage"), Decoded::Unknown));
    }
}
