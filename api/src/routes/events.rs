//! `GET /v1/events`: the tenant's changes as Server-Sent Events.

use std::time::Duration;

use actix_web::{HttpRequest, HttpResponse, get, web};
use cloud_domain::api::{ErrorCode, Problem, Scope};
use serde::Deserialize;
use utoipa::IntoParams;

use crate::error::{ApiError, ApiResult};
use crate::sse::{self, EventFrame};
use crate::{AppState, Auth};

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
///
/// The stream opens with a comment and `id: <version it starts after>`, and a comment every 15 s keeps it alive
/// while idle. A client that reconnects with `Last-Event-ID` misses no event and gets none twice.
#[utoipa::path(tag = "events", security(("bearer" = [])), params(EventsQuery,
    ("Last-Event-ID" = Option<i64>, Header, nullable = false, minimum = 0,
        description = "Resume after this event (its `id`, a version); takes precedence over `since`"),
), responses(
    (status = 200, description = "An endless text/event-stream; each event as described", body = EventFrame, content_type = "text/event-stream"),
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
    if query.since.is_some_and(|v| v < 0) {
        return Err(ApiError::new(ErrorCode::InvalidQuery, "since must be a version, 0 or more"));
    }
    let since = match sse::last_event_id(&req)?.or(query.since) {
        Some(v) => v,
        None => state.store.current_version().await?,
    };
    let (tx, res) = sse::response();
    let store = state.store.clone();
    let mut feed = state.feed.subscribe();
    let keepalive = state.config.stream_keepalive;
    let tenant = auth.tenant;
    tokio::spawn(async move {
        let mut last = since;
        if tx.send(Ok(sse::opening(&format!("stream from version {last}"), last))).await.is_err() {
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
                let action = serde_json::to_value(e.action).ok().and_then(|v| v.as_str().map(str::to_owned));
                let kind = format!("{}.{}", e.resource_type, action.unwrap_or_default());
                if tx.send(Ok(sse::event(e.version, Some(&kind), &e))).await.is_err() {
                    return;
                }
            }
            if full {
                continue;
            }
            // Other tenants' changes also wake us; the query above filters them out.
            tokio::select! {
                changed = feed.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(keepalive) => {
                    if tx.send(Ok(sse::keepalive())).await.is_err() {
                        return;
                    }
                }
                _ = tx.closed() => return,
            }
        }
    });
    Ok(res)
}
