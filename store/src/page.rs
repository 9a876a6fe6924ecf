//! Keyset pagination and name-or-id lookups: every list of the store is ordered by (created_at, id) and a cursor is
//! the last key of a page; every get finds a row by its name or its id. The queries are built here only, from static
//! text of our own (the `SELECT`, table aliases, column names); every value, the caller's key included, is bound.

use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::{FromRow, PgExecutor, Postgres, QueryBuilder};
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

/// What a list or lookup reads: a `SELECT … FROM …` of our own and the alias (`"i."`, or `""` for none) of the
/// table whose `tenant_id`, `name`, `id` and `created_at` the conditions name.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Table {
    /// The query up to its conditions.
    pub select: &'static str,
    /// Prefix of the table's columns.
    pub alias: &'static str,
}

/// The rows of a table a list or lookup may see.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Visible {
    /// Every row (the tenants themselves).
    All,
    /// The tenant's rows.
    Tenant(Uuid),
    /// The tenant's rows and the built-in ones (no tenant); a lookup prefers the tenant's own.
    TenantOrBuiltin(Uuid),
}

/// The row lock a lookup takes for the rest of its transaction.
#[derive(Debug, Clone, Copy)]
pub(crate) enum RowLock {
    /// Read only.
    None,
    /// Others may read and share-lock, nobody may delete or update (attaching instances).
    Share,
    /// Exclusive (changing or deleting the row).
    Update,
}

/// `<select> WHERE <what is visible>`, and what joins the next condition (` WHERE ` when every row is).
fn scoped(table: Table, visible: Visible) -> (QueryBuilder<Postgres>, &'static str) {
    let mut q = QueryBuilder::new(table.select);
    match visible {
        Visible::All => return (q, " WHERE "),
        Visible::Tenant(tenant) => q.push(" WHERE ").push(table.alias).push("tenant_id = ").push_bind(tenant),
        Visible::TenantOrBuiltin(tenant) => q
            .push(" WHERE (")
            .push(table.alias)
            .push("tenant_id = ")
            .push_bind(tenant)
            .push(" OR ")
            .push(table.alias)
            .push("tenant_id IS NULL)"),
    };
    (q, " AND ")
}

/// Appends `(<alias>name = key OR <alias>id = key)`, the id compared only when `key` is a UUID, so that one query
/// finds a row by either.
pub(crate) fn push_name_or_id(q: &mut QueryBuilder<Postgres>, alias: &'static str, key: &str) {
    let id = Uuid::parse_str(key).ok();
    q.push("(").push(alias).push("name = ").push_bind(key);
    q.push(" OR ").push(alias).push("id = ").push_bind(id).push(")");
}

/// One page of the table's visible rows, in (created_at, id) order after `cursor`, and the cursor of the next page
/// when there is one; `key` gives a row's position.
pub(crate) async fn list<'e, R>(
    conn: impl PgExecutor<'e>,
    table: Table,
    visible: Visible,
    cursor: Option<Cursor>,
    limit: usize,
    key: impl Fn(&R) -> Cursor,
) -> Result<(Vec<R>, Option<Cursor>), sqlx::Error>
where
    R: for<'r> FromRow<'r, PgRow> + Send + Unpin,
{
    let rows = list_query(table, visible, cursor, limit).build_query_as().fetch_all(conn).await?;
    Ok(finish(rows, limit, key))
}

fn list_query(table: Table, visible: Visible, cursor: Option<Cursor>, limit: usize) -> QueryBuilder<Postgres> {
    let (mut q, and) = scoped(table, visible);
    let a = table.alias;
    if let Some(c) = cursor {
        q.push(and).push(format_args!("({a}created_at, {a}id) > ("));
        q.push_bind(c.created_at).push(", ").push_bind(c.id).push(")");
    }
    // One row more than asked tells whether another page follows.
    q.push(format_args!(" ORDER BY {a}created_at, {a}id LIMIT ")).push_bind(limit as i64 + 1);
    q
}

/// The visible row of the table whose name or id is `key` ([`push_name_or_id`]), locked as asked.
pub(crate) async fn find<'e, R>(
    conn: impl PgExecutor<'e>,
    table: Table,
    visible: Visible,
    key: &str,
    lock: RowLock,
) -> Result<Option<R>, sqlx::Error>
where
    R: for<'r> FromRow<'r, PgRow> + Send + Unpin,
{
    find_query(table, visible, key, lock).build_query_as().fetch_optional(conn).await
}

fn find_query(table: Table, visible: Visible, key: &str, lock: RowLock) -> QueryBuilder<Postgres> {
    let (mut q, and) = scoped(table, visible);
    q.push(and);
    push_name_or_id(&mut q, table.alias, key);
    if let Visible::TenantOrBuiltin(_) = visible {
        q.push(format_args!(" ORDER BY {}tenant_id NULLS LAST LIMIT 1", table.alias));
    }
    q.push(match lock {
        RowLock::None => "",
        RowLock::Share => " FOR SHARE",
        RowLock::Update => " FOR UPDATE",
    });
    q
}

/// Splits one extra fetched row off a page to know whether another page follows.
fn finish<T>(mut rows: Vec<T>, limit: usize, key: impl Fn(&T) -> Cursor) -> (Vec<T>, Option<Cursor>) {
    if rows.len() > limit {
        rows.truncate(limit);
        let next = rows.last().map(key);
        (rows, next)
    } else {
        (rows, None)
    }
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

    const T: Table = Table { select: "SELECT x FROM t", alias: "t." };

    fn sql(q: QueryBuilder<Postgres>) -> String {
        q.into_string()
    }

    #[test]
    fn lists_start_at_the_cursor_in_key_order_with_one_row_more() {
        let tenant = Uuid::nil();
        let at = Cursor { created_at: DateTime::from_timestamp_micros(1).unwrap(), id: Uuid::nil() };
        let cases = [
            (Visible::All, None, "SELECT x FROM t ORDER BY t.created_at, t.id LIMIT $1"),
            (
                Visible::All,
                Some(at),
                "SELECT x FROM t WHERE (t.created_at, t.id) > ($1, $2) ORDER BY t.created_at, t.id LIMIT $3",
            ),
            (
                Visible::Tenant(tenant),
                None,
                "SELECT x FROM t WHERE t.tenant_id = $1 ORDER BY t.created_at, t.id LIMIT $2",
            ),
            (
                Visible::TenantOrBuiltin(tenant),
                Some(at),
                "SELECT x FROM t WHERE (t.tenant_id = $1 OR t.tenant_id IS NULL) AND (t.created_at, t.id) > ($2, $3) \
                 ORDER BY t.created_at, t.id LIMIT $4",
            ),
        ];
        for (visible, cursor, want) in cases {
            assert_eq!(sql(list_query(T, visible, cursor, 10)), want, "{visible:?} {cursor:?}");
        }
    }

    #[test]
    fn lookups_match_name_or_id_and_prefer_the_tenants_own() {
        let tenant = Uuid::nil();
        let cases = [
            (Visible::All, RowLock::None, "SELECT x FROM t WHERE (t.name = $1 OR t.id = $2)"),
            (
                Visible::Tenant(tenant),
                RowLock::Update,
                "SELECT x FROM t WHERE t.tenant_id = $1 AND (t.name = $2 OR t.id = $3) FOR UPDATE",
            ),
            (
                Visible::TenantOrBuiltin(tenant),
                RowLock::Share,
                "SELECT x FROM t WHERE (t.tenant_id = $1 OR t.tenant_id IS NULL) AND (t.name = $2 OR t.id = $3) \
                 ORDER BY t.tenant_id NULLS LAST LIMIT 1 FOR SHARE",
            ),
        ];
        for (visible, lock, want) in cases {
            assert_eq!(sql(find_query(T, visible, "web", lock)), want, "{visible:?} {lock:?}");
        }
    }

    #[test]
    fn a_page_ends_where_the_extra_row_begins() {
        let key = |n: &i64| Cursor { created_at: DateTime::from_timestamp_micros(*n).unwrap(), id: Uuid::nil() };
        assert_eq!(finish(vec![1, 2], 2, key), (vec![1, 2], None));
        assert_eq!(finish(vec![1, 2, 3], 2, key), (vec![1, 2], Some(key(&2))));
        assert_eq!(finish(Vec::new(), 0, key), (Vec::new(), None));
    }
}
