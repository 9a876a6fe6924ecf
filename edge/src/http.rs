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
use pingora::modules::http::HttpModules;
use pingora::prelude::HttpPeer;
use pingora::proxy::{ProxyHttp, Session};
use pingora::{Error, ErrorType, Result};
use uuid::Uuid;

use crate::Shared;
use crate::access_log::Line;
use crate::table::{InFlight, Pick, Service, normalize_host};

/// Where ACME http-01 validators ask (RFC 8555 §8.3).
const ACME_CHALLENGE_PATH: &str = "/.well-known/acme-challenge/";

/// The SNI a TLS client sent, lower case, attached to the connection at the handshake.
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

/// Builds a response of the edge's own with a short plain-text body and the request's id.
async fn respond(
    session: &mut Session,
    request_id: &str,
    status: u16,
    body: &str,
    headers: &[(&'static str, &str)],
) -> Result<bool> {
    let mut resp = ResponseHeader::build(status, Some(4))?;
    resp.insert_header("content-type", "text/plain; charset=utf-8")?;
    resp.insert_header("content-length", body.len().to_string())?;
    resp.insert_header("x-request-id", request_id)?;
    for (k, v) in headers {
        resp.insert_header(*k, *v)?;
    }
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(Bytes::copy_from_slice(body.as_bytes())), true).await?;
    Ok(true)
}

/// The host a request names, normalized: the authority of an HTTP/2 request, else the Host header.
fn request_host(session: &Session) -> Option<String> {
    let req = session.req_header();
    if let Some(a) = req.uri.authority() {
        return Some(normalize_host(a.as_str()));
    }
    session.get_header(http::header::HOST).and_then(|h| h.to_str().ok()).map(normalize_host)
}

fn sni(session: &Session) -> Option<&str> {
    let digest = session.digest()?.ssl_digest.as_ref()?;
    digest.extension.get::<Sni>().map(|s| s.0.as_str())
}

/// A request id from the client is kept when it is short and printable; otherwise a fresh one (a UUID v4 from
/// the thread's generator, so no system call per request).
fn request_id(session: &Session) -> String {
    match session.get_header("x-request-id").and_then(|h| h.to_str().ok()) {
        Some(id) if !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic()) => id.to_owned(),
        _ => uuid::Builder::from_random_bytes(rand::random()).into_uuid().simple().to_string(),
    }
}

#[async_trait]
impl ProxyHttp for HttpRoute {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx { started: Some(Instant::now()), ..Default::default() }
    }

    /// No downstream modules: the default adds a (disabled) compression module to every request.
    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        ctx.request_id = request_id(session);
        let host = request_host(session);
        let named = host.is_some();
        ctx.host = host.unwrap_or_default();
        // The id and host stay borrowed from the context (the access log reads them there) while the rest of it
        // is filled in.
        let RequestCtx { request_id, host, service: routed, destination_port: to_port, in_flight, tried, .. } = ctx;
        let (rid, host) = (request_id.as_str(), host.as_str());
        if !named {
            return respond(session, rid, 400, "the request names no host\n", &[]).await;
        }
        // Over TLS the certificate was chosen for the SNI; a request for another host on the same connection
        // (HTTP/2 coalescing, or a forged Host) must open its own connection (RFC 9110 §15.5.20).
        if self.tls
            && let Some(sni) = sni(session)
            && sni != host
        {
            return respond(session, rid, 421, "this connection is for another host\n", &[]).await;
        }
        // ACME http-01 answers the certificate manager published for this host; anything else under that path
        // goes to the service like any request (a tenant may run its own ACME client).
        if !self.tls
            && let Some(token) = session.req_header().uri.path().strip_prefix(ACME_CHALLENGE_PATH)
            && !token.is_empty()
            && token.len() <= 256
            && token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            let (store, name, token) = (self.shared.store.clone(), host.to_owned(), token.to_owned());
            match self.shared.on_control(async move { store.acme_http_answer(&name, &token).await }).await {
                Some(Ok(Some(answer))) => {
                    return respond(session, rid, 200, &answer, &[]).await;
                }
                Some(Ok(None)) | None => {}
                Some(Err(e)) => {
                    tracing::warn!(error = %cloud_domain::error_chain(&e), "cannot read ACME http-01 answers")
                }
            }
        }
        let table = self.shared.table.load();
        let Some(service) = table.by_normalized_host(host).cloned() else {
            return respond(session, rid, 404, &format!("no service at {host}\n"), &[]).await;
        };
        drop(table);
        let Some(mapping) = service.port(self.port) else {
            return respond(session, rid, 404, &format!("{host} does not serve port {}\n", self.port), &[]).await;
        };
        let (destination_port, http, redirect) = (
            mapping.destination_port,
            mapping.handlers.contains(&Handler::Http),
            mapping.handlers.contains(&Handler::Redirect),
        );
        *routed = Some(service.clone());
        if redirect {
            let port = if destination_port == 443 { String::new() } else { format!(":{destination_port}") };
            let path = session.req_header().uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
            let location = format!("https://{host}{port}{path}");
            let body = format!("moved to {location}\n");
            return respond(session, rid, 308, &body, &[("location", &location)]).await;
        }
        if !http {
            return respond(session, rid, 404, &format!("{host} does not serve HTTP on port {}\n", self.port), &[])
                .await;
        }
        *to_port = destination_port;
        crate::touch(&self.shared, &service);
        match service.pick(tried) {
            Pick::Backend(g) => *in_flight = Some(g),
            Pick::NoBackend if service.scale_to_zero_after.is_some() || service.starting > 0 => {
                // Held until an instance runs: the first request after idleness or a deploy is slow, not lost.
                let Some((woken, g)) = crate::wake(&self.shared, &service).await else {
                    self.shared.metrics.upstream_errors.with_label_values(&[&service.fqdn, "no_backend"]).inc();
                    return respond(session, rid, 503, "the service did not start in time\n", &[("retry-after", "1")])
                        .await;
                };
                *routed = Some(woken);
                *in_flight = Some(g);
            }
            Pick::NoBackend => {
                self.shared.metrics.upstream_errors.with_label_values(&[&service.fqdn, "no_backend"]).inc();
                return respond(session, rid, 503, "no instance of this service is running\n", &[("retry-after", "1")])
                    .await;
            }
            Pick::Overloaded => {
                self.shared.metrics.upstream_errors.with_label_values(&[&service.fqdn, "overloaded"]).inc();
                return respond(session, rid, 503, "every instance is at its limit\n", &[("retry-after", "1")]).await;
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
                let client_ip = client.to_string();
                let xff = appended(&upstream.headers, "x-forwarded-for", &client_ip);
                upstream.insert_header("x-forwarded-for", xff)?;
                let fwd = appended(&upstream.headers, "forwarded", &forwarded_element(client, proto, &ctx.host));
                upstream.insert_header("forwarded", fwd)?;
                upstream.insert_header("x-real-ip", client_ip)?;
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
        let elapsed = ctx.started.map(|t| t.elapsed()).unwrap_or_default();
        if let Some(s) = &ctx.service {
            let m = s.metrics(&self.shared.metrics);
            m.requests(status).inc();
            m.latency.observe(elapsed.as_secs_f64());
            if e.is_some() && ctx.in_flight.is_some() {
                self.shared.metrics.upstream_errors.with_label_values(&[&s.fqdn, "proxy"]).inc();
            }
        }
        let req = session.req_header();
        self.shared.access_log.log(&Line {
            request_id: &ctx.request_id,
            client: session.client_addr().and_then(|a| a.as_inet()).copied(),
            port: self.port,
            host: &ctx.host,
            method: req.method.as_str(),
            path: req.uri.path(),
            status,
            service: ctx.service.as_ref().map_or("-", |s| s.fqdn.as_str()),
            instance: ctx.in_flight.as_ref().map_or("-", |g| g.backend().name.as_str()),
            duration: elapsed,
            error: e.map(|e| e as &dyn std::fmt::Display),
        });
    }
}

/// Every value of a list header (as many lines as the client sent) joined, with `ours` appended last. Values
/// that are not visible ASCII are dropped: they are not addresses and an instance could not parse them.
fn appended(headers: &http::HeaderMap, name: &str, ours: &str) -> String {
    if !headers.contains_key(name) {
        return ours.to_owned();
    }
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
    if host.contains(['\\', '"']) {
        let host = host.replace('\\', "\\\\").replace('"', "\\\"");
        return format!("for={node};proto={proto};host=\"{host}\"");
    }
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
