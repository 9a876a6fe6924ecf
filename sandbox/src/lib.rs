//! Instance sandboxes: each instance runs through runc, a well-kept OCI runtime, with
//! - its own root filesystem: the image's layers, read-only and shared on disk, under a private writable layer
//!   removed with the sandbox ([`mounts`]);
//! - its own user namespace mapped to a host id range no other sandbox on the host holds ([`ids`]), so root
//!   inside is nobody outside, and files its image gives to root are its own (idmapped mounts);
//! - new pid, mount, ipc and uts namespaces and the instance's network namespace;
//! - no new privileges, a reduced capability set, a system call filter ([`seccomp`]), masked and read-only
//!   kernel interfaces, the standard few devices, and memory, pids and cpu limits in a cgroup of its own.
//!
//! runc is started detached: nothing of ours but a small init stays beside a running sandbox. Its first process
//! is that init (`builtin/programs/init.rs`, bind-mounted read-only at [`INIT_PATH`]), which starts the image's program,
//! forwards signals to it and reaps orphans, and ends the sandbox when the [`Sandboxes`] that started it is gone
//! (dropped, or its process killed): a sandbox never outlives its supervisor. This process becomes the child
//! subreaper, so a sandbox's first process is re-parented to it and its exit status is read through a pidfd.
//! What a dead agent leaves (mounts, writable layers, runc's state, cgroups) the next agent of its node removes
//! ([`Sandboxes::remove_all`]) before it starts anything, and any agent beside it once it is gone for good
//! ([`Sandboxes::remove_abandoned`]). What is not covered: kernel bugs reachable from inside (the kernel is
//! shared; microVMs are the stronger boundary where hosts have KVM).

mod cgroups;
mod exec;
pub mod ids;
mod mounts;
mod seccomp;
mod spec;
pub mod user;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use cloud_builtin::INIT;
use tokio::io::unix::AsyncFd;
use tokio::net::unix::pipe;

pub use exec::{Exec, ExecEnd, ExecStdio, WinSize, resize};
pub use ids::{IdPool, IdRange};

/// Where a sandbox's init is, inside.
pub const INIT_PATH: &str = "/dev/init";

/// Where a sandbox's init listens for exec requests, inside (`sock` in it).
pub const EXEC_DIR: &str = "/dev/.exec";

/// Why a sandbox could not be set up, started or removed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SandboxError {
    /// A host operation failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// runc is missing or refused.
    #[error("runc: {message}")]
    Runc {
        /// runc's own words.
        message: String,
    },
    /// Every id range on the host is held.
    #[error("no free uid/gid range for another sandbox on this host")]
    NoIds,
    /// Another agent (of the same node, on this host) holds the directory.
    #[error("another agent runs the sandboxes of {dir}")]
    Busy {
        /// The node's sandbox directory.
        dir: String,
    },
    /// The image's `User` does not resolve.
    #[error("the image's user {user:?}: {reason}")]
    User {
        /// As the image says.
        user: String,
        /// Why.
        reason: String,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SandboxError {
    let what = what.into();
    move |source| SandboxError::Io { what, source }
}

/// What a sandbox runs and with what.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    /// Its name on the host: `[a-z0-9]`, unique on the node (an instance id).
    pub id: String,
    /// Unpacked image layers, bottom first.
    pub layers: Vec<PathBuf>,
    /// Program and arguments.
    pub argv: Vec<String>,
    /// `KEY=value` entries.
    pub env: Vec<String>,
    /// Working directory inside.
    pub cwd: String,
    /// The image's `User` (empty: root of the sandbox).
    pub user: String,
    /// Host name inside.
    pub hostname: String,
    /// Its network.
    pub network: Network,
    /// The private address, for `/etc/hosts`.
    pub address: Option<std::net::IpAddr>,
    /// Shown as `/etc/resolv.conf`.
    pub resolv_conf: Option<PathBuf>,
    /// Files shown read-only in `/run/secrets` (name, content), readable by the sandbox's user alone; kept in
    /// memory on the host (a tmpfs of the sandbox's own) when the agent is root.
    pub secret_files: Vec<(String, Vec<u8>)>,
    /// Resource limits.
    pub limits: Limits,
}

/// The network a sandbox is in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Network {
    /// An existing network namespace (`/run/netns/...`): the instance's.
    Join(PathBuf),
    /// A new one with only loopback.
    Own,
    /// The host's (rootless sandboxes of an unprivileged agent, which cannot make one reachable from the host).
    Host,
}

/// Resource limits of a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Memory, bytes.
    pub memory_bytes: u64,
    /// Processes and threads.
    pub pids: i64,
    /// CPU time per wall time, in thousandths of a core; none: no quota.
    pub cpu_millicores: Option<u64>,
}

/// Where sandboxes live on a node and what runs them.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// The node's sandbox directory (bundles, runc's state).
    pub dir: PathBuf,
    /// The host-wide id range directory, shared by every agent on the host.
    pub ids: PathBuf,
    /// The runc executable.
    pub runc: PathBuf,
}

/// The node's sandboxes. They live as long as this value: dropping it (or the death of this process) ends them.
#[derive(Debug)]
pub struct Sandboxes {
    dir: PathBuf,
    runc: PathBuf,
    ids: IdPool,
    /// An exclusive lock on `<dir>/lock` while this value lives: how another agent tells a directory whose
    /// agent is gone ([`Sandboxes::remove_abandoned`]).
    _lock: std::fs::File,
    /// Each sandbox's init holds a copy of the read end as descriptor 3 and ends its sandbox at end of file,
    /// when the write end, which only this value holds (close-on-exec), is closed.
    watchdog: (OwnedFd, OwnedFd),
    /// This process is not root: sandboxes are rootless (see [`Sandboxes::rootless`]).
    rootless: bool,
}

/// A running sandbox.
#[derive(Debug)]
pub struct Sandbox {
    /// Its id.
    pub id: String,
    /// Its first process, as the host sees it.
    pub pid: i32,
    /// A pidfd of the first process; taken by [`Drop`] when the process was never waited for.
    exit: Option<AsyncFd<OwnedFd>>,
    reaped: bool,
    /// The first process's standard output.
    pub stdout: Option<pipe::Receiver>,
    /// The first process's standard error.
    pub stderr: Option<pipe::Receiver>,
    /// Its host id range (none for a rootless sandbox, which maps the agent's own ids).
    _ids: Option<IdRange>,
}

impl Sandboxes {
    /// Checks that runc works and makes this process the child subreaper (see the crate docs).
    pub async fn new(config: SandboxConfig) -> Result<Self, SandboxError> {
        let (read, write) = std::io::pipe().map_err(io("creating the watchdog pipe"))?;
        std::fs::create_dir_all(config.dir.join("runc")).map_err(io(format!("creating {}", config.dir.display())))?;
        let lock = lock_file(&config.dir).map_err(io(format!("locking {}", config.dir.display())))?;
        if !ids::try_lock(&lock) {
            return Err(SandboxError::Busy { dir: config.dir.display().to_string() });
        }
        let me = Self {
            runc: config.runc,
            ids: IdPool::new(config.ids),
            dir: config.dir,
            _lock: lock,
            watchdog: (OwnedFd::from(read), OwnedFd::from(write)),
            rootless: current_uid() != 0,
        };
        // Sandboxes' root filesystems are mounted below: no one else on the host lists them (each sandbox's own
        // directory lets in only its root, which runc needs to pass through here).
        std::fs::set_permissions(&me.dir, std::os::unix::fs::PermissionsExt::from_mode(0o711))
            .map_err(io(format!("restricting {}", me.dir.display())))?;
        me.install_init().map_err(io(format!("writing {}", me.init().display())))?;
        if !me.rootless {
            cgroups::ensure_visible().map_err(io("mounting the cgroup hierarchies"))?;
        }
        let out = tokio::process::Command::new(&me.runc).arg("--version").output().await.map_err(|e| {
            SandboxError::Runc { message: format!("cannot run {} ({e}); scripts/setup installs it", me.runc.display()) }
        })?;
        if !out.status.success() {
            return Err(SandboxError::Runc { message: String::from_utf8_lossy(&out.stderr).into_owned() });
        }
        set_subreaper().map_err(io("becoming the child subreaper"))?;
        Ok(me)
    }

    fn place(&self) -> Place<'_> {
        Place { runc: &self.runc, dir: &self.dir }
    }

    /// Whether sandboxes are rootless: this process is not root, so each sandbox maps only its own uid and gid
    /// (root inside is this process's user outside, shared by every sandbox), runs in the host's network, on its
    /// image as one read-only directory (a [`SandboxSpec`] then has exactly one layer: the flattened image) with
    /// its own `/tmp` and `/run`, and has no cgroup limits. Its pid, mount, ipc, uts and user namespaces, the
    /// capability set, the seccomp filter, `no_new_privs`, the masked paths and the init are those of every
    /// sandbox.
    pub fn rootless(&self) -> bool {
        self.rootless
    }

    fn init(&self) -> PathBuf {
        self.dir.join("init")
    }

    /// Writes the init program beside the sandboxes (replaced whole: running sandboxes keep the one they have).
    fn install_init(&self) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        if std::fs::read(self.init()).is_ok_and(|have| have == INIT) {
            return Ok(());
        }
        let tmp = self.dir.join(format!(".init-{}", std::process::id()));
        std::fs::write(&tmp, INIT)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o555))?;
        std::fs::rename(&tmp, self.init())
    }

    fn bundle(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    fn runc(&self) -> tokio::process::Command {
        self.place().runc()
    }

    /// Sets up and starts a sandbox.
    pub async fn start(&self, spec: &SandboxSpec) -> Result<Sandbox, SandboxError> {
        // What a previous run of the same id left, if anything (asking runc costs a process).
        if self.bundle(&spec.id).exists() || self.dir.join("runc").join(&spec.id).exists() {
            self.remove(&spec.id).await?;
        }
        let ids = if self.rootless { None } else { Some(self.ids.acquire(&spec.id)?) };
        match self.start_with(spec, ids).await {
            Ok(s) => Ok(s),
            Err(e) => {
                if let Err(e) = self.remove(&spec.id).await {
                    tracing::warn!(sandbox = %spec.id, error = %e, "could not clean up after a failed start");
                }
                Err(e)
            }
        }
    }

    async fn start_with(&self, spec: &SandboxSpec, mut ids: Option<IdRange>) -> Result<Sandbox, SandboxError> {
        let bundle = self.bundle(&spec.id);
        let mapping = match &ids {
            Some(range) => spec::Ids::Range(range.base),
            None => spec::Ids::Own { uid: current_uid(), gid: current_gid() },
        };
        let (spec2, bundle2, init) = (spec.clone(), bundle.clone(), self.init());
        tokio::task::spawn_blocking(move || match mapping {
            spec::Ids::Range(base) => prepare(&spec2, &bundle2, base, &init),
            own => prepare_rootless(&spec2, &bundle2, own, &init),
        })
        .await
        .map_err(|e| SandboxError::Io {
            what: "preparing the root filesystem".into(),
            source: std::io::Error::other(e),
        })??;

        let (out_r, out_w) = std::io::pipe().map_err(io("creating a pipe"))?;
        let (err_r, err_w) = std::io::pipe().map_err(io("creating a pipe"))?;
        let log = bundle.join("runc.log");
        let pid_file = bundle.join("pid");
        let mut cmd = self.runc();
        cmd.arg("--log").arg(&log).arg("--log-format").arg("json");
        cmd.args(["run", "--detach", "--preserve-fds", "1", "--pid-file"]).arg(&pid_file);
        cmd.arg("--bundle").arg(&bundle).arg(&spec.id);
        cmd.stdout(Stdio::from(OwnedFd::from(out_w))).stderr(Stdio::from(OwnedFd::from(err_w)));
        pass_as_fd3(&mut cmd, self.watchdog.0.as_raw_fd());
        let status = cmd.status().await.map_err(io("running runc"))?;
        // The write ends now live in the sandbox (and in the Command, dropped above): its output reaches us
        // until its last process ends.
        if !status.success() {
            return Err(SandboxError::Runc { message: last_error(&log) });
        }
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|p| p.trim().parse().ok())
            .ok_or_else(|| SandboxError::Runc { message: "no pid file after run".into() })?;
        let exit =
            watch(pidfd_open(pid).map_err(io("opening the sandbox's pidfd"))?).map_err(io("watching the sandbox"))?;
        if let Some(ids) = &mut ids {
            ids.held_by(pid);
        }
        let receiver = |r: std::io::PipeReader| pipe::Receiver::from_owned_fd(OwnedFd::from(r)).ok();
        Ok(Sandbox {
            id: spec.id.clone(),
            pid,
            exit: Some(exit),
            reaped: false,
            stdout: receiver(out_r),
            stderr: receiver(err_r),
            _ids: ids,
        })
    }

    /// Sends a signal to every process of a sandbox.
    pub async fn signal(&self, id: &str, signal: &str) -> Result<(), SandboxError> {
        let out = self.runc().args(["kill", "--all", id, signal]).output().await.map_err(io("running runc kill"))?;
        if out.status.success() || String::from_utf8_lossy(&out.stderr).contains("not running") {
            Ok(())
        } else {
            Err(SandboxError::Runc { message: String::from_utf8_lossy(&out.stderr).trim().to_owned() })
        }
    }

    /// Stops a sandbox: SIGTERM to its program (through its init), then SIGKILL to every process after `grace`;
    /// returns how it ended.
    pub async fn stop(&self, sandbox: &mut Sandbox, grace: Duration) -> Result<ExitStatus, SandboxError> {
        // The init alone: it passes the signal on to the program, which decides what its own children get.
        let out = self.runc().args(["kill", &sandbox.id, "TERM"]).output().await.map_err(io("running runc kill"))?;
        if !out.status.success() && !String::from_utf8_lossy(&out.stderr).contains("not running") {
            return Err(SandboxError::Runc { message: String::from_utf8_lossy(&out.stderr).trim().to_owned() });
        }
        if let Ok(status) = tokio::time::timeout(grace, sandbox.wait()).await {
            return status;
        }
        self.signal(&sandbox.id, "KILL").await?;
        sandbox.wait().await
    }

    /// Removes a sandbox and everything it had: its processes, runc's state, its cgroup, its mounts and
    /// writable layer. Nothing there is fine.
    pub async fn remove(&self, id: &str) -> Result<(), SandboxError> {
        self.place().remove(id).await
    }

    /// Removes every sandbox of this node, as an agent does when it starts: what a crashed agent left.
    pub async fn remove_all(&self) -> Result<usize, SandboxError> {
        self.place().remove_all().await
    }

    /// Removes the sandboxes of the other directories beside this one whose agent is gone (their lock is
    /// free): what agents that never came back left, such as a node renamed, or one of a database since reset.
    /// Returns those directories' names (their nodes).
    pub async fn remove_abandoned(&self) -> Result<Vec<String>, SandboxError> {
        let Some(parent) = self.dir.parent() else { return Ok(Vec::new()) };
        let mut removed = Vec::new();
        for entry in std::fs::read_dir(parent).map_err(io(format!("listing {}", parent.display())))?.flatten() {
            let dir = entry.path();
            if dir == self.dir || !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            // Held while cleaning, so that two agents starting together do not both clean.
            let Ok(lock) = lock_file(&dir) else { continue };
            if !ids::try_lock(&lock) {
                continue;
            }
            Place { runc: &self.runc, dir: &dir }.remove_all().await?;
            std::fs::remove_dir_all(&dir).map_err(io(format!("removing {}", dir.display())))?;
            removed.extend(entry.file_name().into_string().ok());
        }
        Ok(removed)
    }
}

fn lock_file(dir: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(dir.join("lock"))
}

/// A directory of sandboxes and the runc that runs them: what removing them needs.
struct Place<'a> {
    runc: &'a Path,
    dir: &'a Path,
}

impl Place<'_> {
    fn runc(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(self.runc);
        cmd.arg("--root").arg(self.dir.join("runc")).stdin(Stdio::null()).kill_on_drop(true);
        cmd
    }

    async fn remove(&self, id: &str) -> Result<(), SandboxError> {
        let out = self.runc().args(["delete", "--force", id]).output().await.map_err(io("running runc delete"))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() && !stderr.contains("does not exist") && !stderr.contains("not exist") {
            return Err(SandboxError::Runc { message: stderr.trim().to_owned() });
        }
        let bundle = self.dir.join(id);
        tokio::task::spawn_blocking(move || teardown(&bundle))
            .await
            .map_err(|e| SandboxError::Io { what: "removing the sandbox".into(), source: std::io::Error::other(e) })?
    }

    async fn remove_all(&self) -> Result<usize, SandboxError> {
        let mut ids = std::collections::BTreeSet::new();
        let out = self.runc().args(["list", "-q"]).output().await.map_err(io("running runc list"))?;
        ids.extend(String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned));
        if let Ok(dir) = std::fs::read_dir(self.dir) {
            ids.extend(
                dir.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| n != "runc"),
            );
        }
        for id in &ids {
            self.remove(id).await?;
        }
        Ok(ids.len())
    }
}

impl Sandbox {
    /// Waits until the sandbox's first process ends (the others die with it: it is the pid namespace's init).
    pub async fn wait(&mut self) -> Result<ExitStatus, SandboxError> {
        let exit = self.exit.as_ref().expect("taken only when dropped");
        loop {
            let mut guard = exit.readable().await.map_err(io("waiting for the sandbox"))?;
            match waitid(exit.get_ref(), libc::WNOHANG) {
                Ok(Some(status)) => {
                    self.reaped = true;
                    return Ok(status);
                }
                Ok(None) => guard.clear_ready(),
                Err(e) => return Err(io("waiting for the sandbox")(e)),
            }
        }
    }
}

impl Drop for Sandbox {
    /// A sandbox dropped without its end being waited for (its supervisor was aborted) would stay a zombie child
    /// of this process once it ends: a thread waits for that end and reaps it.
    fn drop(&mut self) {
        if self.reaped {
            return;
        }
        if let Some(pidfd) = self.exit.take().map(AsyncFd::into_inner) {
            std::thread::spawn(move || drop(waitid(&pidfd, 0)));
        }
    }
}

/// Mounts the root filesystem and writes the bundle: blocking work.
fn prepare(spec: &SandboxSpec, bundle: &Path, base: u32, init: &Path) -> Result<(), SandboxError> {
    let err = |what: String| move |e| SandboxError::Io { what, source: e };
    for d in ["l", "upper", "work", "rootfs"] {
        std::fs::create_dir_all(bundle.join(d)).map_err(err(format!("creating {}", bundle.join(d).display())))?;
    }
    // runc mounts the root filesystem from inside the sandbox's user namespace: its root must reach it, and no
    // one else (its group is the sandbox root's alone).
    std::os::unix::fs::chown(bundle, Some(0), Some(base)).map_err(err("chown the bundle".into()))?;
    std::fs::set_permissions(bundle, std::os::unix::fs::PermissionsExt::from_mode(0o710))
        .map_err(err("restricting the bundle".into()))?;
    // The writable layer is the sandbox root's own; its top directory becomes the root directory.
    std::os::unix::fs::chown(bundle.join("upper"), Some(base), Some(base)).map_err(err("chown upper".into()))?;
    let userns = mounts::user_namespace(base, ids::RANGE_SIZE).map_err(err("creating the id mapping".into()))?;
    let mut lowers = Vec::new();
    for (i, layer) in spec.layers.iter().enumerate() {
        let at = bundle.join("l").join(i.to_string());
        std::fs::create_dir_all(&at).map_err(err(format!("creating {}", at.display())))?;
        use std::os::fd::AsFd;
        mounts::idmapped_bind(layer, &at, userns.as_fd()).map_err(err(format!("mapping layer {}", layer.display())))?;
        lowers.push(at);
    }
    if lowers.is_empty() {
        // overlayfs needs a lower layer: an empty one.
        let empty = bundle.join("l").join("empty");
        std::fs::create_dir_all(&empty).map_err(err("creating an empty layer".into()))?;
        lowers.push(empty);
    }
    let top_first: Vec<&Path> = lowers.iter().rev().map(PathBuf::as_path).collect();
    mounts::overlay(&top_first, &bundle.join("upper"), &bundle.join("work"), &bundle.join("rootfs"))
        .map_err(err("mounting the root filesystem".into()))?;
    let account = user::resolve(&bundle.join("rootfs"), &spec.user)?;
    let files = spec::BundleFiles {
        hosts: bundle.join("hosts"),
        hostname: bundle.join("hostname"),
        init: init.to_owned(),
        exec: bundle.join("exec"),
        root: None,
        secrets: (!spec.secret_files.is_empty()).then(|| bundle.join("secrets")),
    };
    write_bundle(spec, bundle, spec::Ids::Range(base), &account, &files)
}

/// The bundle of a rootless sandbox: its root is the one flattened image directory, read-only and shared, so
/// nothing is mounted here; the sandbox runs as its root, the only id it maps.
fn prepare_rootless(spec: &SandboxSpec, bundle: &Path, ids: spec::Ids, init: &Path) -> Result<(), SandboxError> {
    let err = |what: String| move |e| SandboxError::Io { what, source: e };
    let [root] = spec.layers.as_slice() else {
        return Err(SandboxError::Io {
            what: "a rootless sandbox".into(),
            source: std::io::Error::other(format!(
                "needs its image as one directory, not {} layers",
                spec.layers.len()
            )),
        });
    };
    std::fs::create_dir_all(bundle).map_err(err(format!("creating {}", bundle.display())))?;
    std::fs::set_permissions(bundle, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .map_err(err("restricting the bundle".into()))?;
    let account = user::Account { uid: 0, gid: 0, home: "/root".into() };
    let files = spec::BundleFiles {
        hosts: bundle.join("hosts"),
        hostname: bundle.join("hostname"),
        init: init.to_owned(),
        exec: bundle.join("exec"),
        root: Some(root.clone()),
        secrets: (!spec.secret_files.is_empty()).then(|| bundle.join("secrets")),
    };
    write_bundle(spec, bundle, ids, &account, &files)
}

/// The files the sandbox sees from us and runc's `config.json`.
fn write_bundle(
    spec: &SandboxSpec,
    bundle: &Path,
    ids: spec::Ids,
    account: &user::Account,
    files: &spec::BundleFiles,
) -> Result<(), SandboxError> {
    let err = |what: String| move |e| SandboxError::Io { what, source: e };
    let mut hosts = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    if let Some(ip) = spec.address {
        hosts.push_str(&format!("{ip}\t{}\n", spec.hostname));
    }
    std::fs::write(&files.hosts, hosts).map_err(err("writing hosts".into()))?;
    std::fs::write(&files.hostname, format!("{}\n", spec.hostname)).map_err(err("writing hostname".into()))?;
    // The init makes its exec socket here as the sandbox's user; nobody else inside or outside may.
    let (uid, gid) = match ids {
        spec::Ids::Range(base) => (base + account.uid, base + account.gid),
        spec::Ids::Own { uid, gid } => (uid, gid),
    };
    std::fs::create_dir_all(&files.exec).map_err(err("creating the exec directory".into()))?;
    std::os::unix::fs::chown(&files.exec, Some(uid), Some(gid)).map_err(err("chown the exec directory".into()))?;
    std::fs::set_permissions(&files.exec, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .map_err(err("restricting the exec directory".into()))?;
    if let Some(dir) = &files.secrets {
        write_secrets(dir, &spec.secret_files, ids, (uid, gid))?;
    }
    let config = spec::config(spec, ids, account, files);
    std::fs::write(bundle.join("config.json"), serde_json::to_vec_pretty(&config).expect("JSON serializes"))
        .map_err(err("writing config.json".into()))
}

/// Writes the secret files into `dir`, the sandbox user's (`owner`) alone: a tmpfs of their own when the agent is
/// root, so that no value reaches a disk; a rootless agent (which cannot mount) writes them in the bundle, itself
/// readable by the agent alone.
fn write_secrets(
    dir: &Path,
    files: &[(String, Vec<u8>)],
    ids: spec::Ids,
    owner: (u32, u32),
) -> Result<(), SandboxError> {
    let err = |what: String| move |e| SandboxError::Io { what, source: e };
    std::fs::create_dir_all(dir).map_err(err("creating the secrets directory".into()))?;
    if let spec::Ids::Range(_) = ids {
        let bytes: u64 = files.iter().map(|(_, v)| v.len() as u64 + 4096).sum::<u64>() + 4096;
        mounts::tmpfs(dir, bytes, owner.0, owner.1, 0o500).map_err(err("mounting the secrets' memory".into()))?;
    }
    for (name, value) in files {
        // Names are environment variable names ([A-Za-z_][A-Za-z0-9_]*): no path in them.
        let path = dir.join(name);
        std::fs::write(&path, value).map_err(err(format!("writing secret {name}")))?;
        std::os::unix::fs::chown(&path, Some(owner.0), Some(owner.1)).map_err(err(format!("chown secret {name}")))?;
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o400))
            .map_err(err(format!("restricting secret {name}")))?;
    }
    std::os::unix::fs::chown(dir, Some(owner.0), Some(owner.1)).map_err(err("chown the secrets directory".into()))?;
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o500))
        .map_err(err("restricting the secrets directory".into()))
}

/// Unmounts and deletes a bundle directory.
fn teardown(bundle: &Path) -> Result<(), SandboxError> {
    if !bundle.exists() {
        return Ok(());
    }
    let err = |what: String| move |e| SandboxError::Io { what, source: e };
    // A rootless sandbox mounted nothing here (and unmounting would need root).
    if !bundle.join("rootfs").exists() {
        return std::fs::remove_dir_all(bundle).map_err(err(format!("removing {}", bundle.display())));
    }
    mounts::unmount(&bundle.join("rootfs")).map_err(err("unmounting the root filesystem".into()))?;
    mounts::unmount(&bundle.join("secrets")).map_err(err("unmounting the secrets".into()))?;
    if let Ok(layers) = std::fs::read_dir(bundle.join("l")) {
        for l in layers.flatten() {
            mounts::unmount(&l.path()).map_err(err(format!("unmounting {}", l.path().display())))?;
        }
    }
    std::fs::remove_dir_all(bundle).map_err(err(format!("removing {}", bundle.display())))
}

/// The last error runc logged (its log is JSON lines with `level` and `msg`).
fn last_error(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["level"] == "error" || v["level"] == "fatal")
        .find_map(|v| v["msg"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "failed without saying why".into())
}

/// Makes `fd` the child's descriptor 3, inherited across exec (runc's `--preserve-fds 1` passes it on).
#[allow(unsafe_code)]
fn pass_as_fd3(cmd: &mut tokio::process::Command, fd: std::os::fd::RawFd) {
    // SAFETY: the closure runs in the forked child before exec and only calls dup2 and fcntl, which are
    // async-signal-safe, on integers. dup2 onto itself keeps close-on-exec set, hence the fcntl.
    unsafe {
        cmd.pre_exec(move || {
            if (fd != 3 && libc::dup2(fd, 3) < 0) || libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[allow(unsafe_code)]
fn current_uid() -> u32 {
    // SAFETY: getuid(2) cannot fail and touches no memory.
    unsafe { libc::getuid() }
}

#[allow(unsafe_code)]
fn current_gid() -> u32 {
    // SAFETY: getgid(2) cannot fail and touches no memory.
    unsafe { libc::getgid() }
}

#[allow(unsafe_code)]
fn set_subreaper() -> std::io::Result<()> {
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[allow(unsafe_code)]
fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open with integer arguments; a non-negative result is a descriptor we now own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[allow(unsafe_code)]
fn watch(pidfd: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd always returns the descriptor it owns, which stays open until it is dropped with the
    // AsyncFd.
    unsafe { AsyncFd::register(pidfd) }.map_err(|e| e.into())
}

/// Reaps the process behind a pidfd if it has exited (with `WNOHANG`), or once it exits.
#[allow(unsafe_code)]
fn waitid(pidfd: &OwnedFd, flags: libc::c_int) -> std::io::Result<Option<ExitStatus>> {
    // SAFETY: waitid fills the zeroed siginfo it is given.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::waitid(libc::P_PIDFD, pidfd.as_raw_fd() as libc::id_t, &mut info, libc::WEXITED | flags) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: si_pid and si_status are valid for a SIGCHLD siginfo.
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if pid == 0 {
        return Ok(None);
    }
    Ok(Some(match info.si_code {
        libc::CLD_EXITED => ExitStatus::from_raw((status & 0xff) << 8),
        _ => ExitStatus::from_raw(status & 0x7f),
    }))
}
