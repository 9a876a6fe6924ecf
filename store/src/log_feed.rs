//! Followers of instance logs, woken by PostgreSQL instead of polling it.
//!
//! Node agents append lines from other processes; a trigger announces each append on [`LOGS_CHANNEL`] (see
//! `migrations/0019_log_notifications.sql`). One listener per process ([`LogFeed`]) reads the new lines of a
//! followed instance once per notification and hands them to all of that instance's followers in memory, so a
//! thousand followers cost the database what one does, and an idle follower costs it nothing. A follower reads
//! the database itself only to start, and when it fell behind the lines kept in memory.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use cloud_domain::api::LogLine;
use sqlx::postgres::PgListener;
use tokio::sync::watch;
use uuid::Uuid;

use crate::{Store, StoreError};

/// The NOTIFY channel announcing appended lines (`<instance> <first seq> <last seq>`) and deleted instances
/// (`<instance> deleted`).
pub const LOGS_CHANNEL: &str = "cloud_instance_logs";

/// Lines read per query.
const BATCH: i64 = 500;
/// The newest lines kept in memory per followed instance, for followers a little behind: at most this many...
const WINDOW_LINES: usize = 1000;
/// ...and at most this many bytes of text.
const WINDOW_BYTES: usize = 1 << 20;
/// How long the listener waits before reconnecting, or before reading lines again after a failed read.
const RETRY: Duration = Duration::from_secs(1);

/// What this process knows of a followed instance's newest lines.
#[derive(Debug, Clone, Default)]
struct LogTail {
    /// `None` until known; then every line after this `seq` is in `lines`.
    complete_after: Option<i64>,
    /// The newest lines, oldest first.
    lines: Arc<[Arc<LogLine>]>,
    /// The instance is gone: no line will follow.
    deleted: bool,
}

impl LogTail {
    /// The newest `seq` this process knows of.
    fn newest(&self) -> Option<i64> {
        self.lines.last().map(|l| l.seq).or(self.complete_after)
    }

    /// This tail with `fetched`, the lines after `from` as read now.
    fn merged(&self, from: i64, fetched: Vec<LogLine>) -> LogTail {
        let (after, mut lines) = match (self.complete_after, self.newest()) {
            (Some(after), Some(newest)) if from <= newest => {
                let mut lines = self.lines.to_vec();
                lines.extend(fetched.into_iter().filter(|l| l.seq > newest).map(Arc::new));
                (after, lines)
            }
            // Unknown, or a gap between what was known and what was read: start over from what was read.
            _ => (from, fetched.into_iter().map(Arc::new).collect()),
        };
        let mut bytes = 0;
        let keep = lines
            .iter()
            .rev()
            .take(WINDOW_LINES)
            .take_while(|l| {
                bytes += l.line.len();
                bytes <= WINDOW_BYTES
            })
            .count();
        let cut = lines.len() - keep;
        let after = if cut > 0 { lines[cut - 1].seq } else { after };
        lines.drain(..cut);
        LogTail { complete_after: Some(after), lines: lines.into(), deleted: self.deleted }
    }
}

type Followed = HashMap<Uuid, watch::Sender<Arc<LogTail>>>;

/// Instances whose new lines could not be read, with the range announced.
type Unread = HashMap<Uuid, Option<(i64, i64)>>;

#[derive(Debug)]
struct Shared {
    store: Store,
    followed: Mutex<Followed>,
    /// Bumped whenever notifications may have been lost (the listener reconnected).
    epoch: AtomicU64,
    /// Dropped with the last [`LogFeed`]: the listener then stops.
    _alive: watch::Sender<()>,
}

impl Shared {
    fn followed(&self) -> std::sync::MutexGuard<'_, Followed> {
        self.followed.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sender(&self, id: Uuid) -> Option<watch::Sender<Arc<LogTail>>> {
        self.followed().get(&id).cloned()
    }
}

/// The process's one listener for log notifications, shared by every follower.
#[derive(Debug, Clone)]
pub struct LogFeed {
    shared: Arc<Shared>,
}

impl LogFeed {
    /// Listens for log notifications; returns once listening, so that no follower started after it misses one.
    pub async fn start(store: Store) -> Result<Self, StoreError> {
        let listener = listen(&store).await?;
        let (alive, alive_rx) = watch::channel(());
        let shared = Arc::new(Shared {
            store: store.clone(),
            followed: Mutex::default(),
            epoch: AtomicU64::new(0),
            _alive: alive,
        });
        tokio::spawn(run(Arc::downgrade(&shared), store, alive_rx, listener));
        Ok(Self { shared })
    }

    /// Starts following instance `id`: every line committed from now on reaches the follower. Call it before
    /// reading the lines the follower starts after, then [`LogFollower::start_after`].
    pub fn follow(&self, id: Uuid) -> LogFollower {
        let epoch = self.shared.epoch.load(Ordering::SeqCst);
        let rx = self.shared.followed().entry(id).or_insert_with(|| watch::channel(Arc::default()).0).subscribe();
        LogFollower { shared: self.shared.clone(), id, rx, epoch, last: 0, behind: true, catch_up_to: 0, dirty: true }
    }

    /// Instances followed in this process now.
    pub fn followed_instances(&self) -> usize {
        self.shared.followed().len()
    }
}

/// What a follower gets next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogUpdate {
    /// New lines, oldest first.
    Lines(Vec<LogLine>),
    /// The instance is gone (or the process is shutting down): nothing will follow.
    Ended,
}

/// One follower of an instance's log.
#[derive(Debug)]
pub struct LogFollower {
    shared: Arc<Shared>,
    id: Uuid,
    rx: watch::Receiver<Arc<LogTail>>,
    epoch: u64,
    /// The last line delivered.
    last: i64,
    /// Whether lines after `last` may exist that this follower must read from the database...
    behind: bool,
    /// ...at least up to this `seq`, if they still exist.
    catch_up_to: i64,
    /// Whether the tail may hold lines not yet delivered.
    dirty: bool,
}

impl LogFollower {
    /// Where the follower starts: after line `seq`. `newest` is the newest line's `seq` (0 for an empty log) when
    /// the caller read up to it; without it, the follower first reads on from the database.
    pub fn start_after(&mut self, seq: i64, newest: Option<i64>) {
        self.last = seq;
        self.behind = newest.is_none();
        if let Some(newest) = newest {
            self.seed(newest);
        }
    }

    /// The next lines after the last ones returned, waiting for them. Cancel-safe: lines are returned once.
    pub async fn next(&mut self) -> Result<LogUpdate, StoreError> {
        loop {
            if self.behind {
                let lines = self.shared.store.log_lines_after(self.id, self.last, BATCH).await?;
                if (lines.len() as i64) < BATCH {
                    // Read up to the newest line: lines below the window's start that were not there are gone.
                    self.behind = false;
                    if let Some(l) = lines.last() {
                        self.seed(l.seq);
                    }
                    self.last = self.last.max(self.catch_up_to);
                }
                if let Some(l) = lines.last() {
                    self.last = self.last.max(l.seq);
                    return Ok(LogUpdate::Lines(lines));
                }
                continue;
            }
            if !self.dirty {
                if self.rx.changed().await.is_err() {
                    return Ok(LogUpdate::Ended);
                }
                self.dirty = true;
            }
            let tail = self.rx.borrow_and_update().clone();
            if let Some(after) = tail.complete_after {
                if after > self.last {
                    // Fell behind what is kept in memory.
                    (self.behind, self.catch_up_to) = (true, after);
                    continue;
                }
                let new: Vec<LogLine> =
                    tail.lines.iter().filter(|l| l.seq > self.last).map(|l| (**l).clone()).collect();
                if let Some(l) = new.last() {
                    self.last = l.seq;
                    return Ok(LogUpdate::Lines(new));
                }
            }
            if tail.deleted {
                return Ok(LogUpdate::Ended);
            }
            self.dirty = false;
        }
    }

    /// Tells the feed, when it knows nothing yet, that `newest` is the newest line: every line after it will be
    /// announced. Not when notifications may have been lost since the follower subscribed.
    fn seed(&mut self, newest: i64) {
        self.dirty = true;
        if self.shared.epoch.load(Ordering::SeqCst) != self.epoch {
            return;
        }
        if let Some(tx) = self.shared.sender(self.id) {
            tx.send_if_modified(|tail| {
                if tail.complete_after.is_some() {
                    return false;
                }
                *tail = Arc::new(LogTail { complete_after: Some(newest), ..(**tail).clone() });
                true
            });
        }
    }
}

impl Drop for LogFollower {
    fn drop(&mut self) {
        let mut followed = self.shared.followed();
        // Our own receiver still counts.
        if followed.get(&self.id).is_some_and(|tx| tx.receiver_count() <= 1) {
            followed.remove(&self.id);
        }
    }
}

async fn listen(store: &Store) -> Result<PgListener, StoreError> {
    let mut l = PgListener::connect_with(store.pool()).await?;
    l.listen(LOGS_CHANNEL).await?;
    Ok(l)
}

/// A notification's meaning.
#[derive(Debug, PartialEq, Eq)]
enum Notice {
    Appended { id: Uuid, first: i64, last: i64 },
    Deleted(Uuid),
}

fn parse(payload: &str) -> Option<Notice> {
    let mut parts = payload.split(' ');
    let id = parts.next()?.parse().ok()?;
    match (parts.next()?, parts.next(), parts.next()) {
        ("deleted", None, None) => Some(Notice::Deleted(id)),
        (first, Some(last), None) => {
            Some(Notice::Appended { id, first: first.parse().ok()?, last: last.parse().ok()? })
        }
        _ => None,
    }
}

async fn run(shared: Weak<Shared>, store: Store, mut alive: watch::Receiver<()>, first: PgListener) {
    let mut listener = Some(first);
    // Instances whose new lines could not be read (with what was announced): read again after a pause.
    let mut unread = Unread::new();
    loop {
        let mut l = match listener.take() {
            Some(l) => l,
            None => {
                let connected = tokio::select! {
                    _ = alive.changed() => return,
                    l = listen(&store) => l,
                };
                match connected {
                    Ok(l) => {
                        let Some(shared) = shared.upgrade() else { return };
                        resync(&shared, &mut unread).await;
                        l
                    }
                    Err(e) => {
                        tracing::warn!(error = %cloud_domain::error_chain(&e), "log feed: cannot listen; retrying");
                        tokio::select! {
                            _ = alive.changed() => return,
                            _ = tokio::time::sleep(RETRY) => continue,
                        }
                    }
                }
            }
        };
        loop {
            tokio::select! {
                _ = alive.changed() => return,
                n = l.try_recv() => {
                    let Some(shared) = shared.upgrade() else { return };
                    match n {
                        Ok(Some(n)) => match parse(n.payload()) {
                            Some(Notice::Appended { id, first, last }) => {
                                read_new_lines(&shared, id, Some((first, last)), &mut unread).await;
                            }
                            Some(Notice::Deleted(id)) => mark_deleted(&shared, id),
                            None => tracing::warn!(payload = n.payload(), "log feed: unexpected notification"),
                        },
                        // Lost the connection, and listening again: what was announced meanwhile is lost.
                        Ok(None) => resync(&shared, &mut unread).await,
                        Err(e) => {
                            tracing::warn!(error = %cloud_domain::error_chain(&e), "log feed: listener failed; reconnecting");
                            break;
                        }
                    }
                }
                _ = tokio::time::sleep(RETRY), if !unread.is_empty() => {
                    let Some(shared) = shared.upgrade() else { return };
                    for (id, announced) in std::mem::take(&mut unread) {
                        read_new_lines(&shared, id, announced, &mut unread).await;
                    }
                }
            }
        }
    }
}

/// Reads the lines of a followed instance after those known, once for all its followers. `announced` is the
/// notification's range, which says where to start when nothing is known yet.
async fn read_new_lines(shared: &Shared, id: Uuid, announced: Option<(i64, i64)>, unread: &mut Unread) {
    let Some(tx) = shared.sender(id) else { return };
    let tail = tx.borrow().clone();
    let from = match (tail.newest(), announced) {
        (Some(newest), Some((_, last))) if newest >= last => return,
        (Some(newest), _) => newest,
        (None, Some((first, _))) => first - 1,
        // Nothing known and nothing announced: the followers read for themselves.
        (None, None) => return,
    };
    let mut fetched = Vec::new();
    loop {
        let after = fetched.last().map_or(from, |l: &LogLine| l.seq);
        match shared.store.log_lines_after(id, after, BATCH).await {
            Ok(lines) => {
                let full = lines.len() as i64 == BATCH;
                fetched.extend(lines);
                if !full {
                    break;
                }
            }
            Err(e) => {
                tracing::warn!(error = %cloud_domain::error_chain(&e), instance = %id, "log feed: cannot read new lines");
                unread.insert(id, announced);
                // What was read is still complete up to its last line; nothing read claims nothing.
                if fetched.is_empty() {
                    return;
                }
                break;
            }
        }
    }
    if fetched.is_empty() && tail.complete_after.is_some() {
        return;
    }
    tx.send_if_modified(|t| {
        *t = Arc::new(t.merged(from, std::mem::take(&mut fetched)));
        true
    });
}

fn mark_deleted(shared: &Shared, id: Uuid) {
    if let Some(tx) = shared.sender(id) {
        tx.send_if_modified(|t| {
            if t.deleted {
                return false;
            }
            *t = Arc::new(LogTail { deleted: true, ..(**t).clone() });
            true
        });
    }
}

/// After notifications may have been lost: reads what every followed instance appended meanwhile, and notes
/// those deleted meanwhile.
async fn resync(shared: &Shared, unread: &mut Unread) {
    shared.epoch.fetch_add(1, Ordering::SeqCst);
    let ids: Vec<Uuid> = shared.followed().keys().copied().collect();
    if ids.is_empty() {
        return;
    }
    match shared.store.existing_instances(&ids).await {
        Ok(existing) => {
            for id in ids.iter().filter(|id| !existing.contains(id)) {
                mark_deleted(shared, *id);
            }
        }
        Err(e) => tracing::warn!(error = %cloud_domain::error_chain(&e), "log feed: cannot check followed instances"),
    }
    for id in ids {
        read_new_lines(shared, id, None, unread).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(seq: i64, text: &str) -> LogLine {
        LogLine { seq, at: chrono::Utc::now(), stream: "stdout".into(), line: text.into() }
    }

    fn seqs(t: &LogTail) -> Vec<i64> {
        t.lines.iter().map(|l| l.seq).collect()
    }

    #[test]
    fn notifications_are_parsed() {
        let id = Uuid::new_v4();
        assert_eq!(parse(&format!("{id} 3 7")), Some(Notice::Appended { id, first: 3, last: 7 }));
        assert_eq!(parse(&format!("{id} deleted")), Some(Notice::Deleted(id)));
        assert_eq!(parse(&format!("{id} 3")), None);
        assert_eq!(parse("x 1 2"), None);
        assert_eq!(parse(&format!("{id} 1 2 3")), None);
    }

    #[test]
    fn a_tail_grows_from_what_it_knows_and_restarts_after_a_gap() {
        let t = LogTail::default().merged(4, vec![line(5, "a"), line(6, "b")]);
        assert_eq!((t.complete_after, seqs(&t)), (Some(4), vec![5, 6]));
        // Overlapping reads add only what is new.
        let t = t.merged(5, vec![line(6, "b"), line(7, "c")]);
        assert_eq!((t.complete_after, seqs(&t)), (Some(4), vec![5, 6, 7]));
        // A read starting after the newest known line leaves a gap: the tail starts over there.
        let t = t.merged(9, vec![line(10, "d")]);
        assert_eq!((t.complete_after, seqs(&t)), (Some(9), vec![10]));
    }

    #[test]
    fn a_tail_keeps_a_bounded_window() {
        let many: Vec<LogLine> = (1..=WINDOW_LINES as i64 + 10).map(|s| line(s, "x")).collect();
        let t = LogTail::default().merged(0, many);
        assert_eq!(t.lines.len(), WINDOW_LINES);
        assert_eq!(t.complete_after, Some(10));
        let big = "y".repeat(WINDOW_BYTES / 2 + 1);
        let t = LogTail::default().merged(0, vec![line(1, &big), line(2, &big), line(3, &big)]);
        assert_eq!((t.complete_after, seqs(&t)), (Some(2), vec![3]));
    }
}
