//! Proof that a tenant owns a custom domain: a TXT record `_cloud-challenge.<domain>` holding
//! `cloud-verify=<token>`, looked up through a recursive resolver (the system's, or a configured one). Until it is
//! seen, the platform neither routes the domain nor orders a certificate for it.

use std::net::SocketAddr;
use std::time::Duration;

use cloud_store::{PendingDomain, Store, StoreError};
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

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
}

impl OwnershipChecker {
    /// Asks `resolver`, or when `None` the first nameserver of /etc/resolv.conf at each lookup.
    pub fn new(resolver: Option<SocketAddr>) -> Self {
        Self { resolver, timeout: Duration::from_secs(3) }
    }

    fn resolver(&self) -> Result<SocketAddr, OwnershipError> {
        if let Some(r) = self.resolver {
            return Ok(r);
        }
        let conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        conf.lines()
            .filter_map(|l| l.trim().strip_prefix("nameserver"))
            .find_map(|ip| ip.trim().parse::<std::net::IpAddr>().ok())
            .map(|ip| SocketAddr::new(ip, 53))
            .ok_or(OwnershipError::NoResolver)
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

    /// The TXT strings at `name` (each record's strings concatenated, as RFC 7208 reads them), following what
    /// the recursive resolver returns; NXDOMAIN and NODATA are empty.
    pub(crate) async fn txt(&self, name: &str) -> Result<Vec<String>, OwnershipError> {
        let resolver = self.resolver()?;
        let fail = |reason: String| OwnershipError::Lookup { record: name.to_owned(), resolver, reason };
        let qname = Name::from_ascii(format!("{name}.")).map_err(|e| fail(format!("invalid name: {e}")))?;
        let mut query = Message::query();
        query.metadata.recursion_desired = true;
        query.add_query(Query::query(qname, RecordType::TXT));
        let bytes = query.to_vec().map_err(|e| fail(e.to_string()))?;
        let mut reply = tokio::time::timeout(self.timeout, udp_exchange(resolver, &bytes, query.metadata.id))
            .await
            .map_err(|_| fail("no answer".into()))?
            .map_err(|e| fail(e.to_string()))?;
        if reply.metadata.truncation {
            reply = tokio::time::timeout(self.timeout, tcp_exchange(resolver, &bytes))
                .await
                .map_err(|_| fail("no answer over TCP".into()))?
                .map_err(|e| fail(e.to_string()))?;
        }
        match reply.metadata.response_code {
            ResponseCode::NoError | ResponseCode::NXDomain => {}
            other => return Err(fail(format!("the resolver answered {other}"))),
        }
        Ok(reply
            .answers
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

async fn udp_exchange(server: SocketAddr, bytes: &[u8], id: u16) -> std::io::Result<Message> {
    let bind: SocketAddr = if server.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
    let sock = UdpSocket::bind(bind).await?;
    sock.connect(server).await?;
    sock.send(bytes).await?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = sock.recv(&mut buf).await?;
        // Anything else on this socket (a late or forged reply) is not ours.
        if let Ok(m) = Message::from_vec(&buf[..n])
            && m.metadata.id == id
        {
            return Ok(m);
        }
    }
}

async fn tcp_exchange(server: SocketAddr, bytes: &[u8]) -> std::io::Result<Message> {
    let mut stream = TcpStream::connect(server).await?;
    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(bytes);
    stream.write_all(&framed).await?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await?;
    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
    stream.read_exact(&mut buf).await?;
    Message::from_vec(&buf).map_err(std::io::Error::other)
}
