//! A stand-in for the Internet's DNS as a custom domain's owner sees it: a UDP server on loopback answering TXT
//! questions from a table the test edits (what the owner publishes at their DNS provider), NXDOMAIN otherwise.
//! It answers with RA set, as the recursive resolver the platform asks would. Started with
//! [`TxtServer::start_with_address`] it also answers A for every name (for an ACME CA that must reach the test's
//! http-01 responder whatever the name).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, TXT};
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
        Self::serve(None).await
    }

    /// Starts on a free loopback port, answering A `address` for every name.
    pub async fn start_with_address(address: Ipv4Addr) -> Self {
        Self::serve(Some(address)).await
    }

    async fn serve(address: Option<Ipv4Addr>) -> Self {
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
                let name = key(&question.name().to_ascii());
                match table.lock().expect("not poisoned").get(&name) {
                    _ if question.query_type() == RecordType::A && address.is_some() => {
                        let a = RData::A(A(address.expect("checked")));
                        reply.add_answer(Record::from_rdata(question.name().clone(), 60, a));
                    }
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
        self.records.lock().expect("not poisoned").insert(key(name), values.iter().map(|v| v.to_string()).collect());
    }

    /// Adds a TXT value at `name` (once).
    pub fn add(&self, name: &str, value: &str) {
        let mut records = self.records.lock().expect("not poisoned");
        let values = records.entry(key(name)).or_default();
        if !values.iter().any(|v| v == value) {
            values.push(value.to_owned());
        }
    }

    /// Removes a TXT value at `name`, and the name with its last value.
    pub fn remove(&self, name: &str, value: &str) {
        let mut records = self.records.lock().expect("not poisoned");
        if let Some(values) = records.get_mut(&key(name)) {
            values.retain(|v| v != value);
            if values.is_empty() {
                records.remove(&key(name));
            }
        }
    }

    /// The TXT values at `name` now.
    pub fn values(&self, name: &str) -> Vec<String> {
        self.records.lock().expect("not poisoned").get(&key(name)).cloned().unwrap_or_default()
    }
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl Drop for TxtServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
