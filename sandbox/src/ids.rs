//! Host uid/gid ranges for sandboxes' user namespaces: each running sandbox holds a range of 65536 ids that no
//! other sandbox on the host holds, so root in one sandbox is an unprivileged stranger to every other one and
//! to the host.
//!
//! A range is held by an exclusive `flock` on its file in a host-wide directory: the kernel releases it when
//! the holder closes it or dies, and it works between agents in one process (locks belong to open files) as
//! between processes. The ranges start at 2^30, above the ids any distribution gives accounts and above the
//! usual `/etc/subuid` ranges, and never include 0 or 65534.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use crate::SandboxError;

/// Where ranges are held unless configured otherwise: host-wide, and gone at reboot with the sandboxes.
pub const DEFAULT_DIR: &str = "/run/cloud/ids";

/// Ids per sandbox: a full 16-bit id space, as images expect (uid 65534 `nobody` included).
pub const RANGE_SIZE: u32 = 65536;
/// The first range's first id.
const FIRST: u32 = 1 << 30;
/// How many ranges there are (up to 2^31).
const RANGES: u32 = 1 << 14;

/// Where ranges are handed out on this host.
#[derive(Debug, Clone)]
pub struct IdPool {
    dir: PathBuf,
}

/// A held range; dropping it releases the range.
#[derive(Debug)]
pub struct IdRange {
    /// The host id that is root (0) inside the sandbox.
    pub base: u32,
    lock: File,
}

impl IdRange {
    /// Records the first process of the sandbox holding the range, so that the range is not handed out again
    /// while that process lives, even after the lock is gone with the agent that held it.
    pub fn held_by(&mut self, pid: i32) {
        let _ = self.lock.write_all(format!("{pid}\n").as_bytes());
    }
}

/// Whether the process a range's file names still runs with ids of that range. A sandbox ends with its agent
/// (see the crate docs), a moment after the agent's lock is released: this covers that moment, and any sandbox
/// that could outlive its agent.
fn still_running(path: &std::path::Path, base: u32) -> bool {
    use std::os::unix::fs::MetadataExt;
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let Some(pid) = text.lines().nth(1).and_then(|l| l.trim().parse::<u32>().ok()) else { return false };
    // A zombie (ended, not yet reaped) holds nothing.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let alive = stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with(['Z', 'X']));
    alive && std::fs::metadata(format!("/proc/{pid}")).is_ok_and(|m| (base..base + RANGE_SIZE).contains(&m.uid()))
}

impl IdPool {
    /// A pool kept in `dir` (created when missing). Every agent on a host must use the same directory.
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    /// Takes a free range for `owner` (written into the range's file, for operators).
    pub fn acquire(&self, owner: &str) -> Result<IdRange, SandboxError> {
        let io = |e| SandboxError::Io { what: format!("id ranges in {}", self.dir.display()), source: e };
        std::fs::create_dir_all(&self.dir).map_err(io)?;
        for k in 0..RANGES {
            let path = self.dir.join(k.to_string());
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(io)?;
            let base = FIRST + k * RANGE_SIZE;
            if try_lock(&file) && !still_running(&path, base) {
                let _ = file.set_len(0).and_then(|()| file.write_all(format!("{owner}\n").as_bytes()));
                return Ok(IdRange { base, lock: file });
            }
        }
        Err(SandboxError::NoIds)
    }
}

/// Takes an exclusive lock on a file without waiting; false when another open file holds it.
#[allow(unsafe_code)]
pub(crate) fn try_lock(file: &File) -> bool {
    // SAFETY: flock(2) on a descriptor we own.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_exclusive_until_dropped_and_never_touch_root_or_nobody() {
        let dir = tempfile::tempdir().unwrap();
        let pool = IdPool::new(dir.path().to_path_buf());
        let other = IdPool::new(dir.path().to_path_buf());
        let a = pool.acquire("a").unwrap();
        let b = other.acquire("b").unwrap();
        assert_ne!(a.base, b.base);
        for r in [&a, &b] {
            let ids = r.base..r.base + RANGE_SIZE;
            assert!(!ids.contains(&0) && !ids.contains(&65534), "{ids:?}");
        }
        let a_base = a.base;
        drop(a);
        assert_eq!(pool.acquire("c").unwrap().base, a_base, "a released range is taken again");
    }
}
