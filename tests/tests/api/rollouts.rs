//! Draining, rollouts and autoscale as the API records them and the controller's store steps carry them out,
//! driven here step by step (the end-to-end tests in `cli/tests/e2e.rs` run them with real instances and edges).

use std::time::Duration;

use cloud_domain::api::Scope;
use cloud_tests::TestApi;
use reqwest::Method;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::{call, create_service, delete, get, post};

/// Marks instances observed running, as their node agent would.
async fn run(api: &TestApi, ids: &[Uuid]) {
    sqlx::query("UPDATE instances SET state = 'running' WHERE id = ANY($1)")
        .bind(ids)
        .execute(api.store.pool())
        .await
        .unwrap();
}

fn ids(v: &Value) -> Vec<Uuid> {
    v.as_array().unwrap().iter().map(|i| i["id"].as_str().unwrap().parse().unwrap()).collect()
}

async fn state_of(api: &TestApi, id: Uuid) -> Option<String> {
    sqlx::query_as::<_, (String,)>("SELECT state FROM instances WHERE id = $1")
        .bind(id)
        .fetch_optional(api.store.pool())
        .await
        .unwrap()
        .map(|(s,)| s)
}

/// The newest change-feed version.
async fn version(api: &TestApi) -> i64 {
    let (v,): (Option<i64>,) =
        sqlx::query_as("SELECT max(version) FROM events").fetch_one(api.store.pool()).await.unwrap();
    v.unwrap_or(0)
}

#[tokio::test]
async fn a_deleted_instance_drains_until_every_edge_is_done_with_it() {
    let api = TestApi::start().await;
    let t = &api.token;
    create_service(&api, t, json!({"name": "web", "ports": ["443:8080"]})).await;
    let made = post(&api, "/v1/instances", t, json!({"image": "hello", "service": "web", "replicas": 2})).await;
    let both = ids(&made.body["instances"]);
    // One never ran: it goes at once.
    assert_eq!(delete(&api, &format!("/v1/instances/{}", both[1]), t).await.status, 204);
    run(&api, &both[..1]).await;
    let id = both[0];
    let edge = Uuid::new_v4();
    api.store.report_edge(edge, "edge-1", version(&api).await, &[(id, 3)]).await.unwrap();

    let res = delete(&api, &format!("/v1/instances/{id}"), t).await;
    assert_eq!((res.status, res.body["state"].as_str()), (202, Some("draining")), "{}", res.body);
    assert_eq!(res.body["desired_state"], "stopped");
    // Another tenant cannot see it, let alone delete it.
    let (_, other) = api.tenant("hooli", &[Scope::Read, Scope::Write]).await;
    delete(&api, &format!("/v1/instances/{id}"), &other).await.problem(404, "not_found", &id.to_string());
    // Deleting it again changes nothing: it drains on.
    assert_eq!(delete(&api, &format!("/v1/instances/{id}"), t).await.status, 202);

    let live = Duration::from_secs(10);
    api.store.finish_drains(live).await.unwrap();
    // The edge has not seen the drain yet (it routes by an older version): the instance stays.
    assert_eq!(state_of(&api, id).await.as_deref(), Some("draining"));
    // The edge has, but three requests are still in flight on it.
    api.store.report_edge(edge, "edge-1", version(&api).await, &[(id, 3)]).await.unwrap();
    api.store.finish_drains(live).await.unwrap();
    assert_eq!(state_of(&api, id).await.as_deref(), Some("draining"));
    // A second edge still routes by the old version.
    let late = Uuid::new_v4();
    api.store.report_edge(late, "edge-2", 1, &[]).await.unwrap();
    api.store.report_edge(edge, "edge-1", version(&api).await, &[]).await.unwrap();
    api.store.finish_drains(live).await.unwrap();
    assert_eq!(state_of(&api, id).await.as_deref(), Some("draining"));
    // Both are done with it: it goes, and its ephemeral service would go with it.
    api.store.report_edge(late, "edge-2", version(&api).await, &[]).await.unwrap();
    assert_eq!(api.store.finish_drains(live).await.unwrap(), 1);
    assert_eq!(state_of(&api, id).await, None);
    get(&api, &format!("/v1/instances/{id}"), t).await.problem(404, "not_found", &id.to_string());
}

#[tokio::test]
async fn a_stopped_instance_drains_then_stops_and_the_deadline_bounds_a_drain() {
    let api = TestApi::start().await;
    let t = &api.token;
    let made = post(&api, "/v1/instances", t, json!({"image": "hello", "ports": ["443:8080"]})).await;
    let id = ids(&made.body["instances"])[0];
    run(&api, &[id]).await;
    let edge = Uuid::new_v4();
    let stopped = post(&api, &format!("/v1/instances/{id}/stop"), t, json!({})).await;
    assert_eq!(stopped.body["state"], "draining", "{}", stopped.body);
    post(&api, &format!("/v1/instances/{id}/start"), t, json!({})).await.problem(
        409,
        "invalid_state_transition",
        "draining",
    );
    // Requests in flight forever: the deadline ends the drain.
    api.store.report_edge(edge, "edge-1", version(&api).await + 1, &[(id, 1)]).await.unwrap();
    api.store.finish_drains(Duration::from_secs(10)).await.unwrap();
    assert_eq!(state_of(&api, id).await.as_deref(), Some("draining"));
    sqlx::query("UPDATE instances SET drain_deadline = now() - interval '1 second' WHERE id = $1")
        .bind(id)
        .execute(api.store.pool())
        .await
        .unwrap();
    api.store.finish_drains(Duration::from_secs(10)).await.unwrap();
    assert_eq!(state_of(&api, id).await.as_deref(), Some("stopping"), "then the node agent stops it");
    // An edge gone silent holds nothing up.
    let made = post(&api, "/v1/instances", t, json!({"image": "hello", "ports": ["8443:8080/tls"]})).await;
    let id = ids(&made.body["instances"])[0];
    run(&api, &[id]).await;
    sqlx::query("UPDATE edges SET reported_at = now() - interval '1 minute'").execute(api.store.pool()).await.unwrap();
    assert_eq!(delete(&api, &format!("/v1/instances/{id}"), t).await.status, 202);
    api.store.finish_drains(Duration::from_secs(10)).await.unwrap();
    assert_eq!(state_of(&api, id).await, None);
}

#[tokio::test]
async fn a_rollout_replaces_instances_one_by_one_and_a_broken_one_stops_it() {
    let api = TestApi::start().await;
    let t = &api.token;
    create_service(&api, t, json!({"name": "web", "ports": ["443:8080"]})).await;
    let made = post(
        &api,
        "/v1/instances",
        t,
        json!({"image": "hello", "service": "web", "replicas": 2, "env": {"GREETING": "hi"}, "memory_mb": 64}),
    )
    .await;
    let old = ids(&made.body["instances"]);
    run(&api, &old).await;
    let path = "/v1/services/web/rollouts";

    // Refused before anything changes.
    let rollout = async |body: Value| call(&api, Method::POST, path, Some(t), Some(body)).await;
    rollout(json!({"image": "nope"})).await.problem(404, "not_found", "nope");
    for bad in [json!({"replicas": 0}), json!({"max_surge": 65}), json!({"ready_timeout_seconds": 0})] {
        let res = rollout(bad.clone()).await;
        assert_eq!(res.status, 400, "{bad}: {}", res.body);
    }
    rollout(json!({"strategy": "sideways"})).await.problem(400, "invalid_json", "strategy");
    rollout(json!({"env": {"A-B": "x"}})).await.problem(400, "invalid_request", "A-B");
    let (_, other) = api.tenant("hooli", &[Scope::Read, Scope::Write]).await;
    call(&api, Method::POST, path, Some(&other), Some(json!({}))).await.problem(404, "not_found", "web");
    let reader = api.issue_token(&api.tenant, &[Scope::Read]).await.jwt;
    call(&api, Method::POST, path, Some(&reader), Some(json!({}))).await.problem(403, "insufficient_scope", "write");
    let _empty = create_service(&api, t, json!({"name": "empty", "ports": ["443:8080"]})).await;
    call(&api, Method::POST, "/v1/services/empty/rollouts", Some(t), Some(json!({}))).await.problem(
        409,
        "invalid_state_transition",
        "give an image",
    );
    assert_eq!(get(&api, path, t).await.body, json!([]), "nothing recorded");

    let started = rollout(json!({"image": "hello"})).await;
    assert_eq!((started.status, started.body["state"].as_str()), (201, Some("running")), "{}", started.body);
    assert_eq!((started.body["replicas"].as_u64(), started.body["old_remaining"].as_u64()), (Some(2), Some(2)));
    let id = started.body["id"].as_str().unwrap().to_owned();
    rollout(json!({})).await.problem(409, "rollout_in_progress", &id);
    let one = format!("{path}/{id}");
    get(&api, &one, &other).await.problem(404, "not_found", "web");

    // Step by step: one new instance (surge 1) with the old one's configuration; once it runs, an old one drains.
    api.store.step_rollouts().await.unwrap();
    let now = get(&api, &one, t).await.body;
    let new = ids(&now["new_instances"]);
    assert_eq!(new.len(), 1, "{now}");
    let first = get(&api, &format!("/v1/instances/{}", new[0]), t).await.body;
    assert_eq!((first["env"]["GREETING"].as_str(), first["memory_mb"].as_u64()), (Some("hi"), Some(64)));
    api.store.step_rollouts().await.unwrap();
    assert_eq!(ids(&get(&api, &one, t).await.body["new_instances"]).len(), 1, "no more before it runs");
    run(&api, &new).await;
    api.store.step_rollouts().await.unwrap();
    let states = [state_of(&api, old[0]).await, state_of(&api, old[1]).await];
    let draining = states.iter().filter(|s| s.as_deref() == Some("draining")).count();
    assert_eq!(draining, 1, "one old instance drains for the one new that runs: {states:?}");
    api.store.step_rollouts().await.unwrap();
    let now = get(&api, &one, t).await.body;
    let new = ids(&now["new_instances"]);
    assert_eq!((new.len(), now["old_remaining"].as_u64()), (2, Some(1)), "{now}");
    run(&api, &new).await;
    api.store.step_rollouts().await.unwrap();
    let done = get(&api, &one, t).await.body;
    assert_eq!(done["state"], "succeeded", "{done}");
    for id in &old {
        assert_eq!(state_of(&api, *id).await.as_deref(), Some("draining"));
    }

    // A rollout whose new instance never becomes ready fails and removes it; the others serve on.
    let broken = rollout(json!({"ready_timeout_seconds": 5})).await;
    let broken_path = format!("{path}/{}", broken.body["id"].as_str().unwrap());
    api.store.step_rollouts().await.unwrap();
    let waiting = ids(&get(&api, &broken_path, t).await.body["new_instances"]);
    assert_eq!(waiting.len(), 1);
    sqlx::query("UPDATE instances SET created_at = now() - interval '1 minute' WHERE id = $1")
        .bind(waiting[0])
        .execute(api.store.pool())
        .await
        .unwrap();
    api.store.step_rollouts().await.unwrap();
    let failed = get(&api, &broken_path, t).await.body;
    assert_eq!(failed["state"], "failed", "{failed}");
    let reason = failed["state_reason"].as_str().unwrap();
    assert!(
        reason.contains("did not become ready within 5s") && reason.contains("2 instance(s) keep serving"),
        "{reason}"
    );
    assert_eq!(state_of(&api, waiting[0]).await, None, "the unready instance went");
    for id in &new {
        assert_eq!(state_of(&api, *id).await.as_deref(), Some("running"));
    }
    let history = get(&api, path, t).await.body;
    assert_eq!((history[0]["state"].as_str(), history[1]["state"].as_str()), (Some("failed"), Some("succeeded")));
}

#[tokio::test]
async fn autoscale_policies_are_checked_and_decisions_carried_out() {
    let api = TestApi::start().await;
    let t = &api.token;
    let svc = create_service(&api, t, json!({"name": "web", "ports": ["443:8080"]})).await;
    let path = "/v1/services/web/autoscale";
    let put = async |body: Value| call(&api, Method::PUT, path, Some(t), Some(body)).await;
    put(json!({"min": 3, "max": 2, "target_in_flight": 5})).await.problem(
        409,
        "limits_conflict",
        "min 3 is above max 2",
    );
    for bad in [
        json!({"min": 1, "max": 2, "target_in_flight": 0}),
        json!({"min": 1, "max": 0, "target_in_flight": 1}),
        json!({"min": 1, "max": 65, "target_in_flight": 1}),
        json!({"min": 1, "max": 2}),
    ] {
        let res = put(bad.clone()).await;
        assert_eq!(res.status, 400, "{bad}: {}", res.body);
    }
    assert_eq!(get(&api, "/v1/services/web", t).await.body["autoscale"], Value::Null, "nothing half-set");
    let set = put(json!({"min": 1, "max": 3, "target_in_flight": 5})).await;
    assert_eq!(set.body["autoscale"], json!({"min": 1, "max": 3, "target_in_flight": 5, "cooldown_seconds": 30}));
    let (_, other) = api.tenant("hooli", &[Scope::Read, Scope::Write]).await;
    call(&api, Method::PUT, path, Some(&other), Some(json!({"min": 1, "max": 3, "target_in_flight": 5})))
        .await
        .problem(404, "not_found", "web");

    // No instance to copy: nothing is added.
    let service: Uuid = svc["id"].as_str().unwrap().parse().unwrap();
    let tenant = api.tenant.id;
    assert_eq!(api.store.scale_up(tenant, service, 2).await.unwrap(), 0);
    let made = post(&api, "/v1/instances", t, json!({"image": "hello", "service": "web", "env": {"K": "v"}})).await;
    let first = ids(&made.body["instances"]);
    run(&api, &first).await;
    // The edges' load of live edges counts, that of silent ones not.
    let edge = Uuid::new_v4();
    api.store.report_edge(edge, "edge-1", version(&api).await, &[(first[0], 12)]).await.unwrap();
    let stale = Uuid::new_v4();
    api.store.report_edge(stale, "edge-2", version(&api).await, &[(first[0], 100)]).await.unwrap();
    sqlx::query("UPDATE edges SET reported_at = now() - interval '1 minute' WHERE id = $1")
        .bind(stale)
        .execute(api.store.pool())
        .await
        .unwrap();
    let inputs = api.store.autoscale_inputs(Duration::from_secs(10)).await.unwrap();
    assert_eq!((inputs.len(), inputs[0].in_flight, inputs[0].running), (1, 12, 1), "{inputs:?}");
    assert_eq!(api.store.scale_up(tenant, service, 2).await.unwrap(), 2);
    let all = get(&api, "/v1/instances", t).await.body;
    let copies: Vec<&Value> =
        all["items"].as_array().unwrap().iter().filter(|i| i["id"] != first[0].to_string()).collect();
    assert_eq!(copies.len(), 2);
    assert!(copies.iter().all(|i| i["env"]["K"] == "v" && i["service"]["name"] == "web"), "{all}");
    run(&api, &copies.iter().map(|i| i["id"].as_str().unwrap().parse().unwrap()).collect::<Vec<_>>()).await;
    // Down: the newest drains away.
    assert_eq!(api.store.scale_down(tenant, service, 1).await.unwrap(), 1);
    let draining: Vec<(String,)> = sqlx::query_as("SELECT name FROM instances WHERE state = 'draining'")
        .fetch_all(api.store.pool())
        .await
        .unwrap();
    assert_eq!(draining.len(), 1);
    assert_eq!(call(&api, Method::DELETE, path, Some(t), None).await.body["autoscale"], Value::Null);
}

#[tokio::test]
async fn one_controller_acts_at_a_time_and_another_takes_over_when_it_goes() {
    let api = TestApi::start().await;
    // A second API process on the same database: its own pool, as another replica has.
    let options = (*api.store.pool().connect_options()).clone();
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(2).connect_with(options).await.unwrap();
    let other = cloud_store::Store::new(pool, Default::default());
    let (mut first, mut second) = (None, None);
    assert!(api.store.lead(&mut first).await, "the first to ask leads");
    assert!(!other.lead(&mut second).await, "a second replica waits");
    assert!(api.store.lead(&mut first).await, "and the leader keeps leading");
    assert!(!other.lead(&mut second).await);
    // The leader's process (and so its connection) goes: the other takes over.
    drop(first.take());
    let t0 = std::time::Instant::now();
    while !other.lead(&mut second).await {
        assert!(t0.elapsed() < Duration::from_secs(30), "nobody took over");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!api.store.lead(&mut first).await, "the old leader now waits");
}

#[tokio::test]
async fn a_rollout_under_way_can_be_cancelled_once() {
    let api = TestApi::start().await;
    let t = &api.token;
    create_service(&api, t, json!({"name": "web", "ports": ["443:8080"]})).await;
    let made = post(&api, "/v1/instances", t, json!({"image": "hello", "service": "web"})).await;
    let old = ids(&made.body["instances"]);
    run(&api, &old).await;
    let started = post(&api, "/v1/services/web/rollouts", t, json!({})).await;
    let id = started.body["id"].as_str().unwrap().to_owned();
    api.store.step_rollouts().await.unwrap();
    let path = format!("/v1/services/web/rollouts/{id}");
    let new = ids(&get(&api, &path, t).await.body["new_instances"]);
    assert_eq!(new.len(), 1);

    let (_, other) = api.tenant("hooli", &[Scope::Read, Scope::Write]).await;
    post(&api, &format!("{path}/cancel"), &other, json!({})).await.problem(404, "not_found", "web");
    let cancelled = post(&api, &format!("{path}/cancel"), t, json!({})).await;
    assert_eq!(cancelled.body["state"], "cancelled", "{}", cancelled.body);
    assert_eq!(cancelled.body["state_reason"], "cancelled; 1 instance(s) keep serving");
    assert_eq!(state_of(&api, new[0]).await, None, "the new instance that did not run went");
    assert_eq!(state_of(&api, old[0]).await.as_deref(), Some("running"), "the old one serves on");
    post(&api, &format!("{path}/cancel"), t, json!({})).await.problem(409, "invalid_state_transition", "cancelled");
    // Nothing moves it on any more, and the service may have a new one.
    api.store.step_rollouts().await.unwrap();
    assert_eq!(get(&api, &path, t).await.body["state"], "cancelled");
    assert_eq!(post(&api, "/v1/services/web/rollouts", t, json!({})).await.status, 201);
}
