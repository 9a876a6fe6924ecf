//! `GET /v1/events`: the tenant's changes as Server-Sent Events.

use std::time::Duration;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, get, web};
use cloud_domain::api::{ErrorCode, Event, Problem, Scope};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use utoipa::IntoParams;

use crate::error::{ApiError, ApiResult};
use crate::{AppState, Auth};

/// A comment line keeps proxies from closing an idle stream.
const KEEPALIVE: Duration = Duration::from_secs(15);
const BATCH: i64 = 500;

/// Where a stream starts.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct EventsQuery {
    /// Replay events after this version (default: only new ones). `Last-Event-ID` does the same on reconnect.
    #[param(minimum = 0)]
    since: Option<i64>,
}

/// Stream the tenant's changes. Each event's `id` is its version, `event` is `<resource_type>.<action>` and
/// `data` the JSON `Event`.
#[utoipa::path(tag = "events", security(("bearer" = [])), params(EventsQuery), responses(
    (status = 200, description = "An endless text/event-stream of `Event`s", body = Event, content_type = "text/event-stream"),
    (status = "4XX", description = "Problem", body = Problem, content_type = "application/problem+json"),
))]
#[get("/events")]
pub(crate) async fn stream_events(
    state: web::Data<AppState>,
    auth: Auth,
    req: HttpRequest,
    query: web::Query<EventsQuery>,
) -> ApiResult<HttpResponse> {
    auth.require(Scope::Read)?;
    let last_event_id = match req.headers().get("last-event-id") {
        Some(v) => Some(v.to_str().ok().and_then(|s| s.parse::<i64>().ok()).ok_or_else(|| {
            ApiError::new(ErrorCode::InvalidRequest, "Last-Event-ID must be an event version (an integer)")
        })?),
        None => None,
    };
    let since = match last_event_id.or(query.since) {
        Some(v) if v < 0 => {
            return Err(ApiError::new(ErrorCode::InvalidQuery, "since must be a version, 0 or more"));
        }
        Some(v) => v,
        None => state.store.current_version().await?,
    };
    let (tx, rx) = mpsc::channel::<Result<web::Bytes, std::io::Error>>(16);
    let store = state.store.clone();
    let mut feed = state.feed.subscribe();
    let tenant = auth.tenant;
    tokio::spawn(async move {
        let mut last = since;
        // Sent at once so clients know the stream is established (and from which version).
        if tx.send(Ok(web::Bytes::from(format!(": stream from version {last}\n\n")))).await.is_err() {
            return;
        }
        loop {
            let events = match store.events_since(Some(tenant), last, BATCH).await {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(error = %crate::error::chain(&e), "event stream: cannot read events");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let full = events.len() as i64 == BATCH;
            for e in events {
                last = e.version;
                let data = serde_json::to_string(&e).unwrap_or_default();
                let action = serde_json::to_value(e.action).ok().and_then(|v| v.as_str().map(str::to_owned));
                let frame = format!(
                    "id: {}\nevent: {}.{}\ndata: {data}\n\n",
                    e.version,
                    e.resource_type,
                    action.unwrap_or_default()
                );
                if tx.send(Ok(web::Bytes::from(frame))).await.is_err() {
                    return;
                }
            }
            if full {
                continue;
            }
            // Other tenants' changes also wake us; the query above filters them out.
            tokio::select! {
                changed = feed.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(KEEPALIVE) => {
                    if tx.send(Ok(web::Bytes::from_static(b": keepalive\n\n"))).await.is_err() {
                        return;
                    }
                }
                _ = tx.closed() => return,
            }
        }
    });
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header(("x-accel-buffering", "no"))
        .streaming(ReceiverStream::new(rx)))
}
