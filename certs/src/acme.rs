//! ACME (RFC 8555) orders for custom domains, over `instant-acme`: one account per platform, and one call that
//! runs a whole order (challenges published through a [`ChallengeResponder`], key and CSR made here, the chain
//! fetched and checked) and always withdraws what it published.
//!
//! Boundaries: no storage and no scheduling. The account credentials are handed out as JSON for the caller to keep
//! (in PostgreSQL, sealed); renewal and retries belong to the caller. Who answers challenges is the caller's
//! choice too: the edge serves http-01 tokens, our DNS serves dns-01 TXT records. tls-alpn-01 is not offered: the
//! edge's listener (pingora with rustls) offers one ALPN set, so it cannot answer `acme-tls/1` beside HTTP.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BodyWrapper, ChallengeType, Identifier, NewAccount, NewOrder,
    Order, OrderStatus, Problem, RetryPolicy,
};
use rcgen::{CertificateParams, DistinguishedName, KeyPair};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use time::OffsetDateTime;
use tokio::time::Instant;

use crate::Issued;
use crate::upload::{UploadError, check_upload};

/// What a [`ChallengeResponder`] may fail with; the order reports it as the source of
/// [`AcmeError::Publish`].
pub type ResponderError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Where to order certificates and how long to wait.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AcmeConfig {
    /// The ACME directory, e.g. `https://acme-v02.api.letsencrypt.org/directory`.
    pub directory_url: String,
    /// Contact URIs for the account (`mailto:ops@example.com`); the CA writes there about expiry and incidents.
    pub contact: Vec<String>,
    /// Certificates (PEM) to trust for the directory's TLS instead of the system's roots: a test CA such as
    /// pebble. `None` verifies with the platform's trust store.
    pub root_pem: Option<String>,
    /// Bound on one account creation or restore, and on one whole order (from the new order to the chain).
    pub timeout: Duration,
    /// First wait before polling an order; doubled after each poll, unless the CA's `Retry-After` says when.
    pub poll_initial: Duration,
}

impl AcmeConfig {
    /// The directory at `directory_url`, no contact, system roots, 3 minutes per order, polls from 250 ms.
    pub fn new(directory_url: impl Into<String>) -> Self {
        Self {
            directory_url: directory_url.into(),
            contact: Vec::new(),
            root_pem: None,
            timeout: Duration::from_secs(180),
            poll_initial: Duration::from_millis(250),
        }
    }
}

/// The challenge types we answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ChallengeKind {
    /// The key authorization served at `http://<name>/.well-known/acme-challenge/<token>` (port 80). No wildcards.
    Http01,
    /// The key authorization's digest in a TXT record at `_acme-challenge.<name>`. Required for wildcards.
    Dns01,
}

impl ChallengeKind {
    fn acme_type(self) -> ChallengeType {
        match self {
            Self::Http01 => ChallengeType::Http01,
            Self::Dns01 => ChallengeType::Dns01,
        }
    }
}

impl fmt::Display for ChallengeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Http01 => "http-01",
            Self::Dns01 => "dns-01",
        })
    }
}

/// Publishes challenge answers where the CA will look for them. The edge implements the http-01 pair, our DNS
/// the dns-01 pair; each pair defaults to "not supported" (publish fails, withdraw does nothing).
///
/// A publish must return only once the answer is served (every replica of the edge or the DNS), since the CA is
/// told to look right after. Publishing the same thing twice must be harmless. Every publish attempted, even one
/// that failed (it may have half happened), is followed by its withdrawal when the order ends, whatever the
/// outcome: withdrawing what is not there must be harmless too.
#[async_trait]
pub trait ChallengeResponder: Send + Sync {
    /// Serves `key_authorization` as the body of `http://<domain>/.well-known/acme-challenge/<token>`.
    async fn publish_http01(&self, domain: &str, token: &str, key_authorization: &str) -> Result<(), ResponderError> {
        let _ = (domain, token, key_authorization);
        Err("this responder does not answer http-01 challenges".into())
    }

    /// Stops serving the token.
    async fn withdraw_http01(&self, domain: &str, token: &str) -> Result<(), ResponderError> {
        let _ = (domain, token);
        Ok(())
    }

    /// Adds `value` to the TXT records at `record` (`_acme-challenge.<domain>`, no trailing dot). A name and its
    /// wildcard share the record with two values, so add beside existing values, never replace them.
    async fn publish_dns01(&self, record: &str, value: &str) -> Result<(), ResponderError> {
        let _ = (record, value);
        Err("this responder does not answer dns-01 challenges".into())
    }

    /// Removes `value` (only that one) from the TXT records at `record`.
    async fn withdraw_dns01(&self, record: &str, value: &str) -> Result<(), ResponderError> {
        let _ = (record, value);
        Ok(())
    }
}

/// Why an account or an order failed. Variants carrying `reason` quote the CA's problem document.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AcmeError {
    /// The directory cannot be reached or spoke something other than ACME (TLS, HTTP, JSON).
    #[error("cannot talk to the ACME server while {stage}")]
    Transport {
        /// What we were doing.
        stage: &'static str,
        /// The client's error.
        #[source]
        source: instant_acme::Error,
    },
    /// The CA refused a request (bad contact, rate limit, rejected name, bad CSR, ...).
    #[error("the ACME server refused while {stage}: {reason}")]
    Refused {
        /// What we were doing.
        stage: &'static str,
        /// The CA's problem: detail (type), and per-name subproblems.
        reason: String,
    },
    /// `root_pem` holds no usable certificate.
    #[error("root_pem holds no usable PEM certificate: {reason}")]
    BadRoot {
        /// What is wrong with it.
        reason: String,
    },
    /// The stored credentials are not ours to use: unreadable, or for another directory.
    #[error("the stored ACME account credentials cannot be used: {reason}")]
    Credentials {
        /// What is wrong with them.
        reason: String,
    },
    /// An order needs at least one name.
    #[error("an ACME order needs at least one name")]
    NoNames,
    /// The CA offers no challenge of the asked kind for a name (e.g. http-01 for a wildcard).
    #[error("the ACME server offers no {kind} challenge for {name} (offered: {offered})")]
    ChallengeUnavailable {
        /// The name (`*.` for a wildcard).
        name: String,
        /// The kind asked for.
        kind: ChallengeKind,
        /// The challenge types offered.
        offered: String,
    },
    /// An authorization is in a state no challenge can fix (deactivated, expired, revoked, already invalid).
    #[error("the authorization for {name} is {status}")]
    AuthorizationUnusable {
        /// The name.
        name: String,
        /// Its status as the CA reports it.
        status: String,
    },
    /// The responder could not publish a challenge answer.
    #[error("cannot publish the {kind} answer for {name}")]
    Publish {
        /// The name.
        name: String,
        /// The challenge kind.
        kind: ChallengeKind,
        /// The responder's error.
        #[source]
        source: ResponderError,
    },
    /// The CA looked for the answer and did not find the right one: `reason` is its verdict (wrong value,
    /// connection refused, NXDOMAIN, ...).
    #[error("the {kind} challenge for {name} failed: {reason}")]
    ChallengeFailed {
        /// The name.
        name: String,
        /// The challenge kind.
        kind: ChallengeKind,
        /// The CA's problem for the challenge.
        reason: String,
    },
    /// The order became invalid and no failed challenge explains it.
    #[error("the order for {names} became invalid: {reason}")]
    OrderInvalid {
        /// The names ordered.
        names: String,
        /// The CA's problem for the order, if any.
        reason: String,
    },
    /// The deadline ([`AcmeConfig::timeout`]) passed.
    #[error("gave up after {after:?} while {stage}")]
    Timeout {
        /// What we were waiting for.
        stage: &'static str,
        /// The configured bound.
        after: Duration,
    },
    /// Making the certificate's key or signing request failed.
    #[error("cannot make the certificate key or signing request")]
    Generate(#[source] rcgen::Error),
    /// The CA returned a chain that does not hold up (unparsable, not for our key or names, not current).
    #[error("the certificate the ACME server issued is unusable")]
    BadCertificate(#[source] UploadError),
}

/// The CA's problem as one line: detail, type, and each subproblem.
fn describe(problem: &Problem) -> String {
    let mut out = problem.detail.clone().unwrap_or_else(|| "no detail given".to_owned());
    if let Some(kind) = &problem.r#type {
        out.push_str(&format!(" ({kind})"));
    }
    for sub in &problem.subproblems {
        out.push_str(&format!("; {sub}"));
    }
    out
}

fn classify(stage: &'static str) -> impl FnOnce(instant_acme::Error) -> AcmeError {
    move |e| match e {
        instant_acme::Error::Api(problem) => AcmeError::Refused { stage, reason: describe(&problem) },
        source => AcmeError::Transport { stage, source },
    }
}

/// An ACME account, ready to order. Cheap to clone.
#[derive(Clone)]
pub struct AcmeClient {
    config: AcmeConfig,
    account: Account,
    credentials: Arc<str>,
}

impl fmt::Debug for AcmeClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AcmeClient")
            .field("directory_url", &self.config.directory_url)
            .field("account", &self.account.id())
            .finish_non_exhaustive()
    }
}

impl AcmeClient {
    /// Registers a new account (agreeing to the CA's terms of service). Store
    /// [`credentials_json`](Self::credentials_json) to [`restore`](Self::restore) it later instead of registering
    /// again.
    pub async fn create(config: AcmeConfig) -> Result<Self, AcmeError> {
        let builder = account_builder(&config)?;
        let contact: Vec<&str> = config.contact.iter().map(String::as_str).collect();
        let new = NewAccount { contact: &contact, terms_of_service_agreed: true, only_return_existing: false };
        let stage = "creating the account";
        let (account, credentials) =
            tokio::time::timeout(config.timeout, builder.create(&new, config.directory_url.clone(), None))
                .await
                .map_err(|_| AcmeError::Timeout { stage, after: config.timeout })?
                .map_err(classify(stage))?;
        let credentials = serde_json::to_string(&credentials)
            .map_err(|e| AcmeError::Credentials { reason: format!("cannot serialize them: {e}") })?;
        tracing::info!(directory = %config.directory_url, account = %account.id(), "ACME account created");
        Ok(Self { config, account, credentials: credentials.into() })
    }

    /// The account whose [`credentials_json`](Self::credentials_json) were stored. Fails when they belong to
    /// another directory than `config.directory_url` (e.g. staging credentials on production).
    pub async fn restore(config: AcmeConfig, credentials_json: &str) -> Result<Self, AcmeError> {
        let value: serde_json::Value = serde_json::from_str(credentials_json)
            .map_err(|e| AcmeError::Credentials { reason: format!("not JSON: {e}") })?;
        match value.get("directory").and_then(|d| d.as_str()) {
            Some(d) if d == config.directory_url => {}
            Some(d) => {
                return Err(AcmeError::Credentials {
                    reason: format!("they are for {d}, not {}", config.directory_url),
                });
            }
            None => return Err(AcmeError::Credentials { reason: "they name no directory".into() }),
        }
        let credentials: AccountCredentials = serde_json::from_value(value)
            .map_err(|e| AcmeError::Credentials { reason: format!("not ACME account credentials: {e}") })?;
        let builder = account_builder(&config)?;
        let stage = "restoring the account";
        let account = tokio::time::timeout(config.timeout, builder.from_credentials(credentials))
            .await
            .map_err(|_| AcmeError::Timeout { stage, after: config.timeout })?
            .map_err(classify(stage))?;
        Ok(Self { config, account, credentials: credentials_json.into() })
    }

    /// The account's credentials (its URL, private key and directory) as JSON, for [`restore`](Self::restore).
    /// Secret: seal it before storing.
    pub fn credentials_json(&self) -> &str {
        &self.credentials
    }

    /// The account's URL at the CA.
    pub fn account_id(&self) -> &str {
        self.account.id()
    }

    /// Orders a certificate for `names` (DNS names; wildcards need dns-01), proving control with `kind` through
    /// `responder`, within [`AcmeConfig::timeout`]. Everything published is withdrawn before returning, whatever
    /// the outcome; a failed withdrawal is logged, not returned.
    pub async fn order(
        &self,
        names: &[String],
        kind: ChallengeKind,
        responder: &dyn ChallengeResponder,
    ) -> Result<Issued, AcmeError> {
        if names.is_empty() {
            return Err(AcmeError::NoNames);
        }
        let mut progress = Progress { stage: "creating the order", published: Vec::new() };
        let deadline = Instant::now() + self.config.timeout;
        let outcome =
            match tokio::time::timeout_at(deadline, self.run(names, kind, responder, deadline, &mut progress)).await {
                Ok(outcome) => outcome,
                // A request that hangs: the polls themselves stop at the deadline.
                Err(_) => Err(AcmeError::Timeout { stage: progress.stage, after: self.config.timeout }),
            };
        for answer in progress.published {
            let withdraw = async {
                match &answer {
                    Published::Http01 { domain, token } => responder.withdraw_http01(domain, token).await,
                    Published::Dns01 { record, value } => responder.withdraw_dns01(record, value).await,
                }
            };
            let withdrawn = tokio::time::timeout(self.config.timeout, withdraw)
                .await
                .unwrap_or_else(|_| Err("the responder did not answer in time".into()));
            if let Err(e) = withdrawn {
                tracing::warn!(answer = ?answer, error = %e, "cannot withdraw an ACME challenge answer");
            }
        }
        match &outcome {
            Ok(issued) => {
                tracing::info!(names = ?names, %kind, not_after = %issued.not_after, "ACME certificate issued")
            }
            Err(e) => tracing::warn!(names = ?names, %kind, error = %e, "ACME order failed"),
        }
        outcome
    }

    async fn run(
        &self,
        names: &[String],
        kind: ChallengeKind,
        responder: &dyn ChallengeResponder,
        deadline: Instant,
        progress: &mut Progress,
    ) -> Result<Issued, AcmeError> {
        let identifiers: Vec<Identifier> = names.iter().map(|n| Identifier::Dns(n.clone())).collect();
        let mut order =
            self.account.new_order(&NewOrder::new(&identifiers)).await.map_err(classify("creating the order"))?;

        progress.stage = "answering the challenges";
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz.map_err(classify("fetching an authorization"))?;
            let name = authz.identifier().to_string();
            match authz.status {
                AuthorizationStatus::Pending => {}
                // Already proven recently (CAs reuse authorizations): nothing to publish.
                AuthorizationStatus::Valid => continue,
                other => return Err(AcmeError::AuthorizationUnusable { name, status: format!("{other:?}") }),
            }
            let bare = match &authz.identifier().identifier {
                Identifier::Dns(d) => d.clone(),
                other => format!("{other:?}"),
            };
            let offered = authz.challenges.iter().map(|c| type_name(&c.r#type)).collect::<Vec<_>>().join(", ");
            let Some(mut challenge) = authz.challenge(kind.acme_type()) else {
                return Err(AcmeError::ChallengeUnavailable { name, kind, offered });
            };
            let key_authorization = challenge.key_authorization();
            let answer = match kind {
                ChallengeKind::Http01 => Published::Http01 { domain: bare, token: challenge.token.clone() },
                ChallengeKind::Dns01 => Published::Dns01 {
                    record: format!("_acme-challenge.{}", bare.trim_end_matches('.')),
                    value: key_authorization.dns_value(),
                },
            };
            // Recorded before the attempt: a failed publish may have half happened (some replicas), so it is
            // withdrawn too.
            progress.published.push(answer);
            let published = match progress.published.last().expect("just pushed") {
                Published::Http01 { domain, token } => {
                    responder.publish_http01(domain, token, key_authorization.as_str()).await
                }
                Published::Dns01 { record, value } => responder.publish_dns01(record, value).await,
            };
            published.map_err(|source| AcmeError::Publish { name: name.clone(), kind, source })?;
            // A CA may validate at once and put its verdict in this reply.
            challenge.set_ready().await.map_err(|e| match e {
                instant_acme::Error::Api(problem) => {
                    AcmeError::ChallengeFailed { name, kind, reason: describe(&problem) }
                }
                e => classify("telling the server a challenge is ready")(e),
            })?;
        }

        progress.stage = "waiting for the server to validate the challenges";
        let ready = poll_until(&self.config, deadline, progress.stage, &mut order, |order, policy| {
            Box::pin(order.poll_ready(policy))
        })
        .await?;
        match ready {
            Ok(OrderStatus::Ready) => {}
            // The order carries a problem (poll_ready's error) or became invalid: say which challenge failed.
            Ok(_) => return Err(blame(&mut order, names, kind).await),
            Err(instant_acme::Error::Api(_)) if order.state().error.is_some() => {
                return Err(blame(&mut order, names, kind).await);
            }
            Err(e) => return Err(classify(progress.stage)(e)),
        }

        progress.stage = "finalizing the order";
        let key = KeyPair::generate().map_err(AcmeError::Generate)?;
        let mut params = CertificateParams::new(names.to_vec()).map_err(AcmeError::Generate)?;
        // The names go in the SANs; rcgen's default subject ("rcgen self signed cert") has no place in a CSR.
        params.distinguished_name = DistinguishedName::new();
        let csr = params.serialize_request(&key).map_err(AcmeError::Generate)?;
        order.finalize_csr(csr.der()).await.map_err(classify(progress.stage))?;

        progress.stage = "waiting for the certificate";
        let chain = poll_until(&self.config, deadline, progress.stage, &mut order, |order, policy| {
            Box::pin(order.poll_certificate(policy))
        })
        .await?;
        let chain_pem = match chain {
            Ok(chain) => chain,
            Err(instant_acme::Error::Api(problem)) => {
                return Err(AcmeError::OrderInvalid { names: names.join(", "), reason: describe(&problem) });
            }
            Err(e) => return Err(classify(progress.stage)(e)),
        };
        let key_pem = key.serialize_pem();
        let now = OffsetDateTime::now_utc();
        let mut not_after = None;
        for name in names {
            let checked = check_upload(&chain_pem, &key_pem, name, now).map_err(AcmeError::BadCertificate)?;
            not_after = Some(checked.not_after);
        }
        let not_after = not_after.expect("names is not empty");
        Ok(Issued { chain_pem, key_pem, not_after })
    }
}

/// Runs one of instant-acme's polls under its [`RetryPolicy`] (waits doubling from [`AcmeConfig::poll_initial`],
/// or as long as the CA's `Retry-After` asks) until `deadline`. The policy gives up as soon as its next wait would
/// end past its timeout, which with doubling waits can be half the time early: while a few waits are left before
/// the deadline it is started afresh. A `Retry-After` past the deadline ends the wait at once. The outer `Result`
/// is ours (the deadline), the inner the poll's.
async fn poll_until<S, T>(
    config: &AcmeConfig,
    deadline: Instant,
    stage: &'static str,
    polled: &mut S,
    poll: impl for<'a> Fn(&'a mut S, &'a RetryPolicy) -> Polling<'a, T>,
) -> Result<Result<T, instant_acme::Error>, AcmeError> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let policy = RetryPolicy::new().initial_delay(config.poll_initial).timeout(left);
        match poll(polled, &policy).await {
            Err(instant_acme::Error::Timeout(None)) if Instant::now() + config.poll_initial * 3 < deadline => {}
            Err(instant_acme::Error::Timeout(_)) => return Err(AcmeError::Timeout { stage, after: config.timeout }),
            polled => return Ok(polled),
        }
    }
}

/// One poll of an order (boxed: an async closure's future borrowing the order would not be `Send`).
type Polling<'a, T> = std::pin::Pin<Box<dyn Future<Output = Result<T, instant_acme::Error>> + Send + 'a>>;

/// Where an order stands, kept outside the order's future so that a timeout can say what it was waiting for and
/// the answers are withdrawn however the order ends.
struct Progress {
    stage: &'static str,
    published: Vec<Published>,
}

/// A challenge answer the responder holds for us.
#[derive(Debug)]
enum Published {
    Http01 { domain: String, token: String },
    Dns01 { record: String, value: String },
}

/// Why an invalid order is invalid: the first failed challenge with the CA's reason, else the order's problem.
async fn blame(order: &mut Order, names: &[String], kind: ChallengeKind) -> AcmeError {
    let order_problem = order.state().error.as_ref().map(describe);
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authz)) = authorizations.next().await {
        if authz.refresh().await.is_err() {
            continue;
        }
        let name = authz.identifier().to_string();
        for challenge in &authz.challenges {
            if let Some(problem) = &challenge.error {
                return AcmeError::ChallengeFailed { name, kind, reason: describe(problem) };
            }
        }
        if authz.status == AuthorizationStatus::Invalid {
            return AcmeError::ChallengeFailed { name, kind, reason: "the authorization is invalid".into() };
        }
    }
    AcmeError::OrderInvalid {
        names: names.join(", "),
        reason: order_problem.unwrap_or_else(|| "the server gave no reason".into()),
    }
}

fn type_name(kind: &ChallengeType) -> String {
    match kind {
        ChallengeType::Http01 => "http-01".into(),
        ChallengeType::Dns01 => "dns-01".into(),
        ChallengeType::TlsAlpn01 => "tls-alpn-01".into(),
        ChallengeType::DeviceAttest01 => "device-attest-01".into(),
        ChallengeType::Unknown(other) => other.clone(),
        other => format!("{other:?}"),
    }
}

/// An account builder whose HTTPS client trusts `root_pem` when given, else the platform's verifier.
fn account_builder(config: &AcmeConfig) -> Result<instant_acme::AccountBuilder, AcmeError> {
    let Some(pem) = &config.root_pem else {
        return Account::builder().map_err(classify("loading the system's trusted roots"));
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let cert = cert.map_err(|e| AcmeError::BadRoot { reason: e.to_string() })?;
        roots.add(cert).map_err(|e| AcmeError::BadRoot { reason: e.to_string() })?;
    }
    if roots.is_empty() {
        return Err(AcmeError::BadRoot { reason: "no \"BEGIN CERTIFICATE\" block".into() });
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| AcmeError::BadRoot { reason: e.to_string() })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .enable_http2()
        .build();
    let http: HyperClient<_, BodyWrapper<bytes::Bytes>> = HyperClient::builder(TokioExecutor::new()).build(connector);
    Ok(Account::builder_with_http(Box::new(http)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_read_as_one_line_with_their_subproblems() {
        let problem: Problem = serde_json::from_value(serde_json::json!({
            "type": "urn:ietf:params:acme:error:rejectedIdentifier",
            "detail": "Error creating new order",
            "status": 400,
            "subproblems": [{
                "type": "urn:ietf:params:acme:error:malformed",
                "detail": "Invalid underscore in DNS name",
                "identifier": {"type": "dns", "value": "a_b.example.com"}
            }]
        }))
        .unwrap();
        assert_eq!(
            describe(&problem),
            "Error creating new order (urn:ietf:params:acme:error:rejectedIdentifier); for \"a_b.example.com\": \
             Invalid underscore in DNS name (urn:ietf:params:acme:error:malformed)"
        );
        let bare: Problem = serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!(describe(&bare), "no detail given");
    }

    /// As instant-acme's policy does with doubling waits: it stops at about half its time.
    fn gives_up_at_half<'a>(state: &'a mut (u32, Instant), _: &'a RetryPolicy) -> Polling<'a, ()> {
        state.0 += 1;
        let deadline = state.1;
        Box::pin(async move {
            tokio::time::sleep(deadline.saturating_duration_since(Instant::now()) / 2).await;
            Err(instant_acme::Error::Timeout(None))
        })
    }

    fn second_time_lucky<'a>(calls: &'a mut u32, _: &'a RetryPolicy) -> Polling<'a, u32> {
        *calls += 1;
        let result = if *calls == 1 { Err(instant_acme::Error::Timeout(None)) } else { Ok(*calls) };
        Box::pin(async move { result })
    }

    fn come_back_in_an_hour<'a>(asked: &'a mut u32, _: &'a RetryPolicy) -> Polling<'a, ()> {
        *asked += 1;
        let later = std::time::Instant::now() + Duration::from_secs(3600);
        Box::pin(async move { Err(instant_acme::Error::Timeout(Some(later))) })
    }

    #[tokio::test]
    async fn a_policy_that_gives_up_early_is_started_again_until_the_deadline() {
        let mut config = AcmeConfig::new("https://acme.example/directory");
        config.poll_initial = Duration::from_millis(10);
        let deadline = Instant::now() + Duration::from_millis(400);
        let mut state = (0, deadline);
        let err = poll_until(&config, deadline, "waiting", &mut state, gives_up_at_half).await.unwrap_err();
        assert!(matches!(err, AcmeError::Timeout { stage: "waiting", after } if after == config.timeout), "{err:?}");
        assert!(state.0 >= 3, "started afresh while time was left: {}", state.0);
        // Given up only once fewer than three initial waits were left.
        assert!(Instant::now() + config.poll_initial * 3 >= deadline);

        // A verdict ends the polling; the CA asking to come back after the deadline ends it at once.
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut calls = 0;
        let polled = poll_until(&config, deadline, "waiting", &mut calls, second_time_lucky).await;
        assert_eq!(polled.unwrap().unwrap(), 2);
        let mut asked = 0;
        let polled = poll_until(&config, deadline, "waiting", &mut asked, come_back_in_an_hour).await;
        assert!(matches!(polled, Err(AcmeError::Timeout { .. })), "{polled:?}");
        assert_eq!(asked, 1);
    }

    #[tokio::test]
    async fn a_root_pem_without_certificates_is_refused() {
        let mut config = AcmeConfig::new("https://127.0.0.1:1/dir");
        config.root_pem = Some("not a certificate".into());
        let err = AcmeClient::create(config).await.unwrap_err();
        assert!(matches!(err, AcmeError::BadRoot { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn credentials_for_another_directory_are_refused() {
        let config = AcmeConfig::new("https://acme.example/directory");
        let stored =
            r#"{"id":"https://other.example/acct/1","key_pkcs8":"AA","directory":"https://other.example/dir"}"#;
        let err = AcmeClient::restore(config.clone(), stored).await.unwrap_err();
        assert!(err.to_string().contains("https://other.example/dir"), "{err}");
        let err = AcmeClient::restore(config, "{").await.unwrap_err();
        assert!(matches!(err, AcmeError::Credentials { .. }), "{err:?}");
    }
}
