//! The account an image asks to run as (`User` in its config: `name`, `uid`, `name:group`, `uid:gid`),
//! resolved against the image's own `/etc/passwd` and `/etc/group`, read inside the sandbox's root (a link in
//! the image cannot make us read a host file).

use std::ffi::CString;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;

use crate::SandboxError;

/// Who the process runs as inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Home directory, for `HOME`.
    pub home: String,
}

/// Resolves `user` in the root filesystem at `root`. Empty means root. Ids must fit the sandbox's mapping.
pub fn resolve(root: &Path, user: &str) -> Result<Account, SandboxError> {
    let bad = |reason: String| SandboxError::User { user: user.into(), reason };
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let passwd = read_in_root(root, "etc/passwd").unwrap_or_default();
    // name:password:uid:gid:gecos:home:shell
    let entry = |pred: &dyn Fn(&[&str]) -> bool| -> Option<(u32, u32, String)> {
        passwd
            .lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .filter(|f| f.len() >= 6)
            .find(|f| pred(f))
            .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?, f[5].to_owned())))
    };
    let (uid, mut gid, home) = if u.is_empty() {
        (0, 0, entry(&|f| f[2] == "0").map_or("/root".into(), |e| e.2))
    } else if let Ok(uid) = u.parse::<u32>() {
        let e = entry(&|f| f[2] == u);
        (uid, e.as_ref().map_or(uid, |e| e.1), e.map_or("/".into(), |e| e.2))
    } else {
        entry(&|f| f[0] == u).ok_or_else(|| bad(format!("no user {u:?} in the image's /etc/passwd")))?
    };
    if let Some(g) = g.filter(|g| !g.is_empty()) {
        gid = match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => read_in_root(root, "etc/group")
                .unwrap_or_default()
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.len() >= 3 && f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| bad(format!("no group {g:?} in the image's /etc/group")))?,
        };
    }
    if uid >= crate::ids::RANGE_SIZE || gid >= crate::ids::RANGE_SIZE {
        return Err(bad(format!("ids must be below {}", crate::ids::RANGE_SIZE)));
    }
    Ok(Account { uid, gid, home })
}

/// Reads a small file of the image, resolving every link inside `root` (openat2 with RESOLVE_IN_ROOT).
#[allow(unsafe_code)]
fn read_in_root(root: &Path, path: &str) -> Option<String> {
    let root = std::fs::File::open(root).ok()?;
    let p = CString::new(path).ok()?;
    // SAFETY: open_how is plain integers; all zero is its default.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    use std::os::fd::AsRawFd;
    // SAFETY: openat2 with a directory we hold open, a NUL-terminated path and a properly sized open_how.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            p.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: a descriptor openat2 just returned to us.
    let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    let mut text = String::new();
    file.take(1 << 20).read_to_string(&mut text).ok()?;
    Some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_resolve_inside_the_image_only() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        std::fs::write(
            root.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001:app:/home/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(root.path().join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
        let r = |u: &str| resolve(root.path(), u);
        assert_eq!(r("").unwrap(), Account { uid: 0, gid: 0, home: "/root".into() });
        assert_eq!(r("app").unwrap(), Account { uid: 1000, gid: 1001, home: "/home/app".into() });
        assert_eq!(r("app:staff").unwrap().gid, 50);
        assert_eq!(r("1000:7").unwrap(), Account { uid: 1000, gid: 7, home: "/home/app".into() });
        assert_eq!(r("4242").unwrap(), Account { uid: 4242, gid: 4242, home: "/".into() });
        assert!(r("nobody-here").unwrap_err().to_string().contains("nobody-here"));
        assert!(r("app:nogroup").is_err());
        assert!(r("70000").is_err(), "outside the mapping");

        // An image whose /etc/passwd links to the host's: resolved inside the image, where it does not exist.
        let evil = tempfile::tempdir().unwrap();
        std::fs::create_dir(evil.path().join("etc")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", evil.path().join("etc/passwd")).unwrap();
        assert!(resolve(evil.path(), "root").is_err(), "the host's accounts are not the image's");
    }
}
