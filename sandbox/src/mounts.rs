//! A sandbox's root filesystem: each image layer bind-mounted with the sandbox's id mapping (an idmapped
//! mount, so a file the image gives to root belongs to the sandbox's root and to no one on the host), stacked
//! read-only under a private writable directory by overlayfs. Layers stay shared between sandboxes and images
//! on disk; only the mappings differ. Needs root and Linux 5.19+ (idmapped overlay layers).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn cstr(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)
}

fn check(r: libc::c_long) -> io::Result<libc::c_long> {
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r) }
}

/// A user namespace mapping ids `0..size` to `base..base+size`, held only as a file descriptor: what an
/// idmapped mount takes its mapping from. The process that created it is gone by the time this returns.
#[allow(unsafe_code)]
pub(crate) fn user_namespace(base: u32, size: u32) -> io::Result<OwnedFd> {
    let mut ready = [0i32; 2];
    let mut done = [0i32; 2];
    // SAFETY: pipe2 fills the arrays it is given.
    unsafe {
        check(libc::pipe2(ready.as_mut_ptr(), libc::O_CLOEXEC) as _)?;
        if libc::pipe2(done.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            let e = io::Error::last_os_error();
            libc::close(ready[0]);
            libc::close(ready[1]);
            return Err(e);
        }
    }
    // SAFETY: the child only calls async-signal-safe functions (unshare, write, read, _exit) before exiting,
    // as required after fork in a multi-threaded process.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        unsafe {
            libc::close(done[1]);
            let ok: u8 = if libc::unshare(libc::CLONE_NEWUSER) == 0 { 1 } else { 0 };
            libc::write(ready[1], (&ok as *const u8).cast(), 1);
            // Waits for the parent's byte, not for the end of the pipe: a child forked at the same time by
            // another thread holds a copy of our write end until it exits, and may itself be waiting for us.
            let mut b = 0u8;
            libc::read(done[0], (&mut b as *mut u8).cast(), 1);
            libc::_exit(0);
        }
    }
    // SAFETY: closing the ends the child uses; reading and writing one byte from and to locals.
    let result = (|| {
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut ok = 0u8;
        let n = unsafe { libc::read(ready[0], (&mut ok as *mut u8).cast(), 1) };
        if n != 1 || ok != 1 {
            return Err(io::Error::other("could not create a user namespace"));
        }
        let map = format!("0 {base} {size}\n");
        std::fs::write(format!("/proc/{pid}/uid_map"), &map)?;
        std::fs::write(format!("/proc/{pid}/gid_map"), &map)?;
        let ns = std::fs::File::open(format!("/proc/{pid}/ns/user"))?;
        Ok(OwnedFd::from(ns))
    })();
    unsafe {
        libc::close(ready[0]);
        libc::close(ready[1]);
        let go = 1u8;
        libc::write(done[1], (&go as *const u8).cast(), 1);
        libc::close(done[1]);
        libc::close(done[0]);
        if pid > 0 {
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
    }
    result
}

/// Mounts `source` at `target` (an empty directory) read-only, nosuid and nodev, with ids shifted by `userns`.
#[allow(unsafe_code)]
pub(crate) fn idmapped_bind(source: &Path, target: &Path, userns: BorrowedFd<'_>) -> io::Result<()> {
    let (src, dst) = (cstr(source)?, cstr(target)?);
    // SAFETY: the new mount API's system calls with valid NUL-terminated paths, a properly sized mount_attr and
    // descriptors we own; the tree descriptor is wrapped at once so it is closed on every path.
    let tree = unsafe {
        let tree = check(libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            src.as_ptr(),
            libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC as libc::c_uint,
        ))?;
        let tree = OwnedFd::from_raw_fd(tree as i32);
        let attr = libc::mount_attr {
            attr_set: libc::MOUNT_ATTR_IDMAP
                | libc::MOUNT_ATTR_RDONLY
                | libc::MOUNT_ATTR_NOSUID
                | libc::MOUNT_ATTR_NODEV,
            attr_clr: 0,
            propagation: 0,
            userns_fd: userns.as_raw_fd() as u64,
        };
        check(libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        ))?;
        tree
    };
    attach(&tree, &dst)
}

/// Mounts an overlay at `target`: `lowers` top first, writes going to `upper` (with `work` beside it).
/// Through fsconfig's `lowerdir+`, so the number of layers is not bounded by a mount option string.
#[allow(unsafe_code)]
pub(crate) fn overlay(lowers: &[&Path], upper: &Path, work: &Path, target: &Path) -> io::Result<()> {
    let set = |fs: &OwnedFd, key: &std::ffi::CStr, value: &Path| -> io::Result<()> {
        let v = cstr(value)?;
        // SAFETY: fsconfig with valid NUL-terminated key and value on an fs context we own.
        check(unsafe {
            libc::syscall(libc::SYS_fsconfig, fs.as_raw_fd(), libc::FSCONFIG_SET_STRING, key.as_ptr(), v.as_ptr(), 0)
        })
        .map(drop)
        .map_err(|e| io::Error::new(e.kind(), format!("overlay {}={}: {e}", key.to_string_lossy(), value.display())))
    };
    let dst = cstr(target)?;
    // SAFETY: the new mount API on descriptors we own, wrapped at once; valid NUL-terminated strings.
    unsafe {
        let fs = OwnedFd::from_raw_fd(
            check(libc::syscall(libc::SYS_fsopen, c"overlay".as_ptr(), libc::FSOPEN_CLOEXEC))? as i32,
        );
        for lower in lowers {
            set(&fs, c"lowerdir+", lower)?;
        }
        set(&fs, c"upperdir", upper)?;
        set(&fs, c"workdir", work)?;
        check(libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            libc::FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_char>(),
            0,
        ))
        .map_err(|e| io::Error::new(e.kind(), format!("creating the overlay: {e}")))?;
        let mnt = OwnedFd::from_raw_fd(check(libc::syscall(
            libc::SYS_fsmount,
            fs.as_raw_fd(),
            libc::FSMOUNT_CLOEXEC,
            libc::MOUNT_ATTR_NODEV | libc::MOUNT_ATTR_NOSUID,
        ))? as i32);
        attach(&mnt, &dst)
    }
}

/// Attaches a detached mount (from `open_tree` or `fsmount`) at `target`.
#[allow(unsafe_code)]
fn attach(mount: &OwnedFd, target: &std::ffi::CStr) -> io::Result<()> {
    // SAFETY: move_mount of a descriptor we own to a valid NUL-terminated path.
    check(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            mount.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH,
        )
    })
    .map(drop)
}

/// Mounts a memory file system of at most `bytes` at `target`, owned by `uid`:`gid` with `mode`, where nothing
/// runs or is a device: what a sandbox's secret files live in, never on disk.
#[allow(unsafe_code)]
pub(crate) fn tmpfs(target: &Path, bytes: u64, uid: u32, gid: u32, mode: u32) -> io::Result<()> {
    let t = cstr(target)?;
    let data = CString::new(format!("size={bytes},uid={uid},gid={gid},mode={mode:o}")).map_err(io::Error::other)?;
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    // SAFETY: mount with valid NUL-terminated strings.
    check(unsafe { libc::mount(c"tmpfs".as_ptr(), t.as_ptr(), c"tmpfs".as_ptr(), flags, data.as_ptr().cast()) }.into())
        .map(drop)
}

/// Detaches whatever is mounted at `target` (lazily: a process still inside keeps its view until it ends).
/// Not mounted is fine.
#[allow(unsafe_code)]
pub(crate) fn unmount(target: &Path) -> io::Result<()> {
    let t = cstr(target)?;
    // SAFETY: umount2 with a valid path.
    if unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) } == 0 {
        return Ok(());
    }
    match io::Error::last_os_error() {
        e if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOENT)) => Ok(()),
        e => Err(e),
    }
}
