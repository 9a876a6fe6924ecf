//! The route table: host -> service, raw TCP port -> service, and each service's ports, limits and backends.
//!
//! A table is immutable once built; the edge swaps whole tables atomically. Applying a change copies the maps
//! (their values are shared `Arc`s, so the copy is cheap per entry) and replaces only the touched services.
//! Backends keep their balancing state (in-flight count, health) across tables: a service that is replaced
//! reuses the `Arc<Backend>` of every instance it still has.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use cloud_domain::ports::{Handler, PortMapping};
use cloud_store::{RouteData, ServiceRoute};
use uuid::Uuid;

use crate::metrics::{Metrics, ServiceMetrics};

/// A routable service.
#[derive(Debug)]
pub struct Service {
    /// Service id.
    pub id: Uuid,
    /// Owning tenant.
    pub tenant_id: Uuid,
    /// Name (logs, metrics).
    pub name: String,
    /// Public FQDN.
    pub fqdn: String,
    /// Hosts routed here: the FQDN and verified domains, lower case.
    pub hosts: Vec<Arc<str>>,
    /// Public port mappings.
    pub ports: Vec<PortMapping>,
    /// Soft per-instance limit (in-flight requests or connections).
    pub soft_limit: Option<u32>,
    /// Hard per-instance limit: past it, refuse.
    pub hard_limit: Option<u32>,
    /// Idle seconds before the platform stops the instances; a request wakes them.
    pub scale_to_zero_after: Option<u32>,
    /// Running instances.
    pub backends: Vec<Arc<Backend>>,
    /// Instances on their way to running: a request finding no backend waits for them rather than failing.
    pub starting: u32,
    /// When a request last restarted the idle clock in the database (on the health marks' clock; 0: never).
    pub(crate) last_touch_ms: AtomicU64,
    /// Its metric handles, resolved at its first request and carried into later tables.
    pub(crate) metric_handles: OnceLock<Arc<ServiceMetrics>>,
}

impl Service {
    /// The mapping for a public port.
    pub fn port(&self, port: u16) -> Option<&PortMapping> {
        self.ports.iter().find(|p| p.port == port)
    }

    /// Its per-service metric handles (looked up by label once, not per request).
    pub(crate) fn metrics(&self, all: &Metrics) -> &ServiceMetrics {
        self.metric_handles.get_or_init(|| Arc::new(ServiceMetrics::new(all, &self.fqdn)))
    }

    /// Whether the idle clock is due for a restart: at most once a second per service and edge, whichever core
    /// the request came to.
    pub(crate) fn touch_due(&self) -> bool {
        let now = now_ms();
        let last = self.last_touch_ms.load(Ordering::Relaxed);
        (last == 0 || now.saturating_sub(last) >= 1000)
            && self.last_touch_ms.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    }
}

/// A running instance and its balancing state.
#[derive(Debug)]
pub struct Backend {
    /// Instance id.
    pub id: Uuid,
    /// Instance name.
    pub name: String,
    /// Private IP.
    pub ip: IpAddr,
    in_flight: AtomicU32,
    /// Milliseconds since [`epoch`] until which the backend is considered down (0: up).
    down_until_ms: AtomicU64,
}

/// The clock health marks are kept on.
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64 + 1
}

impl Backend {
    /// A backend with nothing in flight, up.
    pub fn new(id: Uuid, name: String, ip: IpAddr) -> Self {
        Self { id, name, ip, in_flight: AtomicU32::new(0), down_until_ms: AtomicU64::new(0) }
    }

    /// Requests or connections in flight now.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Whether a failed check or connect marked it down and the mark has not expired.
    pub fn is_down(&self) -> bool {
        let until = self.down_until_ms.load(Ordering::Relaxed);
        until != 0 && now_ms() < until
    }

    /// Marks it down for `window` (a failed connect or health check).
    pub fn mark_down(&self, window: Duration) {
        self.down_until_ms.store(now_ms() + window.as_millis() as u64, Ordering::Relaxed);
    }

    /// Marks it up (a successful health check).
    pub fn mark_up(&self) {
        self.down_until_ms.store(0, Ordering::Relaxed);
    }
}

/// Counts one request or connection on a backend for as long as it lives.
#[derive(Debug)]
pub struct InFlight(Arc<Backend>);

impl InFlight {
    /// The backend counted.
    pub fn backend(&self) -> &Arc<Backend> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The outcome of choosing a backend.
#[derive(Debug)]
pub enum Pick {
    /// Use this backend; the guard counts the request.
    Backend(InFlight),
    /// The service has no running instance (left to try).
    NoBackend,
    /// Every candidate is at its hard limit.
    Overloaded,
}

impl Service {
    /// Least in-flight among healthy instances not in `tried`, random among equals; instances marked down are
    /// used only when no healthy one is left (a stale mark beats refusing). Past the hard limit: `Overloaded`.
    pub fn pick(&self, tried: &[Uuid]) -> Pick {
        let candidates = || self.backends.iter().filter(|b| !tried.contains(&b.id));
        let healthy = candidates().any(|b| !b.is_down());
        let mut best: Option<&Arc<Backend>> = None;
        let mut best_load = u32::MAX;
        let mut ties = 0u32;
        for b in candidates().filter(|b| !healthy || !b.is_down()) {
            let load = b.in_flight();
            if load < best_load {
                best = Some(b);
                best_load = load;
                ties = 1;
            } else if load == best_load {
                // Reservoir sampling: each of the equally loaded is kept with equal probability.
                ties += 1;
                if rand::random_range(0..ties) == 0 {
                    best = Some(b);
                }
            }
        }
        let Some(best) = best else { return Pick::NoBackend };
        if self.hard_limit.is_some_and(|hard| best_load >= hard) {
            return Pick::Overloaded;
        }
        best.in_flight.fetch_add(1, Ordering::Relaxed);
        Pick::Backend(InFlight(best.clone()))
    }
}

/// What the edge routes, as of a change-feed version.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    /// The newest change included.
    pub version: i64,
    services: HashMap<Uuid, Arc<Service>>,
    hosts: HashMap<Arc<str>, Arc<Service>>,
    tcp_ports: HashMap<u16, Arc<Service>>,
}

impl RouteTable {
    /// Builds a table from a full load, reusing the backends of `previous` (balancing state survives reloads).
    pub fn load(data: RouteData, previous: Option<&RouteTable>) -> Self {
        let mut table = RouteTable { version: data.version, ..Default::default() };
        for s in data.services {
            let old = previous.and_then(|p| p.services.get(&s.id));
            table.insert(build(s, old));
        }
        table
    }

    /// A new table with `present` services replaced or added and `gone` removed.
    pub fn apply(&self, version: i64, present: Vec<ServiceRoute>, gone: &[Uuid]) -> Self {
        let mut table = self.clone();
        table.version = version;
        for id in gone {
            table.remove(*id);
        }
        for s in present {
            let old = table.remove(s.id);
            table.insert(build(s, old.as_ref()));
        }
        table
    }

    fn remove(&mut self, id: Uuid) -> Option<Arc<Service>> {
        let old = self.services.remove(&id)?;
        for h in &old.hosts {
            if self.hosts.get(h).is_some_and(|s| s.id == id) {
                self.hosts.remove(h);
            }
        }
        for p in old.ports.iter().filter(|p| p.handlers.contains(&Handler::Tcp)) {
            if self.tcp_ports.get(&p.port).is_some_and(|s| s.id == id) {
                self.tcp_ports.remove(&p.port);
            }
        }
        Some(old)
    }

    fn insert(&mut self, s: Arc<Service>) {
        for h in &s.hosts {
            self.hosts.insert(h.clone(), s.clone());
        }
        for p in s.ports.iter().filter(|p| p.handlers.contains(&Handler::Tcp)) {
            self.tcp_ports.insert(p.port, s.clone());
        }
        self.services.insert(s.id, s);
    }

    /// The service a host name routes to: exact, then a wildcard domain one label up. The host may carry a
    /// port and a trailing dot and any case.
    pub fn by_host(&self, host: &str) -> Option<&Arc<Service>> {
        self.by_normalized_host(&normalize_host(host))
    }

    /// [`Self::by_host`] for a host already lower case, without a port or a trailing dot.
    pub(crate) fn by_normalized_host(&self, host: &str) -> Option<&Arc<Service>> {
        if let Some(s) = self.hosts.get(host) {
            return Some(s);
        }
        let (_, parent) = host.split_once('.')?;
        self.hosts.get(format!("*.{parent}").as_str())
    }

    /// A service by id.
    pub fn service(&self, id: Uuid) -> Option<&Arc<Service>> {
        self.services.get(&id)
    }

    /// Whether some service scales to zero (only then is idleness worth checking).
    pub fn any_scale_to_zero(&self) -> bool {
        self.services.values().any(|s| s.scale_to_zero_after.is_some())
    }

    /// The service owning a raw TCP public port.
    pub fn by_tcp_port(&self, port: u16) -> Option<&Arc<Service>> {
        self.tcp_ports.get(&port)
    }

    /// Public ports needing a listener of their own: raw TCP ports, and TLS ports (with or without HTTP) other
    /// than the https port.
    pub fn extra_ports(&self, https_port: u16) -> (BTreeSet<u16>, BTreeSet<u16>) {
        let tcp = self.tcp_ports.keys().copied().collect();
        let tls = self
            .services
            .values()
            .flat_map(|s| s.ports.iter())
            .filter(|p| p.port != https_port && p.handlers.contains(&Handler::Tls))
            .map(|p| p.port)
            .collect();
        (tcp, tls)
    }

    /// Number of services.
    pub fn len(&self) -> usize {
        self.services.len()
    }

    /// Whether there is no service.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// The backends of this table that `next` no longer routes to. A service `next` shares unchanged (the same
    /// `Arc`, as [`Self::apply`] leaves the untouched ones) is skipped, so a change costs what it touched; a
    /// backend kept across tables is the same `Arc` (see `build`).
    pub fn dropped_backends<'a>(&'a self, next: &'a RouteTable) -> impl Iterator<Item = &'a Arc<Backend>> + 'a {
        self.services
            .iter()
            .map(move |(id, old)| (old, next.services.get(id)))
            .filter(|(old, now)| !now.is_some_and(|n| Arc::ptr_eq(n, old)))
            .flat_map(|(old, now)| {
                old.backends
                    .iter()
                    .filter(move |b| !now.is_some_and(|n| n.backends.iter().any(|nb| Arc::ptr_eq(nb, b))))
            })
    }

    /// Every backend of every service (for health checks).
    pub fn backends(&self) -> impl Iterator<Item = (&Arc<Service>, &Arc<Backend>)> {
        self.services.values().flat_map(|s| s.backends.iter().map(move |b| (s, b)))
    }
}

/// Lower case, without a port or a trailing dot.
pub fn normalize_host(host: &str) -> String {
    let host = match host.rsplit_once(':') {
        // An IPv6 literal has colons of its own and ends in ']' when it carries none.
        Some((h, port)) if !port.contains(']') && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

fn build(s: ServiceRoute, old: Option<&Arc<Service>>) -> Arc<Service> {
    let mut hosts: Vec<Arc<str>> = vec![Arc::from(normalize_host(&s.fqdn))];
    hosts.extend(s.domains.iter().map(|d| Arc::from(normalize_host(d))));
    let backends = s
        .backends
        .into_iter()
        .map(|b| {
            old.and_then(|o| o.backends.iter().find(|ob| ob.id == b.id && ob.ip == b.private_ip))
                .cloned()
                .unwrap_or_else(|| Arc::new(Backend::new(b.id, b.name, b.private_ip)))
        })
        .collect();
    Arc::new(Service {
        id: s.id,
        tenant_id: s.tenant_id,
        name: s.name,
        fqdn: s.fqdn,
        hosts,
        ports: s.ports,
        soft_limit: s.soft_limit,
        hard_limit: s.hard_limit,
        scale_to_zero_after: s.scale_to_zero_after,
        backends,
        starting: s.starting,
        last_touch_ms: AtomicU64::new(old.map_or(0, |o| o.last_touch_ms.load(Ordering::Relaxed))),
        metric_handles: old.and_then(|o| o.metric_handles.get().cloned()).map(OnceLock::from).unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use cloud_store::RouteBackend;

    use super::*;

    fn port(spec: &str) -> Vec<PortMapping> {
        cloud_domain::ports::parse_specs(&[spec], &Default::default()).unwrap()
    }

    fn service(n: u8, fqdn: &str, backends: u8) -> ServiceRoute {
        ServiceRoute {
            id: Uuid::from_u128(n as u128),
            tenant_id: Uuid::from_u128(1000 + n as u128),
            name: format!("s{n}"),
            fqdn: fqdn.into(),
            domains: vec![],
            ports: port("443:8080"),
            soft_limit: None,
            hard_limit: None,
            scale_to_zero_after: None,
            backends: (0..backends)
                .map(|i| RouteBackend {
                    id: Uuid::from_u128(n as u128 * 100 + i as u128),
                    name: format!("i{n}-{i}"),
                    private_ip: IpAddr::from([10, 0, n, i + 2]),
                })
                .collect(),
            starting: 0,
        }
    }

    #[test]
    fn hosts_match_exactly_or_by_wildcard_whatever_the_case_port_or_dot() {
        let mut s = service(1, "a-1234.dev.cloud.localhost", 1);
        s.domains = vec!["www.example.com".into(), "*.apps.example.com".into()];
        let t = RouteTable::load(RouteData { version: 1, services: vec![s] }, None);
        for host in [
            "a-1234.dev.cloud.localhost",
            "A-1234.Dev.Cloud.Localhost.:443",
            "www.example.com:80",
            "x.apps.example.com",
        ] {
            assert_eq!(t.by_host(host).map(|s| s.name.as_str()), Some("s1"), "{host}");
        }
        for host in ["b.dev.cloud.localhost", "example.com", "y.x.apps.example.com", "apps.example.com", ""] {
            assert!(t.by_host(host).is_none(), "{host}");
        }
    }

    #[test]
    fn applying_changes_replaces_only_touched_services_and_keeps_balancing_state() {
        let t = RouteTable::load(
            RouteData { version: 1, services: vec![service(1, "a.z", 2), service(2, "b.z", 1)] },
            None,
        );
        let Pick::Backend(guard) = t.by_host("a.z").unwrap().pick(&[]) else { panic!() };
        let busy = guard.backend().id;
        // Service 1 loses one backend (not the busy one) and gains a domain; service 2 is deleted.
        let mut s1 = service(1, "a.z", 2);
        s1.backends.retain(|b| b.id == busy);
        s1.domains = vec!["www.a.com".into()];
        let t2 = t.apply(2, vec![s1], &[Uuid::from_u128(2)]);
        assert_eq!(t2.version, 2);
        assert!(t2.by_host("b.z").is_none());
        let a = t2.by_host("www.a.com").unwrap();
        assert_eq!(a.backends.len(), 1);
        assert_eq!(a.backends[0].in_flight(), 1, "the in-flight count moved to the new table");
        drop(guard);
        assert_eq!(a.backends[0].in_flight(), 0);
        // The old table is untouched.
        assert!(t.by_host("b.z").is_some() && t.by_host("www.a.com").is_none());
        // What t2 no longer routes to: service 1's other backend and service 2's, not the one kept.
        let mut dropped: Vec<Uuid> = t.dropped_backends(&t2).map(|b| b.id).collect();
        dropped.sort();
        let mut want: Vec<Uuid> = t.backends().map(|(_, b)| b.id).filter(|id| *id != busy).collect();
        want.sort();
        assert_eq!((dropped.len(), dropped), (2, want));
        // A table that changed nothing drops nothing.
        assert_eq!(t2.dropped_backends(&t2.apply(3, Vec::new(), &[])).count(), 0);
    }

    #[test]
    fn picks_the_least_loaded_healthy_backend_and_refuses_past_the_hard_limit() {
        let mut s = service(1, "a.z", 3);
        s.hard_limit = Some(2);
        let t = RouteTable::load(RouteData { version: 1, services: vec![s] }, None);
        let svc = t.by_host("a.z").unwrap();
        let mut guards = Vec::new();
        // Six requests fill three backends evenly to the hard limit.
        for _ in 0..6 {
            match svc.pick(&[]) {
                Pick::Backend(g) => guards.push(g),
                other => panic!("{other:?}"),
            }
            let loads: Vec<u32> = svc.backends.iter().map(|b| b.in_flight()).collect();
            assert!(loads.iter().max().unwrap() - loads.iter().min().unwrap() <= 1, "{loads:?}");
        }
        assert!(matches!(svc.pick(&[]), Pick::Overloaded));
        guards.pop();
        assert!(matches!(svc.pick(&[]), Pick::Backend(_)));
    }

    #[test]
    fn down_and_tried_backends_are_avoided_but_a_stale_mark_beats_refusing() {
        let t = RouteTable::load(RouteData { version: 1, services: vec![service(1, "a.z", 2)] }, None);
        let svc = t.by_host("a.z").unwrap();
        svc.backends[0].mark_down(Duration::from_secs(60));
        for _ in 0..20 {
            let Pick::Backend(g) = svc.pick(&[]) else { panic!() };
            assert_eq!(g.backend().id, svc.backends[1].id);
        }
        // The healthy one was tried and failed: the marked one is still better than nothing.
        let Pick::Backend(g) = svc.pick(&[svc.backends[1].id]) else { panic!() };
        assert_eq!(g.backend().id, svc.backends[0].id);
        assert!(matches!(svc.pick(&[svc.backends[0].id, svc.backends[1].id]), Pick::NoBackend));
        svc.backends[0].mark_up();
        assert!(!svc.backends[0].is_down());
    }

    #[test]
    fn ties_are_broken_at_random() {
        let t = RouteTable::load(RouteData { version: 1, services: vec![service(1, "a.z", 3)] }, None);
        let svc = t.by_host("a.z").unwrap();
        let mut seen = BTreeSet::new();
        for _ in 0..200 {
            let Pick::Backend(g) = svc.pick(&[]) else { panic!() };
            seen.insert(g.backend().id);
        }
        assert_eq!(seen.len(), 3);
    }

    #[test]
    fn raw_tcp_and_extra_tls_ports_are_listed() {
        let mut s = service(1, "a.z", 1);
        s.ports =
            cloud_domain::ports::parse_specs(&["443:8080", "8443:9000/tls", "30001:5432/tcp"], &Default::default())
                .unwrap();
        let t = RouteTable::load(RouteData { version: 1, services: vec![s] }, None);
        let (tcp, tls) = t.extra_ports(443);
        assert_eq!(tcp.into_iter().collect::<Vec<_>>(), vec![30001]);
        assert_eq!(tls.into_iter().collect::<Vec<_>>(), vec![8443]);
        assert_eq!(t.by_tcp_port(30001).unwrap().name, "s1");
        let t2 = t.apply(2, vec![], &[Uuid::from_u128(1)]);
        assert!(t2.by_tcp_port(30001).is_none() && t2.extra_ports(443).0.is_empty());
    }
}
