//! Keyset pagination: lists are ordered by (created_at, id), and a cursor is the last key of a page.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use uuid::Uuid;

/// A position in a list, handed to clients as an opaque string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// Creation time of the last item seen.
    pub created_at: DateTime<Utc>,
    /// Id of the last item seen (ties on created_at).
    pub id: Uuid,
}

impl Cursor {
    /// The opaque form given to clients.
    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(format!("v1:{}:{}", self.created_at.timestamp_micros(), self.id))
    }

    /// Parses a cursor issued by [`Cursor::encode`]; `None` for anything else.
    pub fn decode(s: &str) -> Option<Self> {
        let raw = String::from_utf8(URL_SAFE_NO_PAD.decode(s).ok()?).ok()?;
        let mut parts = raw.splitn(3, ':');
        if parts.next()? != "v1" {
            return None;
        }
        let micros: i64 = parts.next()?.parse().ok()?;
        let id = Uuid::parse_str(parts.next()?).ok()?;
        Some(Self { created_at: DateTime::from_timestamp_micros(micros)?, id })
    }
}

/// Splits one extra fetched row off a page to know whether another page follows.
pub(crate) fn finish<T>(mut rows: Vec<T>, limit: usize, key: impl Fn(&T) -> Cursor) -> (Vec<T>, Option<Cursor>) {
    if rows.len() > limit {
        rows.truncate(limit);
        let next = rows.last().map(key);
        (rows, next)
    } else {
        (rows, None)
    }
}

/// Binds for `($2::timestamptz IS NULL OR (created_at, id) > ($2, $3))`, the condition every list uses;
/// NULLs mean the start.
pub(crate) fn after(cursor: Option<Cursor>) -> (Option<DateTime<Utc>>, Option<Uuid>) {
    (cursor.map(|c| c.created_at), cursor.map(|c| c.id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_foreign_strings() {
        let c =
            Cursor { created_at: DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap(), id: Uuid::new_v4() };
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        for bad in ["", "x", "djE6", "!!!", &URL_SAFE_NO_PAD.encode("v2:1:00000000-0000-0000-0000-000000000000")] {
            assert_eq!(Cursor::decode(bad), None, "{bad}");
        }
    }
}
