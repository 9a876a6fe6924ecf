//! The data dir on disk: creating it with initdb, its password file, stale lock files and the server log.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use rand::Rng;
use rand::distr::Alphanumeric;

use crate::Error;
use crate::account::{Account, chown_to};

/// The superuser initdb creates.
pub(crate) const SUPERUSER: &str = "cloud";
/// The superuser's password, inside the data dir.
pub(crate) const PASSWORD_FILE: &str = "cloud-password";
/// How many lines of a log end up in an error.
const TAIL_LINES: usize = 20;
/// The server log is rotated once at start when bigger than this.
const LOG_ROTATE_BYTES: u64 = 16 << 20;

/// What the data dir holds before we start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DataDirState {
    /// Nothing, or an empty directory: initdb will fill it.
    Absent,
    /// A cluster: its major version (from `PG_VERSION`) and owner (uid, gid).
    Cluster { version: String, owner: (u32, u32) },
}

pub(crate) fn inspect(data_dir: &Path) -> Result<DataDirState, Error> {
    let mut entries = match fs::read_dir(data_dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(DataDirState::Absent),
        Err(err) => return Err(Error::io("read the data dir", data_dir)(err)),
    };
    if entries.next().is_none() {
        return Ok(DataDirState::Absent);
    }
    let version_file = data_dir.join("PG_VERSION");
    let version = match fs::read_to_string(&version_file) {
        Ok(v) => v.trim().to_owned(),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            return Err(Error::NotACluster { data_dir: data_dir.to_owned() });
        }
        Err(err) => return Err(Error::io("read", version_file)(err)),
    };
    let meta = fs::metadata(data_dir).map_err(Error::io("inspect the data dir", data_dir))?;
    Ok(DataDirState::Cluster { version, owner: (meta.uid(), meta.gid()) })
}

/// A password of 32 characters from `[A-Za-z0-9]`, safe in a URL without encoding.
pub(crate) fn generate_password() -> String {
    rand::rng().sample_iter(&Alphanumeric).take(32).map(char::from).collect()
}

/// Creates the cluster with initdb, atomically: it is built in a staging dir beside the data dir, gets its
/// password file, and is then renamed into place, so an interrupted initdb never leaves a half cluster that
/// later looks like a real one.
pub(crate) async fn initdb(bin_dir: &Path, data_dir: &Path, account: Option<&Account>) -> Result<(), Error> {
    let parent = data_dir.parent().expect("data dir is absolute and named");
    let name = data_dir.file_name().expect("data dir is named").to_string_lossy();
    let staging = parent.join(format!(".{name}.initdb"));
    match fs::remove_dir_all(&staging) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => {
            return Err(Error::io("remove the leftover staging dir", &staging)(err));
        }
        _ => {}
    }
    DirBuilder::new().mode(0o700).create(&staging).map_err(Error::io("create the directory", &staging))?;
    chown_to(account, &staging)?;
    let password_file = staging.join("password");
    write_private(&password_file, &format!("{}\n", generate_password()))?;
    chown_to(account, &password_file)?;
    let target = staging.join("pgdata");

    let mut command = tokio::process::Command::new(bin_dir.join("initdb"));
    command
        .arg("-D")
        .arg(&target)
        .args(["-U", SUPERUSER, "--auth-host=scram-sha-256", "--auth-local=scram-sha-256"])
        .arg(format!("--pwfile={}", password_file.display()))
        .args(["--encoding=UTF8", "--locale=C"])
        .env("LC_ALL", "C")
        .env_remove("PGDATA")
        .current_dir(&staging)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Some(account) = account {
        command.uid(account.uid).gid(account.gid);
    }
    let description = format!("{:?}", command.as_std());
    tracing::debug!(command = %description, "running initdb");
    let output = command.output().await.map_err(|source| Error::Spawn { command: description.clone(), source })?;
    if !output.status.success() {
        let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&output.stderr));
        let _ = fs::remove_dir_all(&staging);
        return Err(Error::Initdb {
            data_dir: data_dir.to_owned(),
            command: description,
            status: output.status.to_string(),
            output: last_lines(&text, TAIL_LINES * 2),
        });
    }

    let final_password = target.join(PASSWORD_FILE);
    fs::rename(&password_file, &final_password).map_err(Error::io("move the password file to", &final_password))?;
    if data_dir.exists() {
        // `inspect` found it empty.
        fs::remove_dir(data_dir).map_err(Error::io("replace the empty data dir", data_dir))?;
    }
    fs::rename(&target, data_dir).map_err(Error::io("move the new cluster to", data_dir))?;
    fs::remove_dir_all(&staging).map_err(Error::io("remove the staging dir", &staging))?;
    tracing::info!(data_dir = %data_dir.display(), "created a PostgreSQL cluster");
    Ok(())
}

pub(crate) fn read_password(data_dir: &Path) -> Result<String, Error> {
    let path = data_dir.join(PASSWORD_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => Ok(text.trim().to_owned()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            Err(Error::ForeignCluster { data_dir: data_dir.to_owned(), password_file: path })
        }
        Err(err) => Err(Error::io("read", path)(err)),
    }
}

fn write_private(path: &Path, contents: &str) -> Result<(), Error> {
    let mut file =
        OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(Error::io("create", path))?;
    file.write_all(contents.as_bytes()).map_err(Error::io("write", path))
}

/// Removes a `postmaster.pid` left by a server that is gone (killed with its host process, say).
///
/// A live postgres process with that pid means the cluster is in use. Any other live process means the pid was
/// recycled (common in containers), which postgres itself would mistake for a running server.
pub(crate) fn clear_stale_pid_file(data_dir: &Path) -> Result<(), Error> {
    let path = data_dir.join("postmaster.pid");
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(Error::io("read", path)(err)),
    };
    // A standalone backend records its pid negated.
    let pid = text.lines().next().and_then(|line| line.trim().trim_start_matches('-').parse::<u32>().ok());
    if let Some(pid) = pid.filter(|pid| *pid != 0 && is_postgres(*pid)) {
        return Err(Error::AlreadyRunning { data_dir: data_dir.to_owned(), pid });
    }
    tracing::warn!(path = %path.display(), pid = ?pid, "removing a stale postmaster.pid");
    fs::remove_file(&path).map_err(Error::io("remove the stale lock file", path))
}

/// Whether `postmaster.pid` names `pid` and says the server is ready (PostgreSQL 10 and later write a status on
/// line 8; with an older server, the line is missing and we rely on the connection probe alone).
pub(crate) fn lock_file_says_ready(data_dir: &Path, pid: i32) -> bool {
    let Ok(text) = fs::read_to_string(data_dir.join("postmaster.pid")) else {
        return false;
    };
    let lines: Vec<&str> = text.lines().collect();
    let ours = lines.first().is_some_and(|line| line.trim() == pid.to_string());
    ours && lines.get(7).is_none_or(|status| status.trim() == "ready")
}

/// Whether `pid` is a live postgres process.
fn is_postgres(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/comm")) {
        Ok(comm) => matches!(comm.trim_end(), "postgres" | "postmaster"),
        Err(_) => false,
    }
}

/// The server log, `<data dir>/log/server.log`, opened for appending.
pub(crate) struct ServerLog {
    pub path: PathBuf,
    file: File,
}

impl ServerLog {
    pub fn open(data_dir: &Path, account: Option<&Account>) -> Result<ServerLog, Error> {
        let dir = data_dir.join("log");
        match DirBuilder::new().mode(0o700).create(&dir) {
            Err(err) if err.kind() != io::ErrorKind::AlreadyExists => {
                return Err(Error::io("create the directory", dir)(err));
            }
            _ => chown_to(account, &dir)?,
        }
        let path = dir.join("server.log");
        if fs::metadata(&path).is_ok_and(|m| m.len() > LOG_ROTATE_BYTES) {
            let old = dir.join("server.log.1");
            fs::rename(&path, &old).map_err(Error::io("rotate the log to", old))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(Error::io("open the log", &path))?;
        chown_to(account, &path)?;
        Ok(ServerLog { path, file })
    }

    /// Writes a marker line and returns the offset where this attempt's output starts.
    pub fn begin_attempt(&mut self, port: u16) -> Result<u64, Error> {
        writeln!(self.file, "--- cloud-embedded-pg: starting postgres on 127.0.0.1:{port} ---")
            .map_err(Error::io("write the log", &self.path))?;
        self.file.metadata().map(|m| m.len()).map_err(Error::io("inspect the log", &self.path))
    }

    /// A handle for the child's stdout or stderr.
    pub fn stdio(&self) -> Result<Stdio, Error> {
        self.file.try_clone().map(Stdio::from).map_err(Error::io("duplicate the log handle", &self.path))
    }

    /// The last lines written since `offset`.
    pub fn tail_since(&self, offset: u64) -> String {
        let read = || -> io::Result<String> {
            let mut file = File::open(&self.path)?;
            let len = file.metadata()?.len();
            let start = offset.max(len.saturating_sub(64 * 1024));
            file.seek(SeekFrom::Start(start))?;
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes)?;
            Ok(last_lines(&String::from_utf8_lossy(&bytes), TAIL_LINES))
        };
        read().unwrap_or_else(|err| format!("(could not read the log: {err})"))
    }
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_need_no_url_encoding() {
        let a = generate_password();
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()), "{a}");
        assert_ne!(a, generate_password());
    }

    #[test]
    fn last_lines_keeps_the_end() {
        assert_eq!(last_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(last_lines("a", 5), "a");
        assert_eq!(last_lines("", 5), "");
    }

    #[test]
    fn inspect_tells_empty_from_foreign_from_cluster() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("pg");
        assert_eq!(inspect(&data).unwrap(), DataDirState::Absent);
        fs::create_dir(&data).unwrap();
        assert_eq!(inspect(&data).unwrap(), DataDirState::Absent);
        fs::write(data.join("notes.txt"), "mine").unwrap();
        assert!(matches!(inspect(&data), Err(Error::NotACluster { .. })));
        fs::write(data.join("PG_VERSION"), "15\n").unwrap();
        assert!(matches!(inspect(&data), Ok(DataDirState::Cluster { version, .. }) if version == "15"));
        assert!(matches!(read_password(&data), Err(Error::ForeignCluster { .. })));
    }

    #[test]
    fn a_pid_file_naming_a_live_non_postgres_process_is_stale() {
        let dir = tempfile::tempdir().unwrap();
        // Our own pid: alive, but not postgres, like a pid recycled after a container restart.
        fs::write(dir.path().join("postmaster.pid"), format!("{}\n{}\n", std::process::id(), dir.path().display()))
            .unwrap();
        clear_stale_pid_file(dir.path()).unwrap();
        assert!(!dir.path().join("postmaster.pid").exists());
        clear_stale_pid_file(dir.path()).unwrap();
    }
}
