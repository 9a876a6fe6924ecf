//! One zone as a tree of names: the records at each owner name, with the empty non-terminals kept so that a name
//! answers NODATA or NXDOMAIN rightly, and the lookup that answers a question from it.

use std::sync::Arc;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::rdata::SOA;
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};

use super::{Map, ZoneParams};

/// What a zone's SOA is made of, all but the serial.
#[derive(Debug)]
pub(super) struct Soa {
    apex: Name,
    mname: Name,
    rname: Name,
    apex_ttl: u32,
    negative_ttl: u32,
}

impl Soa {
    pub(super) fn new(apex: Name, mname: Name, params: &ZoneParams) -> Self {
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
pub(super) struct Node {
    /// Empty for a name that exists without data (NODATA) and for an empty non-terminal.
    pub(super) records: Vec<Record>,
    /// Whether the name exists of its own, rather than only as the ancestor of names that do.
    pub(super) owner: bool,
    /// Nodes one label below this one: a node with none that is not an owner is removed.
    pub(super) children: u32,
}

/// One zone: the records of each owner name. Empty non-terminals are present with no records, so they answer
/// NODATA rather than NXDOMAIN.
#[derive(Debug, Clone)]
pub(crate) struct Zone {
    pub(super) apex: LowerName,
    soa: Arc<Soa>,
    pub(super) nodes: Map<LowerName, Node>,
    /// Records held (the SOA aside), kept by `set` so counting never walks the zone.
    pub(super) records: usize,
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
    pub(super) fn new(soa: Soa) -> Self {
        let apex = LowerName::new(&soa.apex);
        let mut nodes = Map::default();
        nodes.insert(apex.clone(), Node { records: Vec::new(), owner: true, children: 0 });
        Self { apex, soa: Arc::new(soa), nodes, records: 0 }
    }

    /// Makes `owner` hold exactly `records`: `Some` (possibly empty: the name then exists and answers NODATA),
    /// or `None` for a name that does not exist of its own. Empty non-terminals are created with the first name
    /// below them and removed with the last, so NODATA and NXDOMAIN stay right as names come and go. The apex
    /// always exists. Names outside the zone are ignored: callers route names to zones, this is the last guard.
    pub(super) fn set(&mut self, owner: &LowerName, records: Option<Vec<Record>>) {
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
