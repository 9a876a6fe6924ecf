//! The request path: from a decoded query to the response, over the snapshot current when the query arrived.
//!
//! hickory-server owns the sockets, the framing and the FORMERR for undecodable messages (header-only, so no
//! amplification); everything after decoding is here, in [`respond`], a plain function the property tests drive
//! without sockets.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use hickory_proto::op::{Edns, Header, HeaderCounts, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, Record, RecordType};
use hickory_server::net::runtime::Time;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{MessageRequest, MessageResponseBuilder};

use crate::metrics::{Metrics, qtype_label, rcode_label};
use crate::rate_limit::{RateLimiter, Verdict};
use crate::snapshot::{Answer, Listener, Snapshot};

/// The response to one request, before encoding.
#[derive(Debug)]
pub(crate) struct Response<'a> {
    pub metadata: Metadata,
    pub answer: Answer<'a>,
    /// The OPT record to send back: present exactly when the query had one (RFC 6891).
    pub edns: Option<Edns>,
    /// The question's type, for metrics (`None` when there was no single question).
    pub qtype: Option<RecordType>,
}

/// Decides the response to a decoded request. Never panics on any input: the property tests hold it to that.
pub(crate) fn respond<'a>(
    snapshot: &'a Snapshot,
    listener: Listener,
    src: IpAddr,
    request: &MessageRequest,
    max_udp_payload: u16,
) -> Response<'a> {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    // We are not a resolver; RD is echoed (response_from_request) but RA stays clear.
    metadata.recursion_available = false;
    let edns = request.edns.as_ref().map(|req| {
        let mut edns = Edns::new();
        edns.set_version(0);
        edns.set_dnssec_ok(false);
        // The response size limit is the smaller of what the client can take and what we are willing to send
        // (1232 by default, to stay clear of IP fragmentation); hickory truncates UDP responses to it.
        edns.set_max_payload(req.max_payload().clamp(512, max_udp_payload.max(512)));
        edns
    });
    let mut respond_with = |answer: Answer<'a>, qtype| {
        metadata.response_code = answer.rcode;
        metadata.authoritative = answer.authoritative;
        Response { metadata, answer, edns: edns.clone(), qtype }
    };
    if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
        return respond_with(Answer::error(ResponseCode::BADVERS), None);
    }
    if request.metadata.op_code != OpCode::Query {
        return respond_with(Answer::error(ResponseCode::NotImp), None);
    }
    let [query] = request.queries.queries() else {
        return respond_with(Answer::error(ResponseCode::FormErr), None);
    };
    // A query carries nothing in the answer and authority sections (RFC 1035 4.1.1; NOTIFY and UPDATE differ).
    if !request.answers.is_empty() || !request.authorities.is_empty() {
        return respond_with(Answer::error(ResponseCode::FormErr), None);
    }
    let qtype = query.query_type();
    let answer = match (query.query_class(), qtype) {
        // We only hold IN data; other classes (CH's version.bind and friends) are not ours to answer.
        (class, _) if class != DNSClass::IN => Answer::error(ResponseCode::Refused),
        (_, RecordType::OPT) => Answer::error(ResponseCode::FormErr),
        // Zones are rebuilt from PostgreSQL by every replica; nobody needs to transfer them from us.
        (_, RecordType::AXFR | RecordType::IXFR) => Answer::error(ResponseCode::Refused),
        (_, RecordType::Unknown(253 | 254)) => Answer::error(ResponseCode::NotImp),
        _ => snapshot.answer(listener, src, query.name(), qtype),
    };
    respond_with(answer, Some(qtype))
}

/// Answers queries on one kind of listener.
pub(crate) struct QueryHandler {
    pub listener: Listener,
    pub zones: Arc<ArcSwap<Snapshot>>,
    pub metrics: Metrics,
    pub rate_limiter: Option<Arc<RateLimiter>>,
    pub max_udp_payload: u16,
}

#[async_trait::async_trait]
impl RequestHandler for QueryHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let started = Instant::now();
        let snapshot = self.zones.load_full();
        let response = respond(&snapshot, self.listener, request.src().ip(), request, self.max_udp_payload);
        let Response { mut metadata, answer, edns, qtype } = response;
        let udp = matches!(request.protocol(), Protocol::Udp);
        let verdict = match &self.rate_limiter {
            Some(limiter) if udp => limiter.check(request.src().ip(), started),
            _ => Verdict::Send,
        };
        let unsent = |metadata| ResponseInfo::from(Header { metadata, counts: HeaderCounts::default() });
        let (answers, authorities): (Vec<&Record>, Vec<&Record>) = match verdict {
            Verdict::Send => (answer.answers().collect(), answer.authorities().collect()),
            Verdict::Truncate => {
                self.metrics.rate_limited.with_label_values(&["truncated"]).inc();
                metadata.truncation = true;
                (Vec::new(), Vec::new())
            }
            Verdict::Drop => {
                self.metrics.rate_limited.with_label_values(&["dropped"]).inc();
                return unsent(metadata);
            }
        };
        self.metrics
            .queries
            .with_label_values(&[
                self.listener.as_str(),
                qtype.map_or("none", qtype_label),
                rcode_label(metadata.response_code),
            ])
            .inc();
        let builder = MessageResponseBuilder::new(&request.queries, edns.as_ref());
        let message = builder.build(metadata, answers, authorities, std::iter::empty(), std::iter::empty());
        let info = match response_handle.send_response(message).await {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!(src = %request.src(), error = %e, "dns: sending a response failed");
                unsent(metadata)
            }
        };
        self.metrics.latency.with_label_values(&[self.listener.as_str()]).observe(started.elapsed().as_secs_f64());
        info
    }
}

#[cfg(test)]
mod tests {
    //! The request path as a fuzz target: random bytes and mutations of valid queries go through the same decoding
    //! hickory-server does ([`Request::from_bytes`]), then [`respond`] and the encoder. Every outcome must be a
    //! decodable answer to the same id, or a decode failure (which the server answers with FORMERR or drops).

    use std::net::SocketAddr;

    use hickory_proto::op::{Message, MessageType, Query};
    use hickory_proto::rr::Name;
    use hickory_proto::serialize::binary::BinEncoder;
    use proptest::prelude::*;

    use super::*;
    use crate::snapshot::tests::{data, params};

    fn snapshot() -> Snapshot {
        Snapshot::build(data(), &params())
    }

    /// Runs raw bytes through the request path; `None` when the bytes do not decode as a request.
    fn run(snapshot: &Snapshot, bytes: &[u8], listener: Listener, src: SocketAddr, udp: bool) -> Option<Vec<u8>> {
        let protocol = if udp { Protocol::Udp } else { Protocol::Tcp };
        let request = Request::from_bytes(bytes.to_vec(), src, protocol).ok()?;
        let response = respond(snapshot, listener, src.ip(), &request, 1232);
        let limit = match (&response.edns, udp) {
            (Some(edns), true) => edns.max_payload(),
            (None, true) => 512,
            (_, false) => u16::MAX,
        };
        let builder = MessageResponseBuilder::new(&request.queries, response.edns.as_ref());
        let message = builder.build(
            response.metadata,
            response.answer.answers(),
            response.answer.authorities(),
            std::iter::empty(),
            std::iter::empty(),
        );
        let mut out = Vec::new();
        let mut encoder = BinEncoder::new(&mut out);
        encoder.set_max_size(limit);
        message.destructive_emit(&mut encoder).expect("every response encodes");
        assert!(out.len() <= usize::from(limit), "{} > {limit}", out.len());
        Some(out)
    }

    fn check(bytes: &[u8], listener: Listener, src: SocketAddr, udp: bool) {
        let snapshot = snapshot();
        if let Some(out) = run(&snapshot, bytes, listener, src, udp) {
            let reply = Message::from_vec(&out).expect("the response decodes");
            assert_eq!(reply.metadata.message_type, MessageType::Response);
            assert_eq!(reply.metadata.id, u16::from_be_bytes([bytes[0], bytes[1]]));
            assert!(reply.answers.iter().all(|r| r.dns_class == DNSClass::IN));
            if listener == Listener::Public {
                // Whatever was asked, the public listener never hands out a private address.
                let private = reply.answers.iter().any(|r| r.data.to_string().starts_with("10.96."));
                assert!(!private, "{reply:?}");
            }
        }
    }

    fn valid_query() -> impl Strategy<Value = Vec<u8>> {
        let names = prop::sample::select(vec![
            "web-abcd1234.dev.cloud.localhost.",
            "dev.cloud.localhost.",
            "nope.dev.cloud.localhost.",
            "web-1.internal.",
            "web.acme.internal.",
            "internal.",
            "example.com.",
            ".",
        ]);
        (names, any::<u16>(), any::<u16>(), any::<bool>(), any::<u16>()).prop_map(|(name, id, qtype, edns, payload)| {
            let mut m = Message::new(id, MessageType::Query, OpCode::Query);
            m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::from(qtype)));
            if edns {
                let mut e = Edns::new();
                e.set_max_payload(payload);
                m.set_edns(e);
            }
            m.to_vec().unwrap()
        })
    }

    #[derive(Debug, Clone)]
    enum Mutation {
        Flip(usize, u8),
        Truncate(usize),
        Insert(usize, u8),
        Count(usize, u16),
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
            any::<usize>().prop_map(Mutation::Truncate),
            (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
            (0usize..4, any::<u16>()).prop_map(|(i, c)| Mutation::Count(i, c)),
        ]
    }

    fn apply(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
        for m in mutations {
            if bytes.is_empty() {
                break;
            }
            match *m {
                Mutation::Flip(i, b) => {
                    let i = i % bytes.len();
                    bytes[i] ^= b;
                }
                Mutation::Truncate(n) => bytes.truncate(n % bytes.len()),
                Mutation::Insert(i, b) => bytes.insert(i % (bytes.len() + 1), b),
                Mutation::Count(section, c) if bytes.len() >= 12 => {
                    bytes[4 + 2 * section..6 + 2 * section].copy_from_slice(&c.to_be_bytes())
                }
                Mutation::Count(..) => {}
            }
        }
        bytes
    }

    fn source() -> impl Strategy<Value = (Listener, SocketAddr, bool)> {
        let srcs = prop::sample::select(vec!["10.96.0.9:5353", "10.96.5.1:1", "203.0.113.1:53", "[2001:db8::1]:99"]);
        (prop::bool::ANY, srcs, prop::bool::ANY).prop_map(|(public, src, udp)| {
            let listener = if public { Listener::Public } else { Listener::Private };
            (listener, src.parse().unwrap(), udp)
        })
    }

    proptest! {
        // 2000 cases per property keeps CI at a couple of seconds; PROPTEST_CASES runs it longer as a fuzz job.
        #![proptest_config(ProptestConfig {
            cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000),
            ..ProptestConfig::default()
        })]

        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600), (l, src, udp) in source()) {
            check(&bytes, l, src, udp);
        }

        #[test]
        fn mutated_queries_never_panic(
            q in valid_query(),
            mutations in prop::collection::vec(mutation(), 0..6),
            (l, src, udp) in source(),
        ) {
            check(&apply(q, &mutations), l, src, udp);
        }
    }

    #[test]
    fn valid_queries_get_answers() {
        let snapshot = snapshot();
        let src: SocketAddr = "10.96.0.9:5353".parse().unwrap();
        let mut m = Message::new(99, MessageType::Query, OpCode::Query);
        m.add_query(Query::query(Name::from_ascii("web-1.internal.").unwrap(), RecordType::A));
        let out = run(&snapshot, &m.to_vec().unwrap(), Listener::Private, src, true).unwrap();
        let reply = Message::from_vec(&out).unwrap();
        assert_eq!(reply.answers.len(), 1);
        assert!(reply.metadata.authoritative);
        let out = run(&snapshot, &m.to_vec().unwrap(), Listener::Public, src, true).unwrap();
        assert_eq!(Message::from_vec(&out).unwrap().metadata.response_code, ResponseCode::Refused);
    }
}
