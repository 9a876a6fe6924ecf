//! The first process of every sandbox, between runc and the image's program (as Docker's `--init`, tini):
//!
//! - it forwards the signals a stop sends to the program, which as a pid namespace's first process would
//!   otherwise ignore every signal it has no handler for (SIGTERM included, so each stop would wait for SIGKILL);
//! - it reaps orphaned processes, which the program was never written to do;
//! - it ends the sandbox when the agent that started it is gone: descriptor 3 is the read end of a pipe whose
//!   only write end the agent holds, so end of file there means the agent died, even by SIGKILL, and no
//!   sandbox outlives its supervisor (a sandbox nobody watches would keep its private IP while the platform
//!   starts the instance elsewhere).
//!
//! It exits with the program's exit code, or 128 + the signal that killed it, as shells report it. Built by
//! `build.rs` with the standard library only and linked statically: it runs in any image.

use std::sync::atomic::{AtomicI32, Ordering};

unsafe extern "C" {
    fn signal(signum: i32, handler: extern "C" fn(i32)) -> usize;
    fn kill(pid: i32, sig: i32) -> i32;
    fn waitpid(pid: i32, status: *mut i32, options: i32) -> i32;
    fn read(fd: i32, buf: *mut u8, count: usize) -> isize;
    fn fcntl(fd: i32, cmd: i32, arg: i32) -> i32;
    fn prctl(option: i32, arg2: u64, arg3: u64, arg4: u64, arg5: u64) -> i32;
    fn _exit(code: i32) -> !;
}

const WATCHDOG_FD: i32 = 3;
const F_GETFD: i32 = 1;
const F_SETFD: i32 = 2;
const FD_CLOEXEC: i32 = 1;
const PR_SET_DUMPABLE: i32 = 4;
const SIGKILL: i32 = 9;
/// Signals passed on to the program: those a stop or an operator sends.
const FORWARDED: [i32; 7] = [1, 2, 3, 10, 12, 15, 28];

/// The program's pid, once started.
static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: i32) {
    let pid = CHILD.load(Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe and touches no memory.
        unsafe {
            kill(pid, sig);
        }
    }
}

/// Ends the sandbox: when a pid namespace's first process exits, the kernel kills every other process in it.
fn end_sandbox() -> ! {
    // SAFETY: _exit(2) ends the process at once, whatever the other thread does.
    unsafe { _exit(128 + SIGKILL) }
}

fn main() {
    let mut args = std::env::args_os().skip(1);
    let Some(program) = args.next() else {
        eprintln!("init: no program to run");
        std::process::exit(127);
    };
    // SAFETY: plain system calls on integers. Not dumpable: the program, running as the same user, may not
    // ptrace this process or open its descriptors through /proc.
    let watched = unsafe {
        prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
        for sig in FORWARDED {
            signal(sig, forward);
        }
        // The watchdog is ours alone: the program does not inherit it.
        fcntl(WATCHDOG_FD, F_GETFD, 0) >= 0 && fcntl(WATCHDOG_FD, F_SETFD, FD_CLOEXEC) == 0
    };
    let child = match std::process::Command::new(&program).args(args).spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cannot run {}: {e}", program.to_string_lossy());
            std::process::exit(if e.kind() == std::io::ErrorKind::PermissionDenied { 126 } else { 127 });
        }
    };
    let pid = child.id() as i32;
    CHILD.store(pid, Ordering::Relaxed);
    if watched {
        std::thread::spawn(|| {
            let mut byte = 0u8;
            // SAFETY: reading into a local byte. Nothing is ever written: it returns at end of file (or an error,
            // which means the same: the pipe is unusable), when the agent's write end is closed.
            while unsafe { read(WATCHDOG_FD, &mut byte, 1) } > 0 {}
            end_sandbox();
        });
    }
    loop {
        let mut status = 0;
        // SAFETY: waitpid fills the integer it is given.
        let reaped = unsafe { waitpid(-1, &mut status, 0) };
        if reaped == pid {
            let code = if status & 0x7f == 0 { (status >> 8) & 0xff } else { 128 + (status & 0x7f) };
            std::process::exit(code);
        }
        if reaped < 0 && std::io::Error::last_os_error().raw_os_error() != Some(4) {
            // No child left to wait for (cannot happen while the program runs): nothing more to do.
            std::process::exit(127);
        }
    }
}
