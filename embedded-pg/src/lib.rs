//! A private PostgreSQL cluster started from the system's binaries, for `cloudd dev` and the tests.
//!
//! It trades generality for safety: the server listens on loopback only (no Unix socket), uses password auth with
//! a random password kept in the data dir, and can never outlive the process that started it (it gets SIGINT,
//! PostgreSQL's fast shutdown, when its parent thread dies). PostgreSQL refuses to run as root, so as root the
//! cluster runs as the `postgres` account, or `nobody` when that does not exist.

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

/// How to start a cluster.
#[derive(Debug, Clone)]
pub struct Options {
    /// The cluster's data directory; created and initialised when it holds no cluster yet.
    pub data_dir: PathBuf,
    /// Loopback port; `None` picks a free one.
    pub port: Option<u16>,
    /// Directory with `initdb` and `postgres`; `None` discovers it.
    pub bin_dir: Option<PathBuf>,
}

/// Why the cluster could not be started or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No PostgreSQL server binaries were found.
    #[error(
        "no PostgreSQL server binaries found (looked for pg_config, /usr/lib/postgresql/*/bin and postgres on PATH); install them, e.g. `apt-get install postgresql`"
    )]
    NoBinaries,
    /// A file system operation failed.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// As root, the unprivileged account cannot reach the data dir.
    #[error("the PostgreSQL account (uid {uid}) cannot enter {}: choose a data dir under a path it can traverse, such as /var/lib/cloudd or /tmp", dir.display())]
    Unreachable {
        /// The directory it cannot traverse.
        dir: PathBuf,
        /// The account's uid.
        uid: u32,
    },
    /// `initdb` failed.
    #[error("initdb failed ({status}): {output}")]
    Initdb {
        /// Exit status.
        status: ExitStatus,
        /// What it printed.
        output: String,
    },
    /// A postmaster is already running on this data dir.
    #[error("a PostgreSQL server (pid {pid}) is already running on {}", data_dir.display())]
    AlreadyRunning {
        /// Its pid.
        pid: i32,
        /// The data dir.
        data_dir: PathBuf,
    },
    /// The server exited or did not accept connections in time.
    #[error("PostgreSQL did not start ({reason}); last lines of {}:\n{log_tail}", log.display())]
    Start {
        /// What happened.
        reason: String,
        /// The server log.
        log: PathBuf,
        /// Its last lines.
        log_tail: String,
    },
}

/// A running cluster. Dropping it stops the server (fast shutdown).
#[derive(Debug)]
pub struct EmbeddedPg {
    port: u16,
    password: String,
    pid: i32,
    // Behind a mutex only so the handle is Sync (tests keep one in a static).
    exited: Mutex<mpsc::Receiver<ExitStatus>>,
    data_dir: PathBuf,
    remove_on_stop: bool,
    stopped: bool,
}

/// The superuser our clusters are created with.
const SUPERUSER: &str = "cloud";
const PASSWORD_FILE: &str = "cloud-password";
const LOG_FILE: &str = "server.log";
const START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

impl EmbeddedPg {
    /// Starts a durable cluster in `opts.data_dir`, creating it the first time.
    pub async fn start(opts: Options) -> Result<Self, Error> {
        let o = opts.clone();
        blocking(move || start(o, &[], false)).await
    }

    /// Starts a throwaway cluster tuned for tests (no fsync, many connections); its data dir is removed when it
    /// stops.
    pub async fn start_ephemeral(opts: Options) -> Result<Self, Error> {
        let extra = [
            "fsync=off",
            "synchronous_commit=off",
            "full_page_writes=off",
            "max_connections=300",
            "shared_buffers=64MB",
        ];
        blocking(move || start(opts, &extra, true)).await
    }

    /// The loopback port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection URL for `database` as the superuser.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://{SUPERUSER}:{}@127.0.0.1:{}/{database}", self.password, self.port)
    }

    /// Stops the server (fast shutdown) and waits for it.
    pub async fn stop(mut self) -> Result<(), Error> {
        self.stopped = true;
        let (pid, dir, remove) = (self.pid, self.data_dir.clone(), self.remove_on_stop);
        let exited = std::mem::replace(&mut self.exited, Mutex::new(mpsc::channel().1));
        blocking(move || {
            shutdown(pid, &exited);
            if remove {
                let _ = fs::remove_dir_all(&dir);
            }
            Ok(())
        })
        .await
    }
}

impl Drop for EmbeddedPg {
    fn drop(&mut self) {
        if !self.stopped {
            shutdown(self.pid, &self.exited);
            if self.remove_on_stop {
                let _ = fs::remove_dir_all(&self.data_dir);
            }
        }
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, Error> + Send + 'static) -> Result<T, Error> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Sends SIGINT (fast shutdown), waits, and kills after the timeout.
fn shutdown(pid: i32, exited: &Mutex<mpsc::Receiver<ExitStatus>>) {
    let exited = exited.lock().unwrap_or_else(|e| e.into_inner());
    signal(pid, libc::SIGINT);
    if exited.recv_timeout(STOP_TIMEOUT).is_err() {
        tracing::warn!(pid, "PostgreSQL did not stop in time; killing it");
        signal(pid, libc::SIGKILL);
        let _ = exited.recv_timeout(STOP_TIMEOUT);
    }
}

#[allow(unsafe_code)]
fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) on a pid we spawned; no memory is touched.
    unsafe {
        libc::kill(pid, sig);
    }
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_owned();
    move |source| Error::Io { what, path, source }
}

/// The account the server runs as: ourselves, or an unprivileged one when we are root.
#[derive(Debug, Clone, Copy)]
struct Account {
    switch: Option<(u32, u32)>,
}

impl Account {
    fn pick() -> Self {
        if current_uid() != 0 {
            return Self { switch: None };
        }
        let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
        let find = |name: &str| {
            passwd.lines().find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.len() > 3 && f[0] == name).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?))).flatten()
            })
        };
        Self { switch: find("postgres").or_else(|| find("nobody")).or(Some((65534, 65534))) }
    }

    fn command(&self, program: PathBuf) -> Command {
        let mut cmd = Command::new(program);
        if let Some((uid, gid)) = self.switch {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    /// Gives the account the directory, and checks it can reach it.
    fn own(&self, dir: &Path) -> Result<(), Error> {
        let Some((uid, gid)) = self.switch else {
            return Ok(());
        };
        std::os::unix::fs::chown(dir, Some(uid), Some(gid)).map_err(io("changing the owner of", dir))?;
        for ancestor in dir.ancestors().skip(1) {
            let Ok(meta) = fs::metadata(ancestor) else {
                continue;
            };
            let mode = meta.permissions().mode();
            let can = if meta.uid() == uid {
                mode & 0o100 != 0
            } else if meta.gid() == gid {
                mode & 0o010 != 0
            } else {
                mode & 0o001 != 0
            };
            if !can {
                return Err(Error::Unreachable { dir: ancestor.to_owned(), uid });
            }
        }
        Ok(())
    }
}

#[allow(unsafe_code)]
fn current_uid() -> u32 {
    // SAFETY: getuid(2) cannot fail and touches no memory.
    unsafe { libc::getuid() }
}

/// Where the server binaries are.
fn discover_bin_dir() -> Result<PathBuf, Error> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() && dir.join("postgres").exists() {
            return Ok(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin): &(u32, PathBuf)| bin.join("initdb").exists())
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .find(|d| d.join("postgres").exists() && d.join("initdb").exists())
        .ok_or(Error::NoBinaries)
}

fn random_password() -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..32).map(|_| CHARS[rng.random_range(0..CHARS.len())] as char).collect()
}

fn initdb(bin: &Path, dir: &Path, account: Account) -> Result<String, Error> {
    let password = random_password();
    // initdb wants an empty directory, so the password file lives beside it until the cluster exists.
    let pwfile = dir.with_extension("initdb-password");
    fs::write(&pwfile, &password).map_err(io("writing", &pwfile))?;
    if let Some((uid, gid)) = account.switch {
        std::os::unix::fs::chown(&pwfile, Some(uid), Some(gid)).map_err(io("changing the owner of", &pwfile))?;
    }
    let out = account
        .command(bin.join("initdb"))
        .arg("-D")
        .arg(dir)
        .args(["-U", SUPERUSER, "--auth=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-instructions"])
        .arg(format!("--pwfile={}", pwfile.display()))
        .stdin(Stdio::null())
        .output()
        .map_err(io("running initdb for", dir));
    let _ = fs::remove_file(&pwfile);
    let out = out?;
    if !out.status.success() {
        let output = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        return Err(Error::Initdb { status: out.status, output: output.trim().to_owned() });
    }
    let stored = dir.join(PASSWORD_FILE);
    fs::write(&stored, &password).map_err(io("writing", &stored))?;
    fs::set_permissions(&stored, fs::Permissions::from_mode(0o600)).map_err(io("protecting", &stored))?;
    Ok(password)
}

/// Removes a postmaster.pid left by a server that is gone; refuses when one is alive.
fn clear_stale_pid(dir: &Path) -> Result<(), Error> {
    let pidfile = dir.join("postmaster.pid");
    let Ok(text) = fs::read_to_string(&pidfile) else {
        return Ok(());
    };
    let pid: i32 = text.lines().next().and_then(|l| l.trim().parse().ok()).unwrap_or(0);
    let alive =
        pid > 0 && fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim().starts_with("postgres"));
    if alive {
        return Err(Error::AlreadyRunning { pid, data_dir: dir.to_owned() });
    }
    tracing::info!(pid, "removing a stale postmaster.pid");
    fs::remove_file(&pidfile).map_err(io("removing", &pidfile))
}

fn free_port() -> Result<u16, Error> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(io("finding a free port near", Path::new("127.0.0.1")))?;
    l.local_addr().map(|a| a.port()).map_err(io("finding a free port near", Path::new("127.0.0.1")))
}

fn log_tail(log: &Path) -> String {
    let lines: Vec<String> =
        fs::File::open(log).map(|f| BufReader::new(f).lines().map_while(Result::ok).collect()).unwrap_or_default();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

fn start(opts: Options, extra: &[&str], ephemeral: bool) -> Result<EmbeddedPg, Error> {
    let bin = match opts.bin_dir {
        Some(b) => b,
        None => discover_bin_dir()?,
    };
    let dir = opts.data_dir;
    let account = Account::pick();
    fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(io("protecting", &dir))?;
    account.own(&dir)?;
    let password = if dir.join("PG_VERSION").exists() {
        let file = dir.join(PASSWORD_FILE);
        fs::read_to_string(&file).map_err(io("reading", &file))?.trim().to_owned()
    } else {
        tracing::info!(data_dir = %dir.display(), "creating a PostgreSQL cluster");
        initdb(&bin, &dir, account)?
    };
    clear_stale_pid(&dir)?;

    let attempts = if opts.port.is_some() { 1 } else { 5 };
    let mut last = None;
    for _ in 0..attempts {
        let port = match opts.port {
            Some(p) => p,
            None => free_port()?,
        };
        match launch(&bin, &dir, port, extra, account) {
            Ok((pid, exited)) => {
                tracing::info!(port, pid, data_dir = %dir.display(), "PostgreSQL is up");
                return Ok(EmbeddedPg {
                    port,
                    password,
                    pid,
                    exited: Mutex::new(exited),
                    data_dir: dir,
                    remove_on_stop: ephemeral,
                    stopped: false,
                });
            }
            // Another process took the port between our probe and the server's bind: try another.
            Err(Error::Start { log_tail, .. })
                if log_tail.contains("could not bind") || log_tail.contains("Address already in use") =>
            {
                last = Some(log_tail);
            }
            Err(e) => return Err(e),
        }
    }
    Err(Error::Start {
        reason: "no free port after 5 attempts".into(),
        log: dir.join(LOG_FILE),
        log_tail: last.unwrap_or_default(),
    })
}

/// Spawns the postmaster from a dedicated thread that lives as long as the server: the kernel signals the server
/// when that thread dies (PR_SET_PDEATHSIG is tied to the forking thread), so it must not be a short-lived
/// runtime worker.
fn launch(
    bin: &Path,
    dir: &Path,
    port: u16,
    extra: &[&str],
    account: Account,
) -> Result<(i32, mpsc::Receiver<ExitStatus>), Error> {
    let log = dir.join(LOG_FILE);
    let log_file = fs::OpenOptions::new().create(true).append(true).open(&log).map_err(io("opening", &log))?;
    let err_file = log_file.try_clone().map_err(io("opening", &log))?;
    let mut cmd = account.command(bin.join("postgres"));
    cmd.arg("-D").arg(dir).arg("-p").arg(port.to_string());
    for setting in
        ["listen_addresses=127.0.0.1", "unix_socket_directories=", "logging_collector=off"].iter().chain(extra)
    {
        cmd.arg("-c").arg(setting);
    }
    cmd.stdin(Stdio::null()).stdout(log_file).stderr(err_file);
    die_with_parent(&mut cmd);

    let (started_tx, started_rx) = mpsc::channel();
    let (exited_tx, exited_rx) = mpsc::channel();
    std::thread::Builder::new()
        .name(format!("postgres-{port}"))
        .spawn(move || {
            let mut child = match cmd.spawn() {
                Ok(c) => c,
                Err(e) => {
                    let _ = started_tx.send(Err(e));
                    return;
                }
            };
            let _ = started_tx.send(Ok(child.id() as i32));
            let status = child.wait().unwrap_or_else(|_| ExitStatus::from_raw(1));
            let _ = exited_tx.send(status);
        })
        .map_err(io("starting a thread for", dir))?;
    let pid = started_rx
        .recv()
        .map_err(|_| Error::Start { reason: "spawn thread died".into(), log: log.clone(), log_tail: String::new() })?
        .map_err(io("running postgres for", dir))?;

    let deadline = Instant::now() + START_TIMEOUT;
    let isready = bin.join("pg_isready");
    loop {
        if let Ok(status) = exited_rx.try_recv() {
            return Err(Error::Start { reason: format!("it exited with {status}"), log_tail: log_tail(&log), log });
        }
        let up = if isready.exists() {
            Command::new(&isready)
                .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string()])
                .status()
                .is_ok_and(|s| s.success())
        } else {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        };
        if up {
            return Ok((pid, exited_rx));
        }
        if Instant::now() > deadline {
            signal(pid, libc::SIGKILL);
            return Err(Error::Start {
                reason: format!("not accepting connections after {}s", START_TIMEOUT.as_secs()),
                log_tail: log_tail(&log),
                log,
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only calls async-signal-safe functions
    // (prctl, getppid, _exit). It runs after the uid switch, so the death signal survives it.
    unsafe {
        let parent = libc::getpid();
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT);
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(pg: &EmbeddedPg, sql: &str) -> Result<String, String> {
        let out = Command::new("psql")
            .arg(pg.url("postgres"))
            .args(["-XAtq", "-c", sql])
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    fn scratch() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("epg-test-{}", rand::random::<u64>()));
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        dir
    }

    #[tokio::test]
    async fn a_cluster_keeps_its_data_across_restarts_and_stops_cleanly() {
        let root = scratch();
        let opts = Options { data_dir: root.join("pg"), port: None, bin_dir: None };
        let pg = EmbeddedPg::start(opts.clone()).await.unwrap();
        assert_eq!(query(&pg, "select 1").unwrap(), "1");
        query(&pg, "create table kept (v int); insert into kept values (42)").unwrap();
        let port = pg.port();
        pg.stop().await.unwrap();
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err(), "the port is closed after stop");

        let pg = EmbeddedPg::start(opts).await.unwrap();
        assert_eq!(query(&pg, "select v from kept").unwrap(), "42");
        // A wrong password is refused: the cluster is not open to anyone on the machine.
        let wrong = pg.url("postgres").replace(&pg.password, "nope");
        let out = Command::new("psql").arg(wrong).args(["-XAtq", "-c", "select 1"]).output().unwrap();
        assert!(!out.status.success());
        let port = pg.port();
        drop(pg);
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err(), "dropping stops the server");
        fs::remove_dir_all(root).unwrap();
    }

    #[tokio::test]
    async fn a_stale_pid_file_is_recovered_and_ephemeral_clusters_clean_up() {
        let root = scratch();
        let dir = root.join("pg");
        let pg =
            EmbeddedPg::start_ephemeral(Options { data_dir: dir.clone(), port: None, bin_dir: None }).await.unwrap();
        assert_eq!(query(&pg, "show fsync").unwrap(), "off");
        // Kill it hard: it leaves postmaster.pid behind, as a crash would.
        signal(pg.pid, libc::SIGKILL);
        let _ = pg.exited.lock().unwrap().recv_timeout(STOP_TIMEOUT);
        assert!(dir.join("postmaster.pid").exists());
        let mut pg = pg;
        pg.stopped = true;
        drop(pg);
        // Shared memory of the killed server may linger a moment; the restart must still succeed.
        let pg =
            EmbeddedPg::start_ephemeral(Options { data_dir: dir.clone(), port: None, bin_dir: None }).await.unwrap();
        assert_eq!(query(&pg, "select 2").unwrap(), "2");
        pg.stop().await.unwrap();
        assert!(!dir.exists(), "an ephemeral cluster removes its data dir");
        fs::remove_dir_all(root).unwrap();
    }

    #[tokio::test]
    async fn an_unreachable_data_dir_is_named() {
        if current_uid() != 0 {
            return; // only root switches accounts
        }
        let root = scratch();
        let closed = root.join("closed");
        fs::create_dir_all(&closed).unwrap();
        fs::set_permissions(&closed, fs::Permissions::from_mode(0o700)).unwrap();
        let err =
            EmbeddedPg::start(Options { data_dir: closed.join("pg"), port: None, bin_dir: None }).await.unwrap_err();
        assert!(matches!(&err, Error::Unreachable { dir, .. } if dir == &closed), "{err}");
        assert!(err.to_string().contains("/var/lib/cloudd"));
        fs::remove_dir_all(root).unwrap();
    }
}
