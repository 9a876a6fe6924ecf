//! Hosts join and leave (issue 19): registration with underlay addresses and overlay keys, overlay addresses from
//! the host pool, refusals, and the peers an overlay is built from.

use std::net::Ipv4Addr;
use std::time::Duration;

use cloud_domain::state::InstanceState;
use cloud_store::{NodeRegistration, Observation, Peer, Settings, StoreError};
use cloud_tests::TestApi;
use serde_json::json;
use uuid::Uuid;

use crate::post;

const LIVE: Duration = Duration::from_secs(60);

fn host(name: &str, underlay: u8, key: u8) -> NodeRegistration<'_> {
    NodeRegistration {
        name,
        address: "127.0.0.1",
        memory_mb: 1 << 20,
        underlay_address: Some(Ipv4Addr::new(192, 0, 2, underlay)),
        public_key: Some([key; 32]),
    }
}

/// Everything the nodes table says of overlay identities, by name.
async fn hosts(api: &TestApi) -> Vec<(String, Option<String>, Option<String>, Option<Vec<u8>>)> {
    sqlx::query_as(
        "SELECT name, host(underlay_address), host(overlay_address), overlay_public_key FROM nodes ORDER BY name",
    )
    .fetch_all(api.store.pool())
    .await
    .unwrap()
}

/// Makes a node's last heartbeat older than any live window, as an agent that died or was cut off leaves it.
async fn lapse(api: &TestApi, name: &str) {
    sqlx::query("UPDATE nodes SET heartbeat_at = now() - interval '1 hour' WHERE name = $1")
        .bind(name)
        .execute(api.store.pool())
        .await
        .unwrap();
}

#[tokio::test]
async fn hosts_get_distinct_overlay_addresses_kept_across_restarts_with_their_new_key() {
    let api = TestApi::start().await;
    let pool = Settings::default().host_pool;
    let a = api.store.register(&host("a", 10, 1), LIVE).await.unwrap();
    let b = api.store.register(&host("b", 11, 2), LIVE).await.unwrap();
    let (oa, ob) = (a.overlay_address.unwrap(), b.overlay_address.unwrap());
    assert_ne!(oa, ob);
    assert!(pool.contains(&oa) && pool.contains(&ob), "{oa} and {ob} come from {pool}");

    // An agent restarting makes a fresh key: it replaces the old one; the overlay address stays.
    let since = api.store.current_version().await.unwrap();
    let again = api.store.register(&host("a", 10, 9), LIVE).await.unwrap();
    assert_eq!(again, a);
    let rows = hosts(&api).await;
    assert_eq!(rows[0], ("a".into(), Some("192.0.2.10".into()), Some(oa.to_string()), Some(vec![9; 32])));
    // Peers learn of the new key from the change feed.
    let events = api.store.events_since(None, since, 100).await.unwrap();
    assert!(
        events.iter().any(|e| e.resource_type == "node"
            && e.resource_id == a.id
            && e.resource["overlay_public_key"] == "09".repeat(32)),
        "{events:?}"
    );
    // The same registration again changes nothing peers follow: no event.
    let since = api.store.current_version().await.unwrap();
    api.store.register(&host("a", 10, 9), LIVE).await.unwrap();
    assert_eq!(api.store.current_version().await.unwrap(), since);

    // A node without an overlay has none of it, and nodes registered the old way keep working.
    let plain = api.store.register_node("plain", "127.0.0.1", 1 << 20).await.unwrap();
    assert_ne!(plain, a.id);
    assert_eq!(hosts(&api).await[2], ("plain".into(), None, None, None));
}

#[tokio::test]
async fn a_live_nodes_underlay_address_is_refused_to_another_node_and_nothing_changes() {
    let api = TestApi::start().await;
    api.store.register(&host("a", 10, 1), LIVE).await.unwrap();
    api.store.register(&host("b", 11, 2), LIVE).await.unwrap();
    let (before, version) = (hosts(&api).await, api.store.current_version().await.unwrap());

    // A newcomer, and an existing node moving onto a held address: both refused, naming address and holder.
    for name in ["intruder", "b"] {
        let err = api.store.register(&host(name, 10, 7), LIVE).await.unwrap_err();
        match &err {
            StoreError::UnderlayAddressTaken { address, node } => {
                assert_eq!((*address, node.as_str()), (Ipv4Addr::new(192, 0, 2, 10), "a"));
            }
            other => panic!("{name}: expected UnderlayAddressTaken, got {other:?}"),
        }
        assert!(err.to_string().contains("192.0.2.10") && err.to_string().contains("\"a\""), "{err}");
    }
    assert_eq!(hosts(&api).await, before, "nothing changed");
    assert_eq!(api.store.current_version().await.unwrap(), version, "no event");
}

#[tokio::test]
async fn a_dead_nodes_underlay_address_goes_to_a_newcomer() {
    let api = TestApi::start().await;
    let a = api.store.register(&host("a", 10, 1), LIVE).await.unwrap();
    lapse(&api, "a").await;
    let since = api.store.current_version().await.unwrap();
    let c = api.store.register(&host("c", 10, 3), LIVE).await.unwrap();
    assert_ne!(c.overlay_address, a.overlay_address, "the dead node's overlay address stays its own");
    let rows = hosts(&api).await;
    assert_eq!(rows[0], ("a".into(), None, Some(a.overlay_address.unwrap().to_string()), None), "a lost it");
    assert_eq!(rows[1].1.as_deref(), Some("192.0.2.10"));
    let events = api.store.events_since(None, since, 100).await.unwrap();
    let nodes: Vec<(Uuid, &str)> = events
        .iter()
        .filter(|e| e.resource_type == "node")
        .map(|e| (e.resource_id, e.resource["underlay_address"].as_str().unwrap_or("none")))
        .collect();
    assert_eq!(nodes, [(a.id, "none"), (c.id, "192.0.2.10")], "peers follow both changes");

    // Coming back, the old node needs another address now, and keeps its overlay address.
    let err = api.store.register(&host("a", 10, 4), LIVE).await.unwrap_err();
    assert!(matches!(&err, StoreError::UnderlayAddressTaken { node, .. } if node == "c"), "{err:?}");
    let back = api.store.register(&host("a", 12, 4), LIVE).await.unwrap();
    assert_eq!(back, a);
}

#[tokio::test]
async fn bad_underlay_addresses_and_keys_are_refused() {
    let api = TestApi::start().await;
    for (ip, why) in [
        (Ipv4Addr::UNSPECIFIED, "not a host address"),
        (Ipv4Addr::new(100, 64, 3, 4), "platform.host_pool"),
        (api.tenant.network.split('/').next().unwrap().parse().unwrap(), "platform.tenant_pool"),
    ] {
        let node = NodeRegistration { underlay_address: Some(ip), ..host("a", 0, 1) };
        let err = api.store.register(&node, LIVE).await.unwrap_err();
        assert!(
            matches!(&err, StoreError::Invalid(m) if m.contains(&ip.to_string()) && m.contains(why)),
            "{ip}: {err:?}"
        );
    }
    assert!(hosts(&api).await.is_empty());

    // The API takes keys as 32 bytes; the database refuses any other length from whatever writes the table.
    api.store.register(&host("a", 10, 1), LIVE).await.unwrap();
    for len in [0, 31, 33] {
        let err = sqlx::query("UPDATE nodes SET overlay_public_key = $1 WHERE name = 'a'")
            .bind(vec![1u8; len])
            .execute(api.store.pool())
            .await
            .unwrap_err();
        let constraint = err.as_database_error().and_then(|d| d.constraint()).map(str::to_owned);
        assert_eq!(constraint.as_deref(), Some("nodes_overlay_public_key_length"), "{len} bytes: {err}");
    }
    assert_eq!(hosts(&api).await[0].3, Some(vec![1; 32]));
}

#[tokio::test]
async fn the_host_pool_running_out_is_a_capacity_error() {
    // A /30 holds one host address (.2; .1 is skipped as in tenant networks).
    let settings = Settings { host_pool: "100.64.7.0/30".parse().unwrap(), ..Settings::default() };
    let api = TestApi::start_with_settings(settings, Default::default()).await;
    let a = api.store.register(&host("a", 10, 1), LIVE).await.unwrap();
    assert_eq!(a.overlay_address, Some(Ipv4Addr::new(100, 64, 7, 2)));
    let err = api.store.register(&host("b", 11, 2), LIVE).await.unwrap_err();
    assert!(matches!(err, StoreError::CapacityExhausted { .. }), "{err:?}");
    assert_eq!(hosts(&api).await.len(), 1);
}

/// Creates an instance of `hello` and schedules it onto the live node with the most free memory.
async fn instance(api: &TestApi, name: &str) -> (Uuid, Ipv4Addr) {
    let res = post(api, "/v1/instances", &api.token, json!({"image": "hello", "name": name})).await;
    assert_eq!(res.status, 201, "{}", res.body);
    assert_eq!(api.store.schedule_pending(LIVE).await.unwrap(), 1);
    let i = &res.body["instances"][0];
    (i["id"].as_str().unwrap().parse().unwrap(), i["private_ip"].as_str().unwrap().parse().unwrap())
}

async fn observe(api: &TestApi, node: Uuid, id: Uuid, state: InstanceState) {
    let obs = Observation { state, reason: None, exit_code: None, boot_time_us: None, restart_count: 0 };
    assert!(api.store.report(node, id, &obs).await.unwrap());
}

#[tokio::test]
async fn peers_are_the_other_live_hosts_with_the_ips_of_their_instances_that_have_not_ended() {
    let api = TestApi::start().await;
    let n1 = api.store.register(&NodeRegistration { memory_mb: 1000, ..host("n1", 1, 1) }, LIVE).await.unwrap();
    let (i1, ip1) = instance(&api, "i1").await;
    let (i2, _) = instance(&api, "i2").await;
    let (i3, ip3) = instance(&api, "i3").await;
    observe(&api, n1.id, i1, InstanceState::Running).await;
    observe(&api, n1.id, i2, InstanceState::Stopped).await;
    observe(&api, n1.id, i3, InstanceState::Starting).await;
    // n2 offers the most memory: the next instance goes there, and is pending (assigned, about to start).
    let n2 = api.store.register(&NodeRegistration { memory_mb: 9000, ..host("n2", 2, 2) }, LIVE).await.unwrap();
    let n3 = api.store.register(&NodeRegistration { memory_mb: 2000, ..host("n3", 3, 3) }, LIVE).await.unwrap();
    let (_, ip4) = instance(&api, "i4").await;
    // A node without an overlay is nobody's peer.
    api.store.register_node("plain", "127.0.0.1", 1).await.unwrap();

    let peer = |r: cloud_store::Registered, name: &str, last: u8, key: u8, ips: Vec<Ipv4Addr>| Peer {
        node: r.id,
        name: name.into(),
        underlay_address: Ipv4Addr::new(192, 0, 2, last),
        overlay_address: r.overlay_address.unwrap(),
        public_key: [key; 32],
        instance_ips: ips,
    };
    let mut n1_ips = vec![ip1, ip3];
    n1_ips.sort();
    let want = vec![peer(n1, "n1", 1, 1, n1_ips.clone()), peer(n2, "n2", 2, 2, vec![ip4])];
    assert_eq!(api.store.overlay_peers(n3.id, LIVE).await.unwrap(), want, "the stopped i2 is left out");
    let from_n1 = api.store.overlay_peers(n1.id, LIVE).await.unwrap();
    assert_eq!(from_n1.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["n2", "n3"]);

    // n2 stops heartbeating: it leaves every peer's overlay.
    lapse(&api, "n2").await;
    assert_eq!(api.store.overlay_peers(n3.id, LIVE).await.unwrap(), vec![peer(n1, "n1", 1, 1, n1_ips)]);

    // n1 shuts down cleanly: it leaves at once, and the feed says so for peers to follow.
    let since = api.store.current_version().await.unwrap();
    api.store.release_node(n1.id).await.unwrap();
    assert_eq!(api.store.overlay_peers(n3.id, LIVE).await.unwrap(), vec![]);
    let events = api.store.events_since(None, since, 100).await.unwrap();
    assert!(events.iter().any(|e| e.resource_type == "node" && e.resource_id == n1.id), "{events:?}");
}

#[tokio::test]
async fn of_hosts_announcing_one_address_at_once_exactly_one_gets_it() {
    let api = TestApi::start().await;
    let names: Vec<String> = (0..8).map(|i| format!("h{i}")).collect();
    let nodes: Vec<NodeRegistration> = names.iter().map(|n| host(n, 10, 1)).collect();
    let results = futures_util::future::join_all(nodes.iter().map(|n| api.store.register(n, LIVE))).await;
    let won = results.iter().filter(|r| r.is_ok()).count();
    let refused = results.iter().filter(|r| matches!(r, Err(StoreError::UnderlayAddressTaken { .. }))).count();
    assert_eq!((won, refused), (1, 7), "{results:?}");
    assert_eq!(hosts(&api).await.len(), 1);
}
