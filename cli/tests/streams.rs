//! The real `cloudctl` following Server-Sent Event streams (`logs -f`): against a peer of the test's own that
//! sends bytes as any server or proxy may (characters split across chunks, every line ending the standard
//! allows, dropped connections), and against the real API restarted under it.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cloud_tests::TestApi;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// What the peer answers one connection with.
enum Reply {
    /// `200 text/event-stream`, each element one HTTP chunk; `end` closes the body properly, else the connection
    /// just drops (a crash).
    Stream { chunks: Vec<Vec<u8>>, end: bool },
    /// `404` with a problem document: the followed instance is gone.
    Gone,
}

/// A peer speaking HTTP/1.1 and SSE, one scripted reply per connection, keeping each request's head.
struct Peer {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<String>>>,
}

impl Peer {
    async fn start(script: Vec<Reply>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        tokio::spawn(async move {
            for reply in script {
                let (mut conn, _) = listener.accept().await.unwrap();
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    head.push(conn.read_u8().await.unwrap());
                }
                seen.lock().unwrap().push(String::from_utf8(head).unwrap().to_ascii_lowercase());
                match reply {
                    Reply::Stream { chunks, end } => {
                        let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                                    transfer-encoding: chunked\r\nconnection: close\r\n\r\n";
                        conn.write_all(head.as_bytes()).await.unwrap();
                        for chunk in chunks {
                            // Each HTTP chunk reaches the client as a read of its own.
                            let mut framed = format!("{:x}\r\n", chunk.len()).into_bytes();
                            framed.extend_from_slice(&chunk);
                            framed.extend_from_slice(b"\r\n");
                            conn.write_all(&framed).await.unwrap();
                            conn.flush().await.unwrap();
                        }
                        if end {
                            conn.write_all(b"0\r\n\r\n").await.unwrap();
                        }
                    }
                    Reply::Gone => {
                        let body = r#"{"type":"about:blank","title":"Not Found","status":404,"detail":"instance \"web\" not found","code":"not_found"}"#;
                        let head = format!(
                            "HTTP/1.1 404 Not Found\r\ncontent-type: application/problem+json\r\n\
                             content-length: {}\r\nconnection: close\r\n\r\n",
                            body.len()
                        );
                        conn.write_all(head.as_bytes()).await.unwrap();
                        conn.write_all(body.as_bytes()).await.unwrap();
                    }
                }
                conn.shutdown().await.ok();
            }
        });
        Self { addr, requests }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

/// Creates the instance `web` of the built-in `hello` through the API.
async fn create_web(api: &TestApi) {
    let res = reqwest::Client::new()
        .post(api.url("/v1/instances"))
        .bearer_auth(&api.token)
        .json(&serde_json::json!({"image": "hello", "name": "web"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
}

fn line_json(seq: i64, text: &str) -> String {
    serde_json::json!({"seq": seq, "at": "2026-11-30T12:00:00Z", "stream": "stdout", "line": text}).to_string()
}

/// `cloudctl instance logs -f web` against `url`, the text of the lines it prints in a channel.
fn logs_follow(url: &str, token: &str, home: &std::path::Path) -> (Child, mpsc::UnboundedReceiver<String>) {
    let (child, mut printed) = cloudctl(&["instance", "logs", "-f", "web"], url, token, home);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(l) = printed.recv().await {
            // "12:00:00.000 out <text>": the text.
            if tx.send(l.splitn(3, ' ').nth(2).unwrap_or_default().to_owned()).is_err() {
                return;
            }
        }
    });
    (child, rx)
}

/// `cloudctl` with `args` against `url`, its stdout lines in a channel.
fn cloudctl(args: &[&str], url: &str, token: &str, home: &std::path::Path) -> (Child, mpsc::UnboundedReceiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cloudctl"))
        .args(args)
        .env("HOME", home)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("CLOUD_REMOTE")
        .env("CLOUD_API_URL", url)
        .env("CLOUD_TOKEN", token)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    tokio::spawn(async move {
        while let Ok(Some(l)) = lines.next_line().await {
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    (child, rx)
}

/// The next line cloudctl prints, within 30 s.
async fn next_line(rx: &mut mpsc::UnboundedReceiver<String>) -> Option<String> {
    tokio::time::timeout(Duration::from_secs(30), rx.recv()).await.expect("cloudctl printed nothing in 30 s")
}

/// Waits for cloudctl to exit; its status and stderr.
async fn exit(mut child: Child) -> (std::process::ExitStatus, String) {
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await.expect("cloudctl exits").unwrap();
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).await.unwrap();
    (status, err)
}

#[tokio::test]
async fn logs_follow_decodes_characters_split_across_chunks_and_every_line_ending() {
    let (one, two, three) = (line_json(1, "price: 5 €"), line_json(2, "naïve"), line_json(3, "crème brûlée"));
    let split = |s: &str, at: char| {
        // Cut inside the character's UTF-8 bytes.
        let i = s.find(at).unwrap() + 1;
        (s.as_bytes()[..i].to_vec(), s.as_bytes()[i..].to_vec())
    };
    let (one_a, one_b) = split(&one, '€');
    let (two_a, two_b) = split(&two, 'ï');
    let mut chunks = vec![b": hello\nid: 0\n\n".to_vec()];
    chunks.push([b"id: 1\ndata: ".as_slice(), &one_a].concat());
    chunks.push([one_b.as_slice(), b"\n\n"].concat());
    // CRLF line endings, the data line split mid-character too.
    chunks.push([b"id: 2\r\ndata: ".as_slice(), &two_a].concat());
    chunks.push([two_b.as_slice(), b"\r\n\r\n"].concat());
    // CR alone.
    chunks.push(format!(": note\rid: 3\rdata: {three}\r\r").into_bytes());
    let peer = Peer::start(vec![Reply::Stream { chunks, end: true }, Reply::Gone]).await;

    let home = tempfile::tempdir().unwrap();
    let (child, mut lines) = logs_follow(&format!("http://{}", peer.addr), "t", home.path());
    let mut printed = Vec::new();
    while let Some(l) = next_line(&mut lines).await {
        printed.push(l);
    }
    assert_eq!(printed, ["price: 5 €", "naïve", "crème brûlée"]);
    let (status, err) = exit(child).await;
    assert!(status.success(), "{status}: {err}");
}

#[tokio::test]
async fn logs_follow_reconnects_with_last_event_id_after_a_dropped_connection() {
    let event = |seq: i64, text: &str| format!("id: {seq}\ndata: {}\n\n", line_json(seq, text)).into_bytes();
    let peer = Peer::start(vec![
        // Ends properly, as a server going down gracefully does.
        Reply::Stream { chunks: vec![b": hello\nid: 0\n\n".to_vec(), event(1, "one"), event(2, "two")], end: true },
        // Drops mid-stream, as a crash does: the half-sent event does not count.
        Reply::Stream { chunks: vec![event(3, "three"), b"id: 4\ndata: {\"seq\"".to_vec()], end: false },
        Reply::Stream { chunks: vec![event(4, "four")], end: true },
        Reply::Gone,
    ])
    .await;

    let home = tempfile::tempdir().unwrap();
    let (child, mut lines) = logs_follow(&format!("http://{}", peer.addr), "t", home.path());
    let mut printed = Vec::new();
    while let Some(l) = next_line(&mut lines).await {
        printed.push(l);
    }
    let (status, err) = exit(child).await;
    let requests = peer.requests();
    let resumed: Vec<Option<&str>> =
        requests.iter().map(|r| r.lines().find_map(|l| l.strip_prefix("last-event-id: "))).collect();
    assert_eq!(resumed, [None, Some("2"), Some("3"), Some("4")], "each reconnection resumes after the last event");
    assert_eq!(printed, ["one", "two", "three", "four"]);
    assert!(status.success(), "{status}: {err}");
    assert!(err.contains("instance web was deleted"), "{err}");
}

/// The real API, restarted while `cloudctl logs -f` follows an instance and lines are appended: every line is
/// printed once, in order; the instance's deletion ends the command.
#[tokio::test]
async fn logs_follow_survives_an_api_restart_without_losing_or_repeating_lines() {
    let mut api = TestApi::start().await;
    create_web(&api).await;
    let id = api.store.instance_id(api.tenant.id, "web").await.unwrap();
    let store = api.store.clone();
    let append = |text: &str| {
        let store = store.clone();
        let line = vec![(chrono::Utc::now(), "stdout", text.to_owned())];
        async move { store.append_logs(id, &line).await.unwrap() }
    };
    append("before 1").await;
    append("before 2").await;

    let home = tempfile::tempdir().unwrap();
    let (child, mut lines) = logs_follow(&api.base, &api.token, home.path());
    assert_eq!(next_line(&mut lines).await.as_deref(), Some("before 1"));
    assert_eq!(next_line(&mut lines).await.as_deref(), Some("before 2"));

    api.stop().await;
    append("during").await;
    api.start_again().await;
    append("after").await;
    assert_eq!(next_line(&mut lines).await.as_deref(), Some("during"));
    assert_eq!(next_line(&mut lines).await.as_deref(), Some("after"));

    let res = reqwest::Client::new().delete(api.url("/v1/instances/web")).bearer_auth(&api.token).send().await;
    assert_eq!(res.unwrap().status(), 204);
    assert_eq!(next_line(&mut lines).await, None, "nothing more, and nothing twice");
    let (status, err) = exit(child).await;
    assert!(status.success(), "{status}: {err}");
}

/// `--watch` renders again after a change made while the API was down: it reconnected and resumed.
#[tokio::test]
async fn watch_survives_an_api_restart() {
    let mut api = TestApi::start().await;
    create_web(&api).await;
    let home = tempfile::tempdir().unwrap();
    let (child, mut lines) =
        cloudctl(&["instance", "list", "--watch", "-o", "name"], &api.base, &api.token, home.path());
    // The first render comes once the stream is open.
    assert_eq!(next_line(&mut lines).await.as_deref(), Some("web"));

    api.stop().await;
    api.store.delete_instance(api.tenant.id, "web").await.unwrap();
    api.start_again().await;
    // A render after a change starts with an empty line; this one lists no instance.
    assert_eq!(next_line(&mut lines).await.as_deref(), Some(""), "a render after the deletion");
    let more = tokio::time::timeout(Duration::from_millis(500), lines.recv()).await;
    assert!(more.is_err(), "the render after the deletion lists nothing: {more:?}");
    drop(child);
}
