//! Starting an instance's process: inside its network namespace, as an unprivileged account, in a memory cgroup,
//! without a way to gain privilege (`no_new_privs`, its bundle seen `nosuid,nodev`), dying with the agent.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::{Child, Command};

/// How to start one process.
#[derive(Debug, Clone)]
pub struct Launch {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Working directory (the unpacked bundle).
    pub cwd: PathBuf,
    /// The complete environment.
    pub env: BTreeMap<String, String>,
    /// Network namespace to join (`/run/netns/...`), or none to stay in the agent's.
    pub netns: Option<String>,
    /// Account to run as, or none to stay as the agent.
    pub user: Option<(u32, u32)>,
    /// Memory cgroup to join, if any (its `cgroup.procs`).
    pub cgroup_procs: Option<PathBuf>,
    /// Whether the process gets a mount namespace of its own, where its working directory (the bundle) is
    /// read-only, `nosuid` and `nodev`. Needs root.
    pub private_mounts: bool,
    /// A file the process sees as `/etc/resolv.conf` (in its own mount namespace), if any.
    pub resolv_conf: Option<PathBuf>,
}

/// Sends a signal to a process.
#[allow(unsafe_code)]
pub fn kill(pid: i32, signal: i32) {
    // SAFETY: kill(2) touches no memory.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// Starts the process with piped stdout and stderr.
pub fn spawn(launch: &Launch) -> std::io::Result<Child> {
    let (program, args) = launch
        .argv
        .split_first()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty command"))?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .current_dir(&launch.cwd)
        .env_clear()
        .envs(&launch.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let netns: Option<OwnedFd> = match &launch.netns {
        Some(path) => Some(std::fs::File::open(path)?.into()),
        None => None,
    };
    // Everything the child needs is allocated here: between fork and exec only async-signal-safe calls are
    // allowed, which excludes allocating.
    let procs = match &launch.cgroup_procs {
        Some(p) => Some(c_path(p)?),
        None => None,
    };
    let mounts = if launch.private_mounts {
        // A host without /etc/resolv.conf has nothing to cover; the process then has no resolver configured.
        let resolv = match &launch.resolv_conf {
            Some(p) if Path::new(RESOLV_CONF).exists() => Some(c_path(p)?),
            _ => None,
        };
        Some(Mounts { bundle: c_path(&launch.cwd)?, bundle_flags: kept_mount_flags(&launch.cwd)?, resolv })
    } else {
        None
    };
    prepare_child(&mut cmd, ChildSetup { netns, user: launch.user, procs, mounts });
    cmd.spawn()
}

const RESOLV_CONF: &str = "/etc/resolv.conf";

fn c_path(path: &Path) -> std::io::Result<CString> {
    CString::new(path.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)
}

/// What the child does between fork and exec, prepared beforehand.
struct ChildSetup {
    netns: Option<OwnedFd>,
    user: Option<(u32, u32)>,
    procs: Option<CString>,
    mounts: Option<Mounts>,
}

/// The child's own mount namespace.
struct Mounts {
    /// The bundle directory, bound onto itself read-only, `nosuid` and `nodev`.
    bundle: CString,
    /// Flags of the mount the bundle is on that the read-only bind must keep (`noexec`).
    bundle_flags: libc::c_ulong,
    /// Bound onto /etc/resolv.conf.
    resolv: Option<CString>,
}

/// The flags of the mount holding `path` that a bind remount must repeat so as not to lift them: a remount sets
/// every per-mount flag it is given and clears the others.
#[allow(unsafe_code)]
fn kept_mount_flags(path: &Path) -> std::io::Result<libc::c_ulong> {
    let c = c_path(path)?;
    // SAFETY: an all-zero statvfs is a valid value, and statvfs(3) writes only into it, which outlives the call.
    let flags = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        st.f_flag
    };
    Ok(if flags & libc::ST_NOEXEC != 0 { libc::MS_NOEXEC } else { 0 })
}

#[allow(unsafe_code)]
fn prepare_child(cmd: &mut Command, setup: ChildSetup) {
    let target = CString::new(RESOLV_CONF).expect("no NUL");
    // SAFETY: the closure runs in the forked child before exec and uses only async-signal-safe system calls
    // (prctl, open, write, close, setns, unshare, mount, chdir, setgroups, setgid, setuid) on memory prepared
    // before the fork. The order matters: joining the namespace and the cgroup and mounting need root, so they
    // come before dropping privileges; the death signal is set last because changing credentials clears it.
    // The mount namespace is the process's own, made private first so nothing propagates back to the host;
    // the resolv.conf bind mount is what `ip netns exec` does.
    unsafe {
        cmd.pre_exec(move || {
            let ChildSetup { netns, user, procs, mounts } = &setup;
            if let Some(path) = procs {
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY);
                if fd >= 0 {
                    libc::write(fd, b"0".as_ptr().cast(), 1);
                    libc::close(fd);
                }
            }
            if let Some(fd) = netns
                && libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(m) = mounts {
                let fail = libc::unshare(libc::CLONE_NEWNS) != 0
                    || libc::mount(
                        std::ptr::null(),
                        c"/".as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_PRIVATE,
                        std::ptr::null(),
                    ) != 0
                    || m.resolv.as_ref().is_some_and(|source| {
                        libc::mount(source.as_ptr(), target.as_ptr(), std::ptr::null(), libc::MS_BIND, std::ptr::null())
                            != 0
                    })
                    // A bind mount takes its flags only from a remount after it.
                    || libc::mount(
                        m.bundle.as_ptr(),
                        m.bundle.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND,
                        std::ptr::null(),
                    ) != 0
                    || libc::mount(
                        std::ptr::null(),
                        m.bundle.as_ptr(),
                        std::ptr::null(),
                        libc::MS_REMOUNT
                            | libc::MS_BIND
                            | libc::MS_RDONLY
                            | libc::MS_NOSUID
                            | libc::MS_NODEV
                            | m.bundle_flags,
                        std::ptr::null(),
                    ) != 0
                    // The working directory was entered before the mount, on the mount underneath: enter the
                    // new one, or relative paths (`./id`) would still resolve through the old.
                    || libc::chdir(m.bundle.as_ptr()) != 0;
                if fail {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some((uid, gid)) = *user
                && (libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(gid) != 0 || libc::setuid(uid) != 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            // No exec from here on gains privilege: setuid and setgid bits and file capabilities are ignored,
            // whatever file the instance finds (its bundle, the host's own setuid programs).
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// A memory cgroup for one instance, v2 when the unified hierarchy has the memory controller, else v1.
#[derive(Debug)]
pub struct MemoryCgroup {
    dir: PathBuf,
}

impl MemoryCgroup {
    /// Creates the cgroup with a hard limit, or `None` when no memory controller is available (then the limit
    /// is not enforced, which the agent logs once).
    pub fn create(name: &str, limit_bytes: u64) -> Option<Self> {
        let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers");
        let (parent, limit_file) =
            if std::fs::read_to_string(v2).is_ok_and(|c| c.split_whitespace().any(|c| c == "memory")) {
                let parent = PathBuf::from("/sys/fs/cgroup/cloud");
                std::fs::create_dir_all(&parent).ok()?;
                let _ = std::fs::write(parent.join("cgroup.subtree_control"), "+memory");
                (parent, "memory.max")
            } else if Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists() {
                let parent = PathBuf::from("/sys/fs/cgroup/memory/cloud");
                std::fs::create_dir_all(&parent).ok()?;
                (parent, "memory.limit_in_bytes")
            } else {
                return None;
            };
        let dir = parent.join(name);
        std::fs::create_dir_all(&dir).ok()?;
        std::fs::write(dir.join(limit_file), limit_bytes.to_string()).ok()?;
        Some(Self { dir })
    }

    /// Kills and removes the cgroup of that name if it exists (v1 or v2).
    pub fn remove_named(name: &str) {
        for parent in ["/sys/fs/cgroup/cloud", "/sys/fs/cgroup/memory/cloud"] {
            let dir = Path::new(parent).join(name);
            if dir.exists() {
                Self { dir }.remove();
            }
        }
    }

    /// The file a process writes to join.
    pub fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    /// Kills what is left in it and removes it.
    pub fn remove(&self) {
        if let Ok(pids) = std::fs::read_to_string(self.procs()) {
            for pid in pids.split_whitespace().filter_map(|p| p.parse().ok()) {
                kill(pid, libc::SIGKILL);
            }
        }
        // The kernel refuses while processes are still exiting; a few tries cover that.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}
