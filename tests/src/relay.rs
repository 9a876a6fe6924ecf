//! A TCP relay to PostgreSQL that a test can cut and restore, as a network partition or a failover would.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cloud_store::Store;
use tokio::net::{TcpListener, TcpStream};

/// Relays connections to one address until cut.
pub struct Relay {
    /// Where it listens.
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Relay {
    /// Relays to `target` from a port of loopback.
    pub async fn start(target: SocketAddr) -> Self {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), target).await
    }

    /// Relays to `target` from `listen` (port 0: any).
    pub async fn start_on(listen: SocketAddr, target: SocketAddr) -> Self {
        let listener = TcpListener::bind(listen).await.expect("binding the relay");
        let relay =
            Relay { addr: listener.local_addr().expect("addr"), cut: Default::default(), conns: Default::default() };
        let (cut, conns) = (relay.cut.clone(), relay.conns.clone());
        tokio::spawn(async move {
            while let Ok((mut down, _)) = listener.accept().await {
                if cut.load(Ordering::SeqCst) {
                    continue; // dropped: refused
                }
                conns.lock().expect("relay lock").push(tokio::spawn(async move {
                    if let Ok(mut up) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                }));
            }
        });
        relay
    }

    /// A relay to `store`'s database and a store (a small pool, quick to give up) that goes through it.
    pub async fn store_through(store: &Store) -> (Self, Store) {
        let opts = store.pool().connect_options();
        let target = SocketAddr::new(opts.get_host().parse().expect("an IP host"), opts.get_port());
        let relay = Relay::start(target).await;
        let via_relay = (*opts).clone().host("127.0.0.1").port(relay.addr.port());
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(1))
            .connect_with(via_relay)
            .await
            .expect("connecting through the relay");
        (relay, Store::new(pool, store.settings().clone()))
    }

    /// Breaks every open connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for c in self.conns.lock().expect("relay lock").drain(..) {
            c.abort();
        }
    }

    /// Relays again.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}
