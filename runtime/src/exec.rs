//! The node's side of `instance exec`: a WebSocket listener (over TLS with a certificate of the platform CA for
//! the listener's address, when the agent has the platform secret key) that the API connects to with an exec
//! session it recorded in PostgreSQL. The session's id is in the path and its secret in the `Authorization` header; the
//! store hands the session over once, to this node, while its instance runs here. The command then runs inside
//! the instance's sandbox (by its init, see cloud-sandbox) and its input, output, terminal size and exit code travel as
//! [`cloud_domain::exec::Frame`]s.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use cloud_domain::exec::Frame;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use uuid::Uuid;

use crate::Shared;

/// The exec listener's TLS: a certificate of the platform CA for its address, renewed in the background.
pub(crate) struct Tls {
    acceptor: tokio_rustls::TlsAcceptor,
    renewal: tokio::task::JoinHandle<()>,
}

impl Tls {
    /// Issues the listener's certificate for `address`.
    pub(crate) async fn start(
        store: &cloud_store::Store,
        key: &cloud_certs::seal::SecretKey,
        address: std::net::IpAddr,
    ) -> Result<Self, crate::NodeError> {
        let boxed = |e: Box<dyn std::error::Error + Send + Sync>| crate::NodeError::ExecCertificate(e);
        let ca = cloud_certs::PlatformCa::load_or_create(store, key).await.map_err(|e| boxed(Box::new(e)))?;
        let (current, renewal) =
            cloud_certs::served::platform_certificate(ca, vec![address.to_string()]).map_err(|e| boxed(Box::new(e)))?;
        let config = cloud_certs::served::server_config(current);
        Ok(Self { acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)), renewal })
    }
}

impl Drop for Tls {
    fn drop(&mut self) {
        self.renewal.abort();
    }
}

/// Takes exec connections until the agent stops.
pub(crate) async fn serve(shared: Arc<Shared>, listener: TcpListener, tls: Option<Tls>) {
    let acceptor = tls.as_ref().map(|t| t.acceptor.clone());
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "exec listener");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let (shared, acceptor) = (shared.clone(), acceptor.clone());
        tokio::spawn(async move {
            let ended = match acceptor {
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(stream) => session(shared, stream).await,
                    Err(e) => return tracing::info!(%peer, error = %e, "exec connection without TLS"),
                },
                None => session(shared, stream).await,
            };
            if let Err(e) = ended {
                tracing::info!(%peer, error = %e, "exec connection ended");
            }
        });
    }
}

/// The session id and secret an exec connection presents.
#[derive(Default)]
struct Presented {
    session: Option<Uuid>,
    secret: Option<String>,
}

// The handshake callback's error type is tungstenite's (a whole HTTP response).
#[allow(clippy::result_large_err)]
async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    shared: Arc<Shared>,
    stream: S,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    let mut presented = Presented::default();
    let callback = |req: &Request, res: Response| -> Result<Response, ErrorResponse> {
        presented.session = req.uri().path().strip_prefix("/exec/").and_then(|id| id.parse().ok());
        presented.secret = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned);
        Ok(res)
    };
    let mut ws = tokio_tungstenite::accept_hdr_async(stream, callback).await?;
    let (Some(id), Some(secret)) = (presented.session, presented.secret) else {
        return fail(&mut ws, "not an exec session").await;
    };
    let hash = cloud_domain::join::secret_hash(&secret);
    let claim = match shared.store.claim_exec_session(shared.node, id, &hash).await {
        Ok(claim) => claim,
        Err(e) => {
            tracing::warn!(session = %id, error = %cloud_domain::error_chain(&e), "refused an exec connection");
            return fail(&mut ws, "no such exec session here (unknown, used, expired, or its instance moved)").await;
        }
    };
    let Some(sandboxes) = &shared.sandboxes else {
        return fail(&mut ws, "this node runs instances as host processes, without a sandbox to exec in").await;
    };
    tracing::info!(session = %id, instance = %claim.instance_id, command = ?claim.command, tty = claim.tty.is_some(),
        "exec");
    let sandbox = crate::sandbox_id(shared.node, claim.instance_id);
    let size = claim.tty.map(|(cols, rows)| cloud_sandbox::WinSize { cols, rows });
    let exec = match sandboxes.exec(&sandbox, &claim.command, size).await {
        Ok(exec) => exec,
        Err(e) => return fail(&mut ws, &format!("cannot exec: {}", cloud_domain::error_chain(&e))).await,
    };
    relay(ws, exec).await
}

async fn fail<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    why: &str,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    ws.send(Message::binary(Frame::Error(why.to_owned()).encode())).await?;
    ws.close(None).await
}

/// Copies a reader into frames until its end (a terminal's EIO at its last close is an end too).
fn pump(mut from: impl AsyncRead + Unpin + Send + 'static, to: mpsc::Sender<Frame>, frame: fn(Vec<u8>) -> Frame) {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf).await {
            if to.send(frame(buf[..n].to_vec())).await.is_err() {
                break;
            }
        }
    });
}

/// Relays frames between the connection and the command until it ends, then sends its exit code.
async fn relay<S: AsyncRead + AsyncWrite + Unpin>(
    ws: WebSocketStream<S>,
    exec: cloud_sandbox::Exec,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    let cloud_sandbox::Exec { stdio, mut end } = exec;
    let (mut sink, mut incoming) = ws.split();
    let (out_tx, mut out_rx) = mpsc::channel::<Frame>(64);
    let (mut stdin, terminal): (Option<Box<dyn tokio::io::AsyncWrite + Unpin + Send>>, Option<OwnedFd>) = match stdio {
        cloud_sandbox::ExecStdio::Pipes { stdin, stdout, stderr } => {
            pump(stdout, out_tx.clone(), Frame::Stdout);
            pump(stderr, out_tx.clone(), Frame::Stderr);
            (Some(Box::new(stdin)), None)
        }
        cloud_sandbox::ExecStdio::Terminal(master) => {
            let reader = master.try_clone().map(|fd| tokio::fs::File::from_std(std::fs::File::from(fd)));
            let writer = master.try_clone().map(|fd| tokio::fs::File::from_std(std::fs::File::from(fd)));
            if let Ok(reader) = reader {
                pump(reader, out_tx.clone(), Frame::Stdout);
            }
            (writer.ok().map(|w| Box::new(w) as Box<dyn tokio::io::AsyncWrite + Unpin + Send>), Some(master))
        }
    };
    // The output ends when every pump has dropped its sender.
    drop(out_tx);
    let mut output_open = true;
    let mut status = None;
    loop {
        tokio::select! {
            frame = out_rx.recv(), if output_open => match frame {
                Some(frame) => sink.send(Message::binary(frame.encode())).await?,
                None => output_open = false,
            },
            ended = end.wait(), if status.is_none() => {
                match ended {
                    Ok(code) => status = Some(code),
                    Err(why) => {
                        sink.send(Message::binary(Frame::Error(format!("cannot exec: {why}")).encode())).await?;
                        return sink.close().await;
                    }
                }
                // Pipes end at their last writer. A terminal's reader may be blocked in a read that outlives the
                // command: what it still has comes within moments, and then the output is over.
                if terminal.is_some() && output_open {
                    drain_soon(&mut out_rx, &mut sink).await?;
                    output_open = false;
                }
            }
            message = incoming.next() => match message {
                Some(Ok(Message::Binary(bytes))) => match Frame::decode(&bytes) {
                    Ok(Frame::Stdin(data)) => {
                        if let Some(w) = stdin.as_mut() && w.write_all(&data).await.is_err() {
                            stdin = None;
                        }
                    }
                    Ok(Frame::StdinClosed) if terminal.is_none() => stdin = None,
                    Ok(Frame::Resize { cols, rows }) => {
                        if let Some(t) = &terminal {
                            let _ = cloud_sandbox::resize(t, cloud_sandbox::WinSize { cols, rows });
                        }
                    }
                    _ => {}
                },
                // The caller left: its terminal or pipes close with this task, which ends the command (SIGHUP,
                // end of input) as a closed ssh session does.
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return Ok(()),
                Some(Ok(_)) => {}
            },
        }
        if let (Some(code), false) = (status, output_open) {
            sink.send(Message::binary(Frame::Exit(code).encode())).await?;
            return sink.close().await;
        }
    }
}

/// Sends what output comes within moments of a terminal command's end.
async fn drain_soon<S: AsyncRead + AsyncWrite + Unpin>(
    out_rx: &mut mpsc::Receiver<Frame>,
    sink: &mut futures_util::stream::SplitSink<WebSocketStream<S>, Message>,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    let deadline = tokio::time::sleep(std::time::Duration::from_millis(200));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            frame = out_rx.recv() => match frame {
                Some(frame) => sink.send(Message::binary(frame.encode())).await?,
                None => return Ok(()),
            },
            _ = &mut deadline => return Ok(()),
        }
    }
}
