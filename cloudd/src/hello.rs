//! The built-in `hello` image: answers every HTTP request with the instance's name and private IP, so a
//! response tells which instance served it.
//!
//! Also what a user debugging routing wants: a connection that starts with a PROXY protocol v2 header gets a
//! line naming the client it announces; `GET /echo` answers with the request head as received (to see the
//! X-Forwarded-* headers the edge adds); `GET /sleep/<ms>` answers after that long (to hold a request in flight).

use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

pub async fn serve() -> anyhow::Result<()> {
    let port: u16 = std::env::var("PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(8080);
    let ip = std::env::var("PRIVATE_IP").unwrap_or_else(|_| "0.0.0.0".into());
    let instance = std::env::var("INSTANCE").unwrap_or_else(|_| "hello".into());
    let body = format!("hello from {instance} ({ip})\n");
    // Bound to the private IP: in a namespace that is the instance's own address; on a node without root
    // (loopback mode) instances share the host's network and each has its own 127.x address.
    let listener = TcpListener::bind((ip.as_str(), port)).await.with_context(|| format!("binding {ip}:{port}"))?;
    tracing::info!(port, %instance, "hello serving");
    loop {
        let (mut conn, _) = listener.accept().await?;
        let mut body = body.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            let mut seen = 0;
            let mut first = true;
            // Answer each request on a keep-alive connection; requests have no body worth reading.
            loop {
                let Ok(n) = conn.read(&mut buf[seen..]).await else {
                    return;
                };
                if n == 0 {
                    return;
                }
                seen += n;
                if first && seen >= 16 {
                    first = false;
                    if let Some((source, destination, len)) = cloud_edge::proxy_protocol::parse_v2(&buf[..seen]) {
                        body.push_str(&format!("proxy: {source} -> {destination}\n"));
                        buf.copy_within(len..seen, 0);
                        seen -= len;
                    }
                }
                while let Some(end) = buf[..seen].windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
                    let path = head.split_whitespace().nth(1).unwrap_or("/");
                    let text = if path == "/echo" {
                        head.clone()
                    } else {
                        if let Some(ms) = path.strip_prefix("/sleep/").and_then(|ms| ms.parse().ok()) {
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                        }
                        body.clone()
                    };
                    let res = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{text}",
                        text.len()
                    );
                    if conn.write_all(res.as_bytes()).await.is_err() {
                        return;
                    }
                    buf.copy_within(end + 4..seen, 0);
                    seen -= end + 4;
                }
                if seen == buf.len() {
                    return;
                }
            }
        });
    }
}
