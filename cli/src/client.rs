//! A typed client of the API. Every endpoint it calls is in [`ENDPOINTS`], which a test checks against the
//! checked-in OpenAPI document, so the CLI cannot drift from the API unnoticed.

use anyhow::{Context, anyhow, bail};
use cloud_domain::api::Problem;
use reqwest::{Method, RequestBuilder, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::config::Remote;

/// `(method, path template)` of every call the CLI makes.
pub const ENDPOINTS: &[(&str, &str)] = &[
    ("GET", "/v1/whoami"),
    ("GET", "/v1/services"),
    ("POST", "/v1/services"),
    ("GET", "/v1/services/{service}"),
    ("PATCH", "/v1/services/{service}"),
    ("DELETE", "/v1/services/{service}"),
    ("GET", "/v1/instances"),
    ("POST", "/v1/instances"),
    ("GET", "/v1/instances/{instance}"),
    ("DELETE", "/v1/instances/{instance}"),
    ("POST", "/v1/instances/{instance}/start"),
    ("POST", "/v1/instances/{instance}/stop"),
    ("POST", "/v1/instances/{instance}/move"),
    ("GET", "/v1/instances/{instance}/exec"),
    ("GET", "/v1/instances/{instance}/logs"),
    ("GET", "/v1/images"),
    ("POST", "/v1/images"),
    ("GET", "/v1/images/{image}"),
    ("DELETE", "/v1/images/{image}"),
    ("GET", "/v1/images/{image}/archive"),
    ("GET", "/v1/tenants"),
    ("POST", "/v1/tenants"),
    ("GET", "/v1/tenants/{tenant}"),
    ("PATCH", "/v1/tenants/{tenant}"),
    ("DELETE", "/v1/tenants/{tenant}"),
    ("GET", "/v1/tokens"),
    ("POST", "/v1/tokens"),
    ("DELETE", "/v1/tokens/{id}"),
    ("GET", "/v1/join-tokens"),
    ("POST", "/v1/join-tokens"),
    ("DELETE", "/v1/join-tokens/{id}"),
    ("POST", "/v1/join"),
    ("GET", "/v1/secrets"),
    ("PUT", "/v1/secrets/{key}"),
    ("DELETE", "/v1/secrets/{key}"),
    ("GET", "/v1/events"),
];

/// A connection to one remote.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    name: String,
    base: String,
    token: String,
    remote: Remote,
}

/// Escapes a name or id for a path segment (names are DNS labels, but input is input).
pub fn seg(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Client {
    /// A client for a remote; fails before any request when the remote has no token.
    pub fn new(name: &str, remote: &Remote) -> anyhow::Result<Self> {
        let Some(token) = remote.token.clone() else {
            bail!(
                "remote \"{name}\" has no token: add one with `cloudctl remote add {name} {} --token T` (after `cloudctl remote remove {name}`) or set CLOUD_TOKEN",
                remote.url
            );
        };
        let url = reqwest::Url::parse(&remote.url)
            .with_context(|| format!("remote \"{name}\" has an invalid URL \"{}\"", remote.url))?;
        if !matches!(url.scheme(), "http" | "https") {
            bail!("remote \"{name}\": the URL must start with http:// or https://, not \"{}\"", remote.url);
        }
        Ok(Self {
            http: Self::builder(name, remote)?.build()?,
            name: name.to_owned(),
            base: remote.url.trim_end_matches('/').to_owned(),
            token,
            remote: remote.clone(),
        })
    }

    /// An HTTP client that trusts what the remote says to trust.
    fn builder(name: &str, remote: &Remote) -> anyhow::Result<reqwest::ClientBuilder> {
        let mut builder = reqwest::Client::builder().user_agent(concat!("cloudctl/", env!("CARGO_PKG_VERSION")));
        if let Some(pin) = &remote.fingerprint {
            builder = builder.use_preconfigured_tls(crate::pin::Pinned::new(Some(pin.clone())).client_config());
        } else if let Some(ca) = &remote.ca {
            let pem =
                std::fs::read(ca).with_context(|| format!("reading the CA of remote \"{name}\" ({})", ca.display()))?;
            builder = builder.add_root_certificate(reqwest::Certificate::from_pem(&pem)?);
        }
        Ok(builder)
    }

    /// Opens a WebSocket on a path of the API (HTTP/1.1 upgrade, over the remote's TLS and token); an API
    /// refusal is its problem detail.
    pub async fn websocket(&self, path: &str) -> anyhow::Result<tokio_tungstenite::WebSocketStream<reqwest::Upgraded>> {
        // HTTP/2 carries no upgrade; the same trust on HTTP/1.1.
        let http = Self::builder(&self.name, &self.remote)?.http1_only().build()?;
        let req = http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", tokio_tungstenite::tungstenite::handshake::client::generate_key());
        let res = req.send().await.map_err(|e| self.unreachable(&e))?;
        if res.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Err(self.failure(res).await);
        }
        let upgraded = res.upgrade().await.map_err(|e| self.unreachable(&e))?;
        Ok(tokio_tungstenite::WebSocketStream::from_raw_socket(
            upgraded,
            tokio_tungstenite::tungstenite::protocol::Role::Client,
            None,
        )
        .await)
    }

    /// The remote's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The remote's API URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// A request to a path of the API.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http.request(method, format!("{}{path}", self.base)).bearer_auth(&self.token)
    }

    /// Sends a request; API errors become their problem detail, network errors name the remote.
    pub async fn send(&self, req: RequestBuilder) -> anyhow::Result<reqwest::Response> {
        let res = req.send().await.map_err(|e| self.unreachable(&e))?;
        if res.status().is_success() {
            return Ok(res);
        }
        Err(self.failure(res).await)
    }

    /// A network error, naming the remote.
    pub fn unreachable(&self, e: &reqwest::Error) -> anyhow::Error {
        let mut cause = e.to_string();
        let mut src = std::error::Error::source(e);
        while let Some(s) = src {
            cause = format!("{cause}: {s}");
            src = s.source();
        }
        anyhow!("cannot reach remote \"{}\" at {}: {cause}", self.name, self.base)
    }

    /// An unsuccessful response as an error: its problem detail when it has one.
    pub async fn failure(&self, res: reqwest::Response) -> anyhow::Error {
        let status = res.status();
        let text = res.text().await.unwrap_or_default();
        match serde_json::from_str::<Problem>(&text) {
            Ok(p) => anyhow!("{} ({})", p.detail, p.code.as_str()),
            Err(_) if status == StatusCode::NOT_FOUND => {
                anyhow!("{} answered 404: is it this platform's API?", self.base)
            }
            Err(_) => anyhow!("{} answered {status}: {}", self.base, text.trim()),
        }
    }

    /// GET and decode.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        Ok(self.send(self.request(Method::GET, path)).await?.json().await?)
    }

    /// POST JSON and decode.
    pub async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> anyhow::Result<T> {
        Ok(self.send(self.request(Method::POST, path).json(body)).await?.json().await?)
    }

    /// PATCH JSON and decode.
    pub async fn patch<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> anyhow::Result<T> {
        Ok(self.send(self.request(Method::PATCH, path).json(body)).await?.json().await?)
    }

    /// DELETE.
    pub async fn delete(&self, path: &str) -> anyhow::Result<()> {
        self.send(self.request(Method::DELETE, path)).await?;
        Ok(())
    }

    /// Every item of a list, following cursors.
    pub async fn list_all<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<Vec<T>> {
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let url = match &cursor {
                Some(c) => format!("{path}?limit=500&cursor={c}"),
                None => format!("{path}?limit=500"),
            };
            let page: cloud_domain::api::Page<T> = self.get(&url).await?;
            items.extend(page.items);
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => return Ok(items),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CLI calls only endpoints that the API's checked-in specification has.
    #[test]
    fn every_endpoint_is_in_the_openapi_document() {
        let spec: serde_json::Value =
            serde_json::from_str(include_str!("../../openapi/openapi.json")).expect("openapi.json parses");
        for (method, path) in ENDPOINTS {
            let op = &spec["paths"][path][method.to_lowercase()];
            assert!(op.is_object(), "{method} {path} is not in openapi/openapi.json");
        }
    }

    #[test]
    fn a_remote_without_token_or_with_a_bad_url_is_refused_before_any_request() {
        let r = Remote { url: "http://127.0.0.1:1".into(), token: None, ca: None, fingerprint: None };
        assert!(Client::new("x", &r).unwrap_err().to_string().contains("has no token"));
        let r = Remote { url: "ftp://x".into(), token: Some("t".into()), ca: None, fingerprint: None };
        assert!(Client::new("x", &r).unwrap_err().to_string().contains("http:// or https://"));
        assert_eq!(seg("a b/c"), "a%20b%2Fc");
    }
}
