//! The postgres process and the thread that owns it.
//!
//! The postmaster is forked from a dedicated thread that lives exactly as long as the child: Linux delivers
//! `PR_SET_PDEATHSIG` when the *thread* that forked dies, so forking from a tokio worker (which may be gone after
//! the test that started the cluster) would kill the server early, while a dedicated thread ties the signal to
//! the life of our process.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::prctl;
use nix::sys::signal::Signal;
use nix::sys::wait::{Id, WaitPidFlag};
use nix::unistd::Pid;
use tokio::sync::{oneshot, watch};

use crate::Error;

/// How long a fast shutdown may take before we SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(30);
/// How long we wait for the exit after SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(10);

/// A running (or exited) postmaster. Dropping it shuts the server down, blocking until it has exited.
pub(crate) struct Postmaster {
    pid: i32,
    exit: Arc<ExitSlot>,
    exited: watch::Receiver<bool>,
    stopped: bool,
}

/// The postmaster's exit, as seen by the supervising thread.
#[derive(Default)]
struct ExitSlot {
    /// `Some(description of the exit status)` once the child has exited. The supervising thread holds this lock
    /// while it reaps the child, and signals are sent under it, so a signal never reaches a recycled pid.
    status: Mutex<Option<String>>,
    changed: Condvar,
}

impl ExitSlot {
    fn lock(&self) -> MutexGuard<'_, Option<String>> {
        self.status.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Postmaster {
    /// Spawns `command` from a new dedicated thread, with SIGINT as its parent-death signal.
    pub async fn spawn(mut command: Command) -> Result<Postmaster, Error> {
        let description = format!("{command:?}");
        tracing::debug!(command = %description, "starting postgres");
        set_death_signal(&mut command);
        let exit = Arc::new(ExitSlot::default());
        let (exited_tx, exited) = watch::channel(false);
        let (pid_tx, pid_rx) = oneshot::channel();
        let thread_exit = Arc::clone(&exit);
        std::thread::Builder::new()
            .name("embedded-postgres".to_owned())
            .spawn(move || supervise(command, pid_tx, &thread_exit, &exited_tx))
            .map_err(|source| Error::Spawn { command: description.clone(), source })?;
        let pid = match pid_rx.await {
            Ok(Ok(pid)) => pid,
            Ok(Err(source)) => {
                return Err(Error::Spawn { command: description, source });
            }
            Err(_) => {
                let source = io::Error::other("the supervising thread ended before reporting the pid");
                return Err(Error::Spawn { command: description, source });
            }
        };
        Ok(Postmaster { pid, exit, exited, stopped: false })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// How the postmaster exited, if it has.
    pub fn exit_status(&self) -> Option<String> {
        self.exit.lock().clone()
    }

    /// Resolves when the postmaster has exited.
    pub async fn exited(&self) {
        let mut exited = self.exited.clone();
        // An error means the supervising thread is gone, which it only is once the child has exited.
        let _ = exited.wait_for(|e| *e).await;
    }

    /// Sends `signal` unless the postmaster has already exited.
    fn signal(&self, signal: Signal) -> Result<(), Error> {
        let status = self.exit.lock();
        if status.is_some() {
            return Ok(());
        }
        let name = signal.as_str();
        tracing::debug!(pid = self.pid, signal = name, "signalling postgres");
        send_signal(self.pid, signal).map_err(|source| Error::Signal { pid: self.pid, signal: name, source })
    }

    /// Fast shutdown: SIGINT, then SIGKILL after 30 s.
    pub async fn stop(mut self) -> Result<(), Error> {
        self.stopped = true;
        self.signal(Signal::SIGINT)?;
        if tokio::time::timeout(STOP_GRACE, self.exited()).await.is_ok() {
            return Ok(());
        }
        tracing::warn!(pid = self.pid, "PostgreSQL ignored SIGINT for {STOP_GRACE:?}; sending SIGKILL");
        self.signal(Signal::SIGKILL)?;
        tokio::time::timeout(KILL_GRACE, self.exited())
            .await
            .map_err(|_| Error::StopTimeout { pid: self.pid, waited: STOP_GRACE + KILL_GRACE })
    }

    /// Like [`Postmaster::stop`], blocking the calling thread.
    fn stop_blocking(&mut self) -> Result<(), Error> {
        self.stopped = true;
        self.signal(Signal::SIGINT)?;
        if self.wait_blocking(STOP_GRACE) {
            return Ok(());
        }
        tracing::warn!(pid = self.pid, "PostgreSQL ignored SIGINT for {STOP_GRACE:?}; sending SIGKILL");
        self.signal(Signal::SIGKILL)?;
        if self.wait_blocking(KILL_GRACE) {
            Ok(())
        } else {
            Err(Error::StopTimeout { pid: self.pid, waited: STOP_GRACE + KILL_GRACE })
        }
    }

    fn wait_blocking(&self, timeout: Duration) -> bool {
        let status = self.exit.lock();
        let (status, _) = self
            .exit
            .changed
            .wait_timeout_while(status, timeout, |s| s.is_none())
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        status.is_some()
    }
}

impl Drop for Postmaster {
    fn drop(&mut self) {
        if self.stopped {
            return;
        }
        match self.stop_blocking() {
            Ok(()) => tracing::info!(pid = self.pid, "PostgreSQL stopped on drop"),
            Err(err) => {
                tracing::warn!(pid = self.pid, error = %err, "could not stop PostgreSQL on drop")
            }
        }
    }
}

/// The body of the dedicated thread: spawn, report the pid, wait, record the exit.
fn supervise(
    mut command: Command,
    pid_tx: oneshot::Sender<io::Result<i32>>,
    exit: &ExitSlot,
    exited_tx: &watch::Sender<bool>,
) {
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(err) => {
            let _ = pid_tx.send(Err(err));
            return;
        }
    };
    // Close our copies of the child's stdio (the log file).
    drop(command);
    let pid = child.id() as i32;
    if pid_tx.send(Ok(pid)).is_err() {
        // Whoever started us gave up (a cancelled start): nobody else will ever stop this server.
        let _ = send_signal(pid, Signal::SIGINT);
    }
    // Wait without reaping, so the pid stays ours (a zombie) until the exit is recorded under the lock.
    if let Err(err) = wait_without_reaping(pid) {
        tracing::warn!(pid, error = %err, "waitid on postgres failed; reaping directly");
    }
    let mut status = exit.lock();
    let description = match child.wait() {
        Ok(s) => s.to_string(),
        Err(err) => format!("unknown exit: wait failed: {err}"),
    };
    tracing::debug!(pid, status = %description, "postgres exited");
    *status = Some(description);
    exit.changed.notify_all();
    drop(status);
    let _ = exited_tx.send(true);
}

/// Makes the child get SIGINT (a fast shutdown) when the forking thread dies, including when our process is
/// killed. std runs `pre_exec` hooks after switching uid/gid, and a credential change clears the death signal,
/// so it must be set here, not earlier.
#[allow(unsafe_code)]
fn set_death_signal(command: &mut Command) {
    let parent = nix::unistd::getpid();
    // SAFETY: the hook runs in the forked child before exec, where only async-signal-safe calls are allowed:
    // prctl and getppid are plain system calls, and nix's errors are errno values, built without allocating.
    unsafe {
        command.pre_exec(move || {
            prctl::set_pdeathsig(Signal::SIGINT)?;
            // The parent may have died between fork and prctl, in which case no signal will ever come.
            if nix::unistd::getppid() != parent {
                return Err(Errno::ESRCH.into());
            }
            Ok(())
        });
    }
}

/// Signals `pid`, which the caller guarantees is our unreaped child, so that it cannot name another process.
fn send_signal(pid: i32, signal: Signal) -> io::Result<()> {
    Ok(nix::sys::signal::kill(Pid::from_raw(pid), signal)?)
}

/// Blocks until child `pid` has exited, leaving it unreaped.
fn wait_without_reaping(pid: i32) -> io::Result<()> {
    loop {
        match nix::sys::wait::waitid(Id::Pid(Pid::from_raw(pid)), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}
