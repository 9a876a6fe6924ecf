//! Proof that a tenant owns a custom domain: a TXT record `_cloud-challenge.<domain>` holding
//! `cloud-verify=<token>`, looked up through a recursive resolver (the system's, or a configured one). Until it is
//! seen, the platform neither routes the domain nor orders a certificate for it.

use std::net::SocketAddr;
use std::time::Duration;

use cloud_store::{PendingDomain, Store, StoreError};
use hickory_proto::rr::{Name, RData};
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::{Resolver, TokioResolver};

/// Why ownership is not (yet) proven.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OwnershipError {
    /// The TXT record exists but holds other values (or none).
    #[error("TXT {record} does not hold \"{expected}\" (found: {found})")]
    Missing {
        /// The record to create.
        record: String,
        /// The value it must hold.
        expected: String,
        /// What the resolver returned, for the user to compare.
        found: String,
    },
    /// The resolver could not be asked, or failed.
    #[error("cannot look up TXT {record} via {resolver}: {reason}")]
    Lookup {
        /// The record asked for.
        record: String,
        /// The resolver.
        resolver: SocketAddr,
        /// What went wrong.
        reason: String,
    },
    /// No resolver is configured and /etc/resolv.conf names none.
    #[error("no DNS resolver: configure one (platform.resolver) or list a nameserver in /etc/resolv.conf")]
    NoResolver,
    /// Recording the proof failed.
    #[error("cannot record the verification")]
    Store(#[from] StoreError),
}

/// Lookups one pass runs at once: enough that a batch of slow or silent resolvers takes a few timeouts, not a
/// hundred, few enough not to flood the resolver.
pub const LOOKUPS_AT_ONCE: usize = 16;

/// Lapsed claims one pass removes at most (each pass removes more).
const EXPIRED_PER_PASS: i64 = 1000;

/// What one pass over the pending claims did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ClaimsPass {
    /// Lapsed claims removed.
    pub expired: usize,
    /// Claims looked up.
    pub checked: usize,
    /// Claims proven and recorded.
    pub verified: usize,
}

/// Looks up ownership records through a recursive resolver.
#[derive(Debug, Clone)]
pub struct OwnershipChecker {
    resolver: Option<SocketAddr>,
    timeout: Duration,
    retries: usize,
}

impl OwnershipChecker {
    /// Asks `resolver`, or when `None` the nameservers of /etc/resolv.conf, read at each lookup.
    pub fn new(resolver: Option<SocketAddr>) -> Self {
        Self { resolver, timeout: Duration::from_secs(2), retries: 1 }
    }

    /// The nameservers to ask, UDP first and TCP when an answer comes truncated.
    fn nameservers(&self) -> Result<Vec<SocketAddr>, OwnershipError> {
        if let Some(r) = self.resolver {
            return Ok(vec![r]);
        }
        let conf = hickory_resolver::system_conf::read_system_conf().map_err(|_| OwnershipError::NoResolver)?.0;
        let servers: Vec<_> = conf.name_servers().iter().map(|ns| SocketAddr::new(ns.ip, 53)).collect();
        if servers.is_empty() {
            return Err(OwnershipError::NoResolver);
        }
        Ok(servers)
    }

    /// A resolver for one lookup. Nothing is cached across lookups: the owner has just published the record
    /// and clicks "verify", so an answer (or NXDOMAIN) from a minute ago must not stand in for it.
    fn client(&self, servers: &[SocketAddr]) -> Result<TokioResolver, NetError> {
        let servers = servers
            .iter()
            .map(|addr| {
                let connection = |mut c: ConnectionConfig| {
                    c.port = addr.port();
                    c
                };
                NameServerConfig::new(
                    addr.ip(),
                    true,
                    vec![connection(ConnectionConfig::udp()), connection(ConnectionConfig::tcp())],
                )
            })
            .collect();
        let mut options = ResolverOpts::default();
        options.timeout = self.timeout;
        options.attempts = self.retries;
        options.cache_size = 0;
        options.positive_max_ttl = Some(Duration::ZERO);
        options.negative_max_ttl = Some(Duration::ZERO);
        options.use_hosts_file = ResolveHosts::Never;
        Resolver::builder_with_config(ResolverConfig::from_name_servers(servers), TokioRuntimeProvider::default())
            .with_options(options)
            .build()
    }

    /// Checks the domain's TXT record.
    pub async fn check(&self, domain: &PendingDomain) -> Result<(), OwnershipError> {
        let record = domain.txt_name();
        let expected = domain.txt_value();
        let values = self.txt(&record).await?;
        if values.iter().any(|v| v == &expected) {
            return Ok(());
        }
        let found = if values.is_empty() {
            "no TXT record".to_owned()
        } else {
            values.iter().map(|v| format!("\"{v}\"")).collect::<Vec<_>>().join(", ")
        };
        Err(OwnershipError::Missing { record, expected, found })
    }

    /// Checks the domain and records the proof when it holds. A claim that cannot be verified whatever its
    /// record holds (another tenant verified the name, or it lapsed) is refused without a lookup.
    pub async fn verify(&self, store: &Store, domain: &PendingDomain) -> Result<(), OwnershipError> {
        if domain.verified {
            return Ok(());
        }
        if let Some(e) = domain.unverifiable() {
            return Err(e.into());
        }
        self.check(domain).await?;
        store.mark_domain_verified(domain.id).await?;
        tracing::info!(domain = %domain.name, tenant = %domain.tenant_id, "custom domain verified");
        Ok(())
    }

    /// One pass over the pending claims: removes lapsed ones, then looks up the `batch` checked least recently
    /// ([`Store::claims_to_check`]), [`LOOKUPS_AT_ONCE`] at a time, and records each proven one. Every pending
    /// claim is thus looked up within ceil(pending / batch) passes, whatever its age or tenant, and a pass takes
    /// at most about ceil(batch / LOOKUPS_AT_ONCE) lookup timeouts.
    pub async fn verify_pending(&self, store: &Store, batch: i64) -> Result<ClaimsPass, OwnershipError> {
        let expired = store.remove_expired_claims(EXPIRED_PER_PASS).await?;
        let claims = store.claims_to_check(batch).await?;
        let mut pass = ClaimsPass { expired, checked: claims.len(), verified: 0 };
        let mut claims = claims.into_iter();
        let mut lookups = tokio::task::JoinSet::new();
        loop {
            while lookups.len() < LOOKUPS_AT_ONCE
                && let Some(claim) = claims.next()
            {
                let (checker, store) = (self.clone(), store.clone());
                lookups.spawn(async move {
                    let result = checker.verify(&store, &claim).await;
                    (claim, result)
                });
            }
            let Some(done) = lookups.join_next().await else { break };
            match done {
                Ok((_, Ok(()))) => pass.verified += 1,
                // The database failing ends the pass; a claim removed, taken or lapsed meanwhile does not.
                Ok((_, Err(OwnershipError::Store(e))))
                    if e.is_unavailable() || matches!(e, StoreError::Database(_)) =>
                {
                    return Err(e.into());
                }
                Ok((claim, Err(e))) => {
                    tracing::debug!(domain = %claim.name, reason = %e, "custom domain not verified yet")
                }
                Err(e) => tracing::warn!(error = %e, "an ownership lookup did not finish"),
            }
        }
        Ok(pass)
    }

    /// The TXT strings at `name` (each record's strings concatenated, as RFC 7208 reads them), following the
    /// CNAMEs the resolver returns; NXDOMAIN and NODATA are empty. Each question is retried once after a
    /// timeout and asked again over TCP when the answer comes truncated.
    pub(crate) async fn txt(&self, name: &str) -> Result<Vec<String>, OwnershipError> {
        let servers = self.nameservers()?;
        let fail = |reason: String| OwnershipError::Lookup { record: name.to_owned(), resolver: servers[0], reason };
        let qname = Name::from_ascii(format!("{name}.")).map_err(|e| fail(format!("invalid name: {e}")))?;
        let client = self.client(&servers).map_err(|e| fail(e.to_string()))?;
        let lookup = match client.txt_lookup(qname).await {
            Ok(lookup) => lookup,
            Err(NetError::Dns(DnsError::NoRecordsFound(_))) => return Ok(Vec::new()),
            Err(NetError::Dns(DnsError::ResponseCode(code))) => {
                return Err(fail(format!("the resolver answered {code}")));
            }
            Err(NetError::Timeout) => return Err(fail("no answer".into())),
            Err(e) => return Err(fail(e.to_string())),
        };
        Ok(lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::TXT(txt) => {
                    Some(txt.txt_data.iter().map(|s| String::from_utf8_lossy(s).into_owned()).collect::<String>())
                }
                _ => None,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use hickory_proto::op::{Message, MessageType, ResponseCode};
    use hickory_proto::rr::Record;
    use hickory_proto::rr::rdata::TXT;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, UdpSocket};

    use super::*;

    /// How the test resolver treats the UDP question it receives, counting from 0.
    #[derive(Clone, Copy)]
    enum Udp {
        DropFirst,
        Truncate,
        Code(ResponseCode),
    }

    /// A resolver on loopback (UDP and TCP on one port) holding `value` at every TXT name; returns its
    /// address and how many UDP questions it received.
    async fn resolver(udp: Udp, value: &'static str) -> (SocketAddr, Arc<AtomicUsize>) {
        let (tcp, sock) = loop {
            let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
            if let Ok(sock) = UdpSocket::bind(tcp.local_addr().unwrap()).await {
                break (tcp, sock);
            }
        };
        let addr = sock.local_addr().unwrap();
        let answer = move |query: &Message, code: ResponseCode| {
            let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
            reply.metadata.message_type = MessageType::Response;
            reply.metadata.recursion_available = true;
            reply.metadata.response_code = code;
            let question = query.queries[0].clone();
            if code == ResponseCode::NoError {
                let txt = RData::TXT(TXT::new(vec![value.to_owned()]));
                reply.add_answer(Record::from_rdata(question.name().clone(), 60, txt));
            }
            reply.add_query(question);
            reply
        };
        let asked = Arc::new(AtomicUsize::new(0));
        let counter = asked.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                let query = Message::from_vec(&buf[..n]).unwrap();
                let reply = match (udp, counter.fetch_add(1, Ordering::SeqCst)) {
                    (Udp::DropFirst, 0) => continue,
                    (Udp::DropFirst, _) => answer(&query, ResponseCode::NoError),
                    (Udp::Truncate, _) => {
                        let mut reply = answer(&query, ResponseCode::NoError);
                        reply.answers.clear();
                        reply.metadata.truncation = true;
                        reply
                    }
                    (Udp::Code(code), _) => answer(&query, code),
                };
                sock.send_to(&reply.to_vec().unwrap(), from).await.unwrap();
            }
        });
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = tcp.accept().await {
                let mut len = [0u8; 2];
                stream.read_exact(&mut len).await.unwrap();
                let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
                stream.read_exact(&mut buf).await.unwrap();
                let reply = answer(&Message::from_vec(&buf).unwrap(), ResponseCode::NoError).to_vec().unwrap();
                let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
                framed.extend_from_slice(&reply);
                stream.write_all(&framed).await.unwrap();
            }
        });
        (addr, asked)
    }

    #[tokio::test]
    async fn a_truncated_answer_is_asked_again_over_tcp() {
        let (addr, _) = resolver(Udp::Truncate, "cloud-verify=tcp").await;
        let values = OwnershipChecker::new(Some(addr)).txt("_cloud-challenge.example.test").await.unwrap();
        assert_eq!(values, ["cloud-verify=tcp"]);
    }

    #[tokio::test]
    async fn a_lost_question_is_asked_again() {
        let (addr, asked) = resolver(Udp::DropFirst, "cloud-verify=again").await;
        let values = OwnershipChecker::new(Some(addr)).txt("_cloud-challenge.example.test").await.unwrap();
        assert_eq!(values, ["cloud-verify=again"]);
        assert_eq!(asked.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn nxdomain_is_no_record_and_servfail_is_an_error() {
        let (addr, _) = resolver(Udp::Code(ResponseCode::NXDomain), "").await;
        assert!(OwnershipChecker::new(Some(addr)).txt("_cloud-challenge.example.test").await.unwrap().is_empty());
        let (addr, _) = resolver(Udp::Code(ResponseCode::ServFail), "").await;
        let err = OwnershipChecker::new(Some(addr)).txt("_cloud-challenge.example.test").await.unwrap_err();
        assert!(matches!(&err, OwnershipError::Lookup { resolver, .. } if *resolver == addr), "{err:?}");
    }
}
