//! Server-Sent Events as the API sends them (`GET /v1/events`, `GET /v1/instances/{instance}/logs?follow=true`),
//! and as the OpenAPI document describes them.
//!
//! Every stream opens with a comment and an `id` field holding the position it starts from, so a client that
//! reconnects before any event still resumes where it was (`Last-Event-ID`); every event carries its position as
//! `id`; comments keep an idle stream alive through proxies and let clients notice a dead connection.

use std::borrow::Cow;

use actix_web::web::Bytes;
use actix_web::{HttpRequest, HttpResponse, http::header};
use cloud_domain::api::{ErrorCode, Event, LogLine};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::{Ref, RefOr};
use utoipa::{PartialSchema, ToSchema};

use crate::error::{ApiError, ApiResult};

/// The sending half of a stream; the body ends when it is dropped.
pub(crate) type Sender = mpsc::Sender<Result<Bytes, std::io::Error>>;

/// A streaming `text/event-stream` response and the sender that feeds it.
pub(crate) fn response() -> (Sender, HttpResponse) {
    let (tx, rx) = mpsc::channel(16);
    let res = HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header(("x-accel-buffering", "no"))
        .streaming(ReceiverStream::new(rx));
    (tx, res)
}

/// The block that opens a stream: a comment, and the position it starts from as the last event id.
pub(crate) fn opening(comment: &str, position: i64) -> Bytes {
    Bytes::from(format!(": {comment}\nid: {position}\n\n"))
}

/// A comment that keeps an idle stream alive.
pub(crate) fn keepalive() -> Bytes {
    Bytes::from_static(b": keepalive\n\n")
}

/// One event. `data` is JSON, which never holds a raw line break.
pub(crate) fn event(id: i64, kind: Option<&str>, data: &impl serde::Serialize) -> Bytes {
    let data = serde_json::to_string(data).unwrap_or_default();
    Bytes::from(match kind {
        Some(kind) => format!("id: {id}\nevent: {kind}\ndata: {data}\n\n"),
        None => format!("id: {id}\ndata: {data}\n\n"),
    })
}

/// The `Last-Event-ID` a reconnecting client sends: the position after which to resume.
pub(crate) fn last_event_id(req: &HttpRequest) -> ApiResult<Option<i64>> {
    let Some(v) = req.headers().get("last-event-id") else { return Ok(None) };
    match v.to_str().ok().and_then(|s| s.trim().parse::<i64>().ok()) {
        Some(id) if id >= 0 => Ok(Some(id)),
        _ => Err(ApiError::new(
            ErrorCode::InvalidRequest,
            "Last-Event-ID must be the id of an event of this stream (an integer, 0 or more)",
        )),
    }
}

/// The schema of one event as it travels: the SSE fields, `data` holding `content` as JSON.
fn frame_schema(description: &str, event: Option<&str>, content: &str) -> RefOr<Schema> {
    let string = |description: &str| ObjectBuilder::new().schema_type(Type::String).description(Some(description));
    let mut frame = ObjectBuilder::new()
        .schema_type(Type::Object)
        .description(Some(description))
        .property("id", string("The event's position: send it as `Last-Event-ID` to resume after it"))
        .required("id");
    if let Some(event) = event {
        frame = frame.property("event", string(event)).required("event");
    }
    frame
        .property(
            "data",
            string(&format!("The `{content}`, as JSON"))
                .content_media_type("application/json")
                .content_schema(Some(Ref::from_schema_name(content))),
        )
        .required("data")
        .into()
}

/// One Server-Sent Event of `GET /v1/events`.
pub(crate) struct EventFrame;

impl PartialSchema for EventFrame {
    fn schema() -> RefOr<Schema> {
        frame_schema(
            "One Server-Sent Event of `GET /v1/events`: `id` is the event's version, `data` the `Event`",
            Some("`<resource_type>.<action>`, e.g. `service.created`"),
            "Event",
        )
    }
}

impl ToSchema for EventFrame {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("EventFrame")
    }

    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push((Event::name().into(), Event::schema()));
        Event::schemas(schemas);
    }
}

/// One Server-Sent Event of `GET /v1/instances/{instance}/logs?follow=true`.
pub(crate) struct LogFrame;

impl PartialSchema for LogFrame {
    fn schema() -> RefOr<Schema> {
        frame_schema(
            "One Server-Sent Event of `GET /v1/instances/{instance}/logs?follow=true`: `id` is the line's `seq`, \
             `data` the `LogLine`",
            None,
            "LogLine",
        )
    }
}

impl ToSchema for LogFrame {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("LogFrame")
    }

    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push((LogLine::name().into(), LogLine::schema()));
        LogLine::schemas(schemas);
    }
}
