//! `GET /v1/instances/{instance}/exec`: a command in an instance's sandbox over a WebSocket. The API checks the
//! caller (write scope, its own running instance), records the session (the audit event and what the node will
//! accept), connects to the instance's node with the session's secret, then relays frames both ways; only the
//! frames a client may send reach the node.

use std::time::Duration;

use actix_web::{HttpRequest, HttpResponse, get, web};
use cloud_domain::api::{ErrorCode, Problem, Scope};
use cloud_domain::exec::Frame;
use cloud_domain::join::{new_secret, secret_hash};
use cloud_store::NewExec;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message as NodeMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::error::{ApiError, ApiResult};
use crate::{AppState, Auth};

/// How long the node may take to be asked for a recorded session; the API asks at once.
const SESSION_TTL: Duration = Duration::from_secs(30);
/// How long reaching a node may take.
const NODE_CONNECT: Duration = Duration::from_secs(5);
/// The most arguments, and characters per argument, a command may have: what fits in a request head (128 KiB
/// here) however they are encoded. A longer script goes through standard input.
const MAX_ARGS: usize = 32;
const MAX_ARG_CHARS: usize = 256;

/// What to run: `command` once per argument (the program first), `tty` for a terminal of `cols` x `rows`. For the
/// document only: the query is read as pairs, since `command` repeats.
#[derive(Debug, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct ExecQuery {
    /// The program and its arguments, one `command` parameter each, in order (1 to 32 of them).
    #[param(inline, min_items = 1, max_items = 32)]
    command: Vec<CommandArg>,
    /// Run it on a terminal (stdout and stderr are then one stream). Default false.
    tty: Option<bool>,
    /// The terminal's columns (default 80).
    #[param(minimum = 1)]
    cols: Option<u16>,
    /// The terminal's rows (default 24).
    #[param(minimum = 1)]
    rows: Option<u16>,
}

/// One argument of a command: 1 to 256 characters, no NUL.
#[derive(Debug, utoipa::ToSchema)]
#[schema(min_length = 1, max_length = 256, pattern = "^[^\\x00]+$")]
#[allow(dead_code)]
struct CommandArg(String);

fn parse(pairs: &[(String, String)]) -> ApiResult<(Vec<String>, Option<(u16, u16)>)> {
    let bad = |detail: String| ApiError::new(ErrorCode::InvalidQuery, detail);
    let (mut command, mut tty, mut cols, mut rows) = (Vec::new(), false, 80u16, 24u16);
    let size = |key: &str, v: &str| match v.parse::<u16>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(bad(format!("{key} must be 1 to 65535, not {v:?}"))),
    };
    for (key, value) in pairs {
        match key.as_str() {
            "command" => command.push(value.clone()),
            "tty" => {
                tty = value.parse().map_err(|_| bad(format!("tty must be true or false, not {value:?}")))?;
            }
            "cols" => cols = size("cols", value)?,
            "rows" => rows = size("rows", value)?,
            other => return Err(bad(format!("unknown query parameter {other:?} (command, tty, cols, rows)"))),
        }
    }
    if command.is_empty() {
        return Err(bad("command must name the program to run (command=/bin/sh)".into()));
    }
    let fits = |a: &String| !a.is_empty() && a.chars().count() <= MAX_ARG_CHARS && !a.contains('\0');
    if command.len() > MAX_ARGS || !command.iter().all(fits) {
        return Err(bad(format!(
            "command takes 1 to {MAX_ARGS} arguments of 1 to {MAX_ARG_CHARS} characters each, without NUL"
        )));
    }
    Ok((command, tty.then_some((cols, rows))))
}

/// Run a command in the instance's sandbox, over a WebSocket (HTTP/1.1 `Upgrade: websocket`). Binary messages
/// are frames whose first byte is the channel: 0 stdin, 1 stdout, 2 stderr, 3 error (text, last), 4 resize (cols,
/// rows as two big-endian u16), 5 exit (i32 big-endian, last), 6 stdin closed. Write scope; recorded as an `exec`
/// event. Refusals come before the upgrade, as problem documents.
#[utoipa::path(tag = "instances", security(("bearer" = [])),
    params(
        ("instance" = String, Path, description = "Instance name or id"),
        ExecQuery,
        ("Upgrade" = String, Header, description = "The WebSocket handshake: `websocket`", pattern = "^websocket$"),
        ("Connection" = String, Header, description = "The WebSocket handshake: `Upgrade`", pattern = "^Upgrade$"),
        ("Sec-WebSocket-Version" = String, Header, description = "The WebSocket handshake: `13`", pattern = "^13$"),
        ("Sec-WebSocket-Key" = String, Header, description = "The WebSocket handshake: 16 random bytes, base64",
            pattern = "^[A-Za-z0-9+/]{21}[AQgw]==$"),
    ),
    responses(
        (status = 101, description = "Switching to the WebSocket carrying the command's frames"),
        (status = "4XX", description = "Problem", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The instance's node cannot be reached", body = Problem,
            content_type = "application/problem+json"),
))]
#[get("/instances/{instance}/exec")]
pub(crate) async fn exec_instance(
    state: web::Data<AppState>,
    auth: Auth,
    path: web::Path<String>,
    query: web::Query<Vec<(String, String)>>,
    req: HttpRequest,
    body: web::Payload,
) -> ApiResult<HttpResponse> {
    auth.require(Scope::Write)?;
    let (command, tty) = parse(&query)?;
    let upgrade = req.headers().get("upgrade").and_then(|v| v.to_str().ok()).unwrap_or_default();
    if !upgrade.eq_ignore_ascii_case("websocket") {
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            "exec is a WebSocket: send the request over HTTP/1.1 with Upgrade: websocket",
        ));
    }
    // The handshake is checked before anything is recorded; its answer is only sent once the node is reached.
    let (response, session, client) = actix_ws::handle(&req, body)
        .map_err(|e| ApiError::new(ErrorCode::InvalidRequest, format!("not a WebSocket handshake: {e}")))?;
    let secret = new_secret();
    let target = state
        .store
        .create_exec_session(&NewExec {
            tenant: auth.tenant,
            token: auth.token_id,
            instance: &path,
            command: &command,
            tty,
            secret_hash: &secret_hash(&secret),
            ttl: SESSION_TTL,
        })
        .await?;
    let unreachable = |why: String| {
        tracing::warn!(node = %target.node, address = %target.exec_address, %why, "cannot reach a node for exec");
        ApiError::new(ErrorCode::Unavailable, format!("cannot reach node {} to exec: {why}", target.node))
    };
    // `wss://` when the node serves a certificate of the platform CA for its address, which is then checked.
    let (tls, authority) = match target.exec_address.split_once("://") {
        Some((scheme, authority)) => (scheme == "wss", authority),
        None => (false, target.exec_address.as_str()),
    };
    let scheme = if tls { "wss" } else { "ws" };
    let mut request = format!("{scheme}://{authority}/exec/{}", target.session)
        .into_client_request()
        .map_err(|e| unreachable(e.to_string()))?;
    let bearer = format!("Bearer {secret}").parse().map_err(|_| unreachable("a secret that is no header".into()))?;
    request.headers_mut().insert("authorization", bearer);
    let connector = match tls {
        true => Some(node_connector(super::system::platform_ca(&state).await?, authority).map_err(unreachable)?),
        false => None,
    };
    let connect = async {
        let tcp = tokio::net::TcpStream::connect(authority).await?;
        let stream: Box<dyn NodeIo> = match connector {
            Some((connector, name)) => Box::new(connector.connect(name, tcp).await?),
            None => Box::new(tcp),
        };
        tokio_tungstenite::client_async(request, stream).await.map_err(std::io::Error::other)
    };
    let (node, _) = tokio::time::timeout(NODE_CONNECT, connect)
        .await
        .map_err(|_| unreachable("it did not answer in time".into()))?
        .map_err(|e| unreachable(e.to_string()))?;
    tracing::info!(instance = %target.instance, node = %target.node, session = %target.session, "exec started");
    actix_web::rt::spawn(relay(session, client, node));
    Ok(response)
}

/// A connection to a node's exec listener, with or without TLS.
trait NodeIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> NodeIo for T {}

/// A TLS connector that trusts the platform CA alone, and the name to check: the node's address (`host:port`).
fn node_connector(
    ca_pem: &str,
    authority: &str,
) -> Result<(tokio_rustls::TlsConnector, rustls::pki_types::ServerName<'static>), String> {
    use rustls::pki_types::pem::PemObject;
    let ca = rustls::pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes()).map_err(|e| e.to_string())?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).map_err(|e| e.to_string())?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let host = match authority.parse::<std::net::SocketAddr>() {
        Ok(addr) => addr.ip().to_string(),
        Err(_) => authority.rsplit_once(':').map_or(authority, |(h, _)| h).to_owned(),
    };
    let name = rustls::pki_types::ServerName::try_from(host).map_err(|e| e.to_string())?;
    Ok((tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)), name))
}

/// Frames both ways until either side ends.
async fn relay(
    mut client_out: actix_ws::Session,
    mut client_in: actix_ws::MessageStream,
    node: tokio_tungstenite::WebSocketStream<Box<dyn NodeIo>>,
) {
    let (mut node_out, mut node_in) = node.split();
    loop {
        tokio::select! {
            from_client = client_in.next() => match from_client {
                Some(Ok(actix_ws::Message::Binary(bytes))) => {
                    // The client speaks for stdin and the terminal only.
                    if Frame::decode(&bytes).is_ok_and(|f| f.from_client())
                        && node_out.send(NodeMessage::binary(bytes)).await.is_err()
                    {
                        break;
                    }
                }
                Some(Ok(actix_ws::Message::Ping(bytes))) => {
                    if client_out.pong(&bytes).await.is_err() {
                        break;
                    }
                }
                Some(Ok(actix_ws::Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
            from_node = node_in.next() => match from_node {
                Some(Ok(NodeMessage::Binary(bytes))) => {
                    if client_out.binary(bytes).await.is_err() {
                        break;
                    }
                }
                Some(Ok(NodeMessage::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
        }
    }
    let _ = node_out.close().await;
    let _ = client_out.close(None).await;
}
