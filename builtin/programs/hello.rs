//! The program of the built-in `hello` image: answers every HTTP request with the instance's name and private
//! IP, so a response tells which instance served it. Also what a user debugging routing wants: a connection
//! that starts with a PROXY protocol v2 header gets a line naming the client it announces; `GET /echo` answers
//! with the request head as received (to see the headers the edge adds); `GET /sleep/<ms>` sends its head at once
//! and its body after that long (a response in progress, held in flight).
//!
//! Built by `build.rs` with the standard library only and linked statically: the image holds this one file and
//! nothing of the host.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

unsafe extern "C" {
    fn signal(signum: i32, handler: extern "C" fn(i32)) -> usize;
    fn _exit(code: i32) -> !;
}

/// As the first process of its sandbox, a signal without a handler is ignored: stop on SIGTERM and SIGINT.
extern "C" fn stop(_: i32) {
    unsafe { _exit(0) }
}

fn main() {
    unsafe {
        signal(15, stop);
        signal(2, stop);
    }
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let port: u16 = var("PORT").and_then(|p| p.parse().ok()).unwrap_or(8080);
    let ip = var("PRIVATE_IP").unwrap_or_else(|| "0.0.0.0".into());
    let instance = var("INSTANCE").unwrap_or_else(|| "hello".into());
    let body = format!("hello from {instance} ({ip})\n");
    let listener = match TcpListener::bind((ip.as_str(), port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("hello: binding {ip}:{port}: {e}");
            std::process::exit(1);
        }
    };
    println!("hello serving on {ip}:{port} as {instance}");
    for conn in listener.incoming().flatten() {
        let body = body.clone();
        std::thread::spawn(move || serve(conn, body));
    }
}

/// Answers each request on a keep-alive connection; requests have no body worth reading.
fn serve(mut conn: TcpStream, mut body: String) {
    let mut buf = vec![0u8; 8192];
    let (mut seen, mut first) = (0, true);
    loop {
        let n = match conn.read(&mut buf[seen..]) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        seen += n;
        if first && seen >= 16 {
            first = false;
            if let Some((source, destination, len)) = proxy_v2(&buf[..seen]) {
                body.push_str(&format!("proxy: {source} -> {destination}\n"));
                buf.copy_within(len..seen, 0);
                seen -= len;
            }
        }
        while let Some(end) = buf[..seen].windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
            let path = head.split_whitespace().nth(1).unwrap_or("/");
            let text = if path == "/echo" { head.clone() } else { body.clone() };
            let mut res = format!("HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n", text.len());
            if let Some(ms) = path.strip_prefix("/sleep/").and_then(|ms| ms.parse().ok()) {
                if conn.write_all(res.as_bytes()).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(ms));
                res.clear();
            }
            // One write otherwise: a second small one would wait for the first one's (delayed) ACK.
            res.push_str(&text);
            if conn.write_all(res.as_bytes()).is_err() {
                return;
            }
            buf.copy_within(end + 4..seen, 0);
            seen -= end + 4;
        }
        if seen == buf.len() {
            return;
        }
    }
}

/// The addresses of a PROXY protocol v2 header (TCP over IPv4 or IPv6) and its length.
fn proxy_v2(buf: &[u8]) -> Option<(SocketAddr, SocketAddr, usize)> {
    const SIGNATURE: [u8; 12] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A];
    if buf.len() < 16 || buf[..12] != SIGNATURE || buf[12] != 0x21 {
        return None;
    }
    let len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    let body = buf.get(16..16 + len)?;
    let (s, d, ports): (IpAddr, IpAddr, &[u8]) = match buf[13] {
        0x11 if len >= 12 => {
            (<[u8; 4]>::try_from(&body[0..4]).ok()?.into(), <[u8; 4]>::try_from(&body[4..8]).ok()?.into(), &body[8..12])
        }
        0x21 if len >= 36 => (
            <[u8; 16]>::try_from(&body[0..16]).ok()?.into(),
            <[u8; 16]>::try_from(&body[16..32]).ok()?.into(),
            &body[32..36],
        ),
        _ => return None,
    };
    let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    Some((SocketAddr::new(s, port(&ports[0..2])), SocketAddr::new(d, port(&ports[2..4])), 16 + len))
}
