//! Pulling an image from a registry that speaks the OCI distribution API (Docker Hub, GHCR, `docker-registry`,
//! Harbor, ...): the manifest (through an index to this platform's entry), then the config and layers, each
//! verified by digest and bounded in size, then the same checks as an uploaded archive.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, AUTHORIZATION, WWW_AUTHENTICATE};

use crate::archive::{MAX_DOCUMENT, assemble, choose};
use crate::spec::{self, Index, TargetPlatform, media};
use crate::{Digest, Image, Limits, OciError, Reference};

/// Which registries the platform reaches, and how. A pull is a request a tenant makes the platform send: without
/// these rules a tenant could make it knock on loopback or private addresses (its own database, metadata
/// services, other hosts' ops ports).
#[derive(Debug, Clone, Default)]
pub struct RegistryAccess {
    /// `host[:port]`s reached over plain http; an operator who lists one also allows its address.
    pub insecure: Vec<String>,
    /// `host[:port]`s reached over https although they resolve to loopback, private or link-local addresses.
    pub private: Vec<String>,
}

impl RegistryAccess {
    fn is_insecure(&self, host_port: &str) -> bool {
        self.insecure.iter().any(|h| h == host_port)
    }

    /// Whether `host` (with `port` when the entry names one) may be on a non-public address.
    fn allows_private(&self, host: &str, port: Option<u16>) -> bool {
        self.insecure.iter().chain(&self.private).any(|entry| match entry.rsplit_once(':') {
            Some((h, p)) if p.parse::<u16>().is_ok() => {
                h.trim_matches(['[', ']']) == host && port.is_none_or(|port| p == port.to_string())
            }
            _ => entry == host,
        })
    }
}

/// Whether an address is on the public internet: not loopback, private, link-local, shared (CGNAT), reserved,
/// documentation, unspecified, broadcast or multicast, also when written as an IPv4-mapped IPv6 address.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            let [first, second, ..] = a.octets();
            !(a.is_loopback()
                || a.is_private()
                || a.is_link_local()
                || a.is_unspecified()
                || a.is_broadcast()
                || a.is_multicast()
                || a.is_documentation()
                || first == 0
                || first >= 240
                || (first == 100 && second & 0xc0 == 64))
        }
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => is_public(IpAddr::V4(v4)),
            None => {
                let first = a.segments()[0];
                !(a.is_loopback()
                    || a.is_unspecified()
                    || a.is_multicast()
                    || first & 0xfe00 == 0xfc00
                    || first & 0xffc0 == 0xfe80
                    || first == 0x2001 && a.segments()[1] == 0x0db8)
            }
        },
    }
}

/// What the resolver says when a name has only non-public addresses; recognized in the error chain.
const PRIVATE_ONLY: &str = "resolves only to non-public addresses";

/// Resolves registry names, keeping only public addresses unless the name is allowed private ones: checked at
/// connection time, so a name cannot pass a check and then resolve elsewhere (DNS rebinding).
struct GuardedResolver {
    access: RegistryAccess,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        let open = self.access.allows_private(&host, None);
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let kept: Vec<SocketAddr> = addrs.into_iter().filter(|a| open || is_public(a.ip())).collect();
            if kept.is_empty() {
                return Err(format!("{host} {PRIVATE_ONLY}").into());
            }
            Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Pulls images.
#[derive(Debug, Clone)]
pub struct Registries {
    http: reqwest::Client,
    access: RegistryAccess,
    limits: Limits,
    platform: TargetPlatform,
}

/// The manifest types we accept, most preferred first.
const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

impl Registries {
    /// A client reaching registries as `access` allows.
    pub fn new(access: RegistryAccess, limits: Limits) -> Self {
        let guard = access.clone();
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .timeout(std::time::Duration::from_secs(600))
            .dns_resolver(Arc::new(GuardedResolver { access: access.clone() }))
            // Registries redirect blobs to storage hosts: each hop is held to the same rules (names through the
            // resolver, addresses here).
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() >= 10 {
                    attempt.error("too many redirects")
                } else if let Err(e) = address_allowed(&guard, attempt.url()) {
                    attempt.error(e)
                } else {
                    attempt.follow()
                }
            }))
            .build()
            .expect("a default HTTP client builds");
        Self { http, access, limits, platform: TargetPlatform::host() }
    }

    /// Pulls and verifies an image.
    pub async fn pull(&self, reference: &Reference) -> Result<Image, OciError> {
        let mut session = Session { registries: self, reference, token: None };
        let (mut manifest, mut media_type) = session.manifest(reference.manifest_ref()).await?;
        if let Some(pinned) = &reference.digest {
            pinned.verify("the manifest", &manifest)?;
        }
        for _ in 0..2 {
            if media_type != media::OCI_INDEX && media_type != media::DOCKER_LIST {
                break;
            }
            let index: Index = spec::parse_json("the image index", &manifest)?;
            let entry = spec::descriptor_digest(choose(&index, &self.platform)?)?;
            (manifest, media_type) = session.manifest(entry.as_str()).await?;
            entry.verify("the manifest", &manifest)?;
        }
        let parsed: spec::Manifest = spec::parse_json("the image manifest", &manifest)?;
        let mut blobs: HashMap<Digest, Bytes> = HashMap::new();
        let mut budget = self.limits.max_stored_bytes;
        for desc in std::iter::once(&parsed.config).chain(&parsed.layers) {
            let digest = spec::descriptor_digest(desc)?;
            if blobs.contains_key(&digest) {
                continue;
            }
            let data = session.blob(&digest, budget).await?;
            budget -= data.len() as u64;
            blobs.insert(digest, data);
        }
        let (limits, platform) = (self.limits, self.platform.clone());
        tokio::task::spawn_blocking(move || assemble(manifest, &|d| blobs.get(d).cloned(), &limits, &platform))
            .await
            .map_err(|e| OciError::Corrupt { what: "the image".into(), reason: e.to_string() })?
    }
}

/// One pull: the reference and the bearer token the registry gave for it.
struct Session<'a> {
    registries: &'a Registries,
    reference: &'a Reference,
    token: Option<String>,
}

impl Session<'_> {
    fn url(&self, path: &str) -> String {
        let r = self.reference;
        let scheme = if self.registries.access.is_insecure(&r.registry) { "http" } else { "https" };
        // Docker Hub's API lives on another host than its name.
        let host = if r.registry == crate::reference::DEFAULT_REGISTRY { "registry-1.docker.io" } else { &r.registry };
        format!("{scheme}://{host}/v2/{}/{path}", r.repository)
    }

    fn unavailable(&self, reason: impl std::fmt::Display) -> OciError {
        OciError::RegistryUnavailable { registry: self.reference.registry.clone(), reason: reason.to_string() }
    }

    /// GET with the token, answering one bearer challenge (anonymous pull tokens, as Docker Hub and GHCR give).
    async fn get(&mut self, url: &str, accept: &str) -> Result<reqwest::Response, OciError> {
        self.allowed(url)?;
        for _ in 0..2 {
            let mut req = self.registries.http.get(url).header(ACCEPT, accept);
            if let Some(t) = &self.token {
                req = req.header(AUTHORIZATION, format!("Bearer {t}"));
            }
            let res = req.send().await.map_err(|e| self.send_error(e))?;
            match res.status() {
                s if s.is_success() => return Ok(res),
                StatusCode::NOT_FOUND => return Err(OciError::NotFound { reference: self.reference.to_string() }),
                StatusCode::UNAUTHORIZED if self.token.is_none() => {
                    let challenge = res.headers().get(WWW_AUTHENTICATE).and_then(|v| v.to_str().ok()).unwrap_or("");
                    match self.fetch_token(challenge).await? {
                        Some(t) => self.token = Some(t),
                        None => return Err(self.denied(StatusCode::UNAUTHORIZED)),
                    }
                }
                s @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => return Err(self.denied(s)),
                s => return Err(self.unavailable(format!("answered {s} for {url}"))),
            }
        }
        Err(self.denied(StatusCode::UNAUTHORIZED))
    }

    /// An address in a URL (names are checked when they resolve).
    fn allowed(&self, url: &str) -> Result<(), OciError> {
        let url = reqwest::Url::parse(url).map_err(|e| self.unavailable(e))?;
        address_allowed(&self.registries.access, &url)
            .map_err(|_| OciError::RegistryNotAllowed { registry: self.reference.registry.clone() })
    }

    fn denied(&self, status: StatusCode) -> OciError {
        OciError::RegistryDenied { reference: self.reference.to_string(), status: status.as_u16() }
    }

    fn send_error(&self, e: reqwest::Error) -> OciError {
        let mut chain = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            chain.push_str(": ");
            chain.push_str(&s.to_string());
            source = s.source();
        }
        if chain.contains(PRIVATE_ONLY) || chain.contains(NOT_PUBLIC) {
            return OciError::RegistryNotAllowed { registry: self.reference.registry.clone() };
        }
        // A plain-http server answering a TLS hello: say what to configure rather than a TLS error.
        if chain.contains("InvalidContentType") || chain.contains("corrupt message") {
            return OciError::InsecureRegistry { registry: self.reference.registry.clone() };
        }
        self.unavailable(chain)
    }

    /// An anonymous token for a `Bearer realm="...",service="...",scope="..."` challenge.
    async fn fetch_token(&self, challenge: &str) -> Result<Option<String>, OciError> {
        let Some(params) = challenge.strip_prefix("Bearer ").or_else(|| challenge.strip_prefix("bearer ")) else {
            return Ok(None);
        };
        let mut realm = None;
        let mut query: Vec<(String, String)> = Vec::new();
        for part in split_params(params) {
            let Some((k, v)) = part.split_once('=') else { continue };
            let v = v.trim().trim_matches('"').to_owned();
            match k.trim() {
                "realm" => realm = Some(v),
                k @ ("service" | "scope") => query.push((k.to_owned(), v)),
                _ => {}
            }
        }
        let Some(realm) = realm.and_then(|r| reqwest::Url::parse(&r).ok()) else {
            return Ok(None);
        };
        // The token service is held to the registry's rules: https unless listed as insecure, and a public
        // address unless allowed (a registry must not be able to send us to a private address).
        let authority = match realm.port() {
            Some(p) => format!("{}:{p}", realm.host_str().unwrap_or("")),
            None => realm.host_str().unwrap_or("").to_owned(),
        };
        if realm.scheme() != "https" && !(realm.scheme() == "http" && self.registries.access.is_insecure(&authority)) {
            return Err(self.unavailable(format!("its token service {realm} is not https")));
        }
        self.allowed(realm.as_str())?;
        if !query.iter().any(|(k, _)| k == "scope") {
            query.push(("scope".into(), format!("repository:{}:pull", self.reference.repository)));
        }
        #[derive(serde::Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let res = self.registries.http.get(realm).query(&query).send().await.map_err(|e| self.send_error(e))?;
        if !res.status().is_success() {
            return Err(self.denied(res.status()));
        }
        let body = read_limited(res, MAX_DOCUMENT as u64).await.map_err(|e| self.unavailable(e))?;
        let t: Token = spec::parse_json("the registry's token", &body)?;
        Ok(t.token.or(t.access_token))
    }

    async fn manifest(&mut self, reference: &str) -> Result<(Bytes, String), OciError> {
        let res = self.get(&self.url(&format!("manifests/{reference}")), ACCEPT_MANIFESTS).await?;
        let header_type = res
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or("").trim().to_owned())
            .unwrap_or_default();
        let body = read_limited(res, MAX_DOCUMENT as u64).await.map_err(|e| match e {
            Limited::Over => OciError::TooLarge { what: "the manifest".into(), limit: "4 MiB".into() },
            e => self.unavailable(e),
        })?;
        // The document's own mediaType wins over a header some registries get wrong.
        #[derive(serde::Deserialize)]
        struct Typed {
            #[serde(rename = "mediaType", default)]
            media_type: String,
        }
        let typed: Typed = spec::parse_json("the manifest", &body)?;
        let media_type = if typed.media_type.is_empty() { header_type } else { typed.media_type };
        Ok((body, media_type))
    }

    async fn blob(&mut self, digest: &Digest, budget: u64) -> Result<Bytes, OciError> {
        let res = self.get(&self.url(&format!("blobs/{digest}")), "*/*").await?;
        let data = read_limited(res, budget).await.map_err(|e| match e {
            Limited::Over => OciError::TooLarge {
                what: "the image".into(),
                limit: format!("{} MiB", self.registries.limits.max_stored_bytes >> 20),
            },
            e => self.unavailable(e),
        })?;
        digest.verify(&format!("blob {digest}"), &data)?;
        Ok(data)
    }
}

/// What the address check says when a URL names a non-public address; recognized in the error chain.
const NOT_PUBLIC: &str = "names a non-public address";

/// Whether a URL whose host is an address may be reached (a name is checked by the resolver).
fn address_allowed(access: &RegistryAccess, url: &reqwest::Url) -> Result<(), String> {
    let Some(ip) = url.host_str().and_then(|h| h.trim_matches(['[', ']']).parse::<IpAddr>().ok()) else {
        return Ok(());
    };
    let host = ip.to_string();
    if is_public(ip) || access.allows_private(&host, url.port_or_known_default()) {
        Ok(())
    } else {
        Err(format!("{url} {NOT_PUBLIC}"))
    }
}

/// Splits `a="x,y",b=z` at the commas outside quotes.
fn split_params(s: &str) -> Vec<&str> {
    let (mut parts, mut start, mut quoted) = (Vec::new(), 0, false);
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

/// Why a body could not be read.
#[derive(Debug)]
enum Limited {
    Over,
    Http(reqwest::Error),
}

impl std::fmt::Display for Limited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Over => f.write_str("too large"),
            Self::Http(e) => write!(f, "reading the answer: {e}"),
        }
    }
}

async fn read_limited(mut res: reqwest::Response, limit: u64) -> Result<Bytes, Limited> {
    if res.content_length().is_some_and(|n| n > limit) {
        return Err(Limited::Over);
    }
    let mut out = BytesMut::new();
    while let Some(chunk) = res.chunk().await.map_err(Limited::Http)? {
        if (out.len() + chunk.len()) as u64 > limit {
            return Err(Limited::Over);
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_unless_allowed() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["1.1.1.1", "93.184.216.34", "2606:4700::1111", "::ffff:8.8.8.8"] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
        let access = RegistryAccess { insecure: vec!["127.0.0.1:5000".into()], private: vec!["reg.lan".into()] };
        assert!(access.allows_private("127.0.0.1", Some(5000)));
        assert!(!access.allows_private("127.0.0.1", Some(5001)), "the listed port only");
        assert!(access.allows_private("reg.lan", Some(443)) && access.allows_private("reg.lan", None));
        assert!(!access.allows_private("other.lan", None));
        let url = |u: &str| reqwest::Url::parse(u).unwrap();
        assert!(address_allowed(&access, &url("http://127.0.0.1:5000/v2/")).is_ok());
        assert!(address_allowed(&access, &url("http://127.0.0.1:6000/v2/")).is_err());
        assert!(address_allowed(&access, &url("https://[::1]/v2/")).is_err());
        assert!(address_allowed(&access, &url("https://169.254.169.254/latest/")).is_err());
        assert!(address_allowed(&access, &url("https://registry.example/v2/")).is_ok(), "names: at resolution");
    }

    #[test]
    fn bearer_challenges_split_outside_quotes() {
        assert_eq!(
            split_params(r#"realm="https://a/token",service="reg",scope="repository:x/y:pull,push""#),
            [r#"realm="https://a/token""#, r#"service="reg""#, r#"scope="repository:x/y:pull,push""#]
        );
    }
}
