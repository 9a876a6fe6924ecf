//! Instance output on its way to PostgreSQL, bounded at every step, so that what an instance prints costs the
//! node a fixed amount of memory whatever it prints:
//!
//! - a line is cut at [`MAX_LINE_BYTES`] and marked as cut; the rest of an overlong line is read and counted,
//!   never buffered, so a reader holds at most one line and one read chunk per stream;
//! - each instance has a rate ([`LogLimits`], a token bucket for bytes and one for lines); output beyond it is
//!   dropped, and a `system` line says how much, at most once per [`NOTE_INTERVAL`];
//! - the node's queue to the shipper holds at most [`QUEUE_BYTES`]; when the database falls behind, output is
//!   dropped (and counted the same way) rather than queued.
//!
//! Output is dropped, never pushed back: the pipes are always drained. Pushing back would block the instance in
//! `write(2)` to its stdout, which for most programs means blocking the request that logs, so an instance that
//! logs more than its share would hang instead of losing lines; and the note keeps the loss visible. The cost is
//! the agent's CPU to read and discard (a pipe read per 64 KiB, a memchr, a bucket check per line), which the
//! instance pays for as much in its own CPU time.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use uuid::Uuid;

/// Longest line stored, in bytes; longer lines keep their first bytes and end with
/// `… [line cut: N more bytes]`.
pub const MAX_LINE_BYTES: usize = 16 * 1024;

/// Bytes of output (lines, plus a fixed cost per entry) queued on a node between its instances and PostgreSQL.
pub const QUEUE_BYTES: usize = 4 << 20;

/// Least time between two notes of dropped output of one instance.
pub const NOTE_INTERVAL: Duration = Duration::from_secs(5);

/// Longest wait for room in the queue for a note of the platform.
const NOTE_WAIT: Duration = Duration::from_secs(2);

/// What a queued entry costs besides its text (its bookkeeping), so that empty lines are not free.
const ENTRY_COST: usize = 64;

/// Bytes read from a pipe at once.
const READ_CHUNK: usize = 64 * 1024;

/// Lines of output kept in memory to explain a failure, and how much of each.
const TAIL_LINES: usize = 20;
const TAIL_LINE_BYTES: usize = 256;

/// How much output each instance may send to the database; beyond it, output is dropped.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogLimits {
    /// Sustained bytes per second.
    pub bytes_per_second: u32,
    /// Bytes an instance may print at once after being quiet (at least one whole cut line).
    pub burst_bytes: u32,
    /// Sustained lines per second.
    pub lines_per_second: u32,
    /// Lines an instance may print at once after being quiet.
    pub burst_lines: u32,
}

impl Default for LogLimits {
    fn default() -> Self {
        Self { bytes_per_second: 32 * 1024, burst_bytes: 512 * 1024, lines_per_second: 200, burst_lines: 2000 }
    }
}

/// One line of output, or a note of the platform, on its way to the database.
#[derive(Debug)]
pub(crate) struct LogEntry {
    pub instance: Uuid,
    pub at: DateTime<Utc>,
    pub stream: &'static str,
    pub line: String,
}

/// An entry in the node's queue, holding its share of [`QUEUE_BYTES`] until it is stored.
#[derive(Debug)]
pub(crate) struct Queued {
    pub entry: LogEntry,
    pub room: OwnedSemaphorePermit,
}

/// The sending side of the node's log queue.
#[derive(Debug, Clone)]
pub(crate) struct LogQueue {
    tx: mpsc::UnboundedSender<Queued>,
    room: Arc<Semaphore>,
    bytes: usize,
}

impl LogQueue {
    /// A queue of at most `bytes`, and its receiving end.
    pub fn new(bytes: usize) -> (Self, mpsc::UnboundedReceiver<Queued>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let bytes = bytes.clamp(ENTRY_COST, u32::MAX as usize);
        (Self { tx, room: Arc::new(Semaphore::new(bytes)), bytes }, rx)
    }

    fn cost(&self, entry: &LogEntry) -> u32 {
        // A note longer than the whole queue would wait forever: it takes the whole queue instead.
        (entry.line.len() + ENTRY_COST).min(self.bytes) as u32
    }

    /// Queues an entry if there is room now; `false` when it was dropped.
    pub fn offer(&self, entry: LogEntry) -> bool {
        match self.room.clone().try_acquire_many_owned(self.cost(&entry)) {
            Ok(room) => self.tx.send(Queued { entry, room }).is_ok(),
            Err(_) => false,
        }
    }

    /// Queues a note of the platform, waiting for room: notes are few and small. Not for longer than
    /// [`NOTE_WAIT`], though: the queue stays full while PostgreSQL does not take lines, and the supervisor that
    /// writes the note must go on restarting or stopping its instance meanwhile.
    pub async fn send(&self, entry: LogEntry) {
        let room = self.room.clone().acquire_many_owned(self.cost(&entry));
        match tokio::time::timeout(NOTE_WAIT, room).await {
            Ok(Ok(room)) => drop(self.tx.send(Queued { entry, room })),
            Ok(Err(_)) => {}
            Err(_) => tracing::debug!(instance = %entry.instance, line = %entry.line, "log queue full; note dropped"),
        }
    }
}

/// Splits a byte stream into lines of at most `max` bytes, holding at most one line.
#[derive(Debug)]
pub(crate) struct LineCutter {
    max: usize,
    buf: Vec<u8>,
    /// Bytes of the current line beyond `max`, read and dropped.
    cut: u64,
}

impl LineCutter {
    pub fn new(max: usize) -> Self {
        Self { max, buf: Vec::new(), cut: 0 }
    }

    /// Feeds bytes read; calls `line(text, cut)` for each line they complete, with its first bytes (at most
    /// `max`, without the line ending) and the number of bytes cut from it.
    pub fn push(&mut self, mut bytes: &[u8], mut line: impl FnMut(&[u8], u64)) {
        while !bytes.is_empty() {
            let (part, complete) = match newline(bytes) {
                Some(i) => (&bytes[..i], true),
                None => (bytes, false),
            };
            bytes = if complete { &bytes[part.len() + 1..] } else { &[] };
            if complete && self.buf.is_empty() && self.cut == 0 && part.len() <= self.max {
                line(trim_cr(part), 0);
                continue;
            }
            let take = part.len().min(self.max - self.buf.len());
            self.buf.extend_from_slice(&part[..take]);
            self.cut += (part.len() - take) as u64;
            if complete {
                self.emit(&mut line);
            }
        }
    }

    /// At the end of the stream: the last line if it had no line ending.
    pub fn finish(&mut self, mut line: impl FnMut(&[u8], u64)) {
        if !self.buf.is_empty() || self.cut > 0 {
            self.emit(&mut line);
        }
    }

    fn emit(&mut self, line: &mut impl FnMut(&[u8], u64)) {
        let mut end = self.buf.len();
        if self.cut > 0 {
            // Cut on a character boundary: a partial UTF-8 sequence at the end goes with the cut bytes.
            end = utf8_boundary(&self.buf);
            self.cut += (self.buf.len() - end) as u64;
        }
        let text = if self.cut == 0 { trim_cr(&self.buf[..end]) } else { &self.buf[..end] };
        line(text, self.cut);
        self.buf.clear();
        // An overlong line's buffer is kept (at most `max`) for the next one; nothing grows beyond it.
        self.cut = 0;
    }
}

/// The index of the first `\n`. std's memchr (reached through `BufRead` on a slice) is vectorised even in
/// debug builds, where a byte loop over a 400 MB line takes seconds.
fn newline(bytes: &[u8]) -> Option<usize> {
    let mut rest = bytes;
    let n = std::io::BufRead::skip_until(&mut rest, b'\n').ok()?;
    (n > 0 && bytes[n - 1] == b'\n').then(|| n - 1)
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// The length of `bytes` without a trailing incomplete UTF-8 sequence.
fn utf8_boundary(bytes: &[u8]) -> usize {
    let len = bytes.len();
    for back in 1..=len.min(4) {
        let b = bytes[len - back];
        if b & 0xC0 == 0x80 {
            continue;
        }
        let needed = match b {
            0x00..=0x7F => 1,
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            _ => 4,
        };
        return if needed > back { len - back } else { len };
    }
    len
}

/// The text stored for a line.
pub(crate) fn render(text: &[u8], cut: u64) -> String {
    let text = String::from_utf8_lossy(text);
    if cut == 0 { text.into_owned() } else { format!("{text}… [line cut: {cut} more bytes]") }
}

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    pub fn new(rate: u32, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        Self { rate: f64::from(rate), burst, tokens: burst, at: now }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.at = now;
    }

    fn has(&mut self, n: f64, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= n
    }

    fn take(&mut self, n: f64) {
        self.tokens -= n;
    }
}

/// Output dropped since the last note.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Dropped {
    lines: u64,
    bytes: u64,
}

/// Why output was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DropReason {
    /// Over the instance's rate.
    Rate,
    /// The node's queue to the database was full.
    QueueFull,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rate => "rate",
            Self::QueueFull => "queue_full",
        }
    }
}

/// One instance's allowance, shared by its stdout and stderr and kept across its restarts.
#[derive(Debug)]
pub(crate) struct OutputBudget {
    limits: LogLimits,
    bytes: TokenBucket,
    lines: TokenBucket,
    over_rate: Dropped,
    queue_full: Dropped,
    /// When the note of what was dropped is due.
    due: Option<Instant>,
}

impl OutputBudget {
    pub fn new(limits: LogLimits, now: Instant) -> Self {
        // A cut line must always be able to pass once the bucket is full.
        let burst_bytes = limits.burst_bytes.max((MAX_LINE_BYTES + 64) as u32);
        Self {
            limits,
            bytes: TokenBucket::new(limits.bytes_per_second, burst_bytes, now),
            lines: TokenBucket::new(limits.lines_per_second, limits.burst_lines, now),
            over_rate: Dropped::default(),
            queue_full: Dropped::default(),
            due: None,
        }
    }

    /// Whether a line of `len` bytes fits the rate now; if so, it is charged.
    pub fn admit(&mut self, len: usize, now: Instant) -> bool {
        let len = len as f64;
        if self.bytes.has(len, now) && self.lines.has(1.0, now) {
            self.bytes.take(len);
            self.lines.take(1.0);
            true
        } else {
            false
        }
    }

    /// Counts a dropped line for the next note.
    pub fn dropped(&mut self, reason: DropReason, len: usize, now: Instant) {
        let d = match reason {
            DropReason::Rate => &mut self.over_rate,
            DropReason::QueueFull => &mut self.queue_full,
        };
        d.lines += 1;
        d.bytes += len as u64;
        self.due.get_or_insert(now + NOTE_INTERVAL);
    }

    /// When a note is due, if any drop is unreported.
    pub fn note_due(&self) -> Option<Instant> {
        self.due
    }

    /// The note of what was dropped, once due (or at once with `force`, at the end of a stream); the counts
    /// start over.
    pub fn take_note(&mut self, now: Instant, force: bool) -> Option<String> {
        let due = self.due?;
        if !force && now < due {
            return None;
        }
        let mut parts = Vec::new();
        let l = self.limits;
        if self.over_rate.lines > 0 {
            parts.push(format!(
                "{} lines ({} bytes) over this instance's log rate ({} bytes/s, bursts of {} bytes; {} lines/s, bursts of {})",
                self.over_rate.lines,
                self.over_rate.bytes,
                l.bytes_per_second,
                l.burst_bytes,
                l.lines_per_second,
                l.burst_lines
            ));
        }
        if self.queue_full.lines > 0 {
            parts.push(format!(
                "{} lines ({} bytes) while the node's log queue was full (the database is behind)",
                self.queue_full.lines, self.queue_full.bytes
            ));
        }
        self.over_rate = Dropped::default();
        self.queue_full = Dropped::default();
        self.due = None;
        Some(format!("dropped {}", parts.join(" and ")))
    }
}

/// The last lines of a run, each shortened, to explain how it ended.
#[derive(Debug, Default)]
pub(crate) struct Tail(VecDeque<String>);

impl Tail {
    fn push(&mut self, text: &[u8]) {
        if self.0.len() == TAIL_LINES {
            self.0.pop_front();
        }
        let short = &text[..utf8_boundary(&text[..text.len().min(TAIL_LINE_BYTES)])];
        let mut line = String::from_utf8_lossy(short).into_owned();
        if short.len() < text.len() {
            line.push('…');
        }
        self.0.push_back(line);
    }

    /// The lines, oldest first.
    pub fn joined(&self) -> String {
        self.0.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

/// Where a run's output goes.
#[derive(Debug, Clone)]
pub(crate) struct Output {
    pub instance: Uuid,
    pub queue: LogQueue,
    pub budget: Arc<Mutex<OutputBudget>>,
    pub tail: Arc<Mutex<Tail>>,
    pub dropped_bytes: prometheus::IntCounterVec,
}

impl Output {
    /// Reads one stream of the instance to its end.
    pub async fn capture(self, mut stream: impl AsyncRead + Unpin, name: &'static str) {
        let mut chunk = vec![0u8; READ_CHUNK];
        let mut cutter = LineCutter::new(MAX_LINE_BYTES);
        loop {
            let due = self.lock_budget().note_due();
            let read = tokio::select! {
                read = stream.read(&mut chunk) => read,
                _ = tokio::time::sleep_until(due.unwrap_or_else(far_future).into()), if due.is_some() => {
                    self.note_drops(false);
                    continue;
                }
            };
            let n = match read {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            self.lines(name, |line| cutter.push(&chunk[..n], line));
        }
        self.lines(name, |line| cutter.finish(line));
        self.note_drops(true);
    }

    /// Offers the lines `feed` produces, under one lock of the budget and the tail.
    fn lines(&self, name: &'static str, feed: impl FnOnce(&mut dyn FnMut(&[u8], u64))) {
        let (now, at) = (Instant::now(), Utc::now());
        let mut budget = self.lock_budget();
        let mut tail = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        feed(&mut |text: &[u8], cut: u64| {
            tail.push(text);
            // What the line will cost once stored, marker included.
            let len = text.len() + if cut > 0 { 40 } else { 0 };
            let reason = if !budget.admit(len, now) {
                DropReason::Rate
            } else if self.queue.offer(LogEntry { instance: self.instance, at, stream: name, line: render(text, cut) })
            {
                return;
            } else {
                DropReason::QueueFull
            };
            budget.dropped(reason, len, now);
            self.dropped_bytes.with_label_values(&[reason.as_str()]).inc_by(len as u64);
        });
    }

    /// Queues the note of dropped output when due (or whatever is pending, with `force`).
    fn note_drops(&self, force: bool) {
        let now = Instant::now();
        let mut budget = self.lock_budget();
        if let Some(line) = budget.take_note(now, force) {
            let entry = LogEntry { instance: self.instance, at: Utc::now(), stream: "system", line };
            // No room: the counts are lost but the next drop schedules a note again. The reader never waits.
            let _ = self.queue.offer(entry);
        }
    }

    fn lock_budget(&self) -> std::sync::MutexGuard<'_, OutputBudget> {
        self.budget.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cut_lines(max: usize, chunks: &[&[u8]]) -> Vec<(String, u64)> {
        let mut c = LineCutter::new(max);
        let mut out = Vec::new();
        for chunk in chunks {
            c.push(chunk, |t, cut| out.push((String::from_utf8_lossy(t).into_owned(), cut)));
        }
        c.finish(|t, cut| out.push((String::from_utf8_lossy(t).into_owned(), cut)));
        out
    }

    #[test]
    fn lines_are_split_across_chunks_and_cut_at_the_limit() {
        let l = |s: &str, cut| (s.to_owned(), cut);
        assert_eq!(cut_lines(8, &[b"a\nbc", b"d\r\n\n"]), [l("a", 0), l("bcd", 0), l("", 0)]);
        assert_eq!(cut_lines(4, &[b"abcdefgh\nxy"]), [l("abcd", 4), l("xy", 0)]);
        // An overlong line over many chunks: only `max` bytes are ever held.
        assert_eq!(cut_lines(4, &[b"ab", b"cdef", b"gh", b"ij\nk\n"]), [l("abcd", 6), l("k", 0)]);
        assert_eq!(cut_lines(4, &[b"abcd\n"]), [l("abcd", 0)]);
        // A cut never splits a character: "é" is two bytes, the second would be past the limit.
        assert_eq!(cut_lines(4, &["abcé".as_bytes(), b"\n"]), [l("abc", 2)]);
        assert_eq!(cut_lines(5, &["abcéz".as_bytes(), b"\n"]), [l("abcé", 1)]);
        assert_eq!(cut_lines(4, &[b""]), []);
    }

    #[test]
    fn a_cut_line_says_how_much_was_cut() {
        assert_eq!(render(b"AB", 7), "AB… [line cut: 7 more bytes]");
        assert_eq!(render(b"AB", 0), "AB");
        assert_eq!(render(b"\xffA", 0), "\u{fffd}A");
    }

    #[test]
    fn the_rate_allows_a_burst_then_the_sustained_rate_and_notes_drops_once_per_interval() {
        let t0 = Instant::now();
        let limits = LogLimits { bytes_per_second: 1000, burst_bytes: 20_000, lines_per_second: 10, burst_lines: 3 };
        let mut b = OutputBudget::new(limits, t0);
        assert!(b.admit(100, t0) && b.admit(100, t0) && b.admit(100, t0));
        assert!(!b.admit(1, t0), "three lines of burst");
        b.dropped(DropReason::Rate, 1, t0);
        assert!(b.admit(1, t0 + Duration::from_millis(100)), "a line per 100 ms");
        assert!(!b.admit(20_000, t0 + Duration::from_millis(100)), "301 bytes were spent, 100 came back");
        b.dropped(DropReason::Rate, 20_000, t0 + Duration::from_millis(100));
        assert_eq!(b.note_due(), Some(t0 + NOTE_INTERVAL), "due an interval after the first drop");
        assert_eq!(b.take_note(t0 + Duration::from_secs(2), false), None);
        let note = b.take_note(t0 + NOTE_INTERVAL, false).unwrap();
        assert!(note.starts_with("dropped 2 lines (20001 bytes) over this instance's log rate"), "{note}");
        assert_eq!(b.note_due(), None);
        assert_eq!(b.take_note(t0 + NOTE_INTERVAL * 3, true), None, "nothing dropped since");
    }

    #[test]
    fn a_cut_line_always_fits_a_full_bucket() {
        let t0 = Instant::now();
        let limits = LogLimits { bytes_per_second: 1, burst_bytes: 10, lines_per_second: 1, burst_lines: 1 };
        assert!(OutputBudget::new(limits, t0).admit(MAX_LINE_BYTES + 40, t0));
    }

    #[test]
    fn the_tail_keeps_the_last_lines_shortened() {
        let mut tail = Tail::default();
        for i in 0..30 {
            tail.push(format!("line {i}").as_bytes());
        }
        tail.push(&[b'x'; 1000]);
        let joined = tail.joined();
        assert!(joined.starts_with("line 11\n"), "{joined}");
        assert!(joined.ends_with(&format!("{}…", "x".repeat(TAIL_LINE_BYTES))), "{joined}");
    }

    #[tokio::test]
    async fn the_queue_refuses_output_beyond_its_room_until_entries_are_stored() {
        let (queue, mut rx) = LogQueue::new(300);
        let entry =
            |line: &str| LogEntry { instance: Uuid::nil(), at: Utc::now(), stream: "stdout", line: line.into() };
        assert!(queue.offer(entry(&"a".repeat(100))));
        assert!(!queue.offer(entry(&"b".repeat(200))), "164 + 264 > 300");
        assert!(queue.offer(entry("c")));
        let first = rx.recv().await.unwrap();
        drop(first);
        assert!(queue.offer(entry(&"b".repeat(100))), "room again once the first is stored");
    }
}
