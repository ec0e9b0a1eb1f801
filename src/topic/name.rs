//! `TopicName`: the one place that decides what a topic may be called.

use std::fmt;
use std::sync::Arc;

/// The longest topic name we accept, in bytes (all of them ASCII).
pub const MAX_TOPIC_NAME_LEN: usize = 128;

/// A validated topic name: `[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}`.
///
/// Names travel in URLs, SSE ids, Redis channel names and SQL rows, so the
/// alphabet is kept to characters that need no escaping anywhere. The text is
/// shared (`Arc<str>`) because every snapshot and every subscription of a topic
/// carries its name and cloning must stay cheap.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicName(Arc<str>);

/// Why a string is not a topic name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidTopicName {
    /// The name is empty.
    Empty,
    /// The name is longer than [`MAX_TOPIC_NAME_LEN`] bytes.
    TooLong,
    /// The name starts with something other than a letter or digit.
    BadFirstCharacter,
    /// The name holds a character outside `[A-Za-z0-9_.:-]`.
    BadCharacter,
}

impl fmt::Display for InvalidTopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let why = match self {
            Self::Empty => "topic name is empty",
            Self::TooLong => "topic name is longer than 128 characters",
            Self::BadFirstCharacter => "topic name must start with a letter or a digit",
            Self::BadCharacter => "topic name may only contain A-Z, a-z, 0-9, '_', '.', ':' and '-'",
        };
        f.write_str(why)
    }
}

impl std::error::Error for InvalidTopicName {}

impl TopicName {
    /// Checks `raw` against the topic-name grammar.
    pub fn parse(raw: &str) -> Result<Self, InvalidTopicName> {
        let bytes = raw.as_bytes();
        let Some(first) = bytes.first() else {
            return Err(InvalidTopicName::Empty);
        };
        if bytes.len() > MAX_TOPIC_NAME_LEN {
            return Err(InvalidTopicName::TooLong);
        }
        if !first.is_ascii_alphanumeric() {
            return Err(InvalidTopicName::BadFirstCharacter);
        }
        let allowed = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-');
        if !bytes.iter().all(allowed) {
            return Err(InvalidTopicName::BadCharacter);
        }
        Ok(Self(Arc::from(raw)))
    }

    /// A reserved name for a topic spillway feeds itself (the operator page's
    /// `_stats`). Such names start with `_`, which [`TopicName::parse`]
    /// refuses, so no public endpoint can read, follow or publish them.
    ///
    /// # Panics
    ///
    /// If `raw` is not `_` followed by a valid public name: reserved names are
    /// constants in our own code, so a bad one is a programming error.
    pub(crate) fn internal(raw: &'static str) -> Self {
        let valid = raw.strip_prefix('_').is_some_and(|rest| Self::parse(rest).is_ok());
        assert!(valid, "reserved topic names are `_` and a valid name: {raw:?}");
        Self(Arc::from(raw))
    }

    /// Whether this is a reserved internal topic (never listed, counted,
    /// stored or sent on the bus).
    pub fn is_internal(&self) -> bool {
        self.0.starts_with('_')
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TopicName({:?})", &*self.0)
    }
}

impl std::borrow::Borrow<str> for TopicName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_grammar() {
        for ok in ["a", "Z", "0", "match-42", "league.cup:final_2026", &"x".repeat(128)] {
            assert!(TopicName::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_everything_else() {
        assert_eq!(TopicName::parse(""), Err(InvalidTopicName::Empty));
        assert_eq!(TopicName::parse(&"x".repeat(129)), Err(InvalidTopicName::TooLong));
        for bad in ["-a", "_a", ".a", ":a"] {
            assert_eq!(TopicName::parse(bad), Err(InvalidTopicName::BadFirstCharacter), "{bad}");
        }
        for bad in ["a b", "a/b", "a%20", "aé", "a\n", "a?b", "a#"] {
            assert_eq!(TopicName::parse(bad), Err(InvalidTopicName::BadCharacter), "{bad}");
        }
    }

    #[test]
    fn reserved_names_exist_only_inside() {
        let stats = TopicName::internal("_stats");
        assert!(stats.is_internal());
        assert_eq!(TopicName::parse(stats.as_str()), Err(InvalidTopicName::BadFirstCharacter));
        assert!(!TopicName::parse("stats").expect("valid").is_internal());
        assert!(std::panic::catch_unwind(|| TopicName::internal("stats")).is_err());
        assert!(std::panic::catch_unwind(|| TopicName::internal("_a b")).is_err());
    }
}
