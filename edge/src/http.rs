//! HTTP mode: per-request routing by host and balancing among the service's running instances, on pingora's
//! proxy engine (HTTP/1.1 and HTTP/2 downstream, upstream keep-alive pools, WebSocket upgrades).
//!
//! Tenant isolation lives here: a request is routed only by its host to that host's service, retried only on
//! instances of the same service, and a host that names no service gets a 404 from the edge itself.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use cloud_domain::ports::Handler;
use pingora::http::ResponseHeader;
use pingora::prelude::HttpPeer;
use pingora::proxy::{ProxyHttp, Session};
use pingora::{Error, ErrorType, Result};
use uuid::Uuid;

use crate::Shared;
use crate::table::{InFlight, Pick, Service, normalize_host};

/// Where ACME http-01 validators ask (RFC 8555 §8.3).
const ACME_CHALLENGE_PATH: &str = "/.well-known/acme-challenge/";

/// The SNI a TLS client sent, attached to the connection at the handshake.
#[derive(Debug, Clone)]
pub struct Sni(pub String);

/// The proxy for one public port.
pub struct HttpRoute {
    pub(crate) shared: Arc<Shared>,
    /// The public port requests arrive on (443, 80, or a service's own tls+http port).
    pub(crate) port: u16,
    /// Whether the port terminates TLS.
    pub(crate) tls: bool,
}

/// Per-request state.
#[derive(Default)]
pub struct RequestCtx {
    started: Option<Instant>,
    service: Option<Arc<Service>>,
    destination_port: u16,
    in_flight: Option<InFlight>,
    tried: Vec<Uuid>,
    request_id: String,
    host: String,
}

/// Builds a response with a short plain-text body.
async fn respond(session: &mut Session, status: u16, body: &str, headers: &[(&'static str, String)]) -> Result<bool> {
    let mut resp = ResponseHeader::build(status, Some(4))?;
    resp.insert_header("content-type", "text/plain; charset=utf-8")?;
    resp.insert_header("content-length", body.len().to_string())?;
    for (k, v) in headers {
        resp.insert_header(*k, v.as_str())?;
    }
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(Bytes::copy_from_slice(body.as_bytes())), true).await?;
    Ok(true)
}

/// The host a request names: the authority of an HTTP/2 request, else the Host header.
fn request_host(session: &Session) -> Option<String> {
    let req = session.req_header();
    if let Some(a) = req.uri.authority() {
        return Some(a.as_str().to_owned());
    }
    session.get_header(http::header::HOST).and_then(|h| h.to_str().ok()).map(str::to_owned)
}

fn sni(session: &Session) -> Option<String> {
    let digest = session.digest()?.ssl_digest.as_ref()?;
    digest.extension.get::<Sni>().map(|s| s.0.to_ascii_lowercase())
}

/// A request id from the client is kept when it is short and printable; otherwise a fresh one.
fn request_id(session: &Session) -> String {
    match session.get_header("x-request-id").and_then(|h| h.to_str().ok()) {
        Some(id) if !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic()) => id.to_owned(),
        _ => Uuid::new_v4().simple().to_string(),
    }
}

#[async_trait]
impl ProxyHttp for HttpRoute {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx { started: Some(Instant::now()), ..Default::default() }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        ctx.request_id = request_id(session);
        let rid = ("x-request-id", ctx.request_id.clone());
        let Some(raw_host) = request_host(session) else {
            return respond(session, 400, "the request names no host\n", &[rid]).await;
        };
        let host = normalize_host(&raw_host);
        ctx.host = host.clone();
        // Over TLS the certificate was chosen for the SNI; a request for another host on the same connection
        // (HTTP/2 coalescing, or a forged Host) must open its own connection (RFC 9110 §15.5.20).
        if self.tls
            && let Some(sni) = sni(session)
            && sni != host
        {
            return respond(session, 421, "this connection is for another host\n", &[rid]).await;
        }
        // ACME http-01 answers the certificate manager published for this host; anything else under that path
        // goes to the service like any request (a tenant may run its own ACME client).
        if !self.tls
            && let Some(token) = session.req_header().uri.path().strip_prefix(ACME_CHALLENGE_PATH)
            && !token.is_empty()
            && token.len() <= 256
            && token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            let name = host.split(':').next().unwrap_or(&host).to_owned();
            match self.shared.store.acme_http_answer(&name, token).await {
                Ok(Some(answer)) => {
                    return respond(session, 200, &answer, &[rid]).await;
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %cloud_domain::error_chain(&e), "cannot read ACME http-01 answers"),
            }
        }
        let table = self.shared.table.load();
        let Some(service) = table.by_host(&host).cloned() else {
            return respond(session, 404, &format!("no service at {host}\n"), &[rid]).await;
        };
        let Some(mapping) = service.port(self.port).cloned() else {
            return respond(session, 404, &format!("{host} does not serve port {}\n", self.port), &[rid]).await;
        };
        ctx.service = Some(service.clone());
        if mapping.handlers.contains(&Handler::Redirect) {
            let name = host.split(':').next().unwrap_or(&host);
            let port =
                if mapping.destination_port == 443 { String::new() } else { format!(":{}", mapping.destination_port) };
            let path = session.req_header().uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
            let location = format!("https://{name}{port}{path}");
            return respond(session, 308, &format!("moved to {location}\n"), &[("location", location.clone()), rid])
                .await;
        }
        if !mapping.handlers.contains(&Handler::Http) {
            return respond(session, 404, &format!("{host} does not serve HTTP on port {}\n", self.port), &[rid]).await;
        }
        ctx.destination_port = mapping.destination_port;
        crate::touch(&self.shared, &service);
        match service.pick(&ctx.tried) {
            Pick::Backend(g) => ctx.in_flight = Some(g),
            Pick::NoBackend if service.scale_to_zero_after.is_some() || service.starting > 0 => {
                // Held until an instance runs: the first request after idleness or a deploy is slow, not lost.
                let Some((woken, g)) = crate::wake(&self.shared, &service).await else {
                    self.shared.metrics.upstream_errors.with_label_values(&[&service.fqdn, "no_backend"]).inc();
                    return respond(
                        session,
                        503,
                        "the service did not start in time\n",
                        &[("retry-after", "1".into()), rid],
                    )
                    .await;
                };
                ctx.service = Some(woken);
                ctx.in_flight = Some(g);
            }
            Pick::NoBackend => {
                self.shared.metrics.upstream_errors.with_label_values(&[&service.fqdn, "no_backend"]).inc();
                return respond(
                    session,
                    503,
                    "no instance of this service is running\n",
                    &[("retry-after", "1".into()), rid],
                )
                .await;
            }
            Pick::Overloaded => {
                self.shared.metrics.upstream_errors.with_label_values(&[&service.fqdn, "overloaded"]).inc();
                return respond(session, 503, "every instance is at its limit\n", &[("retry-after", "1".into()), rid])
                    .await;
            }
        }
        Ok(false)
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut RequestCtx) -> Result<Box<HttpPeer>> {
        let service = ctx.service.clone().ok_or_else(|| Error::new(ErrorType::InternalError))?;
        if ctx.in_flight.is_none() {
            // A retry after a failed connect: another instance of the same service, never elsewhere.
            match service.pick(&ctx.tried) {
                Pick::Backend(g) => ctx.in_flight = Some(g),
                Pick::NoBackend => return Err(Error::explain(ErrorType::HTTPStatus(502), "no instance left to try")),
                Pick::Overloaded => {
                    return Err(Error::explain(ErrorType::HTTPStatus(503), "every instance is at its limit"));
                }
            }
        }
        let backend = ctx.in_flight.as_ref().map(|g| g.backend().clone()).expect("picked above");
        let mut peer = HttpPeer::new(SocketAddr::new(backend.ip, ctx.destination_port), false, String::new());
        peer.options.connection_timeout = Some(self.shared.config.connect_timeout);
        peer.options.total_connection_timeout = Some(self.shared.config.connect_timeout);
        peer.options.idle_timeout = Some(self.shared.config.upstream_idle_timeout);
        Ok(Box::new(peer))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if let Some(g) = ctx.in_flight.take() {
            let backend = g.backend();
            backend.mark_down(self.shared.config.health_window);
            ctx.tried.push(backend.id);
            if let Some(s) = &ctx.service {
                self.shared.metrics.upstream_errors.with_label_values(&[&s.fqdn, "connect"]).inc();
                tracing::warn!(service = %s.fqdn, instance = %backend.name, error = %e, "cannot connect to an instance; trying another");
            }
        }
        // Nothing was sent yet, so any request may go to another instance of the service.
        let more = ctx.service.as_ref().is_some_and(|s| s.backends.iter().any(|b| !ctx.tried.contains(&b.id)));
        e.set_retry(more);
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut pingora::http::RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // What the client claims about addresses is kept only where the header is a list that proxies append to
        // (X-Forwarded-For, Forwarded): the last element is ours and is the one to trust. X-Real-IP is a single
        // value, so a client's is replaced, and without a known peer address the claims are dropped rather than
        // passed on unchanged.
        let proto = if self.tls { "https" } else { "http" };
        match session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip()) {
            Some(client) => {
                let xff = appended(&upstream.headers, "x-forwarded-for", &client.to_string());
                upstream.insert_header("x-forwarded-for", xff)?;
                let fwd = appended(&upstream.headers, "forwarded", &forwarded_element(client, proto, &ctx.host));
                upstream.insert_header("forwarded", fwd)?;
                upstream.insert_header("x-real-ip", client.to_string())?;
            }
            None => {
                for name in ["x-forwarded-for", "forwarded", "x-real-ip"] {
                    upstream.remove_header(name);
                }
            }
        }
        upstream.insert_header("x-forwarded-proto", proto)?;
        upstream.insert_header("x-forwarded-host", ctx.host.as_str())?;
        upstream.insert_header("x-request-id", ctx.request_id.as_str())?;
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        upstream_response.insert_header("x-request-id", ctx.request_id.as_str())?;
        Ok(())
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let service = ctx.service.as_ref().map_or("-", |s| s.fqdn.as_str());
        let elapsed = ctx.started.map(|t| t.elapsed()).unwrap_or_default();
        let class = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            500..=599 => "5xx",
            _ => "none",
        };
        if ctx.service.is_some() {
            self.shared.metrics.requests.with_label_values(&[service, class]).inc();
            self.shared.metrics.latency.with_label_values(&[service]).observe(elapsed.as_secs_f64());
            if e.is_some() && ctx.in_flight.is_some() {
                self.shared.metrics.upstream_errors.with_label_values(&[service, "proxy"]).inc();
            }
        }
        let req = session.req_header();
        tracing::info!(
            target: "cloud_edge::access",
            request_id = %ctx.request_id,
            client = %session.client_addr().map(|a| a.to_string()).unwrap_or_default(),
            port = self.port,
            host = %ctx.host,
            method = %req.method,
            path = %req.uri.path(),
            status,
            service,
            instance = %ctx.in_flight.as_ref().map_or("-", |g| g.backend().name.as_str()),
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            error = %e.map(|e| e.to_string()).unwrap_or_default(),
            "request"
        );
    }
}

/// Every value of a list header (as many lines as the client sent) joined, with `ours` appended last. Values
/// that are not visible ASCII are dropped: they are not addresses and an instance could not parse them.
fn appended(headers: &http::HeaderMap, name: &str, ours: &str) -> String {
    let mut list: Vec<&str> =
        headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).map(str::trim).filter(|v| !v.is_empty()).collect();
    list.push(ours);
    list.join(", ")
}

/// Our element of an RFC 7239 `Forwarded` list: the client, the protocol and the host it asked for. IPv6
/// addresses and the host are quoted strings (they contain ':' or may), per the RFC's grammar.
fn forwarded_element(client: std::net::IpAddr, proto: &str, host: &str) -> String {
    let node = match client {
        std::net::IpAddr::V4(ip) => ip.to_string(),
        std::net::IpAddr::V6(ip) => format!("\"[{ip}]\""),
    };
    // A wildcard service matches any first label the client sent, so the host is escaped as a quoted-string.
    let host = host.replace('\\', "\\\\").replace('"', "\\\"");
    format!("for={node};proto={proto};host=\"{host}\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarding_headers_append_ours_after_every_line_the_client_sent() {
        let mut h = http::HeaderMap::new();
        assert_eq!(appended(&h, "x-forwarded-for", "10.0.0.1"), "10.0.0.1");
        h.append("x-forwarded-for", "6.6.6.6".parse().unwrap());
        h.append("x-forwarded-for", " 7.7.7.7, 8.8.8.8 ".parse().unwrap());
        h.append("x-forwarded-for", http::HeaderValue::from_bytes(b"\xff").unwrap());
        assert_eq!(appended(&h, "x-forwarded-for", "10.0.0.1"), "6.6.6.6, 7.7.7.7, 8.8.8.8, 10.0.0.1");
    }

    #[test]
    fn forwarded_elements_follow_rfc_7239() {
        assert_eq!(
            forwarded_element("203.0.113.7".parse().unwrap(), "https", "a.example"),
            "for=203.0.113.7;proto=https;host=\"a.example\""
        );
        assert_eq!(
            forwarded_element("2001:db8::1".parse().unwrap(), "http", "a.example"),
            "for=\"[2001:db8::1]\";proto=http;host=\"a.example\""
        );
        assert_eq!(
            forwarded_element("10.0.0.1".parse().unwrap(), "http", "a\"b\\c.example"),
            "for=10.0.0.1;proto=http;host=\"a\\\"b\\\\c.example\""
        );
    }
}
