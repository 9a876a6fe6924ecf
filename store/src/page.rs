//! Keyset pagination: lists are ordered by (created_at, id), and a cursor is the last key of a page.

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// A position in a list, handed to clients as `<creation time in microseconds>.<id>` of the last item seen.
/// Every string of that shape ([`Cursor::PATTERN`], as the OpenAPI document states it) is a position: a client may
/// only skip ahead in its own lists, which are filtered by tenant whatever the cursor says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// Creation time of the last item seen.
    pub created_at: DateTime<Utc>,
    /// Id of the last item seen (ties on created_at).
    pub id: Uuid,
}

impl Cursor {
    /// What a cursor looks like, as a regular expression.
    pub const PATTERN: &str = "^[0-9]{1,16}\\.[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$";

    /// The form given to clients.
    pub fn encode(&self) -> String {
        format!("{}.{}", self.created_at.timestamp_micros(), self.id.hyphenated())
    }

    /// Parses a string of the shape [`Cursor::PATTERN`]; `None` for anything else.
    pub fn decode(s: &str) -> Option<Self> {
        let (micros, id) = s.split_once('.')?;
        if micros.is_empty() || micros.len() > 16 || !micros.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        // The hyphenated lower-case form only: Uuid::parse_str also takes braces, urn: and upper case.
        let shape = id.len() == 36
            && id.bytes().enumerate().all(|(i, b)| match i {
                8 | 13 | 18 | 23 => b == b'-',
                _ => b.is_ascii_digit() || (b'a'..=b'f').contains(&b),
            });
        if !shape {
            return None;
        }
        Some(Self { created_at: DateTime::from_timestamp_micros(micros.parse().ok()?)?, id: Uuid::parse_str(id).ok()? })
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
        assert_eq!(c.encode(), format!("1700000000123456.{}", c.id));
        let id = "00000000-0000-0000-0000-00000000000a";
        assert!(Cursor::decode(&format!("0.{id}")).is_some());
        for bad in [
            "",
            "x",
            ".",
            "!!!",
            "-1.00000000-0000-0000-0000-00000000000a",
            "12345678901234567.00000000-0000-0000-0000-00000000000a",
            "1.00000000-0000-0000-0000-00000000000A",
            "1.{00000000-0000-0000-0000-00000000000a}",
            "1.000000000000000000000000000000000a",
            "1 .00000000-0000-0000-0000-00000000000a",
        ] {
            assert_eq!(Cursor::decode(bad), None, "{bad}");
        }
    }
}
