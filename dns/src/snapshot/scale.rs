//! The cost of a build, a patch and a lookup at 100k names, without PostgreSQL (a measurement, ignored).

use std::time::Instant;

use cloud_store::{ZoneInstance, ZoneService, ZoneTenant};

use super::*;

fn platform(n: u32) -> ZoneData {
    let t = Uuid::from_u128(1);
    ZoneData {
        version: 1,
        tenants: vec![ZoneTenant { id: t, name: "acme".into(), network: "10.0.0.0/12".parse().unwrap() }],
        services: (0..n)
            .map(|i| ZoneService {
                id: Uuid::from_u128(u128::from(i) + 1_000_000),
                tenant_id: t,
                name: format!("s{i}"),
                fqdn: format!("s{i}-abcdefgh.dev.cloud.localhost"),
                domains: Vec::new(),
            })
            .collect(),
        instances: (0..n)
            .map(|i| ZoneInstance {
                id: Uuid::from_u128(u128::from(i) + 2_000_000),
                tenant_id: t,
                name: format!("i{i}"),
                service_id: Some(Uuid::from_u128(u128::from(i) + 1_000_000)),
                private_ip: IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i + 1)),
                running: true,
            })
            .collect(),
        ..ZoneData::default()
    }
}

/// Build, patch and lookup cost alone, without PostgreSQL:
/// `cargo test -p cloud-dns --release --lib build_cost -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement"]
fn build_cost() {
    let data = platform(100_000);
    let copy = data.clone();
    let rss = cloud_tests::proc_status_kib(std::process::id(), "VmRSS").unwrap_or(0);
    let started = Instant::now();
    let snap = Snapshot::build(copy, &tests::params());
    println!("build of {} records: {:?}", snap.record_count(), started.elapsed());
    println!(
        "RSS growth with the snapshot: {} MiB",
        cloud_tests::proc_status_kib(std::process::id(), "VmRSS").unwrap_or(0).saturating_sub(rss) / 1024
    );
    let started = Instant::now();
    let patches = 1000u32;
    let mut patched = snap.clone();
    for i in 0..patches {
        let service = ZoneService {
            id: Uuid::from_u128(u128::from(i) + 3_000_000),
            tenant_id: Uuid::from_u128(1),
            name: format!("late{i}"),
            fqdn: format!("late{i}-abcdefgh.dev.cloud.localhost"),
            domains: Vec::new(),
        };
        let patch = ZonePatch { version: 2 + i64::from(i), services: vec![service], ..ZonePatch::default() };
        patched = patched.patch(patch);
    }
    println!("patch adding one service, mean of {patches}: {:?}", started.elapsed() / patches);

    // The query path's map lookups against a plain HashMap of the same names, for the cost of persistence.
    let names: Vec<LowerName> =
        data.services.iter().map(|s| LowerName::new(&Name::from_ascii(format!("{}.", s.fqdn)).unwrap())).collect();
    let src = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1));
    let rounds = 10;
    let started = Instant::now();
    let mut found = 0usize;
    for _ in 0..rounds {
        for name in &names {
            found += snap.answer(Listener::Public, src, name, RecordType::A).answers().count();
        }
    }
    let per = started.elapsed() / (rounds * names.len() as u32);
    println!("answer() for a service name: {per:?} per question ({found} records)");
    let plain: std::collections::HashMap<LowerName, Vec<Record>> =
        snap.public.nodes.iter().map(|(k, v)| (k.clone(), v.records.clone())).collect();
    let started = Instant::now();
    let mut found = 0usize;
    for _ in 0..rounds {
        for name in &names {
            found += plain.get(name).map_or(0, Vec::len);
        }
    }
    let per = started.elapsed() / (rounds * names.len() as u32);
    println!("std HashMap get of the same names: {per:?} per lookup ({found} records)");
    let started = Instant::now();
    let mut found = 0usize;
    for _ in 0..rounds {
        for name in &names {
            found += snap.public.nodes.get(name).map_or(0, |n| n.records.len());
        }
    }
    let per = started.elapsed() / (rounds * names.len() as u32);
    println!("the public zone's ShardedMap get of the same names: {per:?} per lookup ({found} records)");
    let only_public = ZoneData { instances: vec![], tenants: vec![], ..data.clone() };
    let started = Instant::now();
    let snap = Snapshot::build(only_public, &tests::params());
    println!("public zone only, {} records: {:?}", snap.record_count(), started.elapsed());
}
