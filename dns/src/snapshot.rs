//! The zones as one immutable in-memory value, built from [`ZoneData`] and swapped whole on every change, so a
//! query never sees half of an update and never waits for PostgreSQL.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

use cloud_store::ZoneData;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::rdata::{A, AAAA, NS, SOA, TXT};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};
use ipnet::Ipv4Net;
use uuid::Uuid;

/// Zone parameters that do not come from the database: names, addresses and TTLs, resolved from `DnsConfig`.
#[derive(Debug, Clone)]
pub(crate) struct ZoneParams {
    /// `<region>.<base_domain>`, lowercase, without the trailing dot.
    pub public_apex: String,
    /// Name servers of the public zone, fully qualified.
    pub ns_names: Vec<Name>,
    /// Addresses of in-zone name servers (glue).
    pub ns_addresses: Vec<IpAddr>,
    /// A/AAAA answers for service FQDNs and platform subdomains.
    pub edge_addresses: Vec<IpAddr>,
    /// TTL of service and platform-domain records.
    pub service_ttl: u32,
    /// TTL of private instance and service records.
    pub instance_ttl: u32,
    /// TTL of ACME challenge TXT records.
    pub challenge_ttl: u32,
    /// TTL of SOA and NS records at the apexes.
    pub apex_ttl: u32,
    /// TTL of negative answers (SOA minimum).
    pub negative_ttl: u32,
}

/// The label of the private zone.
pub(crate) const PRIVATE_APEX: &str = "internal";

/// One zone: its apex SOA and the records of each owner name. Empty non-terminals are present with no records,
/// so they answer NODATA rather than NXDOMAIN.
#[derive(Debug)]
pub(crate) struct Zone {
    apex: LowerName,
    /// The SOA as placed in the authority section of negative answers (TTL = negative TTL, RFC 2308).
    negative_soa: Record,
    nodes: HashMap<LowerName, Vec<Record>>,
}

/// What a lookup found.
#[derive(Debug)]
pub(crate) struct Answer<'a> {
    pub rcode: ResponseCode,
    /// Whether we speak for the name (false for REFUSED and errors).
    pub authoritative: bool,
    pub answers: Vec<&'a Record>,
    pub authorities: Vec<&'a Record>,
}

impl<'a> Answer<'a> {
    /// An answer with no records.
    pub fn error(rcode: ResponseCode) -> Self {
        Self { rcode, authoritative: false, answers: Vec::new(), authorities: Vec::new() }
    }
}

impl Zone {
    fn new(apex: Name, soa: SOA, ns: &[Name], apex_ttl: u32) -> Self {
        let negative_ttl = soa.minimum;
        let negative_soa = Record::from_rdata(apex.clone(), negative_ttl.min(apex_ttl), RData::SOA(soa.clone()));
        let mut apex_records = vec![Record::from_rdata(apex.clone(), apex_ttl, RData::SOA(soa))];
        apex_records.extend(ns.iter().map(|n| Record::from_rdata(apex.clone(), apex_ttl, RData::NS(NS(n.clone())))));
        let apex = LowerName::new(&apex);
        let mut nodes = HashMap::new();
        nodes.insert(apex.clone(), apex_records);
        Self { apex, negative_soa, nodes }
    }

    /// Adds records at `owner` (possibly none: the name then exists and answers NODATA), creating the empty
    /// non-terminals between it and the apex. Names outside the zone are ignored: callers filter them, this is
    /// the last guard.
    fn insert(&mut self, owner: &Name, records: impl IntoIterator<Item = Record>) {
        let owner = LowerName::new(owner);
        if !self.apex.zone_of(&owner) {
            return;
        }
        if let Some(existing) = self.nodes.get_mut(&owner) {
            // Its ancestors were created with it.
            existing.extend(records);
            return;
        }
        self.create_ancestors(&owner);
        self.nodes.insert(owner, records.into_iter().collect());
    }

    fn create_ancestors(&mut self, owner: &LowerName) {
        let mut parent = owner.base_name();
        while parent.num_labels() > self.apex.num_labels() {
            if self.nodes.contains_key(&parent) {
                break;
            }
            let next = parent.base_name();
            self.nodes.insert(parent, Vec::new());
            parent = next;
        }
    }

    pub fn contains(&self, name: &LowerName) -> bool {
        self.apex.zone_of(name)
    }

    /// Answers a question for a name inside this zone.
    pub fn lookup(&self, name: &LowerName, qtype: RecordType) -> Answer<'_> {
        let Some(records) = self.nodes.get(name) else {
            return Answer {
                rcode: ResponseCode::NXDomain,
                authoritative: true,
                answers: Vec::new(),
                authorities: vec![&self.negative_soa],
            };
        };
        let answers: Vec<&Record> =
            records.iter().filter(|r| qtype == RecordType::ANY || r.record_type() == qtype).collect();
        let authorities = if answers.is_empty() { vec![&self.negative_soa] } else { Vec::new() };
        Answer { rcode: ResponseCode::NoError, authoritative: true, answers, authorities }
    }

    /// How many records the zone holds.
    pub fn record_count(&self) -> usize {
        self.nodes.values().map(Vec::len).sum()
    }
}

/// Both zones at one change-feed version.
#[derive(Debug)]
pub(crate) struct Snapshot {
    /// The change-feed version the data includes; also the SOA serial.
    pub version: i64,
    pub public: Zone,
    /// Tenant networks sorted by first address; disjoint, so at most one contains a given address.
    networks: Vec<(Ipv4Net, usize)>,
    /// The private zone as each tenant sees it, indexed by `networks`' second field.
    private_views: Vec<Zone>,
    /// Answers private-zone questions from sources outside every tenant network.
    private_apex: LowerName,
    /// Verified custom domains delegated to us, each its own zone, by apex.
    custom: HashMap<LowerName, Zone>,
}

/// Where a question was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Listener {
    /// The Internet-facing listener: public zone only.
    Public,
    /// The listener on the tenants' private networks: both zones.
    Private,
}

impl Listener {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Public => "public",
            Self::Private => "private",
        }
    }
}

/// A name from the database as an absolute DNS name; `None` (logged) when it is not a valid name.
fn absolute(name: &str) -> Option<Name> {
    let name = name.trim_end_matches('.');
    match Name::from_ascii(format!("{name}.")) {
        Ok(n) => Some(n),
        Err(e) => {
            tracing::warn!(name, error = %e, "dns: skipping a name that is not a valid DNS name");
            None
        }
    }
}

fn address_record(name: Name, ttl: u32, ip: IpAddr) -> Record {
    match ip {
        IpAddr::V4(v4) => Record::from_rdata(name, ttl, RData::A(A(v4))),
        IpAddr::V6(v6) => Record::from_rdata(name, ttl, RData::AAAA(AAAA(v6))),
    }
}

/// The custom zone holding `name`, if any: the one with the longest apex that encloses it.
fn custom_zone_of<'z>(custom: &'z mut HashMap<LowerName, Zone>, name: &LowerName) -> Option<&'z mut Zone> {
    let mut apex = name.clone();
    while !apex.is_root() {
        if custom.contains_key(&apex) {
            return custom.get_mut(&apex);
        }
        apex = apex.base_name();
    }
    None
}

/// The SOA serial for a change-feed version: serial arithmetic (RFC 1982) makes the wrap at 2^32 harmless.
pub(crate) fn serial(version: i64) -> u32 {
    version as u32
}

impl Snapshot {
    /// Builds both zones. Invalid names in the data are skipped with a warning rather than failing the build:
    /// one bad row must not take every other name down.
    pub fn build(data: &ZoneData, params: &ZoneParams) -> Self {
        let public_apex = absolute(&params.public_apex).unwrap_or_else(Name::root);
        let hostmaster = |apex: &Name| Name::from_ascii("hostmaster").and_then(|h| h.append_domain(apex));
        let soa = |apex: &Name, mname: Name| {
            SOA::new(
                mname,
                hostmaster(apex).unwrap_or_else(|_| apex.clone()),
                serial(data.version),
                3600,
                600,
                86400,
                params.negative_ttl,
            )
        };
        let public_mname = params.ns_names.first().cloned().unwrap_or_else(|| public_apex.clone());
        let mut public =
            Zone::new(public_apex.clone(), soa(&public_apex, public_mname), &params.ns_names, params.apex_ttl);
        for ns in &params.ns_names {
            public.insert(ns, params.ns_addresses.iter().map(|ip| address_record(ns.clone(), params.apex_ttl, *ip)));
        }
        let fqdns = data.services.iter().map(|s| s.fqdn.as_str()).chain(data.domains.iter().map(String::as_str));
        for name in fqdns.filter_map(absolute) {
            public.insert(
                &name,
                params.edge_addresses.iter().map(|ip| address_record(name.clone(), params.service_ttl, *ip)),
            );
        }
        // A custom domain is served as its own zone, so the resolvers its owner's delegation sends here get
        // authoritative answers (and its ACME challenges), but only once the domain is verified as the tenant's.
        let mut custom: HashMap<LowerName, Zone> = HashMap::new();
        for apex in data.custom_domains.iter().filter_map(|d| absolute(d)) {
            if public_apex.zone_of(&apex) || LowerName::new(&apex).num_labels() < 2 {
                continue;
            }
            let mname = params.ns_names.first().cloned().unwrap_or_else(|| apex.clone());
            let mut zone = Zone::new(apex.clone(), soa(&apex, mname), &params.ns_names, params.apex_ttl);
            zone.insert(
                &apex,
                params.edge_addresses.iter().map(|ip| address_record(apex.clone(), params.service_ttl, *ip)),
            );
            custom.insert(LowerName::new(&apex), zone);
        }
        for (name, value) in &data.acme_challenges {
            let Some(name) = absolute(name) else { continue };
            let record =
                Record::from_rdata(name.clone(), params.challenge_ttl, RData::TXT(TXT::new(vec![value.clone()])));
            if public_apex.zone_of(&name) {
                public.insert(&name, [record]);
            } else if let Some(zone) = custom_zone_of(&mut custom, &LowerName::new(&name)) {
                zone.insert(&name, [record]);
            } else {
                tracing::debug!(%name, "dns: ACME challenge outside our zones is not served");
            }
        }

        let private_apex = absolute(PRIVATE_APEX).unwrap_or_else(Name::root);
        let private_ns = absolute(&format!("ns.{PRIVATE_APEX}")).unwrap_or_else(|| private_apex.clone());
        let tenant_index: HashMap<Uuid, usize> = data.tenants.iter().enumerate().map(|(i, t)| (t.id, i)).collect();
        let mut private_views: Vec<Zone> = data
            .tenants
            .iter()
            .map(|_| {
                Zone::new(
                    private_apex.clone(),
                    soa(&private_apex, private_ns.clone()),
                    std::slice::from_ref(&private_ns),
                    params.apex_ttl,
                )
            })
            .collect();
        // Instance names win over service names in `<name>.internal`: an instance is the more specific thing.
        let mut instance_names: HashMap<usize, std::collections::HashSet<&str>> = HashMap::new();
        for inst in &data.instances {
            let Some(&t) = tenant_index.get(&inst.tenant_id) else { continue };
            let tenant = &data.tenants[t];
            let view = &mut private_views[t];
            instance_names.entry(t).or_default().insert(inst.name.as_str());
            for name in
                [format!("{}.{PRIVATE_APEX}", inst.name), format!("{}.{}.{PRIVATE_APEX}", inst.name, tenant.name)]
            {
                if let Some(name) = absolute(&name) {
                    view.insert(&name, [address_record(name.clone(), params.instance_ttl, inst.private_ip)]);
                }
            }
        }
        // Grouped once, so the build stays linear in the number of instances and services.
        let mut running: HashMap<(Uuid, &str), Vec<IpAddr>> = HashMap::new();
        for inst in data.instances.iter().filter(|i| i.running) {
            if let Some(service) = inst.service.as_deref() {
                running.entry((inst.tenant_id, service)).or_default().push(inst.private_ip);
            }
        }
        for svc in &data.services {
            let Some(&t) = tenant_index.get(&svc.tenant_id) else { continue };
            if instance_names.get(&t).is_some_and(|names| names.contains(svc.name.as_str())) {
                continue;
            }
            let Some(name) = absolute(&format!("{}.{PRIVATE_APEX}", svc.name)) else { continue };
            let view = &mut private_views[t];
            let ips = running.get(&(svc.tenant_id, svc.name.as_str())).into_iter().flatten();
            view.insert(&name, ips.map(|ip| address_record(name.clone(), params.instance_ttl, *ip)));
        }
        let mut networks: Vec<(Ipv4Net, usize)> =
            data.tenants.iter().enumerate().map(|(i, t)| (t.network, i)).collect();
        networks.sort_by_key(|(n, _)| n.network());
        let private_apex = LowerName::new(&private_apex);
        Self { version: data.version, public, networks, private_views, private_apex, custom }
    }

    /// The private zone as seen from `src`: `None` when the source is in no tenant's network.
    pub fn private_view(&self, src: IpAddr) -> Option<&Zone> {
        let v4: Ipv4Addr = match src.to_canonical() {
            IpAddr::V4(v4) => v4,
            IpAddr::V6(_) => return None,
        };
        let after = self.networks.partition_point(|(n, _)| n.network() <= v4);
        let (net, i) = self.networks.get(after.checked_sub(1)?)?;
        net.contains(&v4).then(|| &self.private_views[*i])
    }

    /// Answers one question. REFUSED for names outside our zones, and for the private zone when asked on the
    /// public listener or from outside every tenant network: the same answer as for a name we know nothing
    /// about, so neither reveals that the private zone exists.
    pub fn answer(&self, listener: Listener, src: IpAddr, name: &LowerName, qtype: RecordType) -> Answer<'_> {
        if self.public.contains(name) {
            return self.public.lookup(name, qtype);
        }
        if self.private_apex.zone_of(name) {
            return match (listener, self.private_view(src)) {
                (Listener::Private, Some(view)) => view.lookup(name, qtype),
                _ => Answer::error(ResponseCode::Refused),
            };
        }
        // The closest enclosing custom zone: a name has at most 127 labels, so this is a bounded walk.
        let mut apex = name.clone();
        loop {
            if let Some(zone) = self.custom.get(&apex) {
                return zone.lookup(name, qtype);
            }
            if apex.is_root() {
                return Answer::error(ResponseCode::Refused);
            }
            apex = apex.base_name();
        }
    }

    /// Records in every zone and private view.
    pub fn record_count(&self) -> usize {
        self.public.record_count()
            + self.private_views.iter().map(Zone::record_count).sum::<usize>()
            + self.custom.values().map(Zone::record_count).sum::<usize>()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use cloud_store::{ZoneInstance, ZoneService, ZoneTenant};

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

    pub(crate) fn data() -> ZoneData {
        let a = Uuid::from_u128(1);
        let b = Uuid::from_u128(2);
        let inst = |tenant_id, name: &str, service: Option<&str>, ip: &str, running| ZoneInstance {
            tenant_id,
            name: name.into(),
            service: service.map(Into::into),
            private_ip: ip.parse().unwrap(),
            running,
        };
        ZoneData {
            version: 42,
            tenants: vec![
                ZoneTenant { id: b, name: "beta".into(), network: "10.96.4.0/22".parse().unwrap() },
                ZoneTenant { id: a, name: "acme".into(), network: "10.96.0.0/22".parse().unwrap() },
            ],
            services: vec![
                ZoneService { tenant_id: a, name: "web".into(), fqdn: "web-abcd1234.dev.cloud.localhost".into() },
                ZoneService { tenant_id: b, name: "idle".into(), fqdn: "idle-zzzz0000.dev.cloud.localhost".into() },
            ],
            domains: vec!["shop.deep.dev.cloud.localhost".into(), "elsewhere.example.com".into()],
            custom_domains: vec!["www.example.org".into(), "org".into()],
            instances: vec![
                inst(a, "web-1", Some("web"), "10.96.0.2", true),
                inst(a, "web-2", Some("web"), "10.96.0.3", false),
                inst(b, "db-1", None, "10.96.4.2", true),
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
        answer.answers.iter().map(|r| r.data.to_string()).collect()
    }

    #[test]
    fn public_names_negative_answers_and_empty_non_terminals() {
        let snap = Snapshot::build(&data(), &params());
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
            assert_eq!(got.answers.len(), *answers, "{q} {t}");
            assert_eq!(got.authorities.len(), *authorities, "{q} {t}");
            if *authorities > 0 {
                assert_eq!(got.authorities[0].ttl, 10, "negative TTL");
                assert_eq!(got.authorities[0].record_type(), RecordType::SOA);
            }
        }
        assert_eq!(ips(&snap.answer(Listener::Public, src, &name("dev.cloud.localhost."), RecordType::SOA)).len(), 1);
    }

    #[test]
    fn private_names_are_scoped_to_the_askers_tenant() {
        let snap = Snapshot::build(&data(), &params());
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
        assert_eq!((idle.rcode, idle.answers.len()), (ResponseCode::NoError, 0), "service without running instances");
        assert_eq!(q(stranger, "web-1.internal.").rcode, ResponseCode::Refused);
        let mapped: IpAddr = "::ffff:10.96.0.5".parse().unwrap();
        assert_eq!(ips(&q(mapped, "web-1.internal.")), ["10.96.0.2"], "v4-mapped source on a dual-stack socket");
        let public = snap.answer(Listener::Public, acme, &name("web-1.internal."), RecordType::A);
        assert_eq!(public.rcode, ResponseCode::Refused);
    }

    #[test]
    fn serial_follows_the_version() {
        let mut d = data();
        let snap = Snapshot::build(&d, &params());
        let soa = |s: &Snapshot| match &s.public.negative_soa.data {
            RData::SOA(soa) => soa.serial,
            _ => unreachable!(),
        };
        assert_eq!(soa(&snap), 42);
        d.version = 43;
        assert_eq!(soa(&Snapshot::build(&d, &params())), 43);
    }
}

#[cfg(test)]
mod scale {
    use std::time::Instant;

    use cloud_store::{ZoneInstance, ZoneService, ZoneTenant};

    use super::*;

    /// Build cost alone, without PostgreSQL: `cargo test -p cloud-dns --lib build_cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement"]
    fn build_cost() {
        let n = 100_000u32;
        let t = Uuid::from_u128(1);
        let data = ZoneData {
            version: 1,
            tenants: vec![ZoneTenant { id: t, name: "acme".into(), network: "10.0.0.0/12".parse().unwrap() }],
            services: (0..n)
                .map(|i| ZoneService {
                    tenant_id: t,
                    name: format!("s{i}"),
                    fqdn: format!("s{i}-abcdefgh.dev.cloud.localhost"),
                })
                .collect(),
            instances: (0..n)
                .map(|i| ZoneInstance {
                    tenant_id: t,
                    name: format!("i{i}"),
                    service: Some(format!("s{i}")),
                    private_ip: IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i + 1)),
                    running: true,
                })
                .collect(),
            ..ZoneData::default()
        };
        let started = Instant::now();
        let snap = Snapshot::build(&data, &tests::params());
        println!("build of {} records: {:?}", snap.record_count(), started.elapsed());
        let only_public = ZoneData { instances: vec![], tenants: vec![], ..data.clone() };
        let started = Instant::now();
        let snap = Snapshot::build(&only_public, &tests::params());
        println!("public zone only, {} records: {:?}", snap.record_count(), started.elapsed());
    }
}
