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
use hickory_proto::rr::rdata::{A, AAAA, NS, SOA, TXT};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};
use ipnet::Ipv4Net;
use uuid::Uuid;

use crate::sharded::ShardedMap;

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

/// What a zone's SOA is made of, all but the serial.
#[derive(Debug)]
struct Soa {
    apex: Name,
    mname: Name,
    rname: Name,
    apex_ttl: u32,
    negative_ttl: u32,
}

impl Soa {
    fn new(apex: Name, mname: Name, params: &ZoneParams) -> Self {
        let rname =
            Name::from_ascii("hostmaster").and_then(|h| h.append_domain(&apex)).unwrap_or_else(|_| apex.clone());
        Self { apex, mname, rname, apex_ttl: params.apex_ttl, negative_ttl: params.negative_ttl }
    }

    fn record(&self, serial: u32, ttl: u32) -> Record {
        let soa = SOA::new(self.mname.clone(), self.rname.clone(), serial, 3600, 600, 86400, self.negative_ttl);
        Record::from_rdata(self.apex.clone(), ttl, RData::SOA(soa))
    }

    /// The SOA as placed in the authority section of negative answers (TTL = negative TTL, RFC 2308).
    fn negative(&self, serial: u32) -> Record {
        self.record(serial, self.negative_ttl.min(self.apex_ttl))
    }
}

/// The records at one name.
#[derive(Debug, Clone)]
struct Node {
    /// Empty for a name that exists without data (NODATA) and for an empty non-terminal.
    records: Vec<Record>,
    /// Whether the name exists of its own, rather than only as the ancestor of names that do.
    owner: bool,
    /// Nodes one label below this one: a node with none that is not an owner is removed.
    children: u32,
}

/// One zone: the records of each owner name. Empty non-terminals are present with no records, so they answer
/// NODATA rather than NXDOMAIN.
#[derive(Debug, Clone)]
pub(crate) struct Zone {
    apex: LowerName,
    soa: Arc<Soa>,
    nodes: Map<LowerName, Node>,
    /// Records held (the SOA aside), kept by `set` so counting never walks the zone.
    records: usize,
}

/// What a lookup found: records borrowed from the snapshot, and the zone's SOA made for this answer.
#[derive(Debug)]
pub(crate) struct Answer<'a> {
    pub rcode: ResponseCode,
    /// Whether we speak for the name (false for REFUSED and errors).
    pub authoritative: bool,
    /// The SOA with the snapshot's serial: first in the answer section (SOA and ANY questions at the apex), or
    /// alone in the authority section (negative answers).
    soa: Option<(Record, Section)>,
    /// The answer section after the SOA, if any.
    records: Vec<&'a Record>,
}

/// The section a made SOA goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Section {
    Answer,
    Authority,
}

impl<'a> Answer<'a> {
    /// An answer with no records.
    pub fn error(rcode: ResponseCode) -> Self {
        Self { rcode, authoritative: false, soa: None, records: Vec::new() }
    }

    fn soa_in(&self, section: Section) -> Option<&Record> {
        self.soa.as_ref().filter(|(_, s)| *s == section).map(|(soa, _)| soa)
    }

    /// The answer section.
    pub fn answers(&self) -> impl Iterator<Item = &Record> + Send {
        self.soa_in(Section::Answer).into_iter().chain(self.records.iter().map(|r| -> &Record { r }))
    }

    /// The authority section.
    pub fn authorities(&self) -> impl Iterator<Item = &Record> + Send {
        self.soa_in(Section::Authority).into_iter()
    }
}

impl Zone {
    fn new(soa: Soa) -> Self {
        let apex = LowerName::new(&soa.apex);
        let mut nodes = Map::default();
        nodes.insert(apex.clone(), Node { records: Vec::new(), owner: true, children: 0 });
        Self { apex, soa: Arc::new(soa), nodes, records: 0 }
    }

    /// Makes `owner` hold exactly `records`: `Some` (possibly empty: the name then exists and answers NODATA),
    /// or `None` for a name that does not exist of its own. Empty non-terminals are created with the first name
    /// below them and removed with the last, so NODATA and NXDOMAIN stay right as names come and go. The apex
    /// always exists. Names outside the zone are ignored: callers route names to zones, this is the last guard.
    fn set(&mut self, owner: &LowerName, records: Option<Vec<Record>>) {
        if !self.apex.zone_of(owner) {
            return;
        }
        // Collected records may have room for four (over a kilobyte): a zone keeps hundreds of thousands.
        let records = records.map(|mut r| {
            r.shrink_to_fit();
            r
        });
        let records = if *owner == self.apex { Some(records.unwrap_or_default()) } else { records };
        let existing = self.nodes.get(owner).map(|node| (node.owner, node.children, node.records.len()));
        match (existing, records) {
            (Some((owner_before, children, held)), Some(records)) => {
                if owner_before && self.nodes.get(owner).is_some_and(|n| n.records == records) {
                    // Unchanged: leave the shard (shared with the previous snapshot) alone.
                    return;
                }
                self.records = self.records - held + records.len();
                self.replace(owner, Node { records, owner: true, children });
            }
            (Some((owner_before, children, held)), None) => {
                if !owner_before {
                    // An empty non-terminal already: nothing of its own to remove.
                    return;
                }
                self.records -= held;
                if children > 0 {
                    self.replace(owner, Node { records: Vec::new(), owner: false, children });
                } else {
                    self.nodes.remove(owner);
                    self.unlink(owner);
                }
            }
            (None, Some(records)) => {
                self.records += records.len();
                self.nodes.insert(owner.clone(), Node { records, owner: true, children: 0 });
                self.link(owner);
            }
            (None, None) => {}
        }
    }

    /// Replaces an existing node, keeping its key.
    fn replace(&mut self, owner: &LowerName, node: Node) {
        if let Some(slot) = self.nodes.get_mut(owner) {
            *slot = node;
        }
    }

    /// Counts a new node in its parent, creating the empty non-terminals up to the first existing ancestor (the
    /// apex at the latest).
    fn link(&mut self, name: &LowerName) {
        let mut child = name.clone();
        while child != self.apex && !child.is_root() {
            let parent = child.base_name();
            if let Some(node) = self.nodes.get_mut(&parent) {
                node.children += 1;
                return;
            }
            self.nodes.insert(parent.clone(), Node { records: Vec::new(), owner: false, children: 1 });
            child = parent;
        }
    }

    /// Uncounts a removed node from its parent, removing the empty non-terminals left with no name below them.
    fn unlink(&mut self, name: &LowerName) {
        let mut child = name.clone();
        while child != self.apex && !child.is_root() {
            let parent = child.base_name();
            let Some(node) = self.nodes.get_mut(&parent) else { return };
            node.children = node.children.saturating_sub(1);
            if node.children > 0 || node.owner {
                return;
            }
            self.nodes.remove(&parent);
            child = parent;
        }
    }

    pub fn contains(&self, name: &LowerName) -> bool {
        self.apex.zone_of(name)
    }

    /// Answers a question for a name inside this zone, with the SOA serial of the snapshot.
    pub fn lookup(&self, name: &LowerName, qtype: RecordType, serial: u32) -> Answer<'_> {
        let Some(node) = self.nodes.get(name) else {
            let soa = Some((self.soa.negative(serial), Section::Authority));
            return Answer { rcode: ResponseCode::NXDomain, authoritative: true, soa, records: Vec::new() };
        };
        let records: Vec<&Record> =
            node.records.iter().filter(|r| qtype == RecordType::ANY || r.record_type() == qtype).collect();
        // The type first: comparing names label by label is the dearer test.
        let soa = if matches!(qtype, RecordType::SOA | RecordType::ANY) && *name == self.apex {
            Some((self.soa.record(serial, self.soa.apex_ttl), Section::Answer))
        } else if records.is_empty() {
            Some((self.soa.negative(serial), Section::Authority))
        } else {
            None
        };
        Answer { rcode: ResponseCode::NoError, authoritative: true, soa, records }
    }

    /// How many records the zone holds, its SOA included.
    pub fn record_count(&self) -> usize {
        self.records + 1
    }
}

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
pub(crate) mod tests {
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
                    let children =
                        zone.nodes.iter().filter(|(k, _)| **k != zone.apex && k.base_name() == *owner).count();
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
        assert_eq!(
            (idle.rcode, idle.answers().count()),
            (ResponseCode::NoError, 0),
            "service without running instances"
        );
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
        let snap =
            snap.patch(ZonePatch { version: 47, gone_instances: vec![Uuid::from_u128(22)], ..ZonePatch::default() });
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
        assert_eq!(
            public(&removed, "_acme-challenge.big.dev.cloud.localhost.", RecordType::TXT).0,
            ResponseCode::NXDomain
        );
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
        let one =
            both.patch(ZonePatch { version: 44, gone_services: vec![Uuid::from_u128(12)], ..ZonePatch::default() });
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
        let none =
            owner.patch(ZonePatch { version: 46, gone_services: vec![Uuid::from_u128(13)], ..ZonePatch::default() });
        assert_eq!(public(&none, "shared.dev.cloud.localhost.", RecordType::A), (ResponseCode::NoError, 1));
        assert_eq!(public(&none, "deeper.shared.dev.cloud.localhost.", RecordType::A).0, ResponseCode::NXDomain);
        none.check_invariants();
        let empty =
            none.patch(ZonePatch { version: 47, gone_services: vec![Uuid::from_u128(14)], ..ZonePatch::default() });
        assert_eq!(public(&empty, "shared.dev.cloud.localhost.", RecordType::A).0, ResponseCode::NXDomain);
        assert_eq!(empty.dump(), snap.dump());
    }

    #[test]
    fn a_patch_adds_and_removes_tenants() {
        let snap = Snapshot::build(data(), &params());
        let gamma =
            ZoneTenant { id: Uuid::from_u128(3), name: "gamma".into(), network: "10.96.8.0/22".parse().unwrap() };
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
                    w.services.push(ZoneService {
                        id,
                        tenant_id: tenant,
                        name: name.into(),
                        fqdn: fqdn.into(),
                        domains,
                    });
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
                    let services: Vec<Uuid> =
                        w.services.iter().filter(|s| s.tenant_id == tenant).map(|s| s.id).collect();
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
}

#[cfg(test)]
mod scale {
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

    fn rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// Build, patch and lookup cost alone, without PostgreSQL:
    /// `cargo test -p cloud-dns --release --lib build_cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement"]
    fn build_cost() {
        let data = platform(100_000);
        let copy = data.clone();
        let rss = rss_kib();
        let started = Instant::now();
        let snap = Snapshot::build(copy, &tests::params());
        println!("build of {} records: {:?}", snap.record_count(), started.elapsed());
        println!("RSS growth with the snapshot: {} MiB", rss_kib().saturating_sub(rss) / 1024);
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
}
