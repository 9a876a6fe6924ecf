//! Instances.

use actix_web::{HttpRequest, HttpResponse, delete, get, post, web};
use cloud_domain::api::{
    CreateInstance, CreatedInstances, ErrorCode, Instance, LogLine, MoveInstance, Page, Problem, Scope,
};
use cloud_domain::names::{NameKind, validate_name};
use cloud_domain::ports::expand_inputs;
use cloud_store::{LogUpdate, NewInstances};

use crate::error::{ApiError, ApiResult};
use crate::sse::{self, LogFrame};
use crate::validate::ListQuery;
use crate::{AppState, Auth};

/// Create instances of an image, attached to a service, to a new ephemeral service (`ports`), or to none.
#[utoipa::path(tag = "instances", security(("bearer" = [])), request_body = CreateInstance, responses(
    (status = 201, description = "Created", body = CreatedInstances),
    (status = "4XX", description = "Problem", body = Problem, content_type = "application/problem+json"),
))]
#[post("/instances")]
pub(crate) async fn create_instance(
    state: web::Data<AppState>,
    auth: Auth,
    body: crate::json::Json<CreateInstance>,
) -> ApiResult<HttpResponse> {
    auth.require(Scope::Write)?;
    let body = body.into_inner();
    let invalid = |msg: String| ApiError::new(ErrorCode::InvalidRequest, msg);
    if body.image.is_empty() {
        return Err(invalid("image must name an image".into()));
    }
    if let Some(name) = &body.name {
        validate_name(NameKind::Instance, name)?;
        if body.replicas > 1 {
            validate_name(NameKind::Instance, &format!("{name}-{}", body.replicas))?;
        }
    }
    // replicas, port and memory_mb were checked against their bounds as the body was read.
    let memory_mb = body.memory_mb.unwrap_or(128);
    check_env_args(&body.env, &body.args)?;
    if body.service.is_some() && body.ports.is_some() {
        return Err(invalid(
            "give either service (attach to an existing service) or ports (create an ephemeral one), not both".into(),
        ));
    }
    let policy = state.store.settings().port_policy();
    let ports = body.ports.as_deref().map(|p| expand_inputs(p, &policy)).transpose()?;
    let new = NewInstances {
        image: body.image,
        name: body.name,
        env: body.env,
        args: body.args,
        service: body.service,
        ports,
        replicas: body.replicas,
        restart_policy: body.restart_policy,
        memory_mb,
        port: body.port,
        start: body.start,
    };
    let created = state.store.create_instances(auth.tenant, new).await?;
    Ok(HttpResponse::Created().json(created))
}

/// Refuses environment names that are not variable names or that the platform sets, and NUL in values or
/// arguments.
pub(crate) fn check_env_args(env: &std::collections::BTreeMap<String, String>, args: &[String]) -> ApiResult<()> {
    let invalid = |msg: String| ApiError::new(ErrorCode::InvalidRequest, msg);
    for key in env.keys() {
        let valid = key.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(invalid(format!("env name \"{key}\" must match [A-Za-z_][A-Za-z0-9_]*")));
        }
        if crate::document::PLATFORM_ENV.contains(&key.as_str()) {
            return Err(invalid(format!("env name \"{key}\" is set by the platform and cannot be overridden")));
        }
    }
    if let Some((key, _)) = env.iter().find(|(_, v)| v.contains('\0')) {
        return Err(invalid(format!("env value of \"{key}\" holds NUL, which an environment cannot")));
    }
    if args.iter().any(|a| a.contains('\0')) {
        return Err(invalid("an argument holds NUL, which a command line cannot".into()));
    }
    Ok(())
}

/// List the tenant's instances, oldest first.
#[utoipa::path(tag = "instances", security(("bearer" = [])), params(ListQuery), responses(
    (status = 200, description = "A page of instances", body = Page<Instance>),
    (status = "4XX", description = "Problem", body = Problem, content_type = "application/problem+json"),
))]
#[get("/instances")]
pub(crate) async fn list_instances(
    state: web::Data<AppState>,
    auth: Auth,
    query: web::Query<ListQuery>,
) -> ApiResult<web::Json<Page<Instance>>> {
    auth.require(Scope::Read)?;
    let (cursor, limit) = query.parse()?;
    let (items, next) = state.store.list_instances(auth.tenant, cursor, limit).await?;
    Ok(web::Json(super::page(items, next)))
}

/// Get an instance by name or id.
#[utoipa::path(tag = "instances", security(("bearer" = [])),
    params(("instance" = String, Path, description = "Instance name or id")),
    responses(
        (status = 200, description = "The instance", body = Instance),
        (status = "4XX", description = "Problem", body = Problem, content_type = "application/problem+json"),
))]
#[get("/instances/{instance}")]
pub(crate) async fn get_instance(
    state: web::Data<AppState>,
    auth: Auth,
    path: web::Path<String>,
) -> ApiResult<web::Json<Instance>> {
    auth.require(Scope::Read)?;
    Ok(web::Json(state.store.instance(auth.tenant, &path).await?))
}

/// Delete an instance. Its ephemeral service goes with it when it was the last instance. A running instance
/// drains first: the edges send it no new requests, those in flight finish (within the platform's drain
/// timeout), then it goes; the answer is then 202 with the instance, `draining`.
#[utoipa::path(tag = "instances", security(("bearer" = [])),
    params(("instance" = String, Path, description = "Instance name or id")),
    responses(
        (status = 202, description = "Draining; deleted once its requests in flight have finished", body = Instance),
        (status = 204, description = "Deleted"),
        (status = "4XX", description = "Problem", body = Problem, content_type = "application/problem+json"),
))]
#[delete("/instances/{instance}")]
pub(crate) async fn delete_instance(
    state: web::Data<AppState>,
    auth: Auth,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    auth.require(Scope::Write)?;
    Ok(match state.store.delete_instance(auth.tenant, &path).await? {
        Some(draining) => HttpResponse::Accepted().json(draining),
        None => HttpResponse::NoContent().finish(),
    })
}

/// Start a stopped or failed instance.
#[utoipa::path(tag = "instances", security(("bearer" = [])),
    params(("instance" = String, Path, description = "Instance name or id")),
    responses(
        (status = 200, description = "The instance, now pending", body = Instance),
        (status = "4XX", description = "Problem", body = Problem, content_type = "application/problem+json"),
))]
#[post("/instances/{instance}/start")]
pub(crate) async fn start_instance(
    state: web::Data<AppState>,
    auth: Auth,
    path: web::Path<String>,
) -> ApiResult<web::Json<Instance>> {
    auth.require(Scope::Write)?;
    Ok(web::Json(state.store.start_instance(auth.tenant, &path).await?))
}

/// Stop an instance.
#[utoipa::path(tag = "instances", security(("bearer" = [])),
    params(("instance" = String, Path, description = "Instance name or id")),
    responses(
        (status = 200, description = "The instance, stopping or stopped", body = Instance),
        (status = "4XX", description = "Problem", body = Problem, content_type = "application/problem+json"),
))]
#[post("/instances/{instance}/stop")]
pub(crate) async fn stop_instance(
    state: web::Data<AppState>,
    auth: Auth,
    path: web::Path<String>,
) -> ApiResult<web::Json<Instance>> {
    auth.require(Scope::Write)?;
    Ok(web::Json(state.store.stop_instance(auth.tenant, &path).await?))
}

/// How recently a node must have heartbeated to take a moved instance: a little over node agents' default live
/// window, so that a node the scheduler would use is never refused.
const NODE_LIVE: std::time::Duration = std::time::Duration::from_secs(15);

/// Move an instance to another node. A running instance is stopped on its node and then started on the new
/// one (never both at once), with the same name, private IP, service and configuration; the edge and the DNS
/// follow its state. One that does not run is reassigned at once.
#[utoipa::path(tag = "instances", security(("bearer" = [])),
    params(("instance" = String, Path, description = "Instance name or id")),
    request_body = MoveInstance,
    responses(
        (status = 200, description = "The instance, moving (its `state_reason` says where) or moved", body = Instance),
        (status = "4XX", description = "Problem", body = Problem, content_type = "application/problem+json"),
))]
#[post("/instances/{instance}/move")]
pub(crate) async fn move_instance(
    state: web::Data<AppState>,
    auth: Auth,
    path: web::Path<String>,
    body: crate::json::Json<MoveInstance>,
) -> ApiResult<web::Json<Instance>> {
    auth.require(Scope::Write)?;
    let node = body.into_inner().node;
    if node.is_empty() || node.len() > 253 {
        return Err(ApiError::new(ErrorCode::InvalidRequest, "node must be a node's name, 1 to 253 characters"));
    }
    Ok(web::Json(state.store.move_instance(auth.tenant, &path, &node, NODE_LIVE).await?))
}

/// Which log lines to return.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct LogsQuery {
    /// Only lines after this `seq`; without it, the last `limit` lines.
    after: Option<i64>,
    /// At most this many lines, 1 to 2000 (default 100); with `follow`, the most sent at once.
    #[param(minimum = 1, maximum = 2000)]
    limit: Option<i64>,
    /// Keep the response open and stream lines as Server-Sent Events (`id` the line's `seq`, `data` a `LogLine`)
    /// until the instance is deleted. Resume with `Last-Event-ID` (as `after`).
    #[serde(default)]
    follow: bool,
}

/// An instance's output (stdout, stderr, and the platform's `system` notes), oldest first.
///
/// With `follow=true`, a text/event-stream: first a comment and `id: <seq it starts after>`, then each line as an
/// event as soon as it is stored, and a comment every 15 s while idle. It ends when the instance is deleted; a
/// client that reconnects with `Last-Event-ID` misses no line and gets none twice.
#[utoipa::path(tag = "instances", security(("bearer" = [])),
    params(
        ("instance" = String, Path, description = "Instance name or id"),
        LogsQuery,
        ("Last-Event-ID" = Option<i64>, Header, nullable = false, minimum = 0,
            description = "Resume after this line (its `id`, a `seq`); takes precedence over `after`"),
    ),
    responses(
        (status = 200, description = "Log lines; with follow=true, a text/event-stream of them", content(
            (Vec<LogLine> = "application/json"),
            (LogFrame = "text/event-stream"),
        )),
        (status = "4XX", description = "Problem", body = Problem, content_type = "application/problem+json"),
))]
#[get("/instances/{instance}/logs")]
pub(crate) async fn instance_logs(
    state: web::Data<AppState>,
    auth: Auth,
    req: HttpRequest,
    path: web::Path<String>,
    query: web::Query<LogsQuery>,
) -> ApiResult<HttpResponse> {
    auth.require(Scope::Read)?;
    let limit = query.limit.unwrap_or(100);
    if !(1..=2000).contains(&limit) {
        return Err(ApiError::new(ErrorCode::InvalidQuery, format!("limit must be 1 to 2000, got {limit}")));
    }
    let after = sse::last_event_id(&req)?.or(query.after);
    if !query.follow {
        let (_, lines) = state.store.logs(auth.tenant, &path, after, limit).await?;
        return Ok(HttpResponse::Ok().json(lines));
    }
    let (tenant, key) = (auth.tenant, path.into_inner());
    // Following before reading: a line stored in between is announced to the follower, not lost.
    let mut follower = state.logs.follow(state.store.instance_id(tenant, &key).await?);
    let (_, lines) = state.store.logs(tenant, &key, after, limit).await?;
    // Without `after`, the read ends at the newest line (0: none yet); with it, a full read may have left some
    // behind, and an empty one says nothing of where the log ends (`after` may be past it).
    let newest = match (lines.last(), after) {
        (Some(l), None) => Some(l.seq),
        (Some(l), Some(_)) if (lines.len() as i64) < limit => Some(l.seq),
        (None, None) => Some(0),
        _ => None,
    };
    let start = after.unwrap_or_else(|| lines.first().map_or(0, |l| l.seq - 1));
    follower.start_after(lines.last().map_or(start, |l| l.seq), newest);
    let (tx, res) = sse::response();
    let keepalive = state.config.stream_keepalive;
    tokio::spawn(async move {
        if tx.send(Ok(sse::opening(&format!("log of instance {key}"), start))).await.is_err() {
            return;
        }
        for l in &lines {
            if tx.send(Ok(sse::event(l.seq, None, l))).await.is_err() {
                return;
            }
        }
        loop {
            tokio::select! {
                next = follower.next() => match next {
                    Ok(LogUpdate::Lines(lines)) => {
                        for l in &lines {
                            if tx.send(Ok(sse::event(l.seq, None, l))).await.is_err() {
                                return;
                            }
                        }
                    }
                    Ok(LogUpdate::Ended) => return,
                    Err(e) => {
                        tracing::warn!(error = %crate::error::chain(&e), "log stream: cannot read lines");
                        tokio::select! {
                            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                            _ = tx.closed() => return,
                        }
                    }
                },
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
