//! The certificate manager (`cloudd certs`, also inside `cloudd dev`): verifies custom domains whose owners
//! published their TXT token, and obtains and renews ACME certificates for verified custom domains, answering
//! http-01 through the edges (`acme_http_tokens`) or dns-01 through our DNS (`acme_challenges`). Everything it
//! does goes through PostgreSQL, so any number of replicas may run: a per-domain lease makes one of them order a
//! given name at a time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cloud_store::{DueDomain, DuePlatformCertificate, NewCertificate, Store, StoreError};
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};

use crate::acme::{AcmeClient, AcmeConfig, AcmeError, ChallengeKind, ChallengeResponder, ResponderError};
use crate::ownership::OwnershipChecker;
use crate::seal::SecretKey;

/// Name of the ACME account credentials (sealed) in `platform_secrets`, per directory.
const ACCOUNT_SECRET: &str = "acme_account";

/// First wait before writing again what PostgreSQL did not take; it doubles up to [`RETRY_LONGEST`].
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_LONGEST: Duration = Duration::from_secs(5);

/// How long the challenge answers of an order are retried: the CA gives an order minutes, not hours.
const RESPONDER_RETRY_FOR: Duration = Duration::from_secs(30);

/// Runs a write again, with backoff, while PostgreSQL does not answer, until `deadline`; other errors (and the
/// last one) are returned. For what a pass cannot simply redo next time: an issued certificate, the release of a
/// lease, the reason an order failed, the answers the CA is about to check.
async fn persist<T, F: Future<Output = Result<T, StoreError>>>(
    what: &str,
    deadline: tokio::time::Instant,
    mut write: impl FnMut() -> F,
) -> Result<T, StoreError> {
    let mut wait = RETRY_FIRST;
    loop {
        match write().await {
            Err(e) if e.is_unavailable() && tokio::time::Instant::now() + wait < deadline => {
                tracing::warn!(what, error = %cloud_domain::error_chain(&e), retry_in = ?wait, "PostgreSQL did not take a write; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(RETRY_LONGEST);
            }
            done => return done,
        }
    }
}

/// What the certificate manager does and how often: the `[certs]` section of `cloudd`'s configuration file.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ManagerConfig {
    /// The ACME CA; without it only ownership checks run. Not in the file as such:
    /// [`with_acme_from_file_keys`](Self::with_acme_from_file_keys) makes it from the `acme_*` keys.
    #[serde(skip)]
    pub acme: Option<AcmeConfig>,
    /// The ACME directory URL; none: ownership checks only.
    pub acme_directory: Option<String>,
    /// Contact URLs of the ACME account (`mailto:ops@example.com`).
    pub acme_contact: Vec<String>,
    /// PEM file of the CA that signs the ACME server's own certificate, when no public one does (pebble).
    pub acme_root_file: Option<std::path::PathBuf>,
    /// How domains prove control to the CA (wildcards always use dns-01): `"http-01"` or `"dns-01"`.
    #[serde(with = "challenge_kind")]
    pub challenge: ChallengeKind,
    /// Time between passes.
    #[serde(rename = "interval_seconds", with = "cloud_domain::duration::seconds")]
    pub interval: Duration,
    /// Pending custom-domain claims looked up per pass (the least recently checked first).
    pub ownership_batch: i64,
    /// Renew an ACME certificate this long before it ends (a per-domain jitter of up to a tenth of it spreads
    /// renewals).
    #[serde(rename = "renew_before_days", with = "cloud_domain::duration::days")]
    pub renew_before: Duration,
    /// After a failed order, wait this long before the next attempt for that domain.
    #[serde(rename = "retry_after_seconds", with = "cloud_domain::duration::seconds")]
    pub retry_after: Duration,
    /// Our DNS servers: a dns-01 answer is handed to the CA once every one of them serves it. Empty: wait
    /// `dns_propagation` instead.
    pub dns_servers: Vec<SocketAddr>,
    /// See `dns_servers`.
    #[serde(rename = "dns_propagation_seconds", with = "cloud_domain::duration::seconds")]
    pub dns_propagation: Duration,
    /// This replica's name in order leases.
    pub holder: String,
    /// Where the process running the manager serves its `/healthz`, `/readyz` and `/metrics` (see
    /// [`ManagerProbe`]).
    pub ops_listen: SocketAddr,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            acme: None,
            acme_directory: None,
            acme_contact: Vec::new(),
            acme_root_file: None,
            challenge: ChallengeKind::Http01,
            interval: Duration::from_secs(30),
            ownership_batch: 100,
            renew_before: Duration::from_secs(30 * 86400),
            retry_after: Duration::from_secs(3600),
            dns_servers: Vec::new(),
            dns_propagation: Duration::from_secs(2),
            holder: format!("certs-{}", uuid::Uuid::new_v4().simple()),
            ops_listen: SocketAddr::from(([127, 0, 0, 1], 9157)),
        }
    }
}

impl ManagerConfig {
    /// Sets [`acme`](Self::acme) from `acme_directory`, `acme_contact` and `acme_root_file` (read now), unless it
    /// is set already.
    pub fn with_acme_from_file_keys(mut self) -> std::io::Result<Self> {
        if let (None, Some(url)) = (&self.acme, &self.acme_directory) {
            let mut acme = AcmeConfig::new(url.clone());
            acme.contact = self.acme_contact.clone();
            acme.root_pem = self.acme_root_file.as_deref().map(std::fs::read_to_string).transpose()?;
            self.acme = Some(acme);
        }
        Ok(self)
    }
}

/// [`ChallengeKind`] as the file writes it.
mod challenge_kind {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::acme::ChallengeKind;

    pub fn serialize<S: Serializer>(kind: &ChallengeKind, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(kind)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ChallengeKind, D::Error> {
        match String::deserialize(d)?.as_str() {
            "http-01" => Ok(ChallengeKind::Http01),
            "dns-01" => Ok(ChallengeKind::Dns01),
            other => {
                Err(serde::de::Error::custom(format!("{other:?} is not a challenge: use \"http-01\" or \"dns-01\"")))
            }
        }
    }
}

/// Why a pass could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManagerError {
    /// The database failed.
    #[error("database")]
    Store(#[from] StoreError),
    /// The ACME account could not be created or restored.
    #[error("ACME account")]
    Account(#[from] AcmeError),
    /// The account credentials could not be sealed or opened.
    #[error("ACME account credentials")]
    Seal(#[from] crate::seal::SealError),
    /// Checking domain ownership failed for a reason other than a missing record.
    #[error("ownership checks")]
    Ownership(#[from] crate::ownership::OwnershipError),
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PassReport {
    /// Domains whose ownership was verified.
    pub verified: usize,
    /// Unverified claims removed because they lapsed.
    pub expired_claims: usize,
    /// Certificates obtained or renewed.
    pub issued: Vec<String>,
    /// Orders that failed, with the reason recorded.
    pub failed: Vec<String>,
    /// Certificates of the platform's own servers obtained or renewed, by purpose (`api`).
    pub platform_issued: Vec<String>,
}

/// The certificate manager.
pub struct CertManager {
    store: Store,
    key: Arc<SecretKey>,
    checker: OwnershipChecker,
    config: ManagerConfig,
    client: Option<AcmeClient>,
    registry: Registry,
    orders: IntCounterVec,
    pass_ok: IntGauge,
}

impl std::fmt::Debug for CertManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertManager").field("config", &self.config).finish_non_exhaustive()
    }
}

impl CertManager {
    /// A manager over `store`, sealing keys with `key`.
    pub fn new(store: Store, key: Arc<SecretKey>, checker: OwnershipChecker, config: ManagerConfig) -> Self {
        let registry = Registry::new();
        let orders = IntCounterVec::new(
            Opts::new("certs_acme_orders_total", "ACME orders by result (issued, failed)"),
            &["result"],
        )
        .expect("valid metric");
        let pass_ok = IntGauge::new("certs_last_pass_ok", "1 when the last pass ran to its end").expect("valid metric");
        registry.register(Box::new(orders.clone())).expect("registered once");
        registry.register(Box::new(pass_ok.clone())).expect("registered once");
        Self { store, key, checker, config, client: None, registry, orders, pass_ok }
    }

    /// Prometheus text exposition of the manager's metrics.
    pub fn metrics_text(&self) -> String {
        self.probe().metrics_text()
    }

    /// A view of the metrics and health that stays valid while [`run`](Self::run) owns the manager.
    pub fn probe(&self) -> ManagerProbe {
        ManagerProbe { registry: self.registry.clone(), pass_ok: self.pass_ok.clone() }
    }

    /// One pass: ownership checks, then the orders that are due.
    pub async fn pass(&mut self) -> Result<PassReport, ManagerError> {
        self.pass_ok.set(0);
        let claims = self.checker.verify_pending(&self.store, self.config.ownership_batch).await?;
        let mut report = PassReport { verified: claims.verified, expired_claims: claims.expired, ..Default::default() };
        if self.config.acme.is_some() {
            let mut due = self.store.acme_due(self.config.renew_before, self.config.retry_after, 20).await?;
            due.retain(|d| self.renewal_reached(d));
            for d in due {
                if !self.store.take_acme_lease(&d.domain, &self.config.holder, self.lease_ttl()).await? {
                    continue;
                }
                // Past the lease another replica may order the name: writes about this order stop trying then.
                let lease_end = tokio::time::Instant::now() + self.lease_ttl();
                self.store.record_acme_pending(d.tenant_id, &d.domain).await?;
                let outcome = self.order(&d, lease_end).await;
                persist("release of an ACME lease", lease_end, || {
                    self.store.release_acme_lease(&d.domain, &self.config.holder)
                })
                .await?;
                match outcome {
                    Ok(()) => {
                        self.orders.with_label_values(&["issued"]).inc();
                        report.issued.push(d.domain);
                    }
                    Err(OrderFailure::Acme(e)) => {
                        let reason = cloud_domain::error_chain(&e);
                        tracing::warn!(domain = %d.domain, %reason, "ACME order failed");
                        persist("reason of a failed ACME order", lease_end, || {
                            self.store.record_acme_error(d.tenant_id, &d.domain, &reason)
                        })
                        .await?;
                        self.orders.with_label_values(&["failed"]).inc();
                        report.failed.push(d.domain);
                    }
                    Err(OrderFailure::Manager(e)) => return Err(e),
                }
            }
            for due in self.store.platform_certificates_due(self.config.renew_before, self.config.retry_after).await? {
                let lease = format!("platform:{}", due.name);
                if !self.store.take_acme_lease(&lease, &self.config.holder, self.lease_ttl()).await? {
                    continue;
                }
                let lease_end = tokio::time::Instant::now() + self.lease_ttl();
                let outcome = self.order_platform(&due, lease_end).await;
                persist("release of an ACME lease", lease_end, || {
                    self.store.release_acme_lease(&lease, &self.config.holder)
                })
                .await?;
                match outcome {
                    Ok(()) => {
                        self.orders.with_label_values(&["issued"]).inc();
                        report.platform_issued.push(due.name);
                    }
                    Err(OrderFailure::Acme(e)) => {
                        let reason = cloud_domain::error_chain(&e);
                        tracing::warn!(certificate = %due.name, names = ?due.names, %reason, "ACME order failed");
                        persist("reason of a failed ACME order", lease_end, || {
                            self.store.record_platform_certificate_error(&due.name, &reason)
                        })
                        .await?;
                        self.orders.with_label_values(&["failed"]).inc();
                        report.failed.push(due.name);
                    }
                    Err(OrderFailure::Manager(e)) => return Err(e),
                }
            }
        }
        self.pass_ok.set(1);
        Ok(report)
    }

    /// Orders a certificate of the platform's own (the API's): always dns-01, answered by our DNS, since its
    /// names need not lead to an edge.
    async fn order_platform(
        &mut self,
        due: &DuePlatformCertificate,
        lease_end: tokio::time::Instant,
    ) -> Result<(), OrderFailure> {
        let responder = StoreResponder {
            store: self.store.clone(),
            dns_servers: self.config.dns_servers.clone(),
            dns_propagation: self.config.dns_propagation,
        };
        let client = self.client().await.map_err(OrderFailure::Manager)?.clone();
        let issued = client.order(&due.names, ChallengeKind::Dns01, &responder).await.map_err(OrderFailure::Acme)?;
        let now = time::OffsetDateTime::now_utc();
        let checked = crate::upload::check_upload(&issued.chain_pem, &issued.key_pem, &due.names[0], now)
            .map_err(|e| OrderFailure::Acme(AcmeError::BadCertificate(e)))?;
        let sealed = self.key.seal(issued.key_pem.as_bytes()).map_err(|e| OrderFailure::Manager(e.into()))?;
        let not_after = chrono::DateTime::from_timestamp(checked.not_after.unix_timestamp(), 0).unwrap_or_default();
        persist("an issued certificate", lease_end, || {
            self.store.put_platform_certificate(&due.name, &due.names, &issued.chain_pem, &sealed, not_after)
        })
        .await
        .map_err(|e| OrderFailure::Manager(e.into()))?;
        tracing::info!(certificate = %due.name, names = ?due.names, %not_after, "ACME certificate stored");
        Ok(())
    }

    /// Passes every `interval` until the task is dropped.
    pub async fn run(mut self) {
        loop {
            if let Err(e) = self.pass().await {
                tracing::warn!(error = %cloud_domain::error_chain(&e), "certificate pass failed");
            }
            tokio::time::sleep(self.config.interval).await;
        }
    }

    fn lease_ttl(&self) -> Duration {
        self.config.acme.as_ref().map_or(Duration::from_secs(300), |a| a.timeout) + Duration::from_secs(60)
    }

    /// A renewal waits until `renew_before` (minus a per-domain jitter) before the end; a first order never waits.
    fn renewal_reached(&self, d: &DueDomain) -> bool {
        let Some(not_after) = d.not_after else { return true };
        let tenth = (self.config.renew_before.as_secs() / 10).max(1);
        let jitter = d.domain.bytes().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64)) % tenth;
        let start = not_after - chrono::Duration::seconds((self.config.renew_before.as_secs() - jitter) as i64);
        chrono::Utc::now() >= start
    }

    async fn client(&mut self) -> Result<&AcmeClient, ManagerError> {
        if self.client.is_none() {
            let config = self.config.acme.clone().expect("checked by the caller");
            let name = format!("{ACCOUNT_SECRET}:{}", config.directory_url);
            let client = match self.store.stored_platform_secret(&name).await? {
                Some(sealed) => {
                    let creds = String::from_utf8(self.key.open(&sealed)?).unwrap_or_default();
                    AcmeClient::restore(config, &creds).await?
                }
                None => {
                    let created = AcmeClient::create(config.clone()).await?;
                    let sealed = self.key.seal(created.credentials_json().as_bytes())?;
                    let stored = self.store.platform_secret_or(&name, sealed.clone()).await?;
                    if stored == sealed {
                        created
                    } else {
                        // Another replica registered first: use its account.
                        let creds = String::from_utf8(self.key.open(&stored)?).unwrap_or_default();
                        AcmeClient::restore(config, &creds).await?
                    }
                }
            };
            self.client = Some(client);
        }
        Ok(self.client.as_ref().expect("set above"))
    }

    async fn order(&mut self, d: &DueDomain, lease_end: tokio::time::Instant) -> Result<(), OrderFailure> {
        let kind = if d.domain.starts_with("*.") { ChallengeKind::Dns01 } else { self.config.challenge };
        let responder = StoreResponder {
            store: self.store.clone(),
            dns_servers: self.config.dns_servers.clone(),
            dns_propagation: self.config.dns_propagation,
        };
        let client = self.client().await.map_err(OrderFailure::Manager)?.clone();
        let issued =
            client.order(std::slice::from_ref(&d.domain), kind, &responder).await.map_err(OrderFailure::Acme)?;
        let checked =
            crate::upload::check_upload(&issued.chain_pem, &issued.key_pem, &d.domain, time::OffsetDateTime::now_utc())
                .map_err(|e| OrderFailure::Acme(AcmeError::BadCertificate(e)))?;
        let sealed = self.key.seal(issued.key_pem.as_bytes()).map_err(|e| OrderFailure::Manager(e.into()))?;
        let to_utc =
            |t: time::OffsetDateTime| chrono::DateTime::from_timestamp(t.unix_timestamp(), 0).unwrap_or_default();
        let certificate = NewCertificate {
            domain: d.domain.clone(),
            names: checked.names,
            source: "acme",
            chain_pem: issued.chain_pem,
            key_sealed: sealed,
            not_before: to_utc(checked.not_before),
            not_after: to_utc(checked.not_after),
        };
        // Issued and paid for in the CA's rate limits: kept trying for as long as the lease lasts.
        persist("an issued certificate", lease_end, || self.store.put_certificate(d.tenant_id, certificate.clone()))
            .await
            .map_err(|e| OrderFailure::Manager(e.into()))?;
        tracing::info!(domain = %d.domain, not_after = %checked.not_after, "ACME certificate stored");
        Ok(())
    }
}

/// The manager's metrics and health, shared with whoever serves them.
#[derive(Debug, Clone)]
pub struct ManagerProbe {
    registry: Registry,
    pass_ok: IntGauge,
}

impl ManagerProbe {
    /// Prometheus text exposition.
    pub fn metrics_text(&self) -> String {
        use prometheus::Encoder;
        let mut out = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    /// Whether the last pass ran to its end (false before the first).
    pub fn is_healthy(&self) -> bool {
        self.pass_ok.get() == 1
    }
}

enum OrderFailure {
    /// The order failed: recorded on the domain, retried later.
    Acme(AcmeError),
    /// The platform failed: the pass stops.
    Manager(ManagerError),
}

/// Publishes challenge answers where the platform serves them: http-01 in `acme_http_tokens` (read by every
/// edge at request time), dns-01 in `acme_challenges` (served by our DNS once its snapshot has it).
struct StoreResponder {
    store: Store,
    dns_servers: Vec<SocketAddr>,
    dns_propagation: Duration,
}

#[async_trait]
impl ChallengeResponder for StoreResponder {
    async fn publish_http01(&self, domain: &str, token: &str, key_authorization: &str) -> Result<(), ResponderError> {
        let put = || self.store.put_acme_http_token(domain, token, key_authorization);
        Ok(persist("an http-01 answer", responder_deadline(), put).await?)
    }

    async fn withdraw_http01(&self, _domain: &str, token: &str) -> Result<(), ResponderError> {
        let remove = || self.store.remove_acme_http_token(token);
        Ok(persist("withdrawing an http-01 answer", responder_deadline(), remove).await?)
    }

    async fn publish_dns01(&self, record: &str, value: &str) -> Result<(), ResponderError> {
        persist("a dns-01 answer", responder_deadline(), || self.store.put_acme_challenge(record, value)).await?;
        if self.dns_servers.is_empty() {
            tokio::time::sleep(self.dns_propagation).await;
            return Ok(());
        }
        // Handed to the CA only once every one of our servers answers it.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        for server in &self.dns_servers {
            let checker = OwnershipChecker::new(Some(*server));
            while !checker.txt(record).await.is_ok_and(|v| v.iter().any(|v| v == value)) {
                if tokio::time::Instant::now() > deadline {
                    return Err(format!("our DNS at {server} does not serve TXT {record} after 60 s").into());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    async fn withdraw_dns01(&self, record: &str, value: &str) -> Result<(), ResponderError> {
        let remove = || self.store.remove_acme_challenge(record, value);
        Ok(persist("withdrawing a dns-01 answer", responder_deadline(), remove).await?)
    }
}

fn responder_deadline() -> tokio::time::Instant {
    tokio::time::Instant::now() + RESPONDER_RETRY_FOR
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn unresponsive() -> StoreError {
        StoreError::Unresponsive { waited: Duration::from_secs(5) }
    }

    #[tokio::test]
    async fn a_write_postgresql_did_not_take_is_retried_until_it_is_taken() {
        let attempts = AtomicU32::new(0);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let written = persist("test", deadline, || async {
            match attempts.fetch_add(1, Ordering::SeqCst) {
                0 | 1 => Err(unresponsive()),
                n => Ok(n),
            }
        })
        .await;
        assert_eq!(written.unwrap(), 2, "taken at the third attempt");
    }

    #[tokio::test]
    async fn a_refusal_or_a_deadline_ends_the_retries() {
        let attempts = AtomicU32::new(0);
        let far = tokio::time::Instant::now() + Duration::from_secs(60);
        let refused = persist("test", far, || async {
            attempts.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>(StoreError::Invalid("no".into()))
        })
        .await;
        assert!(matches!(refused, Err(StoreError::Invalid(_))));
        assert_eq!(attempts.swap(0, Ordering::SeqCst), 1, "a refusal is not retried");

        let now = tokio::time::Instant::now();
        let late = persist("test", now, || async {
            attempts.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>(unresponsive())
        })
        .await;
        assert!(matches!(late, Err(StoreError::Unresponsive { .. })));
        assert_eq!(attempts.load(Ordering::SeqCst), 1, "no retry past the deadline");
    }
}
