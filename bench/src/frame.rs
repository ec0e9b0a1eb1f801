//! Reads the few fields the bench needs from a frame without parsing the
//! whole JSON document: a fast reader on a loaded box must not spend its CPU
//! decoding 1 KiB states it never looks at. Works on any server whose frames
//! carry the published state verbatim (the publisher's `seq` and `ts` keys).

/// The fields of one frame.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Fields {
    /// The publisher's sequence number (per topic).
    pub(crate) seq: Option<u64>,
    /// When the publisher sent it, Unix nanoseconds.
    pub(crate) ts: Option<u64>,
    /// The server's `skipped` count, where it sends one.
    pub(crate) skipped: Option<u64>,
}

/// Extracts `seq`, `ts` and `skipped`.
pub(crate) fn parse(bytes: &[u8]) -> Fields {
    Fields {
        seq: number_after(bytes, b"\"seq\":"),
        ts: number_after(bytes, b"\"ts\":"),
        skipped: number_after(bytes, b"\"skipped\":"),
    }
}

/// The unsigned integer after `key` (a JSON key with its colon), if any.
pub(crate) fn number_after(hay: &[u8], key: &[u8]) -> Option<u64> {
    let at = find(hay, key)? + key.len();
    let rest = &hay[at..];
    let rest = &rest[rest.iter().take_while(|b| b.is_ascii_whitespace()).count()..];
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 19 {
        return None;
    }
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

/// The JSON string after `key` (a key with its colon and opening quote),
/// if it has no escapes: enough for codes, reasons and epochs.
pub(crate) fn string_after(hay: &[u8], key: &[u8]) -> Option<String> {
    let at = find(hay, key)? + key.len();
    let rest = &hay[at..];
    let end = rest.iter().position(|&b| b == b'"' || b == b'\\')?;
    if rest[end] != b'"' || end > 256 {
        return None;
    }
    std::str::from_utf8(&rest[..end]).ok().map(str::to_string)
}

/// The position `EPOCH:VERSION` a spillway frame or snapshot body names
/// (its `epoch` and `version`), for resuming with `since=`.
pub(crate) fn position(bytes: &[u8]) -> Option<String> {
    let epoch = string_after(bytes, b"\"epoch\":\"")?;
    let version = number_after(bytes, b"\"version\":")?;
    (epoch.len() == 16 && epoch.bytes().all(|b| b.is_ascii_hexdigit())).then(|| format!("{epoch}:{version}"))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let first = *needle.first()?;
    let mut from = 0;
    while from + needle.len() <= hay.len() {
        let i = hay[from..].iter().position(|&b| b == first)? + from;
        if hay.get(i..i + needle.len())? == needle {
            return Some(i);
        }
        from = i + 1;
    }
    None
}

/// The body the publisher sends: `{"seq":N,"ts":T,"pad":"xxx…"}`, padded so
/// the whole body is about `size` bytes.
pub(crate) fn state_body(seq: u64, ts: u64, size: usize) -> String {
    let head = format!(r#"{{"seq":{seq},"ts":{ts},"pad":""#);
    let pad = size.saturating_sub(head.len() + 2);
    let mut out = String::with_capacity(head.len() + pad + 2);
    out.push_str(&head);
    out.extend(std::iter::repeat_n('x', pad));
    out.push_str("\"}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_spillway_snapshot_frame() {
        let frame = format!(
            r#"{{"type":"snapshot","topic":"t-1","epoch":"00000000000000ab","version":12,"updated_at":"x","skipped":3,"state":{}}}"#,
            state_body(11, 1_700_000_000_000_000_000, 256)
        );
        let f = parse(frame.as_bytes());
        assert_eq!(f, Fields { seq: Some(11), ts: Some(1_700_000_000_000_000_000), skipped: Some(3) });
    }

    #[test]
    fn positions_and_strings() {
        let frame = br#"{"type":"snapshot","topic":"t","epoch":"00000000000000ab","version":12,"state":{}}"#;
        assert_eq!(position(frame).as_deref(), Some("00000000000000ab:12"));
        assert_eq!(position(br#"{"type":"hello","protocol":1}"#), None);
        let body = br#"{"error":"overloaded","reason":"accept_rate","retry_after_ms":1840}"#;
        assert_eq!(string_after(body, br#""reason":""#).as_deref(), Some("accept_rate"));
        assert_eq!(string_after(br#"{"a":"x\"y"}"#, br#""a":""#), None);
    }

    #[test]
    fn heartbeats_and_other_servers() {
        assert_eq!(parse(br#"{"type":"heartbeat"}"#), Fields::default());
        let f = parse(br#"{"data": {"seq": 5, "ts": 7}}"#);
        assert_eq!((f.seq, f.ts, f.skipped), (Some(5), Some(7), None));
    }

    #[test]
    fn bodies_have_the_requested_size_and_parse() {
        let body = state_body(1, 2, 1024);
        assert_eq!(body.len(), 1024);
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["seq"], 1);
    }
}
