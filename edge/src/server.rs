//! Listeners and connections: our own tokio accept loops (pingora's listeners are fixed when its server starts,
//! ours open and close as services declare ports), TLS handshakes with per-SNI certificates, then either
//! pingora's HTTP engine or a raw byte copy to an instance.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use cloud_domain::ports::{Handler, PortMapping};
use pingora::apps::ServerApp;
use pingora::listeners::TlsAccept;
use pingora::listeners::tls::{Acceptor, TlsSettings};
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::tls::TlsRef;
use pingora::protocols::{GetSocketDigest, SocketDigest, Ssl, Stream};
use pingora::proxy::{HttpProxy, http_proxy};
use pingora::server::configuration::ServerConf;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::Shared;
use crate::certs::Resolver;
use crate::http::{HttpRoute, Sni};
use crate::proxy_protocol::header_v2;
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
    fn label(self) -> &'static str {
        match self {
            Kind::Http => "http",
            Kind::Tls => "tls",
            Kind::Tcp => "tcp",
        }
    }
}

/// pingora's stream over an accepted socket, with the socket digest its HTTP layer reads the client address from.
fn l4(tcp: TcpStream) -> L4Stream {
    let fd = std::os::fd::AsRawFd::as_raw_fd(&tcp);
    let mut stream = L4Stream::from(tcp);
    stream.set_socket_digest(SocketDigest::from_raw_fd(fd));
    stream
}

/// Remembers the SNI of each TLS connection so the HTTP layer can compare it with the request's host.
struct SniCapture;

#[async_trait]
impl TlsAccept for SniCapture {
    async fn handshake_complete_callback(&self, tls: &TlsRef) -> Option<Arc<dyn std::any::Any + Send + Sync>> {
        tls.server_name().map(|n| Arc::new(Sni(n.to_owned())) as Arc<dyn std::any::Any + Send + Sync>)
    }
}

/// Everything connections need, shared by every listener.
pub(crate) struct Connections {
    shared: Arc<Shared>,
    acceptor: Acceptor,
    conf: Arc<ServerConf>,
    /// One HTTP engine per public port (the port is part of routing).
    proxies: Mutex<HashMap<(u16, bool), Arc<HttpProxy<HttpRoute>>>>,
    shutdown: watch::Receiver<bool>,
    /// Open downstream connections, for the graceful shutdown.
    pub(crate) open: AtomicUsize,
}

/// Counts a connection while it lives.
struct OpenGuard<'a>(&'a Connections, Kind);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
        self.0.shared.metrics.connections.with_label_values(&[self.1.label()]).dec();
    }
}

impl Connections {
    pub(crate) fn new(shared: Arc<Shared>, shutdown: watch::Receiver<bool>) -> Self {
        let mut tls = TlsSettings::with_callbacks(Box::new(SniCapture)).expect("settings without files");
        tls.set_cert_resolver(Arc::new(Resolver(shared.certs.clone())));
        tls.enable_h2();
        Self {
            shared,
            acceptor: tls.build(),
            conf: Arc::new(ServerConf::default()),
            proxies: Mutex::new(HashMap::new()),
            shutdown,
            open: AtomicUsize::new(0),
        }
    }

    fn proxy(&self, port: u16, tls: bool) -> Arc<HttpProxy<HttpRoute>> {
        let mut proxies = self.proxies.lock().expect("proxies lock");
        proxies
            .entry((port, tls))
            .or_insert_with(|| Arc::new(http_proxy(&self.conf, HttpRoute { shared: self.shared.clone(), port, tls })))
            .clone()
    }

    /// Accepts on `listener` until shutdown; `port` is the public port it stands for.
    pub(crate) async fn accept_loop(self: Arc<Self>, listener: TcpListener, port: u16, kind: Kind) {
        let mut stop = self.shutdown.clone();
        loop {
            let (tcp, client) = tokio::select! {
                _ = crate::stopped(&mut stop) => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors and the like: back off instead of spinning.
                        tracing::warn!(port, error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let this = self.clone();
            tokio::spawn(async move {
                this.open.fetch_add(1, Ordering::Relaxed);
                this.shared.metrics.connections.with_label_values(&[kind.label()]).inc();
                let _open = OpenGuard(&this, kind);
                let local = tcp.local_addr().ok();
                match kind {
                    Kind::Http => this.serve_http(port, false, Box::new(l4(tcp))).await,
                    Kind::Tls => this.serve_tls(port, tcp, client, local).await,
                    Kind::Tcp => this.serve_tcp(port, tcp, client, local).await,
                }
            });
        }
    }

    async fn serve_http(&self, port: u16, tls: bool, stream: Stream) {
        let proxy = self.proxy(port, tls);
        let mut next = proxy.process_new(stream, &self.shutdown).await;
        while let Some(stream) = next {
            next = proxy.process_new(stream, &self.shutdown).await;
        }
    }

    async fn serve_tls(&self, port: u16, tcp: TcpStream, client: SocketAddr, local: Option<SocketAddr>) {
        let handshake = self.acceptor.tls_handshake(l4(tcp));
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
            // HTTP, or no service on this port for the name: the HTTP layer answers (404, 421) properly.
            _ => self.serve_http(port, true, Box::new(tls)).await,
        }
    }

    async fn serve_tcp(&self, port: u16, tcp: TcpStream, client: SocketAddr, local: Option<SocketAddr>) {
        let route = {
            let table = self.shared.table.load();
            table.by_tcp_port(port).and_then(|s| Some((s.clone(), s.port(port)?.clone())))
        };
        if let (Some((service, mapping)), Some(local)) = (route, local) {
            self.forward(tcp, client, local, service, &mapping).await;
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

/// The listeners of service-declared ports, opened and closed as the route table changes.
pub(crate) struct PortListeners {
    conns: Arc<Connections>,
    ip: IpAddr,
    /// Ports the fixed listeners hold (never opened again here).
    fixed: Vec<SocketAddr>,
    running: HashMap<u16, (Kind, JoinHandle<()>)>,
}

impl PortListeners {
    pub(crate) fn new(conns: Arc<Connections>, ip: IpAddr, fixed: Vec<SocketAddr>) -> Self {
        Self { conns, ip, fixed, running: HashMap::new() }
    }

    /// Opens what the table declares and closes what it no longer does. Open connections on a closed port go on.
    pub(crate) async fn reconcile(&mut self) {
        let (tcp, tls) = self.conns.shared.table.load().extra_ports(443);
        let mut want: HashMap<u16, Kind> = tls.into_iter().map(|p| (p, Kind::Tls)).collect();
        // A dedicated raw port wins over SNI routing on the same number.
        want.extend(tcp.into_iter().map(|p| (p, Kind::Tcp)));
        want.retain(|p, _| {
            !self.fixed.iter().any(|f| f.port() == *p && (f.ip() == self.ip || f.ip().is_unspecified()))
        });
        self.running.retain(|port, (kind, task)| {
            let keep = want.get(port) == Some(kind);
            if !keep {
                task.abort();
                tracing::info!(port, kind = kind.label(), "closed a service port");
            }
            keep
        });
        for (port, kind) in want {
            if self.running.contains_key(&port) {
                continue;
            }
            let addr = SocketAddr::new(self.ip, port);
            match TcpListener::bind(addr).await {
                Ok(listener) => {
                    tracing::info!(%addr, kind = kind.label(), "opened a service port");
                    let task = tokio::spawn(self.conns.clone().accept_loop(listener, port, kind));
                    self.running.insert(port, (kind, task));
                }
                // Retried at the next change or resync.
                Err(e) => tracing::warn!(%addr, error = %e, "cannot open a service port"),
            }
        }
    }

    /// Ports open now, by kind.
    pub(crate) fn open_ports(&self) -> Vec<(u16, Kind)> {
        self.running.iter().map(|(p, (k, _))| (*p, *k)).collect()
    }

    pub(crate) fn close_all(&mut self) {
        for (_, (_, task)) in self.running.drain() {
            task.abort();
        }
    }
}
