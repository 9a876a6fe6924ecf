//! Hosts as network namespaces on an underlay switch the test builds: what one host's overlay sends another
//! arrives whole and sealed, and nobody without a peer's key, or speaking for an address it does not hold, gets
//! anything through. Needs root (namespaces, TUN); skipped otherwise.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cloud_overlay::{Config, Key, Overlay, Peer};
use cloud_tests::hosts::{Capture, Underlay, ip};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MARKER: &str = "PLAINTEXT-SECRET-OF-TENANT-A";

/// A host: a thread inside its namespace running a runtime of its own, so that what is spawned on `rt` opens its
/// sockets and devices there.
struct Host {
    rt: tokio::runtime::Handle,
    _stop: tokio::sync::oneshot::Sender<()>,
    ns: String,
}

impl Host {
    fn new(ns: &str) -> Self {
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let path = format!("/var/run/netns/{ns}");
        std::thread::spawn(move || {
            nix::sched::setns(std::fs::File::open(path).unwrap(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            handle_tx.send(rt.handle().clone()).unwrap();
            rt.block_on(async {
                let _ = stopped.await;
            });
        });
        Self { rt: handle_rx.recv().unwrap(), _stop: stop, ns: ns.to_owned() }
    }

    async fn run<T: Send + 'static>(&self, f: impl Future<Output = T> + Send + 'static) -> T {
        self.rt.spawn(f).await.unwrap()
    }

    async fn overlay(&self, underlay: Ipv4Addr, address: Ipv4Addr, key: Key) -> Arc<Overlay> {
        let config = Config { device: "co0".into(), underlay, port: cloud_overlay::PORT, address };
        Arc::new(self.run(async move { Overlay::start(&config, key).await.unwrap() }).await)
    }

    /// A TCP connection from this host (from `source`, if given) to `to`, within five seconds.
    async fn connect(&self, source: Option<Ipv4Addr>, to: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
        self.run(async move {
            let socket = tokio::net::TcpSocket::new_v4()?;
            if let Some(s) = source {
                socket.bind(SocketAddr::from((s, 0)))?;
            }
            match tokio::time::timeout(Duration::from_secs(5), socket.connect(to)).await {
                Ok(r) => r,
                Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
            }
        })
        .await
    }
}

async fn wait_for(what: &str, ok: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !ok() {
        assert!(t0.elapsed() < Duration::from_secs(30), "never {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn hosts_talk_sealed_and_nobody_else_gets_through() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: the overlay needs root");
        return;
    }
    let net = Underlay::build(&format!("ovt{}", std::process::id() % 100_000), 3);
    let underlay = Underlay::address;
    let overlay = |i: u8| Ipv4Addr::new(100, 64, 0, i);
    let mut hosts = net.hosts.iter().map(|ns| Host::new(&ns.0));
    let (a, b, c) = (hosts.next().unwrap(), hosts.next().unwrap(), hosts.next().unwrap());
    // An instance's address on b (on its loopback: the overlay routes to the host, which delivers), and an
    // address of a's that b's overlay does not know a holds.
    let instance = Ipv4Addr::new(10, 99, 2, 2);
    ip(&["-n", &b.ns, "addr", "add", &format!("{instance}/32"), "dev", "lo"]);
    let unheld = Ipv4Addr::new(10, 99, 1, 9);
    ip(&["-n", &a.ns, "addr", "add", &format!("{unheld}/32"), "dev", "lo"]);

    let (key_a, key_b, key_c) = (Key::generate(), Key::generate(), Key::generate());
    let (pub_a, pub_b) = (key_a.public(), key_b.public());
    let oa = a.overlay(underlay(1), overlay(1), key_a).await;
    let ob = b.overlay(underlay(2), overlay(2), key_b).await;
    let oc = c.overlay(underlay(3), overlay(3), key_c).await;
    let peer_a = Peer { name: "a".into(), public_key: pub_a, underlay: underlay(1), addresses: vec![overlay(1)] };
    let peer_b =
        Peer { name: "b".into(), public_key: pub_b, underlay: underlay(2), addresses: vec![overlay(2), instance] };
    oa.set_peers(std::slice::from_ref(&peer_b)).await.unwrap();
    ob.set_peers(std::slice::from_ref(&peer_a)).await.unwrap();
    // c knows b's key and addresses, but b does not count c as a peer.
    oc.set_peers(std::slice::from_ref(&peer_b)).await.unwrap();

    // A server on b's instance address answers 1 MiB, far over the overlay's MTU.
    let body: String = MARKER.repeat((1 << 20) / MARKER.len());
    let listener = b.run(async move { tokio::net::TcpListener::bind((instance, 8080)).await.unwrap() }).await;
    let served = body.clone();
    b.rt.spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else { return };
            let served = served.clone();
            tokio::spawn(async move {
                let mut request = [0u8; 64];
                let _ = conn.read(&mut request).await;
                let _ = conn.write_all(served.as_bytes()).await;
            });
        }
    });

    let dir = tempfile::tempdir().unwrap();
    let pcap = dir.path().join("underlay.pcap");
    let tcpdump = Capture::start(&net.switch, &pcap, &[]);
    let mut conn = a.connect(None, (instance, 8080).into()).await.expect("a reaches b's instance through the overlay");
    conn.write_all(format!("GET /{MARKER} HTTP/1.1\r\n\r\n").as_bytes()).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), conn.read_to_end(&mut got)).await.unwrap().unwrap();
    assert_eq!(got.len(), body.len(), "the whole response crossed the overlay");
    assert!(got == body.as_bytes());
    // tcpdump writes each packet as it reads it (-U): wait until it holds at least the response's size.
    let size = || std::fs::metadata(&pcap).map_or(0, |m| m.len() as usize);
    wait_for("the capture holding the transfer", || size() > body.len()).await;
    drop(tcpdump);
    let captured = std::fs::read(&pcap).unwrap();
    assert!(!captured.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()), "plaintext crossed the underlay");
    assert!(oa.stats().sent > 0 && ob.stats().received > 0);

    // c holds no key b accepts: its handshakes are dropped and it never connects.
    let dropped = ob.stats().unauthenticated;
    let from_c = tokio::spawn({
        let c_rt = c.rt.clone();
        async move { c_rt.spawn(async move { tokio::net::TcpStream::connect((instance, 8080)).await }).await.unwrap() }
    });
    wait_for("b dropping c's handshake", || ob.stats().unauthenticated > dropped).await;
    assert!(!from_c.is_finished() || from_c.await.unwrap().is_err(), "c connected without being a peer");

    // a speaks for an address it does not hold: b opens the packet and drops it.
    let spoofed = ob.stats().spoofed;
    let from_unheld = tokio::spawn({
        let a_rt = a.rt.clone();
        async move {
            a_rt.spawn(async move {
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                socket.bind((unheld, 0).into()).unwrap();
                socket.connect((instance, 8080).into()).await
            })
            .await
            .unwrap()
        }
    });
    wait_for("b dropping a's packet from an address a does not hold", || ob.stats().spoofed > spoofed).await;
    assert!(!from_unheld.is_finished() || from_unheld.await.unwrap().is_err(), "a spoofed its way in");

    // The instance leaves b: a routes nothing there any more, at once.
    let moved = Peer { addresses: vec![overlay(2)], ..peer_b.clone() };
    oa.set_peers(std::slice::from_ref(&moved)).await.unwrap();
    let refused = a.connect(None, (instance, 8080).into()).await;
    assert!(refused.is_err(), "a still reached an address b no longer holds");

    // b restarts with a new key: a's tunnel works again once it is told the new key.
    Arc::try_unwrap(ob).unwrap().shutdown().await;
    let key_b2 = Key::generate();
    let peer_b2 = Peer { public_key: key_b2.public(), ..peer_b };
    let ob2 = b.overlay(underlay(2), overlay(2), key_b2).await;
    ob2.set_peers(std::slice::from_ref(&peer_a)).await.unwrap();
    oa.set_peers(std::slice::from_ref(&peer_b2)).await.unwrap();
    let mut again = a.connect(None, (instance, 8080).into()).await.expect("a reaches b under its new key");
    again.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut first = [0u8; 16];
    again.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, &body.as_bytes()[..16]);
}
