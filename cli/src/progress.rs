//! Progress of long operations on stderr: one line redrawn on a terminal, plain lines for logs.

use std::io::{IsTerminal, Write};

/// A progress line.
pub struct Progress {
    tty: bool,
    last: String,
    spin: usize,
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress {
    /// Progress on stderr, redrawn when stderr is a terminal.
    pub fn new() -> Self {
        Self { tty: std::io::stderr().is_terminal(), last: String::new(), spin: 0 }
    }

    /// Whether lines are redrawn (a terminal) rather than appended (a log).
    pub fn is_tty(&self) -> bool {
        self.tty
    }

    /// A step: redrawn on a terminal; in a log, a line each time the message changes.
    pub fn step(&mut self, msg: &str) {
        if self.tty {
            const FRAMES: [char; 4] = ['|', '/', '-', '\\'];
            self.spin = (self.spin + 1) % FRAMES.len();
            eprint!("\r\x1b[2K{} {msg}", FRAMES[self.spin]);
            let _ = std::io::stderr().flush();
        } else if msg != self.last {
            eprintln!("{msg}");
        }
        self.last = msg.to_owned();
    }

    /// Bytes sent of a total: every percent on a terminal; in a log, every quarter of uploads large enough
    /// to take a while (small ones print nothing).
    pub fn bytes(&mut self, what: &str, done: u64, total: u64) {
        let percent = (done * 100).checked_div(total).unwrap_or(100);
        if self.tty {
            self.step(&format!("{what}: {} of {} ({percent}%)", size(done), size(total)));
        } else if total >= LOGGED_UPLOAD {
            self.step(&format!("{what}: {}%", percent / 25 * 25));
        }
    }

    /// The end of a step: the line stays.
    pub fn done(&mut self, msg: &str) {
        if self.tty {
            eprintln!("\r\x1b[2K✓ {msg}");
        } else {
            eprintln!("{msg}");
        }
    }

    /// Clears a redrawn line (nothing to keep, e.g. before an error).
    pub fn clear(&mut self) {
        if self.tty && !self.last.is_empty() {
            eprint!("\r\x1b[2K");
            let _ = std::io::stderr().flush();
        }
    }
}

/// Uploads from this size on report their progress in logs too.
const LOGGED_UPLOAD: u64 = 16 << 20;

/// A byte count for people: `512 B`, `3.2 KiB`, `48.0 MiB`.
pub fn size(bytes: u64) -> String {
    match bytes {
        b if b < 1024 => format!("{b} B"),
        b if b < 1 << 20 => format!("{:.1} KiB", b as f64 / 1024.0),
        b if b < 1 << 30 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_read_naturally() {
        assert_eq!(super::size(512), "512 B");
        assert_eq!(super::size(3277), "3.2 KiB");
        assert_eq!(super::size(48 << 20), "48.0 MiB");
    }
}
