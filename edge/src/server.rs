//! Listeners and connections: our own tokio accept loops (pingora's listeners are fixed when its server starts,
//! ours open and close as services declare ports), TLS handshakes with per-SNI certificates, then either
//! pingora's HTTP engine or a raw byte copy to an instance.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use cloud_domain::ports::{Handler, PortMapping};
use pingora::apps::ServerApp;
use pingora::listeners::TlsAccept;
use pingora::listeners::tls::{Acceptor, TlsSettings};
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::tls::TlsRef;
use pingora::protocols::{ALPN, GetSocketDigest, SocketDigest, Ssl, Stream};
use pingora::proxy::{HttpProxy, http_proxy};
use pingora::server::configuration::ServerConf;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::Shared;
use crate::certs::Resolver;
use crate::cores::Cores;
use crate::http::{HttpRoute, Sni};
use crate::proxy_protocol::header_v2;
use crate::stream::Coalesced;
use crate::table::{Pick, Service};

/// What a listener does with its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Plain HTTP (the public port 80).
    Http,
    /// TLS terminated, then HTTP or raw bytes per the SNI's service.
    Tls,
    /// Raw TCP to the one service owning the port.
    Tcp,
}

impl Kind {
    /// Every kind, each at the index of its discriminant.
    pub(crate) const ALL: [Kind; 3] = [Kind::Http, Kind::Tls, Kind::Tcp];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Kind::Http => "http",
            Kind::Tls => "tls",
            Kind::Tcp => "tcp",
        }
    }
}

/// pingora's stream over an accepted socket, with the socket digest its HTTP layer reads the client address
/// from, filled from what `accept` returned (so it never asks the kernel again).
fn l4(tcp: TcpStream, client: SocketAddr, local: Option<SocketAddr>) -> L4Stream {
    let fd = std::os::fd::AsRawFd::as_raw_fd(&tcp);
    let mut stream = L4Stream::from(tcp);
    let digest = SocketDigest::from_raw_fd(fd);
    let _ = digest.peer_addr.set(Some(client.into()));
    if let Some(local) = local {
        let _ = digest.local_addr.set(Some(local.into()));
    }
    stream.set_socket_digest(digest);
    stream
}

/// Remembers the SNI of each TLS connection so the HTTP layer can compare it with the request's host.
struct SniCapture;

#[async_trait]
impl TlsAccept for SniCapture {
    async fn handshake_complete_callback(&self, tls: &TlsRef) -> Option<Arc<dyn std::any::Any + Send + Sync>> {
        tls.server_name().map(|n| Arc::new(Sni(n.to_ascii_lowercase())) as Arc<dyn std::any::Any + Send + Sync>)
    }
}

/// What one core needs to serve its connections. Each core has its own: the TLS acceptor, the HTTP engines (and
/// with them the upstream keep-alive pools) and the shutdown signal, so nothing here is shared between cores.
pub(crate) struct Connections {
    shared: Arc<Shared>,
    acceptor: Acceptor,
    conf: Arc<ServerConf>,
    shutdown: watch::Receiver<bool>,
}

/// Counts a connection while it lives.
struct OpenGuard<'a>(&'a Shared, Kind);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.connections(self.1).dec();
    }
}

impl Connections {
    pub(crate) fn new(shared: Arc<Shared>, shutdown: watch::Receiver<bool>) -> Self {
        let mut tls = TlsSettings::with_callbacks(Box::new(SniCapture)).expect("settings without files");
        tls.set_cert_resolver(Arc::new(Resolver(shared.certs.clone())));
        tls.enable_h2();
        // One core's pool: `threads` multiplies the size, and this engine runs on one thread.
        let conf = ServerConf {
            threads: 1,
            upstream_keepalive_pool_size: shared.config.upstream_pool_size,
            ..ServerConf::default()
        };
        Self { shared, acceptor: tls.build(), conf: Arc::new(conf), shutdown }
    }

    /// The HTTP engine of a public port on this core (the port is part of routing).
    fn proxy(&self, port: u16, tls: bool) -> Arc<HttpProxy<HttpRoute>> {
        let route = HttpRoute { shared: self.shared.clone(), port, tls };
        Arc::new(http_proxy(&self.conf, route))
    }

    /// Accepts on `listener` until the task is aborted; `port` is the public port it stands for. Connections stay
    /// on this core's runtime from accept to close.
    pub(crate) async fn accept_loop(self: Arc<Self>, listener: TcpListener, port: u16, kind: Kind) {
        let proxy = match kind {
            Kind::Http => Some(self.proxy(port, false)),
            Kind::Tls => Some(self.proxy(port, true)),
            Kind::Tcp => None,
        };
        loop {
            let (tcp, client) = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(port, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let (this, proxy) = (self.clone(), proxy.clone());
            tokio::spawn(async move {
                this.shared.open.fetch_add(1, Ordering::Relaxed);
                this.shared.metrics.connections(kind).inc();
                let _open = OpenGuard(&this.shared, kind);
                let local = tcp.local_addr().ok();
                let stream = l4(tcp, client, local);
                match (kind, proxy) {
                    (Kind::Tcp, _) | (_, None) => this.serve_tcp(port, stream, client, local).await,
                    (Kind::Http, Some(proxy)) => this.serve_http(&proxy, Box::new(Coalesced::new(stream))).await,
                    (Kind::Tls, Some(proxy)) => this.serve_tls(&proxy, port, stream, client, local).await,
                }
            });
        }
    }

    async fn serve_http(&self, proxy: &Arc<HttpProxy<HttpRoute>>, stream: Stream) {
        let mut next = proxy.process_new(stream, &self.shutdown).await;
        while let Some(stream) = next {
            next = proxy.process_new(stream, &self.shutdown).await;
        }
    }

    async fn serve_tls(
        &self,
        proxy: &Arc<HttpProxy<HttpRoute>>,
        port: u16,
        stream: L4Stream,
        client: SocketAddr,
        local: Option<SocketAddr>,
    ) {
        let handshake = self.acceptor.tls_handshake(stream);
        let tls = match tokio::time::timeout(self.shared.config.handshake_timeout, handshake).await {
            Ok(Ok(tls)) => tls,
            // Unknown SNI, garbage, a slow client: this connection ends, nothing else notices.
            Ok(Err(e)) => {
                tracing::debug!(%client, port, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%client, port, "TLS handshake timed out");
                return;
            }
        };
        let sni = tls.get_ssl_digest().and_then(|d| d.extension.get::<Sni>().map(|s| s.0.clone()));
        let raw = sni.and_then(|sni| {
            let table = self.shared.table.load();
            let service = table.by_host(&sni)?.clone();
            let mapping = service.port(port)?.clone();
            (!mapping.handlers.contains(&Handler::Http)).then_some((service, mapping))
        });
        match (raw, local) {
            (Some((service, mapping)), Some(local)) => self.forward(tls, client, local, service, &mapping).await,
            // HTTP/2 frames are already written one flush at a time by the h2 codec.
            _ if tls.selected_alpn_proto() == Some(ALPN::H2) => self.serve_http(proxy, Box::new(tls)).await,
            // HTTP, or no service on this port for the name: the HTTP layer answers (404, 421) properly.
            _ => self.serve_http(proxy, Box::new(Coalesced::new(tls))).await,
        }
    }

    async fn serve_tcp(&self, port: u16, stream: L4Stream, client: SocketAddr, local: Option<SocketAddr>) {
        let route = {
            let table = self.shared.table.load();
            table.by_tcp_port(port).and_then(|s| Some((s.clone(), s.port(port)?.clone())))
        };
        if let (Some((service, mapping)), Some(local)) = (route, local) {
            self.forward(stream, client, local, service, &mapping).await;
        }
    }

    /// Copies bytes between the client and one instance of `service`, trying the others when one cannot be
    /// reached; sends the PROXY v2 header first when the mapping asks for it.
    async fn forward<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut down: S,
        client: SocketAddr,
        local: SocketAddr,
        mut service: Arc<Service>,
        mapping: &PortMapping,
    ) {
        let metrics = &self.shared.metrics;
        let mut tried = Vec::new();
        crate::touch(&self.shared, &service);
        let mut woken = false;
        loop {
            let guard = match service.pick(&tried) {
                Pick::Backend(g) => g,
                Pick::NoBackend
                    if (service.scale_to_zero_after.is_some() || service.starting > 0)
                        && !woken
                        && tried.is_empty() =>
                {
                    woken = true;
                    match crate::wake(&self.shared, &service).await {
                        Some((s, g)) => {
                            service = s;
                            g
                        }
                        None => return,
                    }
                }
                Pick::NoBackend => {
                    metrics.upstream_errors.with_label_values(&[&service.fqdn, "no_backend"]).inc();
                    return;
                }
                Pick::Overloaded => {
                    metrics.upstream_errors.with_label_values(&[&service.fqdn, "overloaded"]).inc();
                    return;
                }
            };
            let backend = guard.backend().clone();
            let addr = SocketAddr::new(backend.ip, mapping.destination_port);
            let connected = tokio::time::timeout(self.shared.config.connect_timeout, TcpStream::connect(addr)).await;
            let mut up = match connected {
                Ok(Ok(up)) => up,
                _ => {
                    backend.mark_down(self.shared.config.health_window);
                    metrics.upstream_errors.with_label_values(&[&service.fqdn, "connect"]).inc();
                    tried.push(backend.id);
                    continue;
                }
            };
            let _ = up.set_nodelay(true);
            if mapping.proxy && up.write_all(&header_v2(client, local)).await.is_err() {
                return;
            }
            metrics.l4_connections.with_label_values(&[&service.fqdn]).inc();
            tracing::debug!(service = %service.fqdn, instance = %backend.name, %client, "forwarding");
            let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
            return;
        }
    }
}

/// Binds `count` listening sockets on one address with `SO_REUSEPORT`, so each core accepts on its own and the
/// kernel spreads connections between them. The first binds the address as given (port 0 picks one), the rest
/// bind the port it got.
pub(crate) fn bind_reuseport(addr: SocketAddr, count: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    use socket2::{Domain, Protocol, Socket, Type};
    let mut bound = Vec::with_capacity(count);
    let mut at = addr;
    for _ in 0..count.max(1) {
        let socket = Socket::new(Domain::for_address(at), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&at.into())?;
        socket.listen(4096)?;
        let listener: std::net::TcpListener = socket.into();
        at = listener.local_addr()?;
        bound.push(listener);
    }
    Ok(bound)
}

/// The listeners of service-declared ports, opened and closed on every core as the route table changes.
pub(crate) struct PortListeners {
    shared: Arc<Shared>,
    cores: Arc<Cores>,
    ip: IpAddr,
    /// Ports the fixed listeners hold (never opened again here).
    fixed: Vec<SocketAddr>,
    running: HashMap<u16, Kind>,
}

impl PortListeners {
    pub(crate) fn new(shared: Arc<Shared>, cores: Arc<Cores>, ip: IpAddr, fixed: Vec<SocketAddr>) -> Self {
        Self { shared, cores, ip, fixed, running: HashMap::new() }
    }

    /// Opens what the table declares and closes what it no longer does. Open connections on a closed port go on.
    pub(crate) fn reconcile(&mut self) {
        let (tcp, tls) = self.shared.table.load().extra_ports(443);
        let mut want: HashMap<u16, Kind> = tls.into_iter().map(|p| (p, Kind::Tls)).collect();
        // A dedicated raw port wins over SNI routing on the same number.
        want.extend(tcp.into_iter().map(|p| (p, Kind::Tcp)));
        want.retain(|p, _| {
            !self.fixed.iter().any(|f| f.port() == *p && (f.ip() == self.ip || f.ip().is_unspecified()))
        });
        let cores = &self.cores;
        self.running.retain(|port, kind| {
            let keep = want.get(port) == Some(kind);
            if !keep {
                cores.close(*port);
                tracing::info!(port, kind = kind.label(), "closed a service port");
            }
            keep
        });
        for (port, kind) in want {
            if self.running.contains_key(&port) {
                continue;
            }
            let addr = SocketAddr::new(self.ip, port);
            match bind_reuseport(addr, self.cores.len()) {
                Ok(listeners) => {
                    tracing::info!(%addr, kind = kind.label(), "opened a service port");
                    self.cores.listen(port, kind, listeners);
                    self.running.insert(port, kind);
                }
                // Retried at the next change or resync.
                Err(e) => tracing::warn!(%addr, error = %e, "cannot open a service port"),
            }
        }
    }

    /// Ports open now, by kind.
    pub(crate) fn open_ports(&self) -> Vec<(u16, Kind)> {
        self.running.iter().map(|(p, k)| (*p, *k)).collect()
    }
}
