//! Unit tests of the snapshot: answers per listener and tenant, patches, and a property test that patching makes the
//! same zones as rebuilding.

use cloud_store::{ZoneDomain, ZoneInstance, ZoneService, ZoneTenant};

use super::*;

pub(crate) fn params() -> ZoneParams {
    ZoneParams {
        public_apex: "dev.cloud.localhost".into(),
        ns_names: vec![Name::from_ascii("ns1.dev.cloud.localhost.").unwrap()],
        ns_addresses: vec!["192.0.2.53".parse().unwrap()],
        edge_addresses: vec!["192.0.2.1".parse().unwrap(), "2001:db8::1".parse().unwrap()],
        service_ttl: 60,
        instance_ttl: 5,
        challenge_ttl: 5,
        apex_ttl: 3600,
        negative_ttl: 10,
    }
}

const ACME: Uuid = Uuid::from_u128(1);
const BETA: Uuid = Uuid::from_u128(2);
const WEB: Uuid = Uuid::from_u128(10);

fn domain(name: &str, custom: bool) -> ZoneDomain {
    ZoneDomain { name: name.into(), custom }
}

fn service(id: u128, tenant_id: Uuid, name: &str, fqdn: &str, domains: Vec<ZoneDomain>) -> ZoneService {
    ZoneService { id: Uuid::from_u128(id), tenant_id, name: name.into(), fqdn: fqdn.into(), domains }
}

fn instance(id: u128, tenant_id: Uuid, name: &str, service: Option<Uuid>, ip: &str, running: bool) -> ZoneInstance {
    ZoneInstance {
        id: Uuid::from_u128(id),
        tenant_id,
        name: name.into(),
        service_id: service,
        private_ip: ip.parse().unwrap(),
        running,
    }
}

pub(crate) fn data() -> ZoneData {
    ZoneData {
        version: 42,
        tenants: vec![
            ZoneTenant { id: BETA, name: "beta".into(), network: "10.96.4.0/22".parse().unwrap() },
            ZoneTenant { id: ACME, name: "acme".into(), network: "10.96.0.0/22".parse().unwrap() },
        ],
        services: vec![
            service(
                10,
                ACME,
                "web",
                "web-abcd1234.dev.cloud.localhost",
                vec![
                    domain("shop.deep.dev.cloud.localhost", false),
                    domain("elsewhere.example.com", false),
                    domain("www.example.org", true),
                    domain("org", true),
                ],
            ),
            service(11, BETA, "idle", "idle-zzzz0000.dev.cloud.localhost", vec![]),
        ],
        instances: vec![
            instance(20, ACME, "web-1", Some(WEB), "10.96.0.2", true),
            instance(21, ACME, "web-2", Some(WEB), "10.96.0.3", false),
            instance(22, BETA, "db-1", None, "10.96.4.2", true),
        ],
        acme_challenges: vec![
            ("_acme-challenge.web-abcd1234.dev.cloud.localhost".into(), "tok".into()),
            ("_acme-challenge.www.example.org".into(), "custom-tok".into()),
            ("_acme-challenge.example.net".into(), "not-ours".into()),
        ],
    }
}

fn name(s: &str) -> LowerName {
    LowerName::new(&Name::from_ascii(s).unwrap())
}

fn ips(answer: &Answer<'_>) -> Vec<String> {
    answer.answers().map(|r| r.data.to_string()).collect()
}

const OUTSIDE: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9));
const ACME_SRC: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 96, 0, 77));
const BETA_SRC: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 96, 7, 1));

/// The rcode and answer count of a public question.
fn public(snap: &Snapshot, q: &str, t: RecordType) -> (ResponseCode, usize) {
    let a = snap.answer(Listener::Public, OUTSIDE, &name(q), t);
    (a.rcode, a.answers().count())
}

/// The rcode and sorted answers of a private A question from `src`.
fn private(snap: &Snapshot, src: IpAddr, q: &str) -> (ResponseCode, Vec<String>) {
    let a = snap.answer(Listener::Private, src, &name(q), RecordType::A);
    let mut found = ips(&a);
    found.sort();
    (a.rcode, found)
}

fn soa_serial(snap: &Snapshot) -> u32 {
    let a = snap.answer(Listener::Public, OUTSIDE, &name("dev.cloud.localhost."), RecordType::SOA);
    match &a.answers().next().unwrap().data {
        RData::SOA(soa) => soa.serial,
        other => panic!("{other:?}"),
    }
}

impl Snapshot {
    /// Every zone's nodes and records, in a comparable form: `zone name` -> sorted records.
    fn dump(&self) -> BTreeMap<String, Vec<String>> {
        let mut zones: Vec<(String, &Zone)> = vec![("public".into(), &self.public)];
        zones.extend(self.custom.iter().map(|(apex, z)| (format!("custom:{apex}"), &**z)));
        zones.extend(self.private_views.iter().map(|(t, z)| (format!("private:{t}"), &**z)));
        let mut out = BTreeMap::new();
        for (zone_key, zone) in zones {
            for (owner, node) in zone.nodes.iter() {
                let mut records: Vec<String> = node
                    .records
                    .iter()
                    .map(|r| format!("{} {} {} {}", r.name, r.record_type(), r.ttl, r.data))
                    .collect();
                records.sort();
                out.insert(format!("{zone_key} {owner}"), records);
            }
        }
        out
    }

    /// The structure every patch must keep: counts that match, parents present, no orphan non-terminals.
    fn check_invariants(&self) {
        let zones: Vec<&Zone> = std::iter::once(&self.public)
            .chain(self.custom.values().map(|z| &**z))
            .chain(self.private_views.values().map(|z| &**z))
            .collect();
        assert_eq!(self.records, zones.iter().map(|z| z.record_count()).sum::<usize>(), "snapshot record count");
        for zone in zones {
            let held: usize = zone.nodes.iter().map(|(_, n)| n.records.len()).sum();
            assert_eq!(zone.records, held, "record count of {}", zone.apex);
            for (owner, node) in zone.nodes.iter() {
                let children = zone.nodes.iter().filter(|(k, _)| **k != zone.apex && k.base_name() == *owner).count();
                assert_eq!(node.children as usize, children, "children of {owner}");
                if *owner == zone.apex {
                    continue;
                }
                assert!(node.owner || node.children > 0, "orphan empty non-terminal {owner}");
                assert!(zone.nodes.get(&owner.base_name()).is_some(), "parent of {owner}");
            }
        }
    }
}

#[test]
fn public_names_negative_answers_and_empty_non_terminals() {
    let snap = Snapshot::build(data(), &params());
    let src: IpAddr = "203.0.113.9".parse().unwrap();
    let cases: &[(&str, RecordType, ResponseCode, usize, usize)] = &[
        ("web-abcd1234.dev.cloud.localhost.", RecordType::A, ResponseCode::NoError, 1, 0),
        ("WEB-ABCD1234.Dev.Cloud.Localhost.", RecordType::AAAA, ResponseCode::NoError, 1, 0),
        ("web-abcd1234.dev.cloud.localhost.", RecordType::MX, ResponseCode::NoError, 0, 1),
        ("nope.dev.cloud.localhost.", RecordType::A, ResponseCode::NXDomain, 0, 1),
        ("deep.dev.cloud.localhost.", RecordType::A, ResponseCode::NoError, 0, 1),
        ("shop.deep.dev.cloud.localhost.", RecordType::A, ResponseCode::NoError, 1, 0),
        ("dev.cloud.localhost.", RecordType::SOA, ResponseCode::NoError, 1, 0),
        ("dev.cloud.localhost.", RecordType::NS, ResponseCode::NoError, 1, 0),
        ("ns1.dev.cloud.localhost.", RecordType::A, ResponseCode::NoError, 1, 0),
        ("_acme-challenge.web-abcd1234.dev.cloud.localhost.", RecordType::TXT, ResponseCode::NoError, 1, 0),
        ("elsewhere.example.com.", RecordType::A, ResponseCode::Refused, 0, 0),
        ("web-1.internal.", RecordType::A, ResponseCode::Refused, 0, 0),
        ("WWW.example.org.", RecordType::A, ResponseCode::NoError, 1, 0),
        ("www.example.org.", RecordType::SOA, ResponseCode::NoError, 1, 0),
        ("www.example.org.", RecordType::NS, ResponseCode::NoError, 1, 0),
        ("sub.www.example.org.", RecordType::A, ResponseCode::NXDomain, 0, 1),
        ("_acme-challenge.www.example.org.", RecordType::TXT, ResponseCode::NoError, 1, 0),
        ("example.org.", RecordType::A, ResponseCode::Refused, 0, 0),
        ("org.", RecordType::SOA, ResponseCode::Refused, 0, 0),
        ("_acme-challenge.example.net.", RecordType::TXT, ResponseCode::Refused, 0, 0),
    ];
    for (q, t, rcode, answers, authorities) in cases {
        let got = snap.answer(Listener::Public, src, &name(q), *t);
        assert_eq!(got.rcode, *rcode, "{q} {t}");
        assert_eq!(got.answers().count(), *answers, "{q} {t}");
        assert_eq!(got.authorities().count(), *authorities, "{q} {t}");
        if *authorities > 0 {
            assert_eq!(got.authorities().next().unwrap().ttl, 10, "negative TTL");
            assert_eq!(got.authorities().next().unwrap().record_type(), RecordType::SOA);
        }
    }
    assert_eq!(ips(&snap.answer(Listener::Public, src, &name("dev.cloud.localhost."), RecordType::SOA)).len(), 1);
    snap.check_invariants();
}

#[test]
fn private_names_are_scoped_to_the_askers_tenant() {
    let snap = Snapshot::build(data(), &params());
    let acme: IpAddr = "10.96.0.77".parse().unwrap();
    let beta: IpAddr = "10.96.7.1".parse().unwrap();
    let stranger: IpAddr = "10.97.0.1".parse().unwrap();
    let q = |src, n: &str| snap.answer(Listener::Private, src, &name(n), RecordType::A);
    assert_eq!(ips(&q(acme, "web-1.internal.")), ["10.96.0.2"]);
    assert_eq!(ips(&q(acme, "web-2.acme.internal.")), ["10.96.0.3"]);
    assert_eq!(ips(&q(acme, "web.internal.")), ["10.96.0.2"], "only running instances");
    assert_eq!(q(acme, "acme.internal.").rcode, ResponseCode::NoError, "empty non-terminal");
    assert_eq!(q(acme, "db-1.internal.").rcode, ResponseCode::NXDomain, "another tenant's instance");
    assert_eq!(q(acme, "db-1.beta.internal.").rcode, ResponseCode::NXDomain);
    assert_eq!(ips(&q(beta, "db-1.internal.")), ["10.96.4.2"]);
    assert_eq!(q(beta, "web-1.internal.").rcode, ResponseCode::NXDomain);
    let idle = q(beta, "idle.internal.");
    assert_eq!((idle.rcode, idle.answers().count()), (ResponseCode::NoError, 0), "service without running instances");
    assert_eq!(q(stranger, "web-1.internal.").rcode, ResponseCode::Refused);
    let mapped: IpAddr = "::ffff:10.96.0.5".parse().unwrap();
    assert_eq!(ips(&q(mapped, "web-1.internal.")), ["10.96.0.2"], "v4-mapped source on a dual-stack socket");
    let public = snap.answer(Listener::Public, acme, &name("web-1.internal."), RecordType::A);
    assert_eq!(public.rcode, ResponseCode::Refused);
}

#[test]
fn serial_follows_the_version() {
    let mut d = data();
    let snap = Snapshot::build(d.clone(), &params());
    assert_eq!(soa_serial(&snap), 42);
    d.version = 43;
    assert_eq!(soa_serial(&Snapshot::build(d.clone(), &params())), 43);
    let patched = snap.patch(ZonePatch { version: 44, ..ZonePatch::default() });
    assert_eq!(soa_serial(&patched), 44, "a patch that touches no name still moves the serial");
    let negative = patched.answer(Listener::Private, ACME_SRC, &name("nope.internal."), RecordType::A);
    match &negative.authorities().next().unwrap().data {
        RData::SOA(soa) => assert_eq!(soa.serial, 44, "every zone's SOA follows, private views included"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_patch_adds_and_removes_a_service_and_leaves_the_old_snapshot_alone() {
    let before = Snapshot::build(data(), &params());
    let svc = service(12, ACME, "api", "api-00000000.dev.cloud.localhost", vec![]);
    let added = before.patch(ZonePatch { version: 43, services: vec![svc.clone()], ..ZonePatch::default() });
    assert_eq!(public(&added, "api-00000000.dev.cloud.localhost.", RecordType::A), (ResponseCode::NoError, 1));
    assert_eq!(private(&added, ACME_SRC, "api.internal."), (ResponseCode::NoError, vec![]), "no instance yet");
    assert_eq!(private(&added, BETA_SRC, "api.internal.").0, ResponseCode::NXDomain, "another tenant's");
    assert_eq!(added.record_count(), before.record_count() + 2);
    added.check_invariants();
    // Queries still holding the old snapshot see the old zones.
    assert_eq!(public(&before, "api-00000000.dev.cloud.localhost.", RecordType::A).0, ResponseCode::NXDomain);
    before.check_invariants();

    let removed = added.patch(ZonePatch { version: 44, gone_services: vec![svc.id], ..ZonePatch::default() });
    assert_eq!(public(&removed, "api-00000000.dev.cloud.localhost.", RecordType::A).0, ResponseCode::NXDomain);
    assert_eq!(private(&removed, ACME_SRC, "api.internal.").0, ResponseCode::NXDomain);
    assert_eq!(removed.dump(), before.dump());
    assert_eq!(removed.record_count(), before.record_count());
    removed.check_invariants();
    assert!(soa_serial(&removed) > soa_serial(&added));
}

#[test]
fn a_patch_follows_instances_running_stopping_and_shadowing_a_service() {
    let snap = Snapshot::build(data(), &params());
    let web2_running = instance(21, ACME, "web-2", Some(WEB), "10.96.0.3", true);
    let snap = snap.patch(ZonePatch { version: 43, instances: vec![web2_running], ..ZonePatch::default() });
    assert_eq!(private(&snap, ACME_SRC, "web.internal.").1, ["10.96.0.2", "10.96.0.3"]);
    let web1_stopped = instance(20, ACME, "web-1", Some(WEB), "10.96.0.2", false);
    let snap = snap.patch(ZonePatch { version: 44, instances: vec![web1_stopped], ..ZonePatch::default() });
    assert_eq!(private(&snap, ACME_SRC, "web.internal.").1, ["10.96.0.3"]);
    assert_eq!(private(&snap, ACME_SRC, "web-1.internal.").1, ["10.96.0.2"], "a stopped instance keeps its name");

    // An instance named like a service takes `<name>.internal`; when it goes, the service has it back.
    let shadow = instance(23, ACME, "web", None, "10.96.0.9", false);
    let snap = snap.patch(ZonePatch { version: 45, instances: vec![shadow.clone()], ..ZonePatch::default() });
    assert_eq!(private(&snap, ACME_SRC, "web.internal.").1, ["10.96.0.9"]);
    assert_eq!(private(&snap, ACME_SRC, "web.acme.internal.").1, ["10.96.0.9"]);
    snap.check_invariants();
    let snap = snap.patch(ZonePatch { version: 46, gone_instances: vec![shadow.id], ..ZonePatch::default() });
    assert_eq!(private(&snap, ACME_SRC, "web.internal.").1, ["10.96.0.3"]);
    assert_eq!(private(&snap, ACME_SRC, "web.acme.internal.").0, ResponseCode::NXDomain);

    // The last instance of a tenant: `<tenant>.internal` was an empty non-terminal only because of it.
    let snap = snap.patch(ZonePatch { version: 47, gone_instances: vec![Uuid::from_u128(22)], ..ZonePatch::default() });
    assert_eq!(private(&snap, BETA_SRC, "db-1.internal.").0, ResponseCode::NXDomain);
    assert_eq!(private(&snap, BETA_SRC, "beta.internal.").0, ResponseCode::NXDomain, "empty non-terminal gone");
    assert_eq!(private(&snap, ACME_SRC, "acme.internal.").0, ResponseCode::NoError, "acme still has instances");
    snap.check_invariants();
}

#[test]
fn a_patch_adds_and_removes_domains_and_cleans_empty_non_terminals() {
    let snap = Snapshot::build(data(), &params());
    let mut web = data().services[0].clone();
    web.domains.push(domain("a.b.c.dev.cloud.localhost", false));
    web.domains.push(domain("shop.example.net", true));
    let added = snap.patch(ZonePatch { version: 43, services: vec![web.clone()], ..ZonePatch::default() });
    assert_eq!(public(&added, "a.b.c.dev.cloud.localhost.", RecordType::A), (ResponseCode::NoError, 1));
    assert_eq!(public(&added, "b.c.dev.cloud.localhost.", RecordType::A), (ResponseCode::NoError, 0));
    assert_eq!(public(&added, "c.dev.cloud.localhost.", RecordType::A), (ResponseCode::NoError, 0));
    assert_eq!(public(&added, "shop.example.net.", RecordType::A), (ResponseCode::NoError, 1), "a new custom zone");
    assert_eq!(public(&added, "shop.example.net.", RecordType::SOA), (ResponseCode::NoError, 1));
    added.check_invariants();

    web.domains.retain(|d| !d.name.ends_with(".c.dev.cloud.localhost") && d.name != "shop.example.net");
    web.domains.retain(|d| d.name != "shop.deep.dev.cloud.localhost");
    let removed = added.patch(ZonePatch { version: 44, services: vec![web], ..ZonePatch::default() });
    for gone in ["a.b.c", "b.c", "c", "shop.deep", "deep"] {
        let q = format!("{gone}.dev.cloud.localhost.");
        assert_eq!(public(&removed, &q, RecordType::A).0, ResponseCode::NXDomain, "{q}");
    }
    assert_eq!(public(&removed, "shop.example.net.", RecordType::A).0, ResponseCode::Refused, "zone removed");
    assert_eq!(public(&removed, "web-abcd1234.dev.cloud.localhost.", RecordType::A).1, 1, "the service stays");
    removed.check_invariants();
}

#[test]
fn a_domain_moved_between_services_in_one_patch_stays_served() {
    let snap = Snapshot::build(data(), &params());
    let mut web = data().services[0].clone();
    web.domains.retain(|d| d.name != "www.example.org");
    let other = service(12, ACME, "other", "other-0.dev.cloud.localhost", vec![domain("www.example.org", true)]);
    // Listed new owner first: the order a patch lists resources in must not matter.
    let moved = snap.patch(ZonePatch { version: 43, services: vec![other, web], ..ZonePatch::default() });
    assert_eq!(public(&moved, "www.example.org.", RecordType::A), (ResponseCode::NoError, 1));
    assert_eq!(public(&moved, "_acme-challenge.www.example.org.", RecordType::TXT), (ResponseCode::NoError, 1));
    moved.check_invariants();
}

#[test]
fn a_patch_adds_and_removes_challenges_in_the_public_and_custom_zones() {
    let snap = Snapshot::build(data(), &params());
    let challenge = |name: &str, values: &[&str]| (name.to_owned(), values.iter().map(|v| v.to_string()).collect());
    let added = snap.patch(ZonePatch {
        version: 43,
        acme_challenges: vec![
            challenge("_acme-challenge.big.dev.cloud.localhost", &["a", "b"]),
            challenge("_acme-challenge.www.example.org", &["custom-tok", "second"]),
        ],
        ..ZonePatch::default()
    });
    assert_eq!(public(&added, "_acme-challenge.big.dev.cloud.localhost.", RecordType::TXT).1, 2);
    assert_eq!(public(&added, "big.dev.cloud.localhost.", RecordType::A), (ResponseCode::NoError, 0));
    assert_eq!(public(&added, "_acme-challenge.www.example.org.", RecordType::TXT).1, 2);
    added.check_invariants();

    let removed = added.patch(ZonePatch {
        version: 44,
        acme_challenges: vec![
            challenge("_acme-challenge.big.dev.cloud.localhost", &[]),
            challenge("_acme-challenge.www.example.org", &[]),
        ],
        ..ZonePatch::default()
    });
    assert_eq!(public(&removed, "_acme-challenge.big.dev.cloud.localhost.", RecordType::TXT).0, ResponseCode::NXDomain);
    assert_eq!(public(&removed, "big.dev.cloud.localhost.", RecordType::A).0, ResponseCode::NXDomain, "ENT gone");
    assert_eq!(public(&removed, "_acme-challenge.www.example.org.", RecordType::TXT).0, ResponseCode::NXDomain);
    assert_eq!(public(&removed, "www.example.org.", RecordType::A).1, 1, "the custom zone stays");
    removed.check_invariants();
}

#[test]
fn a_new_inner_custom_zone_takes_over_its_challenges() {
    let mut d = data();
    d.services[0].domains.push(domain("example.org", true));
    d.services[0].domains.retain(|x| x.name != "www.example.org");
    let snap = Snapshot::build(d.clone(), &params());
    // Without www.example.org, its challenge is served by example.org.
    let txt = snap.answer(Listener::Public, OUTSIDE, &name("_acme-challenge.www.example.org."), RecordType::TXT);
    assert_eq!((txt.rcode, txt.answers().count()), (ResponseCode::NoError, 1));
    assert_eq!(public(&snap, "www.example.org.", RecordType::A), (ResponseCode::NoError, 0), "ENT in example.org");

    let mut web = d.services[0].clone();
    web.domains.push(domain("www.example.org", true));
    let inner = snap.patch(ZonePatch { version: 43, services: vec![web.clone()], ..ZonePatch::default() });
    let txt = inner.answer(Listener::Public, OUTSIDE, &name("_acme-challenge.www.example.org."), RecordType::TXT);
    assert_eq!(txt.answers().count(), 1);
    assert_eq!(txt.authorities().count(), 0);
    let soa = inner.answer(Listener::Public, OUTSIDE, &name("nope.www.example.org."), RecordType::A);
    assert_eq!(
        soa.authorities().next().unwrap().name,
        Name::from_ascii("www.example.org.").unwrap(),
        "answered by the inner zone"
    );
    let outer = inner.custom.get(&name("example.org.")).unwrap();
    assert!(outer.nodes.iter().all(|(k, _)| k.num_labels() <= 2), "the outer zone let go of the moved names");
    inner.check_invariants();
    d.services[0] = web;
    assert_eq!(inner.dump(), Snapshot::build(d.clone(), &params()).dump());
}

/// A wildcard domain `*.shop.example.net` makes us authoritative below `shop.example.net`, where its
/// certificate's dns-01 answer lives, without routing `shop.example.net` itself.
#[test]
fn a_wildcard_domain_serves_its_acme_challenge_at_its_parent() {
    let mut d = data();
    d.services[0].domains.push(domain("*.shop.example.net", true));
    d.acme_challenges.push(("_acme-challenge.shop.example.net".into(), "tok".into()));
    let snap = Snapshot::build(d.clone(), &params());
    let ask = |snap: &Snapshot, q: &str, t| {
        let a = snap.answer(Listener::Public, OUTSIDE, &name(q), t);
        (a.rcode, a.answers().count())
    };
    assert_eq!(ask(&snap, "_acme-challenge.shop.example.net.", RecordType::TXT), (ResponseCode::NoError, 1));
    assert_eq!(ask(&snap, "shop.example.net.", RecordType::NS).0, ResponseCode::NoError);
    assert_eq!(ask(&snap, "shop.example.net.", RecordType::A), (ResponseCode::NoError, 0), "not routed itself");
    assert_eq!(ask(&snap, "other.example.net.", RecordType::A).0, ResponseCode::Refused);

    // The parent verified as a domain too: now it has addresses; and without the wildcard the zone stays.
    let mut both = d.services[0].clone();
    both.domains.push(domain("shop.example.net", true));
    let patched = snap.patch(ZonePatch { version: 43, services: vec![both.clone()], ..ZonePatch::default() });
    assert_eq!(ask(&patched, "shop.example.net.", RecordType::A), (ResponseCode::NoError, 1));
    let mut exact = both.clone();
    exact.domains.retain(|x| x.name != "*.shop.example.net");
    let patched = patched.patch(ZonePatch { version: 44, services: vec![exact.clone()], ..ZonePatch::default() });
    assert_eq!(ask(&patched, "shop.example.net.", RecordType::A), (ResponseCode::NoError, 1));
    patched.check_invariants();
    d.services[0] = exact;
    assert_eq!(patched.dump(), Snapshot::build(d, &params()).dump());
}

#[test]
fn an_empty_non_terminal_stays_while_any_name_below_it_does() {
    let snap = Snapshot::build(data(), &params());
    let svc = |id, fqdn: &str| service(id, ACME, &format!("s{id}"), fqdn, vec![]);
    let both = snap.patch(ZonePatch {
        version: 43,
        services: vec![svc(12, "x.shared.dev.cloud.localhost"), svc(13, "y.deeper.shared.dev.cloud.localhost")],
        ..ZonePatch::default()
    });
    assert_eq!(public(&both, "shared.dev.cloud.localhost.", RecordType::A), (ResponseCode::NoError, 0));
    let one = both.patch(ZonePatch { version: 44, gone_services: vec![Uuid::from_u128(12)], ..ZonePatch::default() });
    assert_eq!(public(&one, "shared.dev.cloud.localhost.", RecordType::A), (ResponseCode::NoError, 0));
    assert_eq!(public(&one, "x.shared.dev.cloud.localhost.", RecordType::A).0, ResponseCode::NXDomain);
    assert_eq!(public(&one, "deeper.shared.dev.cloud.localhost.", RecordType::A), (ResponseCode::NoError, 0));
    one.check_invariants();
    // A name that exists of its own keeps existing when the last name below it goes.
    let owner = one.patch(ZonePatch {
        version: 45,
        services: vec![svc(14, "shared.dev.cloud.localhost")],
        ..ZonePatch::default()
    });
    let none = owner.patch(ZonePatch { version: 46, gone_services: vec![Uuid::from_u128(13)], ..ZonePatch::default() });
    assert_eq!(public(&none, "shared.dev.cloud.localhost.", RecordType::A), (ResponseCode::NoError, 1));
    assert_eq!(public(&none, "deeper.shared.dev.cloud.localhost.", RecordType::A).0, ResponseCode::NXDomain);
    none.check_invariants();
    let empty = none.patch(ZonePatch { version: 47, gone_services: vec![Uuid::from_u128(14)], ..ZonePatch::default() });
    assert_eq!(public(&empty, "shared.dev.cloud.localhost.", RecordType::A).0, ResponseCode::NXDomain);
    assert_eq!(empty.dump(), snap.dump());
}

#[test]
fn a_patch_adds_and_removes_tenants() {
    let snap = Snapshot::build(data(), &params());
    let gamma = ZoneTenant { id: Uuid::from_u128(3), name: "gamma".into(), network: "10.96.8.0/22".parse().unwrap() };
    let src: IpAddr = "10.96.8.5".parse().unwrap();
    assert_eq!(private(&snap, src, "x.internal.").0, ResponseCode::Refused);
    let added = snap.patch(ZonePatch {
        version: 43,
        tenants: vec![gamma.clone()],
        instances: vec![instance(30, gamma.id, "x", None, "10.96.8.2", true)],
        ..ZonePatch::default()
    });
    assert_eq!(private(&added, src, "x.internal.").1, ["10.96.8.2"]);
    assert_eq!(private(&added, src, "x.gamma.internal.").1, ["10.96.8.2"]);
    assert_eq!(private(&added, ACME_SRC, "web-1.internal.").1, ["10.96.0.2"], "other tenants unchanged");
    added.check_invariants();
    let removed = added.patch(ZonePatch {
        version: 44,
        gone_tenants: vec![gamma.id],
        gone_instances: vec![Uuid::from_u128(30)],
        ..ZonePatch::default()
    });
    assert_eq!(private(&removed, src, "x.internal.").0, ResponseCode::Refused);
    assert_eq!(removed.dump(), snap.dump());
    removed.check_invariants();
}

/// A small world of tenants, services, instances and challenges that random operations change while keeping
/// the database's uniqueness rules; every batch of operations becomes a patch.
mod world {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    const GAMMA: Uuid = Uuid::from_u128(3);
    const SERVICE_NAMES: [&str; 4] = ["web", "db", "api", "x"];
    const INSTANCE_NAMES: [&str; 4] = ["web", "db", "i1", "i2"];
    const FQDNS: [&str; 5] = [
        "web-1.dev.cloud.localhost",
        "a.b.dev.cloud.localhost",
        "b.dev.cloud.localhost",
        "c.a.b.dev.cloud.localhost",
        "z.dev.cloud.localhost",
    ];
    const DOMAINS: [(&str, bool); 8] = [
        ("shop.deep.dev.cloud.localhost", false),
        ("deep.dev.cloud.localhost", false),
        ("www.example.org", true),
        ("example.org", true),
        ("a.www.example.org", true),
        ("org", true),
        ("sub.dev.cloud.localhost", true),
        ("*.www.example.org", true),
    ];
    const CHALLENGES: [&str; 6] = [
        "_acme-challenge.b.dev.cloud.localhost",
        "_acme-challenge.www.example.org",
        "_acme-challenge.a.www.example.org",
        "_acme-challenge.example.org",
        "_acme-challenge.deep.dev.cloud.localhost",
        "x.y.z.example.org",
    ];

    #[derive(Default)]
    struct Touched {
        tenants: BTreeSet<Uuid>,
        services: BTreeSet<Uuid>,
        instances: BTreeSet<Uuid>,
        challenges: BTreeSet<String>,
    }

    fn tenant_of(pick: u8) -> Uuid {
        [ACME, BETA, GAMMA][usize::from(pick % 3)]
    }

    fn network_of(tenant: Uuid) -> u8 {
        match tenant {
            ACME => 0,
            BETA => 4,
            _ => 8,
        }
    }

    /// Applies one operation if the database would accept it.
    fn operate(w: &mut ZoneData, touched: &mut Touched, op: (u8, u8, u8, u8, u8)) {
        let (kind, a, b, c, d) = op;
        match kind % 7 {
            0 | 1 => {
                let id = Uuid::from_u128(100 + u128::from(a % 6));
                let tenant = tenant_of(b);
                let name = SERVICE_NAMES[usize::from(c % 4)];
                let fqdn = FQDNS[usize::from(d % 5)];
                let domains: Vec<ZoneDomain> = DOMAINS
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| ((u16::from(c) << 8) | u16::from(d)) >> (i + 2) & 1 == 1)
                    .map(|(_, (n, custom))| domain(n, *custom))
                    .collect();
                let taken = w.services.iter().filter(|s| s.id != id).any(|s| {
                    (s.tenant_id == tenant && s.name == name)
                        || s.fqdn == fqdn
                        || s.domains.iter().any(|x| domains.iter().any(|y| x.name == y.name))
                });
                let moves_tenant = w.services.iter().any(|s| s.id == id && s.tenant_id != tenant);
                let has_instances = w.instances.iter().any(|i| i.service_id == Some(id));
                let no_tenant = !w.tenants.iter().any(|t| t.id == tenant);
                if taken || (moves_tenant && has_instances) || no_tenant {
                    return;
                }
                w.services.retain(|s| s.id != id);
                w.services.push(ZoneService { id, tenant_id: tenant, name: name.into(), fqdn: fqdn.into(), domains });
                touched.services.insert(id);
            }
            2 => {
                // A forced delete: the service's instances go with it.
                let id = Uuid::from_u128(100 + u128::from(a % 6));
                for i in w.instances.iter().filter(|i| i.service_id == Some(id)) {
                    touched.instances.insert(i.id);
                }
                w.instances.retain(|i| i.service_id != Some(id));
                w.services.retain(|s| s.id != id);
                touched.services.insert(id);
            }
            3 => {
                let n = a % 8;
                let id = Uuid::from_u128(200 + u128::from(n));
                let tenant = w.instances.iter().find(|i| i.id == id).map(|i| i.tenant_id).unwrap_or(tenant_of(b));
                let name = INSTANCE_NAMES[usize::from(c % 4)];
                let services: Vec<Uuid> = w.services.iter().filter(|s| s.tenant_id == tenant).map(|s| s.id).collect();
                let service = if d % 3 == 0 || services.is_empty() {
                    None
                } else {
                    Some(services[usize::from(d) % services.len()])
                };
                let taken = w.instances.iter().any(|i| i.id != id && i.tenant_id == tenant && i.name == name);
                if taken || !w.tenants.iter().any(|t| t.id == tenant) {
                    return;
                }
                let ip = IpAddr::V4(Ipv4Addr::new(10, 96, network_of(tenant), 100 + n));
                w.instances.retain(|i| i.id != id);
                w.instances.push(ZoneInstance {
                    id,
                    tenant_id: tenant,
                    name: name.into(),
                    service_id: service,
                    private_ip: ip,
                    running: d % 2 == 0,
                });
                touched.instances.insert(id);
            }
            4 => {
                let id = Uuid::from_u128(200 + u128::from(a % 8));
                w.instances.retain(|i| i.id != id);
                touched.instances.insert(id);
            }
            5 => {
                let name = CHALLENGES[usize::from(a % 6)];
                w.acme_challenges.retain(|(n, _)| n != name);
                for (i, value) in ["v1", "v2"].iter().enumerate() {
                    if b >> i & 1 == 1 {
                        w.acme_challenges.push((name.into(), (*value).into()));
                    }
                }
                touched.challenges.insert(name.into());
            }
            _ => {
                // Gamma comes and goes; like the database, it can only go when empty.
                let present = w.tenants.iter().any(|t| t.id == GAMMA);
                let empty = !w.services.iter().any(|s| s.tenant_id == GAMMA)
                    && !w.instances.iter().any(|i| i.tenant_id == GAMMA);
                if present && empty {
                    w.tenants.retain(|t| t.id != GAMMA);
                } else if !present {
                    let network = "10.96.8.0/22".parse().unwrap();
                    w.tenants.push(ZoneTenant { id: GAMMA, name: "gamma".into(), network });
                } else {
                    return;
                }
                touched.tenants.insert(GAMMA);
            }
        }
    }

    /// The patch a store would return for `touched`, read from the world as it is now.
    fn patch_of(w: &ZoneData, touched: Touched) -> ZonePatch {
        let mut patch = ZonePatch { version: w.version, ..ZonePatch::default() };
        for id in touched.tenants {
            match w.tenants.iter().find(|t| t.id == id) {
                Some(t) => patch.tenants.push(t.clone()),
                None => patch.gone_tenants.push(id),
            }
        }
        for id in touched.services {
            match w.services.iter().find(|s| s.id == id) {
                Some(s) => patch.services.push(s.clone()),
                None => patch.gone_services.push(id),
            }
        }
        for id in touched.instances {
            match w.instances.iter().find(|i| i.id == id) {
                Some(i) => patch.instances.push(i.clone()),
                None => patch.gone_instances.push(id),
            }
        }
        for name in touched.challenges {
            let values = w.acme_challenges.iter().filter(|(n, _)| *n == name).map(|(_, v)| v.clone()).collect();
            patch.acme_challenges.push((name, values));
        }
        // The store lists resources in id order; the reverse order checks that the order does not matter.
        patch.services.reverse();
        patch.instances.reverse();
        patch
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(300),
            ..ProptestConfig::default()
        })]

        /// Whatever the changes, patching gives exactly the zones a full build of the same data gives.
        #[test]
        fn patching_equals_rebuilding(
            batches in prop::collection::vec(
                prop::collection::vec(any::<(u8, u8, u8, u8, u8)>(), 1..5),
                1..12,
            ),
        ) {
            let mut w = data();
            let mut snap = Snapshot::build(w.clone(), &params());
            for ops in batches {
                let mut touched = Touched::default();
                for op in ops {
                    operate(&mut w, &mut touched, op);
                }
                w.version += 1;
                snap = snap.patch(patch_of(&w, touched));
                let built = Snapshot::build(w.clone(), &params());
                prop_assert_eq!(snap.dump(), built.dump());
                prop_assert_eq!(snap.record_count(), built.record_count());
                prop_assert_eq!(&snap.networks, &built.networks);
                snap.check_invariants();
            }
        }
    }
}
