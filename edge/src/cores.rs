//! Thread per core: each core runs its own single-threaded tokio runtime with its own listening sockets (one per
//! listener and core, `SO_REUSEPORT`), its own HTTP engines and upstream keep-alive pools. A connection lives on
//! the core that accepted it, from handshake to close: no task moves between cores, no request wakes another
//! core, and a pooled upstream connection is always polled by the reactor it is registered with.
//!
//! What the cores share is read-only or atomic: the route table (`ArcSwap`), the certificates, backends' in-flight
//! counts and health marks, the metrics. Work that talks to PostgreSQL runs on the runtime that started the edge
//! ([`crate::Shared::control`]): the store's pooled connections belong to that runtime's reactor, and a core's
//! runtime ends with the edge while the store lives on.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::Shared;
use crate::server::{Connections, Kind};

/// What the edge tells its cores.
enum Order {
    /// Accept on this socket for the public port `port`.
    Listen { port: u16, kind: Kind, listener: std::net::TcpListener },
    /// Stop accepting on the port (its open connections go on).
    Close { port: u16 },
    /// Stop accepting anywhere and end keep-alive: the edge is shutting down.
    Drain,
    /// End the runtime and every connection still on it.
    Exit,
}

/// The cores' threads and the way to reach each.
pub(crate) struct Cores {
    orders: Vec<mpsc::UnboundedSender<Order>>,
    threads: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Cores {
    /// Starts `count` cores (at least one), each on its own thread named `edge-<i>`.
    pub(crate) fn start(shared: &Arc<Shared>, count: usize) -> std::io::Result<Self> {
        let mut orders = Vec::new();
        let mut threads = Vec::new();
        for i in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let (tx, rx) = mpsc::unbounded_channel();
            let shared = shared.clone();
            let thread = std::thread::Builder::new()
                .name(format!("edge-{i}"))
                .spawn(move || runtime.block_on(core_main(shared, rx)))?;
            orders.push(tx);
            threads.push(thread);
        }
        Ok(Self { orders, threads: std::sync::Mutex::new(threads) })
    }

    /// How many cores there are.
    pub(crate) fn len(&self) -> usize {
        self.orders.len()
    }

    /// Hands one socket of `listeners` (as many as there are cores) to each core.
    pub(crate) fn listen(&self, port: u16, kind: Kind, listeners: Vec<std::net::TcpListener>) {
        for (core, listener) in self.orders.iter().zip(listeners) {
            let _ = core.send(Order::Listen { port, kind, listener });
        }
    }

    pub(crate) fn close(&self, port: u16) {
        self.tell(|| Order::Close { port });
    }

    pub(crate) fn drain(&self) {
        self.tell(|| Order::Drain);
    }

    /// Ends every core and waits for their threads.
    pub(crate) async fn exit(&self) {
        self.tell(|| Order::Exit);
        let threads = std::mem::take(&mut *self.threads.lock().expect("threads lock"));
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }

    fn tell(&self, order: impl Fn() -> Order) {
        for core in &self.orders {
            // A core that is gone has nothing left to stop.
            let _ = core.send(order());
        }
    }
}

impl Drop for Cores {
    /// A dropped edge stops its cores (tests drop handles without shutting them down).
    fn drop(&mut self) {
        self.tell(|| Order::Exit);
    }
}

/// One core: follows the edge's orders; the accept loops and connections run beside it on this runtime.
async fn core_main(shared: Arc<Shared>, mut orders: mpsc::UnboundedReceiver<Order>) {
    let (drain, draining) = watch::channel(false);
    let conns = Arc::new(Connections::new(shared.clone(), draining));
    let mut accepting: HashMap<u16, JoinHandle<()>> = HashMap::new();
    let log = shared.clone();
    let ticks = tokio::spawn(async move {
        let mut tick = tokio::time::interval(crate::access_log::TICK);
        loop {
            tick.tick().await;
            log.access_log.hand_over();
        }
    });
    while let Some(order) = orders.recv().await {
        match order {
            Order::Listen { port, kind, listener } => match TcpListener::from_std(listener) {
                Ok(listener) => {
                    let task = tokio::spawn(conns.clone().accept_loop(listener, port, kind));
                    if let Some(old) = accepting.insert(port, task) {
                        old.abort();
                    }
                }
                Err(e) => tracing::warn!(port, error = %e, "cannot accept on a listener"),
            },
            Order::Close { port } => {
                if let Some(task) = accepting.remove(&port) {
                    task.abort();
                }
            }
            Order::Drain => {
                let _ = drain.send(true);
                for (_, task) in accepting.drain() {
                    task.abort();
                }
            }
            Order::Exit => break,
        }
    }
    ticks.abort();
    shared.access_log.hand_over();
}
