//! A command run inside a running sandbox (`instance exec`). The sandbox's init runs it as its own child
//! (`builtin/programs/init.rs`), so it has everything of the sandbox the init has (namespaces, cgroup, user,
//! capabilities, system call filter, environment) and nothing of the host. We connect to the init's socket in the
//! sandbox's exec directory and send the command with its three descriptors: pipes, or the far side of a
//! terminal made here; the exit code comes back on the same connection.
//!
//! Why not `runc exec`: runc before 1.3 joins the sandbox's user namespace before its network namespace, which that
//! user namespace does not own (ours are made by the agent, as the host's), and the kernel refuses.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;

use crate::{SandboxError, Sandboxes, io};

/// A terminal's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WinSize {
    /// Columns.
    pub cols: u16,
    /// Rows.
    pub rows: u16,
}

/// How an exec'd command's input and output are reached.
#[derive(Debug)]
pub enum ExecStdio {
    /// Three pipes.
    Pipes {
        /// Its standard input.
        stdin: pipe::Sender,
        /// Its standard output.
        stdout: pipe::Receiver,
        /// Its standard error.
        stderr: pipe::Receiver,
    },
    /// The controlling side of its terminal: what is written is typed, what is read is shown.
    Terminal(OwnedFd),
}

/// A running exec.
#[derive(Debug)]
pub struct Exec {
    /// The command's input and output.
    pub stdio: ExecStdio,
    /// Its end.
    pub end: ExecEnd,
}

/// The connection to the sandbox's init, which says when the command ends. Closing the terminal (or the pipes)
/// is how a command is ended early: its shell gets SIGHUP, a reader end of file.
#[derive(Debug)]
pub struct ExecEnd {
    control: tokio::net::UnixStream,
    /// What the init has answered so far: kept here, so that a wait dropped half-way (in a `select!`) loses none
    /// of it.
    answer: Vec<u8>,
}

impl ExecEnd {
    /// Waits for the command's end: its exit code (128 + signal for a signal), or why it could not run.
    /// Cancel-safe: a wait dropped before it returns may be started again and loses nothing.
    pub async fn wait(&mut self) -> Result<i32, String> {
        let mut chunk = [0u8; 1024];
        loop {
            // `read` is cancel-safe, and what it returns is kept before the next await.
            match self.control.read(&mut chunk).await {
                Ok(0) => break,
                Ok(n) => self.answer.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(format!("lost the sandbox's answer: {e}")),
            }
        }
        match self.answer.split_first() {
            Some((0, code)) => code.try_into().map(i32::from_be_bytes).map_err(|_| "a garbled answer".to_owned()),
            Some((1, why)) => Err(String::from_utf8_lossy(why).into_owned()),
            _ => Err("the sandbox ended before the command did".into()),
        }
    }
}

impl Sandboxes {
    /// The directory where the init of sandbox `id` takes exec requests, on this host.
    fn exec_dir(&self, id: &str) -> PathBuf {
        self.bundle(id).join("exec")
    }

    /// Runs `argv` in the running sandbox `id`, on a terminal of `tty`'s size if given.
    pub async fn exec(&self, id: &str, argv: &[String], tty: Option<WinSize>) -> Result<Exec, SandboxError> {
        let (theirs, stdio): ([OwnedFd; 3], ExecStdio) = match tty {
            Some(size) => {
                let (master, slave) = open_terminal().map_err(io("making a terminal"))?;
                resize(&master, size).map_err(io("sizing the terminal"))?;
                let copy = || slave.try_clone().map_err(io("making a terminal"));
                ([copy()?, copy()?, slave], ExecStdio::Terminal(master))
            }
            None => {
                let pair = || std::io::pipe().map_err(io("creating a pipe"));
                let ((in_r, in_w), (out_r, out_w), (err_r, err_w)) = (pair()?, pair()?, pair()?);
                let stdio = ExecStdio::Pipes {
                    stdin: pipe::Sender::from_owned_fd(in_w.into()).map_err(io("creating a pipe"))?,
                    stdout: pipe::Receiver::from_owned_fd(out_r.into()).map_err(io("creating a pipe"))?,
                    stderr: pipe::Receiver::from_owned_fd(err_r.into()).map_err(io("creating a pipe"))?,
                };
                ([in_r.into(), out_w.into(), err_w.into()], stdio)
            }
        };
        let mut request = vec![u8::from(tty.is_some())];
        for arg in argv {
            request.extend_from_slice(arg.as_bytes());
            request.push(0);
        }
        // A socket's path must fit in 108 bytes, which the bundle's may not: reached through the directory's
        // descriptor instead.
        let dir = std::fs::File::open(self.exec_dir(id)).map_err(io("opening the sandbox's exec directory"))?;
        let socket = format!("/proc/self/fd/{}/sock", dir.as_raw_fd());
        let stream = std::os::unix::net::UnixStream::connect(&socket).map_err(|e| SandboxError::Io {
            what: "reaching the sandbox's init (a sandbox started by an older agent takes no exec)".into(),
            source: e,
        })?;
        drop(dir);
        send_with_fds(stream.as_raw_fd(), &request, &theirs).map_err(io("sending the command to the sandbox"))?;
        // Their ends now live in the sandbox only: the output ends with the command.
        drop(theirs);
        stream.set_nonblocking(true).map_err(io("watching the command"))?;
        let control = tokio::net::UnixStream::from_std(stream).map_err(io("watching the command"))?;
        Ok(Exec { stdio, end: ExecEnd { control, answer: Vec::new() } })
    }
}

/// Sets a terminal's size (its programs get SIGWINCH).
#[allow(unsafe_code)]
pub fn resize(terminal: &OwnedFd, size: WinSize) -> std::io::Result<()> {
    let ws = libc::winsize { ws_row: size.rows, ws_col: size.cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which outlives the call.
    if unsafe { libc::ioctl(terminal.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A new pseudo-terminal: its controlling side and its far side.
#[allow(unsafe_code)]
fn open_terminal() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: posix_openpt returns a new descriptor or -1.
    let master = unsafe { libc::posix_openpt(flags) };
    if master < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor we just got and own.
    let master = unsafe { OwnedFd::from_raw_fd(master) };
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: calls on the descriptor we own; ptsname_r writes at most the buffer's length.
    unsafe {
        if libc::grantpt(master.as_raw_fd()) < 0 || libc::unlockpt(master.as_raw_fd()) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let e = libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len());
        if e != 0 {
            return Err(std::io::Error::from_raw_os_error(e));
        }
    }
    // SAFETY: ptsname_r wrote a NUL-terminated path into the buffer.
    let slave = unsafe { libc::open(name.as_ptr(), flags) };
    if slave < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor we just got and own.
    Ok((master, unsafe { OwnedFd::from_raw_fd(slave) }))
}

/// Sends `data` with the descriptors attached (SCM_RIGHTS).
#[allow(unsafe_code)]
fn send_with_fds(socket: RawFd, data: &[u8], fds: &[OwnedFd]) -> std::io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let payload = std::mem::size_of_val(raw.as_slice());
    // SAFETY: CMSG_SPACE and CMSG_LEN compute sizes from an integer.
    let (space, len) = unsafe { (libc::CMSG_SPACE(payload as u32) as usize, libc::CMSG_LEN(payload as u32) as usize) };
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
    // SAFETY: a zeroed msghdr is valid; the pointers set below live until sendmsg returns, and the control
    // message is written within the buffer CMSG_SPACE sized.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let header = libc::CMSG_FIRSTHDR(&msg);
        (*header).cmsg_level = libc::SOL_SOCKET;
        (*header).cmsg_type = libc::SCM_RIGHTS;
        (*header).cmsg_len = len as _;
        std::ptr::copy_nonoverlapping(raw.as_ptr().cast::<u8>(), libc::CMSG_DATA(header), payload);
        if libc::sendmsg(socket, &msg, 0) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;

    use super::ExecEnd;

    /// The relay waits for the end inside a `select!` that drops the wait whenever output comes first: an answer
    /// read by a dropped wait must still be there for the next one (it once was lost, and a command's exit code
    /// became "the sandbox ended before the command did").
    #[tokio::test]
    async fn a_wait_dropped_half_way_loses_no_part_of_the_answer() {
        let (control, mut init) = tokio::net::UnixStream::pair().unwrap();
        let mut end = ExecEnd { control, answer: Vec::new() };
        init.write_all(&[0, 0, 0, 0, 3]).await.unwrap();
        // The answer has come, the end of the connection not yet: this wait reads it and is dropped.
        let first = tokio::time::timeout(Duration::from_millis(100), end.wait()).await;
        assert!(first.is_err(), "no end of file yet: {first:?}");
        drop(init);
        assert_eq!(end.wait().await, Ok(3));
    }
}
