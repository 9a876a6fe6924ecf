use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Why the embedded cluster could not be prepared, started or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No PostgreSQL server binaries were found by discovery.
    #[error(
        "PostgreSQL server binaries not found (looked at: {searched}); install them \
         (Debian: `apt-get install postgresql`) or set a bin dir"
    )]
    BinariesNotFound {
        /// Where discovery looked, in order.
        searched: String,
    },

    /// The bin dir (given or discovered) lacks a program the cluster needs.
    #[error(
        "{program} not found in the PostgreSQL bin dir {bin_dir}; install the PostgreSQL server binaries \
         (Debian: `apt-get install postgresql`)"
    )]
    ProgramMissing {
        /// The missing program, e.g. `initdb`.
        program: &'static str,
        /// The directory it was expected in.
        bin_dir: PathBuf,
    },

    /// We run as root and there is no unprivileged account to run PostgreSQL as.
    #[error(
        "running as root, but neither the `postgres` nor the `nobody` account exists to run PostgreSQL as \
         (initdb and postgres refuse to run as root)"
    )]
    NoUnprivilegedAccount,

    /// The data dir path does not name a directory (e.g. `/` or a path ending in `..`).
    #[error("invalid PostgreSQL data dir {path}: it must name a directory")]
    InvalidDataDir {
        /// The path as given.
        path: PathBuf,
    },

    /// A directory above the data dir cannot be traversed by the account PostgreSQL runs as.
    #[error(
        "the PostgreSQL data dir {data_dir} is out of reach of the account `{account}` that PostgreSQL runs as \
         (initdb and postgres refuse to run as root): it cannot traverse {dir}; choose a data dir under a path \
         it can reach, such as /var/lib/cloudd or /tmp"
    )]
    DirNotTraversable {
        /// The first directory on the way that the account cannot enter.
        dir: PathBuf,
        /// The data dir that was asked for.
        data_dir: PathBuf,
        /// The account PostgreSQL would run as.
        account: String,
    },

    /// A filesystem operation failed.
    #[error("could not {action} {path}")]
    Io {
        /// What we were doing, e.g. `create the directory`.
        action: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// A program (or the thread supervising it) could not be started.
    #[error("could not run {command}")]
    Spawn {
        /// The command line.
        command: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// `initdb` ran and failed.
    #[error("initdb failed ({status}) creating the cluster for {data_dir}; command: {command}; output:\n{output}")]
    Initdb {
        /// The data dir being created.
        data_dir: PathBuf,
        /// The command line.
        command: String,
        /// How initdb exited.
        status: String,
        /// The last lines of its output.
        output: String,
    },

    /// The data dir holds files but no PostgreSQL cluster.
    #[error(
        "the PostgreSQL data dir {data_dir} is not empty but holds no cluster; remove it or choose another data dir"
    )]
    NotACluster {
        /// The data dir.
        data_dir: PathBuf,
    },

    /// The data dir holds a cluster that this crate did not create (there is no password file).
    #[error(
        "the PostgreSQL data dir {data_dir} holds a cluster not created by cloud-embedded-pg ({password_file} \
         is missing); remove it or choose another data dir"
    )]
    ForeignCluster {
        /// The data dir.
        data_dir: PathBuf,
        /// The password file we expected.
        password_file: PathBuf,
    },

    /// A postmaster is already running on the data dir.
    #[error("PostgreSQL is already running on {data_dir} (pid {pid}); stop it or choose another data dir")]
    AlreadyRunning {
        /// The data dir.
        data_dir: PathBuf,
        /// The pid recorded in its `postmaster.pid`.
        pid: u32,
    },

    /// No free port could be found on the loopback interface.
    #[error("could not find a free port on 127.0.0.1")]
    NoFreePort {
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// postgres exited before it accepted connections.
    #[error(
        "PostgreSQL on {data_dir} (port {port}) exited during startup ({status}); command: {command}; \
         last lines of {log}:\n{log_tail}"
    )]
    StartFailed {
        /// The data dir.
        data_dir: PathBuf,
        /// The port it was asked to listen on.
        port: u16,
        /// How it exited.
        status: String,
        /// The command line.
        command: String,
        /// The server log.
        log: PathBuf,
        /// The last lines the server wrote to its log during this attempt.
        log_tail: String,
    },

    /// Every free port we picked was taken by someone else before postgres could bind it.
    #[error(
        "PostgreSQL on {data_dir} could not bind a free port in {attempts} attempts; last lines of {log}:\n{log_tail}"
    )]
    PortsExhausted {
        /// The data dir.
        data_dir: PathBuf,
        /// How many ports were tried.
        attempts: u32,
        /// The server log.
        log: PathBuf,
        /// The last lines of the log from the last attempt.
        log_tail: String,
    },

    /// postgres did not accept connections in time (it has been stopped).
    #[error(
        "PostgreSQL on {data_dir} (port {port}) did not accept connections within {waited:?}; \
         last lines of {log}:\n{log_tail}"
    )]
    StartTimeout {
        /// The data dir.
        data_dir: PathBuf,
        /// The port it was asked to listen on.
        port: u16,
        /// How long we waited.
        waited: Duration,
        /// The server log.
        log: PathBuf,
        /// The last lines the server wrote to its log during this attempt.
        log_tail: String,
    },

    /// A signal could not be sent to the postmaster.
    #[error("could not send {signal} to PostgreSQL (pid {pid})")]
    Signal {
        /// The postmaster's pid.
        pid: i32,
        /// The signal's name.
        signal: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// The postmaster did not exit, not even after SIGKILL.
    #[error("PostgreSQL (pid {pid}) did not exit within {waited:?} of SIGINT and SIGKILL")]
    StopTimeout {
        /// The postmaster's pid.
        pid: i32,
        /// How long we waited in all.
        waited: Duration,
    },
}

impl Error {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { action, path, source }
    }
}
