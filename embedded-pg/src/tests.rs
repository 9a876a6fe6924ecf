//! Tests against real clusters, each in its own directory under /tmp.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::*;

/// A scratch directory under /tmp that the unprivileged account can reach, whatever the umask.
fn scratch() -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix("epg-test-").tempdir_in("/tmp").unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn options(data_dir: &Path) -> Options {
    Options::new(data_dir)
}

/// Runs SQL through psql, as a client would through `url()`.
async fn psql(url: &str, sql: &str) -> String {
    let bin = discover::bin_dir(None, None).unwrap().join("psql");
    let psql = if bin.exists() { bin } else { PathBuf::from("psql") };
    let out = tokio::process::Command::new(&psql)
        .args(["-X", "-q", "-tA", "-v", "ON_ERROR_STOP=1", "-c", sql, url])
        .env("PGCONNECT_TIMEOUT", "20")
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "psql {sql:?} failed: {stderr}");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn refuses_connections(port: u16) -> bool {
    match TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(5)) {
        Err(err) => err.kind() == std::io::ErrorKind::ConnectionRefused,
        Ok(_) => false,
    }
}

/// Polls until the port refuses connections, for servers that stop on their own.
fn wait_until_refused(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if refuses_connections(port) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn the_handle_can_live_in_a_static() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<EmbeddedPg>();
}

#[tokio::test]
async fn ephemeral_cluster_serves_sql_and_stop_closes_the_port() {
    let dir = scratch();
    let data = dir.path().join("pg");
    let pg = EmbeddedPg::start_ephemeral(options(&data)).await.unwrap();
    let port = pg.port();
    TcpStream::connect(("127.0.0.1", port)).unwrap();

    let url = pg.url("postgres");
    assert!(url.starts_with("postgres://cloud:") && url.ends_with(&format!("@127.0.0.1:{port}/postgres")));
    assert_eq!(psql(&url, "select 1").await, "1");
    assert_eq!(psql(&url, "show fsync").await, "off");
    assert_eq!(psql(&url, "show max_connections").await, "300");
    assert_eq!(psql(&url, "show server_encoding").await, "UTF8");
    assert_eq!(psql(&url, "show listen_addresses").await, "127.0.0.1");
    assert_eq!(psql(&url, "show unix_socket_directories").await, "");

    let mode = std::fs::metadata(data.join("cloud-password")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(pg.log_path().starts_with(&data));

    pg.stop().await.unwrap();
    assert!(refuses_connections(port));
    assert!(!data.join("postmaster.pid").exists(), "a clean shutdown removes the lock file");
}

#[tokio::test]
async fn a_persistent_cluster_keeps_its_data_across_restarts() {
    let dir = scratch();
    let data = dir.path().join("state").join("pg");
    let pg = EmbeddedPg::start(options(&data)).await.unwrap();
    let url = pg.url("postgres");
    assert_eq!(psql(&url, "show fsync").await, "on");
    psql(&url, "create table kept (v text); insert into kept values ('still here')").await;
    pg.stop().await.unwrap();

    let pg = EmbeddedPg::start(options(&data)).await.unwrap();
    assert_eq!(psql(&pg.url("postgres"), "select v from kept").await, "still here");
    pg.stop().await.unwrap();
}

#[tokio::test]
async fn a_stale_lock_file_from_a_dead_server_is_removed() {
    let dir = scratch();
    let data = dir.path().join("pg");
    EmbeddedPg::start(options(&data)).await.unwrap().stop().await.unwrap();

    // A pid that certainly belonged to a process that is gone now.
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = gone.id();
    gone.wait().unwrap();
    let lock = format!("{dead_pid}\n{}\n1700000000\n5432\n\n127.0.0.1\n  1234   5678\nready   \n", data.display());
    std::fs::write(data.join("postmaster.pid"), lock).unwrap();

    let pg = EmbeddedPg::start(options(&data)).await.unwrap();
    assert_eq!(psql(&pg.url("postgres"), "select 1").await, "1");
    pg.stop().await.unwrap();
}

#[tokio::test]
async fn a_second_server_on_a_running_cluster_is_refused() {
    let dir = scratch();
    let data = dir.path().join("pg");
    let pg = EmbeddedPg::start(options(&data)).await.unwrap();
    let err = EmbeddedPg::start(options(&data)).await.unwrap_err();
    assert!(matches!(&err, Error::AlreadyRunning { pid, .. } if *pid as i32 == pg.postmaster.pid()), "{err}");
    assert!(err.to_string().contains("already running"), "{err}");
    pg.stop().await.unwrap();
}

#[tokio::test]
async fn a_taken_explicit_port_fails_with_the_log_tail() {
    let dir = scratch();
    let taken = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let port = taken.local_addr().unwrap().port();
    let opts = Options { port: Some(port), ..options(&dir.path().join("pg")) };
    let err = EmbeddedPg::start_ephemeral(opts).await.unwrap_err();
    match &err {
        Error::StartFailed { port: p, log_tail, .. } => {
            assert_eq!(*p, port);
            assert!(log_tail.contains("could not bind"), "{log_tail}");
        }
        other => panic!("expected StartFailed, got {other}"),
    }
}

#[tokio::test]
async fn an_explicit_free_port_is_used() {
    let dir = scratch();
    let port = free_port().unwrap();
    let opts = Options { port: Some(port), ..options(&dir.path().join("pg")) };
    let pg = EmbeddedPg::start_ephemeral(opts).await.unwrap();
    assert_eq!(pg.port(), port);
    assert!(pg.url("db").ends_with(&format!(":{port}/db")));
    pg.stop().await.unwrap();
}

#[tokio::test]
async fn dropping_without_stop_stops_the_server() {
    let dir = scratch();
    let data = dir.path().join("pg");
    let pg = EmbeddedPg::start_ephemeral(options(&data)).await.unwrap();
    let port = pg.port();
    drop(pg);
    assert!(refuses_connections(port));
    assert!(!data.join("postmaster.pid").exists());
}

#[tokio::test]
async fn an_unreachable_parent_dir_is_named_in_the_error() {
    if account::effective_uid() != 0 {
        eprintln!("skipped: only root switches to another account");
        return;
    }
    // A 0700 root-owned directory, like root's home.
    let private = tempfile::Builder::new().prefix("epg-test-private-").tempdir_in("/tmp").unwrap();
    std::fs::set_permissions(private.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let data = private.path().join("sub").join("pg");
    let err = EmbeddedPg::start(options(&data)).await.unwrap_err();
    match &err {
        Error::DirNotTraversable { dir, .. } => assert_eq!(dir, private.path()),
        other => panic!("expected DirNotTraversable, got {other}"),
    }
    let message = err.to_string();
    assert!(message.contains(&private.path().display().to_string()), "{message}");
    assert!(message.contains("/var/lib/cloudd"), "{message}");
}

#[tokio::test]
async fn a_missing_bin_dir_program_is_reported() {
    let dir = scratch();
    let opts = Options { bin_dir: Some(dir.path().to_owned()), ..options(&dir.path().join("pg")) };
    let err = EmbeddedPg::start(opts).await.unwrap_err();
    assert!(err.to_string().contains("apt-get install postgresql"), "{err}");
}

/// The environment variable that turns [`child_process_holding_a_cluster`] on, naming its data dir.
const CHILD_DIR_ENV: &str = "CLOUD_EPG_TEST_CHILD_DIR";
/// `kill` (wait to be killed) or `static` (keep the cluster in a static and exit).
const CHILD_MODE_ENV: &str = "CLOUD_EPG_TEST_CHILD_MODE";

/// Not a test on its own: the child process of the two tests below.
#[tokio::test]
#[ignore = "run by the parent-death tests in a child process"]
async fn child_process_holding_a_cluster() {
    static KEPT: OnceLock<EmbeddedPg> = OnceLock::new();
    let (Some(dir), Some(mode)) = (std::env::var_os(CHILD_DIR_ENV), std::env::var_os(CHILD_MODE_ENV)) else {
        return;
    };
    let pg = EmbeddedPg::start_ephemeral(Options::new(dir)).await.unwrap();
    println!("READY port={}", pg.port());
    let kept = KEPT.get_or_init(|| pg);
    if mode == "kill" {
        // Wait to be killed.
        std::future::pending::<()>().await;
    }
    // `static`: return; the process exits with the cluster never dropped.
    let _ = kept;
}

type ChildOutput = std::io::Lines<BufReader<std::process::ChildStdout>>;

/// Starts the child test, returns it with the port its cluster listens on and the rest of its output (which
/// must be drained, or the child fails writing its test report).
fn spawn_child(data_dir: &Path, mode: &str) -> (std::process::Child, u16, ChildOutput) {
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["tests::child_process_holding_a_cluster", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR_ENV, data_dir)
        .env(CHILD_MODE_ENV, mode)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    while let Some(line) = lines.next() {
        // libtest has already written the test's name on this line.
        if let Some((_, port)) = line.unwrap().split_once("READY port=") {
            let port = port.parse().unwrap();
            return (child, port, lines);
        }
    }
    panic!("the child exited before its cluster was ready: {:?}", child.wait());
}

#[tokio::test]
async fn the_server_dies_when_its_owner_is_killed() {
    let dir = scratch();
    let data = dir.path().join("pg");
    let (mut child, port, _output) = tokio::task::spawn_blocking(move || spawn_child(&data, "kill")).await.unwrap();
    assert!(!refuses_connections(port));
    child.kill().unwrap();
    child.wait().unwrap();
    let refused = tokio::task::spawn_blocking(move || wait_until_refused(port, Duration::from_secs(60)));
    assert!(refused.await.unwrap(), "postgres on port {port} outlived its SIGKILLed parent");
}

#[tokio::test]
async fn the_server_dies_when_a_static_owner_exits() {
    let dir = scratch();
    let data = dir.path().join("pg");
    let (mut child, port, output) = tokio::task::spawn_blocking(move || spawn_child(&data, "static")).await.unwrap();
    let status = tokio::task::spawn_blocking(move || {
        output.for_each(drop);
        child.wait().unwrap()
    });
    let status = status.await.unwrap();
    assert!(status.success(), "the child test failed: {status}");
    let refused = tokio::task::spawn_blocking(move || wait_until_refused(port, Duration::from_secs(60)));
    assert!(refused.await.unwrap(), "postgres on port {port} outlived its exited parent");
}
