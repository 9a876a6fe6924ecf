//! A stand-in for the Internet's DNS as a custom domain's owner sees it: a UDP server on loopback answering TXT
//! questions from a table the test edits (what the owner publishes at their DNS provider), NXDOMAIN otherwise.
//! It answers with RA set, as the recursive resolver the platform asks would.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::TXT;
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::net::UdpSocket;

/// TXT records by owner name (lowercase, no trailing dot).
#[derive(Debug)]
pub struct TxtServer {
    addr: SocketAddr,
    records: Arc<Mutex<HashMap<String, Vec<String>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TxtServer {
    /// Starts on a free loopback port.
    pub async fn start() -> Self {
        let sock = UdpSocket::bind("127.0.0.1:0").await.expect("a loopback UDP port");
        let addr = sock.local_addr().expect("bound");
        let records: Arc<Mutex<HashMap<String, Vec<String>>>> = Arc::default();
        let table = records.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                let Ok(q) = Message::from_vec(&buf[..n]) else { continue };
                let Some(question) = q.queries.first().cloned() else { continue };
                let mut reply = Message::response(q.metadata.id, q.metadata.op_code);
                reply.metadata.message_type = MessageType::Response;
                reply.metadata.recursion_desired = q.metadata.recursion_desired;
                reply.metadata.recursion_available = true;
                reply.add_query(question.clone());
                let name = question.name().to_ascii().trim_end_matches('.').to_ascii_lowercase();
                match table.lock().expect("not poisoned").get(&name) {
                    Some(values) if question.query_type() == RecordType::TXT => {
                        for v in values {
                            reply.add_answer(Record::from_rdata(
                                question.name().clone(),
                                60,
                                RData::TXT(TXT::new(vec![v.clone()])),
                            ));
                        }
                    }
                    Some(_) => {}
                    None => reply.metadata.response_code = ResponseCode::NXDomain,
                }
                if let Ok(bytes) = reply.to_vec() {
                    let _ = sock.send_to(&bytes, from).await;
                }
            }
        });
        Self { addr, records, task }
    }

    /// Where to send questions.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Publishes (replaces) the TXT values at `name`.
    pub fn set(&self, name: &str, values: &[&str]) {
        self.records
            .lock()
            .expect("not poisoned")
            .insert(name.trim_end_matches('.').to_ascii_lowercase(), values.iter().map(|v| v.to_string()).collect());
    }
}

impl Drop for TxtServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
