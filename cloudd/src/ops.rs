//! The operations endpoints of roles without an HTTP API of their own (`cloudd dns`, `cloudd node`, `cloudd edge`,
//! `cloudd certs`): `/healthz`, `/readyz` and
//! Prometheus `/metrics`, as every process of the platform serves them.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use actix_web::{App, HttpResponse, HttpServer, web};
use anyhow::Context;

/// What a role reports.
pub trait Probe: Send + Sync + 'static {
    /// Prometheus text exposition.
    fn metrics(&self) -> String;
    /// Whether the role serves current data (not a stale snapshot).
    fn ready(&self) -> bool;
}

impl Probe for cloud_dns::DnsProbe {
    fn metrics(&self) -> String {
        self.metrics_text()
    }

    fn ready(&self) -> bool {
        !self.is_stale()
    }
}

impl Probe for cloud_edge::EdgeProbe {
    fn metrics(&self) -> String {
        self.metrics_text()
    }

    fn ready(&self) -> bool {
        !self.is_stale()
    }
}

impl Probe for cloud_certs::manager::ManagerProbe {
    fn metrics(&self) -> String {
        self.metrics_text()
    }

    fn ready(&self) -> bool {
        self.is_healthy()
    }
}

impl Probe for cloud_runtime::NodeProbe {
    fn metrics(&self) -> String {
        self.metrics_text()
    }

    fn ready(&self) -> bool {
        self.is_healthy()
    }
}

/// Serves the endpoints on `listen` until the returned handle stops it.
pub fn serve(listen: SocketAddr, probe: Arc<dyn Probe>) -> anyhow::Result<actix_web::dev::ServerHandle> {
    let listener = TcpListener::bind(listen).with_context(|| format!("binding the operations endpoint {listen}"))?;
    let data = web::Data::from(probe);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .route("/healthz", web::get().to(|| async { HttpResponse::Ok().content_type("text/plain").body("ok\n") }))
            .route(
                "/readyz",
                web::get().to(|p: web::Data<dyn Probe>| async move {
                    if p.ready() {
                        HttpResponse::Ok().content_type("text/plain").body("ready\n")
                    } else {
                        HttpResponse::ServiceUnavailable()
                            .content_type("text/plain")
                            .body("stale: the database is unreachable\n")
                    }
                }),
            )
            .route(
                "/metrics",
                web::get().to(|p: web::Data<dyn Probe>| async move {
                    HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(p.metrics())
                }),
            )
    })
    .workers(1)
    .shutdown_timeout(2)
    .listen(listener)?
    .run();
    let handle = server.handle();
    tokio::spawn(server);
    tracing::info!(%listen, "operations endpoint serving /healthz, /readyz, /metrics");
    Ok(handle)
}
