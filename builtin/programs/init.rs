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
//! - it runs `instance exec` commands: the agent connects to `/dev/.exec/sock` (a directory of the sandbox's own,
//!   bind-mounted by the agent) and sends the command with its standard input, output and error (or a terminal) as
//!   descriptors; the command is this process's child, so it has everything of the sandbox this process has
//!   (namespaces, cgroup, user, capabilities, system call filter, environment, working directory) and nothing of
//!   the host. The exit code goes back on the connection. (`runc exec` would do the same, but runc before 1.3
//!   cannot join a network namespace the sandbox's user namespace does not own, which ours do not.)
//!
//! It exits with the program's exit code, or 128 + the signal that killed it, as shells report it. Built by
//! `build.rs` with the standard library only and linked statically: it runs in any image.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Condvar, Mutex};

unsafe extern "C" {
    fn signal(signum: i32, handler: extern "C" fn(i32)) -> usize;
    fn kill(pid: i32, sig: i32) -> i32;
    fn waitpid(pid: i32, status: *mut i32, options: i32) -> i32;
    fn read(fd: i32, buf: *mut u8, count: usize) -> isize;
    fn fcntl(fd: i32, cmd: i32, arg: i32) -> i32;
    fn prctl(option: i32, arg2: u64, arg3: u64, arg4: u64, arg5: u64) -> i32;
    fn _exit(code: i32) -> !;
    fn recvmsg(fd: i32, msg: *mut MsgHdr, flags: i32) -> isize;
    fn setsid() -> i32;
    fn ioctl(fd: i32, request: u64, arg: u64) -> i32;
    fn fork() -> i32;
    fn execvp(file: *const std::ffi::c_char, argv: *const *const std::ffi::c_char) -> i32;
    fn dup2(from: i32, to: i32) -> i32;
    fn pipe2(fds: *mut i32, flags: i32) -> i32;
    fn write(fd: i32, buf: *const u8, count: usize) -> isize;
    fn close(fd: i32) -> i32;
    fn __errno_location() -> *mut i32;
}

/// `struct iovec`.
#[repr(C)]
struct IoVec {
    base: *mut u8,
    len: usize,
}

/// `struct msghdr` (64-bit Linux).
#[repr(C)]
struct MsgHdr {
    name: *mut u8,
    name_len: u32,
    iov: *mut IoVec,
    iov_len: usize,
    control: *mut u8,
    control_len: usize,
    flags: i32,
}

/// `struct cmsghdr` (64-bit Linux); its data follows at 16 bytes.
#[repr(C)]
struct CmsgHdr {
    len: usize,
    level: i32,
    kind: i32,
}

const SOL_SOCKET: i32 = 1;
const SCM_RIGHTS: i32 = 1;
const MSG_CMSG_CLOEXEC: i32 = 0x4000_0000;
const TIOCSCTTY: u64 = 0x540E;
const O_CLOEXEC: i32 = 0o2000000;
/// Where the agent reaches this process for `instance exec`.
const EXEC_SOCKET: &str = "/dev/.exec/sock";

/// Exec'd commands still running, with their exit code once the reaper has it.
static EXECS: Mutex<Vec<(i32, Option<i32>)>> = Mutex::new(Vec::new());
static EXEC_ENDED: Condvar = Condvar::new();

/// A shell's exit code from a wait status.
fn exit_code(status: i32) -> i32 {
    if status & 0x7f == 0 { (status >> 8) & 0xff } else { 128 + (status & 0x7f) }
}

/// One message and the descriptors sent with it.
fn receive(socket: i32) -> std::io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut data = vec![0u8; 256 * 1024];
    let mut iov = IoVec { base: data.as_mut_ptr(), len: data.len() };
    let mut control = [0u64; 8];
    let mut msg = MsgHdr {
        name: std::ptr::null_mut(),
        name_len: 0,
        iov: &mut iov,
        iov_len: 1,
        control: control.as_mut_ptr().cast(),
        control_len: std::mem::size_of_val(&control),
        flags: 0,
    };
    // SAFETY: msg points at buffers of the sizes it states, all alive until recvmsg returns.
    let n = unsafe { recvmsg(socket, &mut msg, MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    data.truncate(n as usize);
    let mut fds = Vec::new();
    if msg.control_len >= std::mem::size_of::<CmsgHdr>() {
        // SAFETY: the kernel wrote one control message at the start of the (8-aligned) buffer.
        let header = unsafe { &*(control.as_ptr().cast::<CmsgHdr>()) };
        if header.level == SOL_SOCKET && header.kind == SCM_RIGHTS {
            let count = (header.len.saturating_sub(16) / 4).min(8);
            let bytes: &[u8] = bytemuck_free(&control);
            for i in 0..count {
                let at = 16 + 4 * i;
                let fd = i32::from_ne_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
                // SAFETY: the kernel installed this descriptor for us; nobody else owns it.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Ok((data, fds))
}

/// The control buffer as bytes.
fn bytemuck_free(words: &[u64; 8]) -> &[u8] {
    // SAFETY: u64s are plain bytes; the slice covers exactly the array and lives as long.
    unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), std::mem::size_of_val(words)) }
}

/// Serves exec requests until the socket cannot be made (no exec directory: exec is off for this sandbox).
fn serve_exec() {
    let _ = std::fs::remove_file(EXEC_SOCKET);
    let Ok(listener) = std::os::unix::net::UnixListener::bind(EXEC_SOCKET) else { return };
    for conn in listener.incoming().flatten() {
        std::thread::spawn(move || exec_one(conn));
    }
}

/// One request: `[tty: 0 or 1][argument NUL]...` with stdin, stdout and stderr attached; answered with
/// `0` and the exit code (i32, big-endian) when the command ends, or `1` and why it could not start.
fn exec_one(mut conn: std::os::unix::net::UnixStream) {
    use std::io::Write;
    let answer = |conn: &mut std::os::unix::net::UnixStream, result: Result<i32, String>| {
        let bytes = match result {
            Ok(code) => [&[0u8][..], &code.to_be_bytes()].concat(),
            Err(why) => [&[1u8][..], why.as_bytes()].concat(),
        };
        let _ = conn.write_all(&bytes);
    };
    let Ok((request, fds)) = receive(conn.as_raw_fd()) else { return };
    let Some((&tty, rest)) = request.split_first() else { return answer(&mut conn, Err("an empty request".into())) };
    let mut args: Vec<&[u8]> = rest.split(|b| *b == 0).collect();
    if rest.last() == Some(&0) {
        args.pop();
    }
    let Ok([stdin, stdout, stderr]) = <[OwnedFd; 3]>::try_from(fds) else {
        return answer(&mut conn, Err("a request without its three descriptors".into()));
    };
    let Some((program, args)) = args.split_first().filter(|(p, _)| !p.is_empty()) else {
        return answer(&mut conn, Err("no program to run".into()));
    };
    // Everything the child needs is made before the fork: after it, only async-signal-safe calls.
    let argv: Vec<std::ffi::CString> = std::iter::once(program)
        .chain(args)
        .map(|a| std::ffi::CString::new(*a).unwrap_or_default())
        .collect();
    let pointers: Vec<*const std::ffi::c_char> =
        argv.iter().map(|a| a.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
    let mut errors = [0i32; 2];
    // SAFETY: pipe2 fills the two integers.
    if unsafe { pipe2(errors.as_mut_ptr(), O_CLOEXEC) } < 0 {
        return answer(&mut conn, Err(format!("cannot run it: {}", std::io::Error::last_os_error())));
    }
    let (stdio, terminal) = ([stdin.as_raw_fd(), stdout.as_raw_fd(), stderr.as_raw_fd()], tty == 1);
    // Forked and registered under the lock: the reaper cannot take its status before it is awaited.
    let mut execs = EXECS.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: the child calls only dup2, setsid, ioctl, execvp, write and _exit on data made before the fork.
    let pid = unsafe { fork() };
    if pid == 0 {
        // SAFETY: as above, in the child.
        unsafe {
            for (to, from) in stdio.into_iter().enumerate() {
                dup2(from, to as i32);
            }
            if terminal {
                setsid();
                ioctl(0, TIOCSCTTY, 0);
            }
            execvp(pointers[0], pointers.as_ptr());
            let errno = *__errno_location();
            write(errors[1], errno.to_ne_bytes().as_ptr(), 4);
            _exit(127);
        }
    }
    // SAFETY: closing our copy of the write end, which only the child (until its exec) still holds.
    unsafe {
        close(errors[1]);
    }
    // Our copies of its descriptors go now, so that its output ends when it does.
    drop((stdin, stdout, stderr));
    if pid < 0 {
        drop(execs);
        // SAFETY: closing the read end we own.
        unsafe {
            close(errors[0]);
        }
        return answer(&mut conn, Err(format!("cannot run it: {}", std::io::Error::last_os_error())));
    }
    execs.push((pid, None));
    drop(execs);
    // End of file: it exec'd. Four bytes: it could not, and says why.
    // SAFETY: the read end is ours; from_raw_fd takes it over and closes it.
    let mut failed = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(errors[0]) });
    let mut errno = [0u8; 4];
    let exec_error = match std::io::Read::read(&mut failed, &mut errno) {
        Ok(4) => Some(std::io::Error::from_raw_os_error(i32::from_ne_bytes(errno))),
        _ => None,
    };
    let mut execs = EXECS.lock().unwrap_or_else(|e| e.into_inner());
    let code = loop {
        if let Some(i) = execs.iter().position(|(p, code)| *p == pid && code.is_some()) {
            break execs.swap_remove(i).1.unwrap_or(-1);
        }
        execs = EXEC_ENDED.wait(execs).unwrap_or_else(|e| e.into_inner());
    };
    drop(execs);
    match exec_error {
        Some(e) => answer(&mut conn, Err(format!("cannot run {}: {e}", String::from_utf8_lossy(program)))),
        None => answer(&mut conn, Ok(code)),
    }
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
    std::thread::spawn(serve_exec);
    loop {
        let mut status = 0;
        // SAFETY: waitpid fills the integer it is given.
        let reaped = unsafe { waitpid(-1, &mut status, 0) };
        if reaped == pid {
            std::process::exit(exit_code(status));
        }
        if reaped > 0 {
            let mut execs = EXECS.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(entry) = execs.iter_mut().find(|(p, _)| *p == reaped) {
                entry.1 = Some(exit_code(status));
                EXEC_ENDED.notify_all();
            }
        }
        if reaped < 0 && std::io::Error::last_os_error().raw_os_error() != Some(4) {
            // No child left to wait for (cannot happen while the program runs): nothing more to do.
            std::process::exit(127);
        }
    }
}
