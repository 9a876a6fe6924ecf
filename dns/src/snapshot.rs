//! The zones as one immutable in-memory value, swapped whole on every change, so a query never sees half of an
//! update and never waits for PostgreSQL.
//!
//! A change is applied as a patch ([`Snapshot::patch`]): the snapshot is cloned and only the names the change
//! touches are recomputed, from the sources kept beside the zones (the tenants, services, instances and
//! challenges the records were made from). Cloning is cheap and changes copy little: every map is a
//! [`ShardedMap`] (a change copies one shard of about a hundred entries), but for the running instances of each
//! service, in a persistent B-tree (`imbl`, a change copies the O(log n) nodes on its path). A patch thus costs in
//! proportion to what it touches, and the previous snapshot stays intact for the queries still reading it. A full
//! build ([`Snapshot::build`]) learns the same sources and runs the same per-name computation over every name, so
//! both paths make the same zones (a property test holds them to it).
//!
//! The SOA is not stored: it is made per answer from the snapshot's version, so a new serial does not mean
//! touching every zone (there is a private view per tenant).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use cloud_store::{ZoneData, ZoneInstance, ZonePatch, ZoneService, ZoneTenant};
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::rdata::{A, AAAA, NS, TXT};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};
use ipnet::Ipv4Net;
use uuid::Uuid;

use crate::sharded::ShardedMap;

mod zone;

use self::zone::Soa;
pub(crate) use self::zone::{Answer, Zone};

/// The map everything in a snapshot is kept in: cheap to clone, a change copies one small shard.
type Map<K, V> = ShardedMap<K, V>;

/// A name as a key of the sources: copying a shard then copies pointers, not names.
type NameKey = Arc<LowerName>;

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

/// What the zones are made of, indexed the ways a patch needs to find what a change affects.
#[derive(Debug, Clone, Default)]
struct Sources {
    tenants: Map<Uuid, Arc<ZoneTenant>>,
    services: Map<Uuid, Arc<ZoneService>>,
    instances: Map<Uuid, Arc<ZoneInstance>>,
    /// Instance and service names of each tenant, for `<name>.internal`.
    names: Map<Uuid, TenantNames>,
    /// Running instances by (service, instance): what `<service>.internal` lists.
    running: imbl::OrdMap<(Uuid, Uuid), IpAddr>,
    /// Public names answered with the edge addresses, and how many services claim each (two claims can overlap
    /// while a patch moves a domain from one service to another).
    edge_names: Map<NameKey, u32>,
    /// Verified custom domains (each a zone of its own), and how many services claim each.
    custom_apexes: Map<NameKey, u32>,
    /// The custom zones' apexes that are themselves verified domains (answered with the edge addresses), and how
    /// many services claim each. A wildcard domain `*.<apex>` makes a zone at `<apex>` (where its certificate's
    /// `_acme-challenge` lives) without making `<apex>` a routed name.
    custom_addressed: Map<NameKey, u32>,
    /// ACME challenge TXT values by name.
    challenges: Map<LowerName, Arc<Vec<String>>>,
}

/// The names one tenant's instances and services hold.
#[derive(Debug, Clone, Default)]
struct TenantNames {
    instances: Map<String, Uuid>,
    services: Map<String, Uuid>,
}

/// What a patch touched, to recompute once each after every source is updated.
#[derive(Debug, Default)]
struct Dirty {
    /// False for a full build: it recomputes every name from the sources instead, and sets of every name would
    /// only cost memory and time.
    tracking: bool,
    /// Touched tenants, with what they were before the patch (`None`: new). Tracked always: they are few.
    tenants: HashMap<Uuid, Option<Arc<ZoneTenant>>>,
    public: HashSet<LowerName>,
    custom_apexes: HashSet<LowerName>,
    challenges: HashSet<LowerName>,
    /// `(tenant, label)`: both `<label>.internal` and `<label>.<tenant>.internal` in the tenant's view.
    private: HashSet<(Uuid, String)>,
    /// Services whose running instances changed.
    running: HashSet<Uuid>,
}

impl Dirty {
    fn tracking() -> Self {
        Self { tracking: true, ..Self::default() }
    }

    fn public(&mut self, name: LowerName) {
        if self.tracking {
            self.public.insert(name);
        }
    }

    fn custom_apex(&mut self, apex: LowerName) {
        if self.tracking {
            self.custom_apexes.insert(apex);
        }
    }

    fn challenge(&mut self, name: LowerName) {
        if self.tracking {
            self.challenges.insert(name);
        }
    }

    fn private(&mut self, tenant: Uuid, label: &str) {
        if self.tracking {
            self.private.insert((tenant, label.to_owned()));
        }
    }

    fn running(&mut self, service: Uuid) {
        if self.tracking {
            self.running.insert(service);
        }
    }
}

/// Both zones at one change-feed version, and what they were made of.
#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    /// The change-feed version the data includes; also the SOA serial.
    pub version: i64,
    params: Arc<ZoneParams>,
    public: Zone,
    /// Verified custom domains delegated to us, each its own zone, by apex.
    custom: Map<LowerName, Arc<Zone>>,
    /// Tenant networks sorted by first address; disjoint, so at most one contains a given address.
    networks: Arc<Vec<(Ipv4Net, Uuid)>>,
    /// The private zone as each tenant sees it.
    private_views: Map<Uuid, Arc<Zone>>,
    private_apex: LowerName,
    private_ns: Name,
    sources: Sources,
    /// Records in every zone and view, kept by every change so the metric never walks the zones.
    records: usize,
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

/// The SOA serial for a change-feed version: serial arithmetic (RFC 1982) makes the wrap at 2^32 harmless.
pub(crate) fn serial(version: i64) -> u32 {
    version as u32
}

/// Adds or removes one claim on a counted name.
fn claim(counts: &mut Map<NameKey, u32>, name: &LowerName, add: bool) {
    match (counts.get_mut(name), add) {
        (Some(count), true) => *count += 1,
        (Some(count), false) if *count > 1 => *count -= 1,
        (Some(_), false) => {
            counts.remove(name);
        }
        (None, true) => {
            counts.insert(Arc::new(name.clone()), 1);
        }
        (None, false) => {}
    }
}

/// Changes one zone and keeps the snapshot's record count.
fn set_counted(zone: &mut Zone, total: &mut usize, owner: &LowerName, records: Option<Vec<Record>>) {
    let before = zone.records;
    zone.set(owner, records);
    *total = *total + zone.records - before;
}

impl Snapshot {
    /// Builds both zones. Invalid names in the data are skipped with a warning rather than failing the build:
    /// one bad row must not take every other name down.
    pub fn build(data: ZoneData, params: &ZoneParams) -> Self {
        let ZoneData { version, tenants, services, instances, acme_challenges } = data;
        let mut challenges: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, value) in acme_challenges {
            challenges.entry(name).or_default().push(value);
        }
        let everything = ZonePatch {
            version,
            tenants,
            services,
            instances,
            acme_challenges: challenges.into_iter().collect(),
            ..ZonePatch::default()
        };
        let mut snapshot = Self::empty(Arc::new(params.clone()));
        let mut dirty = Dirty::default();
        snapshot.learn(everything, &mut dirty);
        snapshot.refresh_all(dirty);
        snapshot
    }

    /// The snapshot with `patch` applied; `self` is left as it was, for the queries still reading it.
    pub fn patch(&self, patch: ZonePatch) -> Self {
        let mut next = self.clone();
        let mut dirty = Dirty::tracking();
        next.learn(patch, &mut dirty);
        next.refresh(dirty);
        next
    }

    /// No tenant, no service: the apexes with their NS records and glue.
    fn empty(params: Arc<ZoneParams>) -> Self {
        let public_apex = absolute(&params.public_apex).unwrap_or_else(Name::root);
        let mname = params.ns_names.first().cloned().unwrap_or_else(|| public_apex.clone());
        let private_apex = absolute(PRIVATE_APEX).unwrap_or_else(Name::root);
        let private_ns = absolute(&format!("ns.{PRIVATE_APEX}")).unwrap_or_else(|| private_apex.clone());
        let mut snapshot = Self {
            version: 0,
            public: Zone::new(Soa::new(public_apex.clone(), mname, &params)),
            params,
            custom: Map::default(),
            networks: Arc::new(Vec::new()),
            private_views: Map::default(),
            private_apex: LowerName::new(&private_apex),
            private_ns,
            sources: Sources::default(),
            records: 1,
        };
        snapshot.refresh_public(&LowerName::new(&public_apex));
        for ns in snapshot.params.ns_names.clone() {
            snapshot.refresh_public(&LowerName::new(&ns));
        }
        snapshot
    }

    /// Brings the sources to the patch's version in two passes: first every touched resource is forgotten, then
    /// the present ones are learned again. Within one version names are unique, so once nothing touched is
    /// indexed the present ones cannot collide with anything, whatever order the patch lists them in (a name
    /// passed from a deleted instance to a new one, a domain moved between services).
    fn learn(&mut self, patch: ZonePatch, dirty: &mut Dirty) {
        let ZonePatch {
            version,
            tenants,
            gone_tenants,
            services,
            gone_services,
            instances,
            gone_instances,
            acme_challenges,
        } = patch;
        self.version = version;
        for id in gone_tenants.iter().chain(tenants.iter().map(|t| &t.id)) {
            let old = self.sources.tenants.remove(id);
            dirty.tenants.entry(*id).or_insert(old);
        }
        for id in gone_services.iter().chain(services.iter().map(|s| &s.id)) {
            self.forget_service(*id, dirty);
        }
        for id in gone_instances.iter().chain(instances.iter().map(|i| &i.id)) {
            self.forget_instance(*id, dirty);
        }
        for tenant in tenants {
            self.sources.tenants.insert(tenant.id, Arc::new(tenant));
        }
        for service in services {
            self.learn_service(Arc::new(service), dirty);
        }
        for instance in instances {
            self.learn_instance(Arc::new(instance), dirty);
        }
        for (name, values) in acme_challenges {
            let Some(name) = absolute(&name) else { continue };
            let name = LowerName::new(&name);
            if values.is_empty() {
                self.sources.challenges.remove(&name);
            } else {
                self.sources.challenges.insert(name.clone(), Arc::new(values));
            }
            dirty.challenge(name);
        }
    }

    /// The public names a service claims: its FQDN and its verified platform subdomains.
    fn edge_names_of(service: &ZoneService) -> impl Iterator<Item = LowerName> + '_ {
        let domains = service.domains.iter().filter(|d| !d.custom).map(|d| d.name.as_str());
        std::iter::once(service.fqdn.as_str()).chain(domains).filter_map(absolute).map(|n| LowerName::new(&n))
    }

    /// The custom zones a service claims, with whether the apex is itself the domain (else a wildcard's parent):
    /// its verified custom domains, except those inside the public zone (a platform name is never delegated away)
    /// and top-level domains.
    fn custom_apexes_of<'s>(&self, service: &'s ZoneService) -> impl Iterator<Item = (LowerName, bool)> + 's {
        let public = self.public.apex.clone();
        service
            .domains
            .iter()
            .filter(|d| d.custom)
            .filter_map(|d| absolute(&d.name))
            .map(|n| if n.is_wildcard() { (LowerName::new(&n.base_name()), false) } else { (LowerName::new(&n), true) })
            .filter(move |(apex, _)| !public.zone_of(apex) && apex.num_labels() >= 2)
    }

    fn forget_service(&mut self, id: Uuid, dirty: &mut Dirty) {
        let Some(old) = self.sources.services.remove(&id) else { return };
        if let Some(names) = self.sources.names.get_mut(&old.tenant_id)
            && names.services.get(&old.name) == Some(&id)
        {
            names.services.remove(&old.name);
        }
        dirty.private(old.tenant_id, &old.name);
        self.claim_names(&old, false, dirty);
    }

    fn learn_service(&mut self, service: Arc<ZoneService>, dirty: &mut Dirty) {
        self.sources.services.insert(service.id, service.clone());
        let names = self.sources.names.get_or_insert_with(service.tenant_id, TenantNames::default);
        names.services.insert(service.name.clone(), service.id);
        dirty.private(service.tenant_id, &service.name);
        self.claim_names(&service, true, dirty);
    }

    /// Adds (or withdraws) a service's claims on public names and custom zones.
    fn claim_names(&mut self, service: &ZoneService, add: bool, dirty: &mut Dirty) {
        for name in Self::edge_names_of(service) {
            claim(&mut self.sources.edge_names, &name, add);
            dirty.public(name);
        }
        for (apex, addressed) in self.custom_apexes_of(service).collect::<Vec<_>>() {
            claim(&mut self.sources.custom_apexes, &apex, add);
            if addressed {
                claim(&mut self.sources.custom_addressed, &apex, add);
            }
            dirty.custom_apex(apex);
        }
    }

    fn forget_instance(&mut self, id: Uuid, dirty: &mut Dirty) {
        let Some(old) = self.sources.instances.remove(&id) else { return };
        if let Some(names) = self.sources.names.get_mut(&old.tenant_id)
            && names.instances.get(&old.name) == Some(&id)
        {
            names.instances.remove(&old.name);
        }
        dirty.private(old.tenant_id, &old.name);
        if let Some(service) = old.service_id
            && self.sources.running.remove(&(service, id)).is_some()
        {
            dirty.running(service);
        }
    }

    fn learn_instance(&mut self, instance: Arc<ZoneInstance>, dirty: &mut Dirty) {
        self.sources.instances.insert(instance.id, instance.clone());
        let names = self.sources.names.get_or_insert_with(instance.tenant_id, TenantNames::default);
        names.instances.insert(instance.name.clone(), instance.id);
        dirty.private(instance.tenant_id, &instance.name);
        if let Some(service) = instance.service_id
            && instance.running
        {
            self.sources.running.insert((service, instance.id), instance.private_ip);
            dirty.running(service);
        }
    }

    /// Recomputes everything the patch touched, now that the sources are current.
    fn refresh(&mut self, mut dirty: Dirty) {
        self.refresh_tenants(&mut dirty);
        let mut zones_changed = false;
        for apex in &dirty.custom_apexes {
            if self.sync_custom_zone(apex) {
                zones_changed = true;
            } else {
                // A kept zone's apex may have gained or lost its own addresses (a wildcard's parent, or a domain).
                self.refresh_custom(apex);
            }
        }
        if zones_changed {
            // A challenge is served by the closest enclosing zone: a zone coming or going can move any of them.
            // Challenges are few (one per certificate order in flight), so all of them are placed again.
            dirty.challenges.extend(self.sources.challenges.keys().cloned());
        }
        for name in &dirty.public {
            self.refresh_public(name);
        }
        for name in &dirty.challenges {
            self.refresh_public(name);
            self.refresh_custom(name);
        }
        for service in &dirty.running {
            if let Some(s) = self.sources.services.get(service) {
                dirty.private.insert((s.tenant_id, s.name.clone()));
            }
        }
        for (tenant, label) in &dirty.private {
            self.refresh_private(*tenant, label);
        }
    }

    /// Recomputes every name from the sources, for a full build (which tracked only the tenants while learning).
    /// Iterates over a clone of the sources, which costs a pointer copy per map.
    fn refresh_all(&mut self, mut dirty: Dirty) {
        self.refresh_tenants(&mut dirty);
        let sources = self.sources.clone();
        for apex in sources.custom_apexes.keys() {
            self.sync_custom_zone(apex);
        }
        for name in sources.edge_names.keys() {
            self.refresh_public(name);
        }
        for name in sources.challenges.keys() {
            self.refresh_public(name);
            self.refresh_custom(name);
        }
        for (tenant, names) in sources.names.iter() {
            for label in names.instances.keys().chain(names.services.keys()) {
                self.refresh_private(*tenant, label);
            }
        }
    }

    /// Creates or removes the custom zone at `apex` as its claims say; true when one was created or removed.
    fn sync_custom_zone(&mut self, apex: &LowerName) -> bool {
        let wanted = self.sources.custom_apexes.contains_key(apex);
        match (wanted, self.custom.contains_key(apex)) {
            (true, false) => {
                let mname = self.params.ns_names.first().cloned().unwrap_or_else(|| apex.into());
                let zone = Zone::new(Soa::new(apex.into(), mname, &self.params));
                self.records += zone.record_count();
                self.custom.insert(apex.clone(), Arc::new(zone));
                self.refresh_custom(apex);
                true
            }
            (false, true) => {
                if let Some(zone) = self.custom.remove(apex) {
                    self.records -= zone.record_count();
                }
                true
            }
            _ => false,
        }
    }

    /// Creates, removes or renews the views of touched tenants, and the network index when it changed.
    fn refresh_tenants(&mut self, dirty: &mut Dirty) {
        let mut networks_changed = false;
        let tenants = std::mem::take(&mut dirty.tenants);
        for (id, old) in &tenants {
            let new = self.sources.tenants.get(id).cloned();
            match (old, new) {
                (_, None) => {
                    if let Some(view) = self.private_views.remove(id) {
                        self.records -= view.record_count();
                    }
                    networks_changed = true;
                }
                (Some(old), Some(new)) if old.name == new.name => networks_changed |= old.network != new.network,
                // A new tenant, or one renamed (`<instance>.<tenant>.internal` names change): a fresh view with
                // every name the tenant has.
                (_, Some(_)) => {
                    let apex = Name::from(&self.private_apex);
                    let mut view = Zone::new(Soa::new(apex.clone(), self.private_ns.clone(), &self.params));
                    let ns = Record::from_rdata(apex, self.params.apex_ttl, RData::NS(NS(self.private_ns.clone())));
                    view.set(&self.private_apex, Some(vec![ns]));
                    self.records += view.record_count();
                    if let Some(old) = self.private_views.insert(*id, Arc::new(view)) {
                        self.records -= old.record_count();
                    }
                    if let Some(names) = self.sources.names.get(id) {
                        for label in names.instances.keys().chain(names.services.keys()) {
                            dirty.private(*id, label);
                        }
                    }
                    networks_changed = true;
                }
            }
        }
        if networks_changed {
            // O(tenants), and only when a tenant comes, goes or moves: rare next to names changing.
            let mut networks: Vec<(Ipv4Net, Uuid)> = self.sources.tenants.values().map(|t| (t.network, t.id)).collect();
            networks.sort_by_key(|(n, _)| n.network());
            self.networks = Arc::new(networks);
        }
    }

    /// Recomputes one name of the public zone: NS at the apex, glue for in-zone name servers, the edge addresses
    /// for service FQDNs and platform subdomains, ACME challenge TXT records.
    fn refresh_public(&mut self, name: &LowerName) {
        if !self.public.contains(name) {
            return;
        }
        let p = &self.params;
        let owner = Name::from(name);
        let mut exists = false;
        let mut records = Vec::new();
        if *name == self.public.apex {
            exists = true;
            records.extend(
                p.ns_names.iter().map(|n| Record::from_rdata(owner.clone(), p.apex_ttl, RData::NS(NS(n.clone())))),
            );
        }
        // Name equality ignores case.
        if p.ns_names.contains(&owner) {
            exists = true;
            records.extend(p.ns_addresses.iter().map(|ip| address_record(owner.clone(), p.apex_ttl, *ip)));
        }
        if self.sources.edge_names.contains_key(name) {
            exists = true;
            records.extend(p.edge_addresses.iter().map(|ip| address_record(owner.clone(), p.service_ttl, *ip)));
        }
        if let Some(values) = self.sources.challenges.get(name) {
            exists = true;
            records.extend(
                values
                    .iter()
                    .map(|v| Record::from_rdata(owner.clone(), p.challenge_ttl, RData::TXT(TXT::new(vec![v.clone()])))),
            );
        }
        set_counted(&mut self.public, &mut self.records, name, exists.then_some(records));
    }

    /// Recomputes `name` in every custom zone enclosing it: the apex holds NS and the edge addresses, and a
    /// challenge is served by the closest enclosing zone only (and by none when the public zone holds it).
    fn refresh_custom(&mut self, name: &LowerName) {
        let mut challenges = !self.public.contains(name);
        let mut apex = name.clone();
        loop {
            if self.custom.contains_key(&apex) {
                let records = self.custom_records(&apex, name, challenges);
                if let Some(zone) = self.custom.get_mut(&apex) {
                    set_counted(Arc::make_mut(zone), &mut self.records, name, records);
                }
                challenges = false;
            }
            if apex.is_root() {
                break;
            }
            apex = apex.base_name();
        }
    }

    fn custom_records(&self, apex: &LowerName, name: &LowerName, challenges: bool) -> Option<Vec<Record>> {
        let p = &self.params;
        let owner = Name::from(name);
        let mut exists = false;
        let mut records = Vec::new();
        if name == apex {
            exists = true;
            records.extend(
                p.ns_names.iter().map(|n| Record::from_rdata(owner.clone(), p.apex_ttl, RData::NS(NS(n.clone())))),
            );
            if self.sources.custom_addressed.contains_key(apex) {
                records.extend(p.edge_addresses.iter().map(|ip| address_record(owner.clone(), p.service_ttl, *ip)));
            }
        }
        if challenges && let Some(values) = self.sources.challenges.get(name) {
            exists = true;
            records.extend(
                values
                    .iter()
                    .map(|v| Record::from_rdata(owner.clone(), p.challenge_ttl, RData::TXT(TXT::new(vec![v.clone()])))),
            );
        }
        exists.then_some(records)
    }

    /// Recomputes `<label>.internal` and `<label>.<tenant>.internal` in a tenant's view. Instance names win over
    /// service names in `<label>.internal`: an instance is the more specific thing.
    fn refresh_private(&mut self, tenant: Uuid, label: &str) {
        let Some(t) = self.sources.tenants.get(&tenant).cloned() else { return };
        if !self.private_views.contains_key(&tenant) {
            return;
        }
        let ttl = self.params.instance_ttl;
        let names = self.sources.names.get(&tenant);
        let instance = names.and_then(|n| n.instances.get(label)).and_then(|id| self.sources.instances.get(id));
        let service = names.and_then(|n| n.services.get(label));
        let mut changes = Vec::with_capacity(2);
        if let Some(short) = absolute(&format!("{label}.{PRIVATE_APEX}")) {
            let records = match (instance, service) {
                (Some(i), _) => Some(vec![address_record(short.clone(), ttl, i.private_ip)]),
                (None, Some(service)) => {
                    let running = self.sources.running.range((*service, Uuid::nil())..=(*service, Uuid::max()));
                    Some(running.map(|(_, ip)| address_record(short.clone(), ttl, *ip)).collect())
                }
                (None, None) => None,
            };
            changes.push((LowerName::new(&short), records));
        }
        if let Some(qualified) = absolute(&format!("{label}.{}.{PRIVATE_APEX}", t.name)) {
            let records = instance.map(|i| vec![address_record(qualified.clone(), ttl, i.private_ip)]);
            changes.push((LowerName::new(&qualified), records));
        }
        if let Some(view) = self.private_views.get_mut(&tenant) {
            let view = Arc::make_mut(view);
            for (name, records) in changes {
                set_counted(view, &mut self.records, &name, records);
            }
        }
    }

    /// The private zone as seen from `src`: `None` when the source is in no tenant's network.
    pub fn private_view(&self, src: IpAddr) -> Option<&Zone> {
        let v4: Ipv4Addr = match src.to_canonical() {
            IpAddr::V4(v4) => v4,
            IpAddr::V6(_) => return None,
        };
        let after = self.networks.partition_point(|(n, _)| n.network() <= v4);
        let (net, tenant) = self.networks.get(after.checked_sub(1)?)?;
        if !net.contains(&v4) {
            return None;
        }
        self.private_views.get(tenant).map(|view| &**view)
    }

    /// Answers one question. REFUSED for names outside our zones, and for the private zone when asked on the
    /// public listener or from outside every tenant network: the same answer as for a name we know nothing
    /// about, so neither reveals that the private zone exists.
    pub fn answer(&self, listener: Listener, src: IpAddr, name: &LowerName, qtype: RecordType) -> Answer<'_> {
        let serial = serial(self.version);
        if self.public.contains(name) {
            return self.public.lookup(name, qtype, serial);
        }
        if self.private_apex.zone_of(name) {
            return match (listener, self.private_view(src)) {
                (Listener::Private, Some(view)) => view.lookup(name, qtype, serial),
                _ => Answer::error(ResponseCode::Refused),
            };
        }
        // The closest enclosing custom zone: a name has at most 127 labels, so this is a bounded walk.
        let mut apex = name.clone();
        loop {
            if let Some(zone) = self.custom.get(&apex) {
                return zone.lookup(name, qtype, serial);
            }
            if apex.is_root() {
                return Answer::error(ResponseCode::Refused);
            }
            apex = apex.base_name();
        }
    }

    /// Records in every zone and private view.
    pub fn record_count(&self) -> usize {
        self.records
    }
}

#[cfg(test)]
pub(crate) mod tests;

#[cfg(test)]
mod scale;
