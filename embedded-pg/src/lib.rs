//! A private PostgreSQL cluster run from the system's server binaries, for `cloudd dev` and the test harness
//! when no `DATABASE_URL` is given.
//!
//! Why: a developer or CI machine with the PostgreSQL server package installed should get a working platform
//! with no database setup, on a real PostgreSQL rather than a stand-in.
//!
//! What it does: `initdb` a data dir once (superuser `cloud`, scram-sha-256 with a random password kept in
//! `<data dir>/cloud-password`, UTF8, locale C), then run `postgres` listening on 127.0.0.1 only (no unix
//! sockets) on a free port. As root, both run as an unprivileged account (`postgres`, else `nobody`), because
//! they refuse to run as root. The server log is `<data dir>/log/server.log`.
//!
//! Trade-offs:
//! - The server is a child of our process and never outlives it: it is forked from a dedicated thread with a
//!   parent-death signal (SIGINT, a fast shutdown), so a killed `cloudd dev` or a test binary that never drops
//!   its cluster takes the server down too. The price is that nothing else can keep using the cluster after we
//!   exit; it is not a service manager.
//! - Linux only (`prctl(PR_SET_PDEATHSIG)`, `/proc`).
//! - The port is picked fresh at each start, so URLs are not stable across restarts; ask [`EmbeddedPg::url`].
//! - [`EmbeddedPg::start_ephemeral`] turns durability off (`fsync`, `synchronous_commit`, `full_page_writes`)
//!   for speed: a crash of the host can corrupt such a cluster. Use it only for throwaway data.
//! - Configuration comes from [`Options`] only; no environment variable is read (except `PATH` to find the
//!   binaries).

mod account;
mod cluster;
mod discover;
mod error;
mod postmaster;
mod probe;

#[cfg(test)]
mod tests;

use std::fmt;
use std::net::TcpListener;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub use crate::error::Error;

use crate::account::Account;
use crate::cluster::{DataDirState, ServerLog};
use crate::postmaster::Postmaster;
use crate::probe::Readiness;

/// How long postgres may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often readiness is probed.
const PROBE_INTERVAL: Duration = Duration::from_millis(50);
/// How many free ports are tried when postgres loses the race for one.
const PORT_ATTEMPTS: u32 = 5;

/// Where and how to run the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The cluster's data dir. Created (with its parents) when missing; a cluster is made in it when it holds
    /// none. As root, every directory above it must be traversable by the unprivileged account.
    pub data_dir: PathBuf,
    /// The loopback port to listen on; `None` picks a free one at each start.
    pub port: Option<u16>,
    /// The directory of `postgres` and `initdb`; `None` discovers it (`pg_config --bindir`, then
    /// `/usr/lib/postgresql/<highest version>/bin`, then `PATH`).
    pub bin_dir: Option<PathBuf>,
}

impl Options {
    /// Options for `data_dir`, with a free port and discovered binaries.
    pub fn new(data_dir: impl Into<PathBuf>) -> Options {
        Options { data_dir: data_dir.into(), port: None, bin_dir: None }
    }
}

/// A running private PostgreSQL cluster. Dropping it stops the server (blocking until it has exited); prefer
/// [`EmbeddedPg::stop`] in async code.
pub struct EmbeddedPg {
    data_dir: PathBuf,
    log_path: PathBuf,
    port: u16,
    password: String,
    postmaster: Postmaster,
}

/// Server settings that differ between durable and throwaway clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Durability {
    Persistent,
    Ephemeral,
}

impl Durability {
    fn settings(self) -> &'static [&'static str] {
        match self {
            Durability::Persistent => &[],
            Durability::Ephemeral => {
                // pg_stat_statements (shipped with the server) lets tests count the statements a component runs.
                &[
                    "fsync=off",
                    "synchronous_commit=off",
                    "full_page_writes=off",
                    "max_connections=300",
                    "shared_preload_libraries=pg_stat_statements",
                ]
            }
        }
    }
}

impl EmbeddedPg {
    /// Starts a durable cluster in `opts.data_dir`, creating it when missing, and waits until it accepts
    /// connections (at most 30 s).
    pub async fn start(opts: Options) -> Result<EmbeddedPg, Error> {
        Self::start_with(opts, Durability::Persistent).await
    }

    /// Like [`EmbeddedPg::start`], tuned for throwaway test clusters: `fsync`, `synchronous_commit` and
    /// `full_page_writes` off, `max_connections` 300, `pg_stat_statements` loaded.
    pub async fn start_ephemeral(opts: Options) -> Result<EmbeddedPg, Error> {
        Self::start_with(opts, Durability::Ephemeral).await
    }

    /// The port the server listens on, on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://cloud:<password>@127.0.0.1:<port>/<database>`. The password needs no URL encoding.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://{}:{}@127.0.0.1:{}/{database}", cluster::SUPERUSER, self.password, self.port)
    }

    /// The cluster's data dir (absolute).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server log.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Fast shutdown (SIGINT to the postmaster: open sessions are cut), waiting for the exit; SIGKILL after 30 s.
    pub async fn stop(self) -> Result<(), Error> {
        let EmbeddedPg { data_dir, port, postmaster, .. } = self;
        let pid = postmaster.pid();
        postmaster.stop().await?;
        tracing::info!(port, pid, data_dir = %data_dir.display(), "PostgreSQL stopped");
        Ok(())
    }

    async fn start_with(opts: Options, durability: Durability) -> Result<EmbeddedPg, Error> {
        let data_dir = absolute_data_dir(&opts.data_dir)?;
        let parent = data_dir.parent().expect("absolute and named");
        let state = cluster::inspect(&data_dir)?;
        let (version, owner) = match &state {
            DataDirState::Cluster { version, owner } => (Some(version.as_str()), Some(*owner)),
            DataDirState::Absent => (None, None),
        };
        let bin_dir = discover::bin_dir(opts.bin_dir.as_deref(), version)?;
        let account = Account::for_cluster(owner)?;
        if let Some(account) = &account {
            account.check_reaches(parent, &data_dir)?;
        }
        if state == DataDirState::Absent {
            cluster::initdb(&bin_dir, &data_dir, account.as_ref()).await?;
        }
        let password = cluster::read_password(&data_dir)?;
        cluster::clear_stale_pid_file(&data_dir)?;
        let mut log = ServerLog::open(&data_dir, account.as_ref())?;

        let attempts = if opts.port.is_some() { 1 } else { PORT_ATTEMPTS };
        let mut last_tail = String::new();
        for attempt in 1..=attempts {
            let port = match opts.port {
                Some(port) => port,
                None => free_port()?,
            };
            let offset = log.begin_attempt(port)?;
            let command = postgres_command(&bin_dir, &data_dir, port, durability, account.as_ref(), &log)?;
            let description = format!("{command:?}");
            let postmaster = Postmaster::spawn(command).await?;
            match wait_ready(&postmaster, &data_dir, port).await {
                Ok(()) => {
                    tracing::info!(
                        port,
                        pid = postmaster.pid(),
                        data_dir = %data_dir.display(),
                        log = %log.path.display(),
                        ephemeral = durability == Durability::Ephemeral,
                        "PostgreSQL started"
                    );
                    return Ok(EmbeddedPg { data_dir, log_path: log.path.clone(), port, password, postmaster });
                }
                Err(Startup::Exited(status)) => {
                    let log_tail = log.tail_since(offset);
                    if opts.port.is_none() && lost_port_race(&log_tail) {
                        tracing::debug!(port, attempt, "port taken before postgres could bind it; retrying");
                        last_tail = log_tail;
                        continue;
                    }
                    return Err(Error::StartFailed {
                        data_dir,
                        port,
                        status,
                        command: description,
                        log: log.path.clone(),
                        log_tail,
                    });
                }
                Err(Startup::TimedOut) => {
                    // Stop it before reading the log, so that the reason it hung is in the tail.
                    if let Err(err) = postmaster.stop().await {
                        tracing::warn!(error = %err, "could not stop the PostgreSQL that failed to start");
                    }
                    return Err(Error::StartTimeout {
                        data_dir,
                        port,
                        waited: READY_TIMEOUT,
                        log: log.path.clone(),
                        log_tail: log.tail_since(offset),
                    });
                }
            }
        }
        Err(Error::PortsExhausted { data_dir, attempts, log: log.path.clone(), log_tail: last_tail })
    }
}

impl fmt::Debug for EmbeddedPg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedPg")
            .field("data_dir", &self.data_dir)
            .field("port", &self.port)
            .field("pid", &self.postmaster.pid())
            .finish_non_exhaustive()
    }
}

/// The data dir made absolute, with its parents created and resolved (the traversal check needs real paths).
fn absolute_data_dir(given: &Path) -> Result<PathBuf, Error> {
    let invalid = || Error::InvalidDataDir { path: given.to_owned() };
    let absolute = if given.is_absolute() {
        given.to_owned()
    } else {
        std::env::current_dir().map_err(Error::io("resolve the current directory for", given))?.join(given)
    };
    let name = absolute.file_name().ok_or_else(invalid)?.to_owned();
    let parent = absolute.parent().ok_or_else(invalid)?;
    std::fs::create_dir_all(parent).map_err(Error::io("create the directory", parent))?;
    let parent = parent.canonicalize().map_err(Error::io("resolve the directory", parent))?;
    Ok(parent.join(name))
}

fn free_port() -> Result<u16, Error> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).map_err(|source| Error::NoFreePort { source })?;
    listener.local_addr().map(|a| a.port()).map_err(|source| Error::NoFreePort { source })
}

fn postgres_command(
    bin_dir: &Path,
    data_dir: &Path,
    port: u16,
    durability: Durability,
    account: Option<&Account>,
    log: &ServerLog,
) -> Result<Command, Error> {
    let mut command = Command::new(bin_dir.join("postgres"));
    command.arg("-D").arg(data_dir).arg("-p").arg(port.to_string());
    let common = ["listen_addresses=127.0.0.1", "unix_socket_directories=", "logging_collector=off"];
    for setting in common.iter().chain(durability.settings()) {
        command.arg("-c").arg(setting);
    }
    command
        .env("LC_ALL", "C")
        .env_remove("PGDATA")
        .current_dir(data_dir)
        .stdin(Stdio::null())
        .stdout(log.stdio()?)
        .stderr(log.stdio()?)
        // Its own process group: a Ctrl-C at the terminal reaches us, and we stop the server when we choose.
        .process_group(0);
    if let Some(account) = account {
        // std clears the supplementary groups when root switches uid.
        command.uid(account.uid).gid(account.gid);
    }
    Ok(command)
}

enum Startup {
    Exited(String),
    TimedOut,
}

async fn wait_ready(postmaster: &Postmaster, data_dir: &Path, port: u16) -> Result<(), Startup> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = postmaster.exit_status() {
            return Err(Startup::Exited(status));
        }
        // The probe alone could reach someone else's server on a port we raced for: ours says it is ready
        // in its lock file once it has bound its sockets.
        if cluster::lock_file_says_ready(data_dir, postmaster.pid())
            && probe::probe(port, cluster::SUPERUSER).await == Readiness::Ready
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Startup::TimedOut);
        }
        tokio::select! {
            () = postmaster.exited() => {}
            () = tokio::time::sleep(PROBE_INTERVAL) => {}
        }
    }
}

/// Whether postgres failed because the port was taken between our probe and its bind.
fn lost_port_race(log_tail: &str) -> bool {
    log_tail.contains("could not bind") || log_tail.contains("Address already in use")
}
