//! The DNS role against a real PostgreSQL, queried over real UDP and TCP sockets with hickory-proto messages.
//!
//! Private-zone tests need source addresses inside tenant networks; Linux routes all of 127.0.0.0/8 to the
//! loopback interface, so the tenant pool is carved from 127.96.0.0/16 and clients bind to tenant addresses.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use cloud_dns::{DnsConfig, DnsHandle, RateLimit};
use cloud_domain::api::{QuotasPatch, Tenant};
use cloud_domain::state::{InstanceState, RestartPolicy};
use cloud_store::{
    ChangeFeed, NewInstances, NewService, Observation, Settings, Store, ZoneChanges, ZoneDomain, ZonePatch,
};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, UdpSocket};

/// Generous: the CI machine is a busy 2-core box.
const TIMEOUT: Duration = Duration::from_secs(20);
const ZONE: &str = "dev.cloud.localhost";

fn settings() -> Settings {
    Settings { tenant_pool: "127.96.0.0/16".parse().unwrap(), tenant_prefix: 24, ..Settings::default() }
}

fn config() -> DnsConfig {
    DnsConfig {
        public_listen: vec!["127.0.0.1:0".parse().unwrap()],
        private_listen: vec!["127.0.0.1:0".parse().unwrap()],
        edge_addresses: vec!["192.0.2.10".parse().unwrap(), "2001:db8::10".parse().unwrap()],
        rate_limit: None,
        ..DnsConfig::default()
    }
}

struct Fixture {
    store: Store,
    dns: DnsHandle,
    tenant: Tenant,
}

impl Fixture {
    async fn start() -> Self {
        Self::start_with(config()).await
    }

    async fn start_with(config: DnsConfig) -> Self {
        let store = cloud_tests::fresh_store_with(settings()).await;
        let tenant = store.create_tenant("acme", QuotasPatch::default()).await.unwrap();
        let feed = ChangeFeed::start(store.clone()).await.unwrap();
        let dns = cloud_dns::start(store.clone(), feed, config).await.unwrap();
        Self { store, dns, tenant }
    }

    fn public(&self) -> SocketAddr {
        self.dns.public_addrs()[0]
    }

    fn private(&self) -> SocketAddr {
        self.dns.private_addrs()[0]
    }

    /// Waits until everything committed so far is served.
    async fn synced(&self) {
        let v = self.store.current_version().await.unwrap();
        tokio::time::timeout(TIMEOUT, self.dns.wait_for_version(v)).await.expect("the change was never served");
    }
}

async fn service(store: &Store, tenant: &Tenant, name: &str, domains: &[&str]) -> cloud_domain::api::Service {
    let new =
        NewService { domains: domains.iter().map(|d| (d.to_string(), false)).collect(), ..NewService::named(name) };
    store.create_service(tenant.id, new).await.unwrap()
}

/// Creates instances and, for the first `running` of them, records a node observing them running.
async fn instances(
    store: &Store,
    tenant: &Tenant,
    service: Option<&str>,
    names: &[&str],
    running: usize,
) -> Vec<IpAddr> {
    let mut ips = Vec::new();
    for name in names {
        let new = NewInstances {
            image: "hello".into(),
            name: Some(name.to_string()),
            env: Default::default(),
            args: vec![],
            service: service.map(Into::into),
            ports: None,
            replicas: 1,
            restart_policy: RestartPolicy::Never,
            memory_mb: 64,
            port: None,
            start: true,
        };
        let created = store.create_instances(tenant.id, new).await.unwrap();
        ips.push(created.instances[0].private_ip);
    }
    let node = store.register_node("node-1", "127.0.0.1", 1 << 20).await.unwrap();
    store.schedule_pending(Duration::from_secs(60)).await.unwrap();
    let observed = Observation {
        state: InstanceState::Running,
        reason: None,
        exit_code: None,
        boot_time_us: None,
        restart_count: 0,
    };
    for name in &names[..running] {
        let inst = store.instance(tenant.id, name).await.unwrap();
        assert!(store.report(node, inst.id, &observed).await.unwrap(), "{name} assigned to the node");
    }
    ips
}

fn query(name: &str, qtype: RecordType) -> Message {
    let mut m = Message::query();
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    m
}

fn with_edns(mut m: Message, payload: u16) -> Message {
    let mut edns = Edns::new();
    edns.set_max_payload(payload);
    m.set_edns(edns);
    m
}

/// Sends raw bytes over UDP from `src` and returns the raw reply, or `None` after `wait` of silence.
async fn udp_raw(server: SocketAddr, src: IpAddr, bytes: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let sock = UdpSocket::bind(SocketAddr::new(src, 0)).await.unwrap();
    sock.send_to(bytes, server).await.unwrap();
    let mut buf = vec![0u8; 65535];
    match tokio::time::timeout(wait, sock.recv_from(&mut buf)).await {
        Ok(Ok((n, _))) => Some(buf[..n].to_vec()),
        Ok(Err(e)) => panic!("recv: {e}"),
        Err(_) => None,
    }
}

async fn udp_from(server: SocketAddr, src: IpAddr, m: &Message) -> (Message, usize) {
    let raw = udp_raw(server, src, &m.to_vec().unwrap(), TIMEOUT).await.expect("no UDP answer");
    let reply = Message::from_vec(&raw).expect("a decodable reply");
    assert_eq!(reply.metadata.id, m.metadata.id);
    assert_eq!(reply.metadata.message_type, MessageType::Response);
    (reply, raw.len())
}

async fn udp(server: SocketAddr, m: &Message) -> Message {
    udp_from(server, IpAddr::V4(Ipv4Addr::LOCALHOST), m).await.0
}

async fn tcp_raw(server: SocketAddr, src: IpAddr, bytes: &[u8]) -> Vec<u8> {
    let sock = if src.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.unwrap();
    sock.bind(SocketAddr::new(src, 0)).unwrap();
    let mut stream = tokio::time::timeout(TIMEOUT, sock.connect(server)).await.unwrap().unwrap();
    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(bytes);
    stream.write_all(&framed).await.unwrap();
    let mut len = [0u8; 2];
    tokio::time::timeout(TIMEOUT, stream.read_exact(&mut len)).await.unwrap().unwrap();
    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
    tokio::time::timeout(TIMEOUT, stream.read_exact(&mut buf)).await.unwrap().unwrap();
    buf
}

async fn tcp_from(server: SocketAddr, src: IpAddr, m: &Message) -> Message {
    let reply = Message::from_vec(&tcp_raw(server, src, &m.to_vec().unwrap()).await).unwrap();
    assert_eq!(reply.metadata.id, m.metadata.id);
    reply
}

async fn tcp(server: SocketAddr, m: &Message) -> Message {
    tcp_from(server, IpAddr::V4(Ipv4Addr::LOCALHOST), m).await
}

fn addresses(m: &Message) -> Vec<String> {
    let mut v: Vec<String> = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.to_string()),
            RData::AAAA(a) => Some(a.to_string()),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

fn soa_serial(m: &Message) -> u32 {
    m.answers
        .iter()
        .chain(&m.authorities)
        .find_map(|r| match &r.data {
            RData::SOA(soa) => Some(soa.serial),
            _ => None,
        })
        .expect("an SOA")
}

/// A negative answer: the rcode, no answers, and the zone's SOA in the authority section with the negative TTL.
fn assert_negative(m: &Message, rcode: ResponseCode, apex: &str) {
    assert_eq!(m.metadata.response_code, rcode);
    assert!(m.metadata.authoritative, "AA on negative answers");
    assert!(m.answers.is_empty());
    assert_eq!(m.authorities.len(), 1, "{m:?}");
    let soa = &m.authorities[0];
    assert_eq!(soa.record_type(), RecordType::SOA);
    assert_eq!(soa.name, Name::from_ascii(apex).unwrap());
    assert_eq!(soa.ttl, 10, "negative TTL");
    match &soa.data {
        RData::SOA(s) => assert_eq!(s.minimum, 10),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn public_names_with_correct_flags_over_udp_and_tcp() {
    let f = Fixture::start().await;
    let s = service(&f.store, &f.tenant, "web", &[&format!("shop.{ZONE}")]).await;
    f.synced().await;
    let fqdn = format!("{}.", s.fqdn);

    for reply in
        [udp(f.public(), &query(&fqdn, RecordType::A)).await, tcp(f.public(), &query(&fqdn, RecordType::A)).await]
    {
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
        assert!(reply.metadata.authoritative);
        assert!(!reply.metadata.recursion_available);
        assert_eq!(addresses(&reply), ["192.0.2.10"]);
        assert_eq!(reply.answers[0].ttl, 60);
    }
    let aaaa = udp(f.public(), &query(&fqdn, RecordType::AAAA)).await;
    assert_eq!(addresses(&aaaa), ["2001:db8::10"]);
    // Case-insensitive: the question comes back as asked, the answer is found.
    let shouted = udp(f.public(), &query(&fqdn.to_uppercase(), RecordType::A)).await;
    assert_eq!(addresses(&shouted), ["192.0.2.10"]);
    assert_eq!(shouted.queries[0].name.to_ascii(), fqdn.to_uppercase());
    let domain = udp(f.public(), &query(&format!("SHOP.{ZONE}."), RecordType::A)).await;
    assert_eq!(addresses(&domain), ["192.0.2.10"], "verified platform subdomain");

    let apex = format!("{ZONE}.");
    let soa = udp(f.public(), &query(&apex, RecordType::SOA)).await;
    assert!(soa.metadata.authoritative);
    assert_eq!(i64::from(soa_serial(&soa)), f.dns.serial());
    let ns = udp(f.public(), &query(&apex, RecordType::NS)).await;
    assert_eq!(ns.answers.len(), 1);
    assert_eq!(ns.answers[0].data.to_string(), format!("ns1.{ZONE}."));

    let nx = udp(f.public(), &query(&format!("nope.{ZONE}."), RecordType::A)).await;
    assert_negative(&nx, ResponseCode::NXDomain, &apex);
    let nodata = tcp(f.public(), &query(&fqdn, RecordType::MX)).await;
    assert_negative(&nodata, ResponseCode::NoError, &apex);

    for outside in ["example.com.", "cloud.localhost.", "internal.", "web.internal.", "www.example.org."] {
        for reply in [
            udp(f.public(), &query(outside, RecordType::A)).await,
            tcp(f.public(), &query(outside, RecordType::A)).await,
        ] {
            assert_eq!(reply.metadata.response_code, ResponseCode::Refused, "{outside}");
            assert!(!reply.metadata.authoritative);
            assert!(reply.answers.is_empty() && reply.authorities.is_empty());
        }
    }
    f.dns.shutdown().await;
}

#[tokio::test]
async fn a_verified_custom_domain_is_served_as_its_own_zone() {
    let f = Fixture::start().await;
    let new = NewService { domains: vec![("www.example.org".into(), true)], ..NewService::named("shop") };
    f.store.create_service(f.tenant.id, new).await.unwrap();
    f.synced().await;
    let www = "www.example.org.";
    assert_eq!(
        udp(f.public(), &query(www, RecordType::A)).await.metadata.response_code,
        ResponseCode::Refused,
        "unverified"
    );

    // Verification is the certificate role's job; record it as it does, with the change-feed event the DNS
    // follows (a change made behind the feed's back would wait for the periodic resync).
    let pending = f.store.service_domain(f.tenant.id, "shop", "www.example.org").await.unwrap();
    f.store.mark_domain_verified(pending.id).await.unwrap();
    f.store.put_acme_challenge("_acme-challenge.www.example.org", "custom-token").await.unwrap();
    f.synced().await;
    let a = udp(f.public(), &query(www, RecordType::A)).await;
    assert!(a.metadata.authoritative);
    assert_eq!(addresses(&a), ["192.0.2.10"]);
    let soa = tcp(f.public(), &query(www, RecordType::SOA)).await;
    assert_eq!(i64::from(soa_serial(&soa)), f.dns.serial());
    let txt = udp(f.public(), &query("_acme-challenge.www.example.org.", RecordType::TXT)).await;
    assert_eq!(txt.answers[0].data.to_string(), "custom-token");
    assert_negative(
        &udp(f.public(), &query("nope.www.example.org.", RecordType::A)).await,
        ResponseCode::NXDomain,
        www,
    );
    assert_eq!(
        udp(f.public(), &query("example.org.", RecordType::A)).await.metadata.response_code,
        ResponseCode::Refused
    );
    f.dns.shutdown().await;
}

#[tokio::test]
async fn edns_is_echoed_and_large_answers_truncate_over_udp_but_not_tcp() {
    let f = Fixture::start().await;
    let name = format!("_acme-challenge.big.{ZONE}");
    for i in 0..20 {
        f.store.put_acme_challenge(&name, &format!("{i:02}{}", "x".repeat(180))).await.unwrap();
    }
    f.synced().await;
    let q = format!("{name}.");

    // Without EDNS: at most 512 bytes, TC set.
    let (plain, len) = udp_from(f.public(), IpAddr::V4(Ipv4Addr::LOCALHOST), &query(&q, RecordType::TXT)).await;
    assert!(len <= 512, "{len}");
    assert!(plain.metadata.truncation);
    assert!(plain.edns.is_none(), "no OPT when the query had none");

    // EDNS with 4096: the OPT comes back, and the response stays within our 1232-byte cap.
    let (big, len) =
        udp_from(f.public(), IpAddr::V4(Ipv4Addr::LOCALHOST), &with_edns(query(&q, RecordType::TXT), 4096)).await;
    assert!(len <= 1232, "{len}");
    assert!(big.metadata.truncation);
    assert_eq!(big.edns.as_ref().expect("OPT echoed").max_payload(), 1232);

    // A small answer with EDNS 512 fits and is not truncated.
    let small = udp(f.public(), &with_edns(query(&format!("{ZONE}."), RecordType::SOA), 512)).await;
    assert!(!small.metadata.truncation);
    assert_eq!(small.edns.as_ref().expect("OPT echoed").max_payload(), 512);

    // TCP carries the whole answer.
    let full = tcp(f.public(), &query(&q, RecordType::TXT)).await;
    assert!(!full.metadata.truncation);
    assert_eq!(full.answers.len(), 20);
    assert!(full.metadata.authoritative);

    // An EDNS version we do not speak: BADVERS, with an OPT.
    let mut v1 = with_edns(query(&q, RecordType::TXT), 1232);
    v1.edns.as_mut().unwrap().set_version(1);
    let badvers = udp(f.public(), &v1).await;
    // Code 16 is BADVERS with an OPT (hickory's decoder names it BADSIG, which shares the number).
    assert_eq!(u16::from(badvers.metadata.response_code), 16);
    assert!(badvers.edns.is_some());
    f.dns.shutdown().await;
}

#[tokio::test]
async fn changes_are_served_quickly_and_the_serial_increments() {
    let f = Fixture::start().await;
    let apex = format!("{ZONE}.");
    let serial0 = soa_serial(&udp(f.public(), &query(&apex, RecordType::SOA)).await);

    let created = Instant::now();
    let s = service(&f.store, &f.tenant, "web", &[]).await;
    let fqdn = format!("{}.", s.fqdn);
    f.synced().await;
    let appeared = created.elapsed();
    let reply = udp(f.public(), &query(&fqdn, RecordType::A)).await;
    assert_eq!(addresses(&reply), ["192.0.2.10"]);
    // The feed is LISTEN/NOTIFY: milliseconds in practice; a second is the promise, with room for a busy machine.
    assert!(appeared < Duration::from_secs(5), "service served after {appeared:?}");
    let serial1 = soa_serial(&udp(f.public(), &query(&apex, RecordType::SOA)).await);
    assert!(serial1 > serial0, "{serial1} > {serial0}");

    let challenge = format!("_acme-challenge.web.{ZONE}");
    f.store.put_acme_challenge(&challenge, "token-1").await.unwrap();
    f.synced().await;
    let txt = udp(f.public(), &query(&format!("{challenge}."), RecordType::TXT)).await;
    assert_eq!(txt.answers.len(), 1);
    assert_eq!(txt.answers[0].data.to_string(), "token-1");
    assert_eq!(txt.answers[0].ttl, 5);
    let serial2 = soa_serial(&udp(f.public(), &query(&apex, RecordType::SOA)).await);
    assert!(serial2 > serial1);

    f.store.remove_acme_challenge(&challenge, "token-1").await.unwrap();
    f.store.delete_service(f.tenant.id, "web", true).await.unwrap();
    f.synced().await;
    let gone = udp(f.public(), &query(&format!("{challenge}."), RecordType::TXT)).await;
    assert_negative(&gone, ResponseCode::NXDomain, &apex);
    let gone = udp(f.public(), &query(&fqdn, RecordType::A)).await;
    assert_negative(&gone, ResponseCode::NXDomain, &apex);
    assert!(soa_serial(&gone) > serial2);
    f.dns.shutdown().await;
}

#[tokio::test]
async fn private_names_are_answered_per_tenant_on_the_private_listener_only() {
    let f = Fixture::start().await;
    let beta = f.store.create_tenant("beta", QuotasPatch::default()).await.unwrap();
    service(&f.store, &f.tenant, "web", &[]).await;
    let acme_ips = instances(&f.store, &f.tenant, Some("web"), &["web-1", "web-2"], 1).await;
    let beta_ips = instances(&f.store, &beta, None, &["db-1"], 0).await;
    f.synced().await;
    let (acme_src, beta_src) = (acme_ips[0], beta_ips[0]);

    let ask = |src, name: &str| {
        let m = query(name, RecordType::A);
        let server = f.private();
        async move { udp_from(server, src, &m).await.0 }
    };
    assert_eq!(addresses(&ask(acme_src, "web-1.internal.").await), [acme_ips[0].to_string()]);
    assert_eq!(addresses(&ask(acme_src, "WEB-2.acme.internal.").await), [acme_ips[1].to_string()]);
    let svc = ask(acme_src, "web.internal.").await;
    assert_eq!(addresses(&svc), [acme_ips[0].to_string()], "only running instances");
    assert!(svc.metadata.authoritative);
    assert_eq!(svc.answers[0].ttl, 5, "short TTL for instance records");
    let over_tcp = tcp_from(f.private(), acme_src, &query("web-2.internal.", RecordType::A)).await;
    assert_eq!(addresses(&over_tcp), [acme_ips[1].to_string()]);
    // The public zone is answered on the private listener too.
    let public = udp_from(f.private(), acme_src, &query(&format!("{ZONE}."), RecordType::SOA)).await.0;
    assert_eq!(public.metadata.response_code, ResponseCode::NoError);

    // Tenant B sees none of A's names: exactly what a name that does not exist gets.
    for name in ["web-1.internal.", "web.internal.", "web-1.acme.internal.", "nothing.internal."] {
        assert_negative(&ask(beta_src, name).await, ResponseCode::NXDomain, "internal.");
    }
    assert_eq!(addresses(&ask(beta_src, "db-1.internal.").await), [beta_ips[0].to_string()]);
    assert_eq!(addresses(&ask(beta_src, "db-1.beta.internal.").await), [beta_ips[0].to_string()]);
    assert_negative(&ask(acme_src, "db-1.internal.").await, ResponseCode::NXDomain, "internal.");
    let nodata = udp_from(f.private(), acme_src, &query("web-1.internal.", RecordType::AAAA)).await.0;
    assert_negative(&nodata, ResponseCode::NoError, "internal.");

    // Outside every tenant network, and on the public listener, the private zone does not exist for you.
    let stranger = IpAddr::V4(Ipv4Addr::LOCALHOST);
    assert_eq!(ask(stranger, "web-1.internal.").await.metadata.response_code, ResponseCode::Refused);
    let leaked = udp_from(f.public(), acme_src, &query("web-1.internal.", RecordType::A)).await.0;
    assert_eq!(leaked.metadata.response_code, ResponseCode::Refused);
    assert!(leaked.answers.is_empty());
    f.dns.shutdown().await;
}

#[tokio::test]
async fn the_last_snapshot_is_served_while_postgresql_is_unreachable() {
    let url = cloud_tests::fresh_database().await;
    let store = Store::new(cloud_store::connect(&url, 4).await.unwrap(), settings());
    store.migrate().await.unwrap();
    // The DNS role gets its own pool, which the test closes: its loads fail from then on, as in an outage.
    let dns_store = Store::new(cloud_store::connect(&url, 2).await.unwrap(), settings());
    let tenant = store.create_tenant("acme", QuotasPatch::default()).await.unwrap();
    let before = service(&store, &tenant, "before", &[]).await;
    let feed = ChangeFeed::start(store.clone()).await.unwrap();
    let config = DnsConfig {
        resync_interval: Duration::from_millis(200),
        retry_interval: Duration::from_millis(50),
        ..config()
    };
    let dns = cloud_dns::start(dns_store.clone(), feed, config).await.unwrap();
    let served = dns.serial();

    dns_store.pool().close().await;
    let after = service(&store, &tenant, "after", &[]).await;
    let deadline = Instant::now() + TIMEOUT;
    // No signal exists for "a load failed" other than the handle's state; poll it briefly.
    while !dns.is_stale() {
        assert!(Instant::now() < deadline, "the failed reload was never noticed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let server = dns.public_addrs()[0];
    let old = udp(server, &query(&format!("{}.", before.fqdn), RecordType::A)).await;
    assert_eq!(addresses(&old), ["192.0.2.10"], "the last snapshot keeps answering");
    let new = tcp(server, &query(&format!("{}.", after.fqdn), RecordType::A)).await;
    assert_eq!(new.metadata.response_code, ResponseCode::NXDomain, "nothing newer than the last snapshot");
    assert_eq!(dns.serial(), served);
    // The feed's move may fail first as a patch; the periodic resync then fails as a full load, and says so.
    let mut metrics = dns.metrics_text();
    while !metrics.contains("dns_snapshot_loads_total{result=\"error\"}") {
        assert!(Instant::now() < deadline, "the failed full load was never counted: {metrics}");
        tokio::time::sleep(Duration::from_millis(10)).await;
        metrics = dns.metrics_text();
    }
    assert!(metrics.contains("dns_snapshot_stale 1"), "{metrics}");
    assert_eq!(dns.serial(), served);
    dns.shutdown().await;
}

#[tokio::test]
async fn rate_limit_slips_and_drops_udp_but_tcp_still_answers() {
    let limit = RateLimit { responses_per_second: 0.5, burst: 5, slip: 2 };
    let f = Fixture::start_with(DnsConfig { rate_limit: Some(limit), ..config() }).await;
    let name = format!("{ZONE}.");
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let sent = 20;
    for _ in 0..sent {
        sock.send_to(&query(&name, RecordType::SOA).to_vec().unwrap(), f.public()).await.unwrap();
    }
    let (mut full, mut truncated) = (0, 0);
    let mut buf = vec![0u8; 4096];
    // Dropped responses leave no trace: stop after a quiet second once the expected minimum has arrived.
    loop {
        let wait = if full + truncated >= 5 { Duration::from_secs(1) } else { TIMEOUT };
        let Ok(Ok((n, _))) = tokio::time::timeout(wait, sock.recv_from(&mut buf)).await else { break };
        let m = Message::from_vec(&buf[..n]).unwrap();
        if m.metadata.truncation {
            assert!(m.answers.is_empty());
            truncated += 1;
        } else {
            assert_eq!(m.answers.len(), 1);
            full += 1;
        }
    }
    // 5 from the burst (perhaps one refilled token more on a slow machine); half of the rest slip as TC.
    assert!((5..=7).contains(&full), "full {full}");
    assert!(truncated >= 6, "truncated {truncated}");
    assert!(full + truncated < sent, "some responses dropped");
    let over_tcp = tcp(f.public(), &query(&name, RecordType::SOA)).await;
    assert_eq!(over_tcp.answers.len(), 1, "TCP is not rate limited");
    let metrics = f.dns.metrics_text();
    assert!(metrics.contains("dns_rate_limited_total{action=\"dropped\"}"), "{metrics}");
    assert!(metrics.contains("dns_rate_limited_total{action=\"truncated\"}"), "{metrics}");
    f.dns.shutdown().await;
}

fn header(id: u16, flags: u16, counts: [u16; 4]) -> Vec<u8> {
    let mut h = id.to_be_bytes().to_vec();
    h.extend_from_slice(&flags.to_be_bytes());
    for c in counts {
        h.extend_from_slice(&c.to_be_bytes());
    }
    h
}

fn rcode_of(raw: &[u8]) -> ResponseCode {
    ResponseCode::from_low(raw[3] & 0x0f)
}

#[tokio::test]
async fn bad_input_gets_an_error_or_silence_never_a_crash() {
    let f = Fixture::start().await;
    let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let quiet = Duration::from_millis(300);
    let server = f.public();

    // Shorter than a header: nothing to answer.
    assert_eq!(udp_raw(server, lo, &[0x12, 0x34, 0x01], quiet).await, None);
    // A header claiming 65535 questions and carrying none: FORMERR.
    let raw = udp_raw(server, lo, &header(7, 0x0000, [u16::MAX, 0, 0, 0]), TIMEOUT).await.expect("FORMERR");
    assert_eq!(rcode_of(&raw), ResponseCode::FormErr);
    // Huge counts in every section after a valid question.
    let mut huge = query(&format!("{ZONE}."), RecordType::A).to_vec().unwrap();
    huge[6..12].copy_from_slice(&[0xff; 6]);
    assert_eq!(rcode_of(&udp_raw(server, lo, &huge, TIMEOUT).await.expect("FORMERR")), ResponseCode::FormErr);
    // A truncated question.
    let whole = query(&format!("{ZONE}."), RecordType::A).to_vec().unwrap();
    assert_eq!(
        rcode_of(&udp_raw(server, lo, &whole[..whole.len() - 3], TIMEOUT).await.unwrap()),
        ResponseCode::FormErr
    );
    // A response sent to us is never answered (reflection loops).
    let mut response = query(&format!("{ZONE}."), RecordType::A);
    response.metadata.message_type = MessageType::Response;
    assert_eq!(udp_raw(server, lo, &response.to_vec().unwrap(), quiet).await, None);
    // No question at all, two questions: FORMERR.
    let empty = Message::query();
    assert_eq!(udp(server, &empty).await.metadata.response_code, ResponseCode::FormErr);
    let mut two = query(&format!("{ZONE}."), RecordType::A);
    two.add_query(Query::query(Name::from_ascii("example.com.").unwrap(), RecordType::A));
    assert_eq!(udp(server, &two).await.metadata.response_code, ResponseCode::FormErr);
    // Opcodes other than QUERY: NOTIMP.
    for op in [OpCode::Status, OpCode::Notify, OpCode::Update] {
        let mut m = query(&format!("{ZONE}."), RecordType::SOA);
        m.metadata.op_code = op;
        assert_eq!(udp(server, &m).await.metadata.response_code, ResponseCode::NotImp, "{op:?}");
    }
    // Other classes are not ours; zone transfers are refused; MAILB is not implemented; OPT as a question is malformed.
    let mut chaos = query("version.bind.", RecordType::TXT);
    chaos.queries[0].query_class = DNSClass::CH;
    assert_eq!(udp(server, &chaos).await.metadata.response_code, ResponseCode::Refused);
    let mut chaos_ours = query(&format!("{ZONE}."), RecordType::SOA);
    chaos_ours.queries[0].query_class = DNSClass::CH;
    assert_eq!(udp(server, &chaos_ours).await.metadata.response_code, ResponseCode::Refused);
    assert_eq!(
        tcp(server, &query(&format!("{ZONE}."), RecordType::AXFR)).await.metadata.response_code,
        ResponseCode::Refused
    );
    assert_eq!(
        udp(server, &query(&format!("{ZONE}."), RecordType::Unknown(253))).await.metadata.response_code,
        ResponseCode::NotImp
    );
    assert_eq!(
        udp(server, &query(&format!("{ZONE}."), RecordType::OPT)).await.metadata.response_code,
        ResponseCode::FormErr
    );
    // Odd but valid types inside the zone are NODATA.
    let odd = udp(server, &query(&format!("{ZONE}."), RecordType::Unknown(65000))).await;
    assert_negative(&odd, ResponseCode::NoError, &format!("{ZONE}."));

    // TCP: a frame announcing more than is sent, then a hang-up; and garbage after a valid frame.
    let mut stream = tokio::net::TcpStream::connect(server).await.unwrap();
    stream.write_all(&[0xff, 0xff, 1, 2, 3]).await.unwrap();
    drop(stream);
    let mut stream = tokio::net::TcpStream::connect(server).await.unwrap();
    stream.write_all(&[0x00, 0x03, 1, 2, 3]).await.unwrap();
    drop(stream);

    // Random garbage over UDP from a fixed seed, then the server still answers.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for _ in 0..500 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let len = (state % 300) as usize;
        let bytes: Vec<u8> = (0..len).map(|i| (state >> (i % 8 * 8)) as u8 ^ i as u8).collect();
        sock.send_to(&bytes, server).await.unwrap();
    }
    let alive = tcp(server, &query(&format!("{ZONE}."), RecordType::SOA)).await;
    assert_eq!(alive.answers.len(), 1);
    let alive = udp(server, &query(&format!("{ZONE}."), RecordType::SOA)).await;
    assert_eq!(alive.answers.len(), 1);

    let metrics = f.dns.metrics_text();
    assert!(metrics.contains("dns_queries_total{listener=\"public\",qtype=\"SOA\",rcode=\"NOERROR\"}"), "{metrics}");
    assert!(metrics.contains("dns_query_duration_seconds_bucket{listener=\"public\""), "{metrics}");
    f.dns.shutdown().await;
}

/// The value of one series in a Prometheus text exposition (0 when absent).
fn metric(text: &str, series: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(series)?.trim().parse().ok()).unwrap_or(0.0)
}

#[tokio::test]
async fn with_many_names_loaded_a_change_is_patched_in_not_rebuilt() {
    let names = 20_000i64;
    let store = cloud_tests::fresh_store_with(settings()).await;
    let quotas = QuotasPatch { max_services: Some(names as u32 + 10), ..QuotasPatch::default() };
    let tenant = store.create_tenant("acme", quotas).await.unwrap();
    // Written behind the change feed's back before the DNS starts: only the initial full load sees them.
    cloud_tests::insert_services(&store, tenant.id, names, "abcdefgh.dev.cloud.localhost").await.unwrap();
    let feed = ChangeFeed::start(store.clone()).await.unwrap();
    // No periodic resync during the test: any full load would be the change itself.
    let config = DnsConfig { resync_interval: Duration::from_secs(3600), ..config() };
    let dns = cloud_dns::start(store.clone(), feed, config).await.unwrap();
    let server = dns.public_addrs()[0];
    let loaded = dns.metrics_text();
    assert_eq!(metric(&loaded, "dns_snapshot_loads_total{result=\"ok\"}"), 1.0, "{loaded}");
    let records = metric(&loaded, "dns_zone_records");
    assert!(records > 2.0 * names as f64, "{loaded}");

    let changed = Instant::now();
    let late = service(&store, &tenant, "late", &[]).await;
    let version = store.current_version().await.unwrap();
    tokio::time::timeout(TIMEOUT, dns.wait_for_version(version)).await.expect("the change was never served");
    let served_after = changed.elapsed();
    let reply = udp(server, &query(&format!("{}.", late.fqdn), RecordType::A)).await;
    assert_eq!(addresses(&reply), ["192.0.2.10"]);
    assert_eq!(i64::from(soa_serial(&udp(server, &query(&format!("{ZONE}."), RecordType::SOA)).await)), version);
    let old = udp(server, &query("s20000-abcdefgh.dev.cloud.localhost.", RecordType::AAAA)).await;
    assert_eq!(addresses(&old), ["2001:db8::10"], "the names loaded before are still served");

    let after = dns.metrics_text();
    assert_eq!(metric(&after, "dns_snapshot_loads_total{result=\"ok\"}"), 1.0, "no full rebuild: {after}");
    assert!(metric(&after, "dns_snapshot_patches_total{result=\"ok\"}") >= 1.0, "{after}");
    assert_eq!(metric(&after, "dns_zone_records"), records + 2.0, "A and AAAA of the new service: {after}");
    assert_eq!(metric(&after, "dns_zone_serial"), version as f64);
    println!("with {names} services loaded, a new service was served {served_after:?} after its creation began");
    dns.shutdown().await;
}

#[tokio::test]
async fn zone_changes_returns_what_the_events_after_a_version_touched() {
    let store = cloud_tests::fresh_store_with(settings()).await;
    let tenant = store.create_tenant("acme", QuotasPatch::default()).await.unwrap();
    let since = store.current_version().await.unwrap();
    let web = service(&store, &tenant, "web", &[&format!("shop.{ZONE}")]).await;
    let ips = instances(&store, &tenant, Some("web"), &["web-1"], 1).await;
    let instance = store.instance(tenant.id, "web-1").await.unwrap();
    let challenge = format!("_acme-challenge.web.{ZONE}");
    store.put_acme_challenge(&challenge, "token-1").await.unwrap();

    let ZoneChanges::Patch(patch) = store.zone_changes(since).await.unwrap() else { panic!("a patch expected") };
    assert_eq!(patch.version, store.current_version().await.unwrap());
    assert!(patch.tenants.is_empty() && patch.gone_tenants.is_empty(), "{patch:?}");
    let [svc] = patch.services.as_slice() else { panic!("{patch:?}") };
    assert_eq!(
        (svc.id, svc.tenant_id, svc.name.as_str(), svc.fqdn.as_str()),
        (web.id, tenant.id, "web", web.fqdn.as_str())
    );
    assert_eq!(svc.domains, [ZoneDomain { name: format!("shop.{ZONE}"), custom: false }]);
    let [inst] = patch.instances.as_slice() else { panic!("{patch:?}") };
    assert_eq!((inst.id, inst.service_id, inst.private_ip, inst.running), (instance.id, Some(web.id), ips[0], true));
    assert_eq!(patch.acme_challenges, [(challenge.clone(), vec!["token-1".to_owned()])]);
    assert!(patch.gone_services.is_empty() && patch.gone_instances.is_empty());

    let ZoneChanges::Patch(nothing) = store.zone_changes(patch.version).await.unwrap() else { panic!() };
    assert_eq!(nothing, ZonePatch { version: patch.version, ..ZonePatch::default() });

    store.delete_service(tenant.id, "web", true).await.unwrap();
    store.remove_acme_challenge(&challenge, "token-1").await.unwrap();
    let ZoneChanges::Patch(gone) = store.zone_changes(patch.version).await.unwrap() else { panic!() };
    assert_eq!(gone.gone_services, [web.id]);
    assert_eq!(gone.gone_instances, [instance.id]);
    assert_eq!(gone.acme_challenges, [(challenge, vec![])]);
    assert!(gone.services.is_empty() && gone.instances.is_empty());

    // A version the database never reached (it was restored from an older backup): everything again.
    assert!(matches!(store.zone_changes(gone.version + 1000).await.unwrap(), ZoneChanges::Reload(_)));
    // Past 10k events one full read is cheaper than the patch; these events touch nothing the DNS serves.
    sqlx::query(
        "SELECT record_event(NULL, 'image', gen_random_uuid(), 'updated', '{}'::jsonb) FROM generate_series(1, 10001)",
    )
    .execute(store.pool())
    .await
    .unwrap();
    let ZoneChanges::Reload(data) = store.zone_changes(gone.version).await.unwrap() else {
        panic!("a reload expected")
    };
    assert_eq!(data.version, store.current_version().await.unwrap());
    assert_eq!(data.tenants.len(), 1);
}

#[tokio::test]
async fn resyncs_run_beside_patches_fix_drift_and_never_take_the_serial_back() {
    let store = cloud_tests::fresh_store_with(settings()).await;
    let quotas = QuotasPatch { max_services: Some(5_100), ..QuotasPatch::default() };
    let tenant = store.create_tenant("acme", quotas).await.unwrap();
    // Enough names that a full build takes a while, so patches land while resyncs are being built.
    cloud_tests::insert_services(&store, tenant.id, 5000, "abcdefgh.dev.cloud.localhost").await.unwrap();
    let feed = ChangeFeed::start(store.clone()).await.unwrap();
    let config = DnsConfig { resync_interval: Duration::from_millis(100), ..config() };
    let dns = cloud_dns::start(store.clone(), feed, config).await.unwrap();
    let server = dns.public_addrs()[0];
    let mut versions = dns.served_versions();
    let watcher = tokio::spawn(async move {
        let mut last = *versions.borrow_and_update();
        while versions.changed().await.is_ok() {
            let v = *versions.borrow_and_update();
            assert!(v >= last, "the served version went back from {last} to {v}");
            last = v;
        }
    });

    for i in 0..20 {
        let s = service(&store, &tenant, &format!("late{i}"), &[]).await;
        let version = store.current_version().await.unwrap();
        tokio::time::timeout(TIMEOUT, dns.wait_for_version(version)).await.expect("the change was never served");
        let reply = udp(server, &query(&format!("{}.", s.fqdn), RecordType::A)).await;
        assert_eq!(addresses(&reply), ["192.0.2.10"], "{}", s.fqdn);
    }

    // A row written behind the feed's back (no event) is what the resync is for: the next full load serves it.
    sqlx::query("INSERT INTO services (id, tenant_id, name, fqdn) VALUES (gen_random_uuid(), $1, 'hidden', $2)")
        .bind(tenant.id)
        .bind(format!("hidden-00000000.{ZONE}"))
        .execute(store.pool())
        .await
        .unwrap();
    let loads = |dns: &DnsHandle| metric(&dns.metrics_text(), "dns_snapshot_loads_total{result=\"ok\"}");
    // A load that started before the insert may finish after it: wait for two more.
    let wanted = loads(&dns) + 2.0;
    let deadline = Instant::now() + TIMEOUT;
    // The metric is the only sign of a finished resync that changed no version; poll it.
    while loads(&dns) < wanted {
        assert!(Instant::now() < deadline, "no resync finished");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let hidden = udp(server, &query(&format!("hidden-00000000.{ZONE}."), RecordType::A)).await;
    assert_eq!(addresses(&hidden), ["192.0.2.10"]);
    assert!(metric(&dns.metrics_text(), "dns_snapshot_patches_total{result=\"ok\"}") >= 1.0);
    dns.shutdown().await;
    watcher.await.expect("the served version never went back");
}
