//! Readiness: what `pg_isready` does, without needing the program.
//!
//! A TCP connect alone is not enough: the postmaster listens before recovery is over and then answers every
//! startup packet with SQLSTATE 57P03 ("the database system is starting up"). So we send a startup packet and
//! read the first reply: an authentication request (or any error but 57P03) means the server accepts
//! connections. Closing during authentication is silent in the server log, as with `pg_isready`.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Each connect and read gives up after this long.
const STEP_TIMEOUT: Duration = Duration::from_secs(2);

/// What one probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Readiness {
    /// The server accepts connections.
    Ready,
    /// Nothing listens yet, or the server is still starting up.
    NotYet,
}

pub(crate) async fn probe(port: u16, user: &str) -> Readiness {
    match tokio::time::timeout(STEP_TIMEOUT * 2, exchange(port, user)).await {
        Ok(Ok(reply)) => classify(&reply),
        _ => Readiness::NotYet,
    }
}

/// Sends a startup packet and returns the first message of the reply (type byte, length, body).
async fn exchange(port: u16, user: &str) -> std::io::Result<Vec<u8>> {
    let mut stream = tokio::time::timeout(STEP_TIMEOUT, TcpStream::connect(("127.0.0.1", port))).await??;
    stream.write_all(&startup_packet(user, "postgres")).await?;
    let mut header = [0u8; 5];
    stream.read_exact(&mut header).await?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    let mut message = header.to_vec();
    // Error messages are short; cap what we read from a confused peer.
    let mut body = vec![0u8; len.saturating_sub(4).min(8192)];
    stream.read_exact(&mut body).await?;
    message.extend_from_slice(&body);
    Ok(message)
}

/// A protocol 3.0 StartupMessage.
fn startup_packet(user: &str, database: &str) -> Vec<u8> {
    let mut body = 196_608u32.to_be_bytes().to_vec(); // 3 << 16
    for (key, value) in [("user", user), ("database", database)] {
        body.extend_from_slice(key.as_bytes());
        body.push(0);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    packet
}

fn classify(reply: &[u8]) -> Readiness {
    match reply.first() {
        Some(b'R') => Readiness::Ready,
        Some(b'E') if sqlstate(&reply[5.min(reply.len())..]) == Some("57P03") => Readiness::NotYet,
        Some(b'E') => Readiness::Ready,
        _ => Readiness::NotYet,
    }
}

/// The `C` field of an ErrorResponse body (a list of NUL-terminated, type-tagged fields).
fn sqlstate(body: &[u8]) -> Option<&str> {
    body.split(|b| *b == 0).find_map(|field| field.strip_prefix(b"C")).and_then(|code| std::str::from_utf8(code).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_response(code: &str) -> Vec<u8> {
        let body = format!("SFATAL\0C{code}\0Mthe database system is starting up\0\0");
        let mut msg = vec![b'E'];
        msg.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        msg.extend_from_slice(body.as_bytes());
        msg
    }

    #[test]
    fn startup_packet_has_its_length_and_protocol() {
        let packet = startup_packet("cloud", "postgres");
        assert_eq!(u32::from_be_bytes(packet[..4].try_into().unwrap()) as usize, packet.len());
        assert_eq!(&packet[4..8], &[0, 3, 0, 0]);
        assert!(packet.ends_with(b"database\0postgres\0\0"));
    }

    #[test]
    fn replies_are_classified_like_pg_isready() {
        assert_eq!(classify(&[b'R', 0, 0, 0, 12, 0, 0, 0, 10]), Readiness::Ready);
        assert_eq!(classify(&error_response("57P03")), Readiness::NotYet);
        assert_eq!(classify(&error_response("53300")), Readiness::Ready);
        assert_eq!(classify(b""), Readiness::NotYet);
    }
}
