//! Following the API's Server-Sent Event streams (`--watch`, `logs -f`).
//!
//! The `sse-stream` crate decodes the bytes as the HTML standard says (characters split across reads, every
//! line ending the standard allows, comments); this module adds what a browser's `EventSource` would: it
//! remembers the last event id and, when the connection drops (an API restart, a proxy, a dead peer noticed by
//! missing keepalives), reconnects with `Last-Event-ID` after a growing pause, so no event is lost or repeated.

use std::time::Duration;

use futures_util::{Stream, StreamExt};
use reqwest::{Method, StatusCode};
use sse_stream::SseByteStream;

use crate::client::Client;

/// The first pause before reconnecting; it doubles up to [`MAX_DELAY`] while reconnecting fails.
const FIRST_DELAY: Duration = Duration::from_millis(100);
const MAX_DELAY: Duration = Duration::from_secs(5);
/// With a keepalive every 15 s, this long without a byte means a dead connection.
const IDLE: Duration = Duration::from_secs(60);

/// What a follower is told.
#[derive(Debug)]
pub enum Message {
    /// A connection is established (the first, or a reconnection): events from its position on follow.
    Opened,
    /// An event.
    Event {
        /// The `event` field (`None` for the default type, `message`).
        kind: Option<String>,
        /// The `data` field.
        data: String,
    },
}

/// Follows the stream at `path`, handing what arrives to `on_message`, until the stream's resource is gone (the
/// API answers a reconnection with 404) or `on_message` fails. Errors: the first connection failing (unreachable
/// remote, problem answer), or a reconnection answered with a problem other than 404 (e.g. a revoked token).
pub async fn follow<F>(c: &Client, path: &str, mut on_message: F) -> anyhow::Result<()>
where
    F: FnMut(Message) -> anyhow::Result<()>,
{
    let mut last_id: Option<String> = None;
    let mut connected = false;
    let mut delay = FIRST_DELAY;
    loop {
        let mut req = c.request(Method::GET, path);
        if let Some(id) = &last_id {
            req = req.header("last-event-id", id);
        }
        let res = if connected {
            match req.send().await {
                Ok(res) if res.status().is_success() => Some(res),
                Ok(res) if res.status() == StatusCode::NOT_FOUND => return Ok(()),
                Ok(res) if res.status().is_client_error() => return Err(c.failure(res).await),
                Ok(_) | Err(_) => None,
            }
        } else {
            Some(c.send(req).await?)
        };
        if let Some(res) = res {
            connected = true;
            delay = FIRST_DELAY;
            on_message(Message::Opened)?;
            let mut events = std::pin::pin!(SseByteStream::new(idle_limited(res)));
            let ended = loop {
                match events.next().await {
                    Some(Ok(sse)) => {
                        // An id without data still moves the position (the stream's opening block).
                        if let Some(id) = sse.id {
                            last_id = Some(id);
                        }
                        if let Some(data) = sse.data {
                            on_message(Message::Event { kind: sse.event, data })?;
                        }
                    }
                    Some(Err(e)) => break e.to_string(),
                    None => break "the remote ended the stream".to_owned(),
                }
            };
            eprintln!("cloudctl: {ended}; reconnecting to remote \"{}\"", c.name());
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(MAX_DELAY);
    }
}

/// The response's bytes, ending with an error when none arrive for [`IDLE`].
fn idle_limited(res: reqwest::Response) -> impl Stream<Item = std::io::Result<bytes::Bytes>> {
    futures_util::stream::unfold(Some(res.bytes_stream()), |body| async move {
        let mut body = body?;
        match tokio::time::timeout(IDLE, body.next()).await {
            Ok(Some(Ok(bytes))) => Some((Ok(bytes), Some(body))),
            Ok(Some(Err(e))) => Some((Err(std::io::Error::other(e)), None)),
            Ok(None) => None,
            Err(_) => Some((
                Err(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("nothing received for {IDLE:?}"))),
                None,
            )),
        }
    })
}
