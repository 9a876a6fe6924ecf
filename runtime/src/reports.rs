//! Observations on their way to PostgreSQL. A supervisor hands each one over and goes on with its instance;
//! one task per agent writes them, in the order they were made, and retries with backoff while the database
//! does not answer. An outage thus delays what the platform learns of its instances but loses none of it, and
//! never keeps a supervisor from restarting or stopping its instance meanwhile (static stability).
//!
//! A supervisor waits only for its last report ([`Reports::submit`]'s receiver): the run ended for good only
//! once the database says so (a run that ended per its restart policy is recorded as wanted stopped), and until
//! then its task stays alive, so the agent's reconciliation cannot mistake the instance for one still to start.

use std::collections::VecDeque;

use cloud_store::{Observation, Store};
use prometheus::IntGauge;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::retry::Backoff;

/// An observation waiting to be written, and who waits for it.
pub(crate) struct Pending {
    instance: Uuid,
    observation: Observation,
    written: Option<oneshot::Sender<()>>,
}

/// Where supervisors hand their observations.
#[derive(Debug, Clone)]
pub(crate) struct Reports {
    tx: mpsc::UnboundedSender<Pending>,
}

impl Reports {
    /// The queue, and its end for [`write`].
    pub fn new() -> (Self, mpsc::UnboundedReceiver<Pending>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self { tx }, rx)
    }

    /// Queues an observation; the receiver resolves once it is written (or refused, see [`write`]).
    pub fn submit(&self, instance: Uuid, observation: Observation) -> oneshot::Receiver<()> {
        let (written, wait) = oneshot::channel();
        let _ = self.tx.send(Pending { instance, observation, written: Some(written) });
        wait
    }
}

/// Writes the queue in order until every sender is gone and it is empty. An observation the database refuses
/// (rather than fails to answer) is logged and dropped: retrying would not change the answer.
pub(crate) async fn write(store: Store, node: Uuid, mut rx: mpsc::UnboundedReceiver<Pending>, pending: IntGauge) {
    let mut queue: VecDeque<Pending> = VecDeque::new();
    let mut backoff = Backoff::default();
    loop {
        if queue.is_empty() {
            pending.set(0);
            match rx.recv().await {
                Some(p) => queue.push_back(p),
                None => return,
            }
        }
        while let Ok(p) = rx.try_recv() {
            queue.push_back(p);
        }
        pending.set(queue.len() as i64);
        let head = queue.front_mut().expect("not empty");
        match store.report(node, head.instance, &head.observation).await {
            Ok(_) => {
                if backoff.succeeded() {
                    tracing::info!(queued = queue.len(), "observations reach PostgreSQL again");
                }
                if let Some(written) = queue.pop_front().and_then(|mut p| p.written.take()) {
                    let _ = written.send(());
                }
            }
            Err(e) if e.is_unavailable() => {
                if !backoff.failing() {
                    tracing::warn!(
                        error = %cloud_domain::error_chain(&e),
                        queued = queue.len(),
                        "cannot record observations; retrying until PostgreSQL answers"
                    );
                }
                tokio::time::sleep(backoff.after_failure()).await;
            }
            Err(e) => {
                tracing::warn!(instance = %head.instance, error = %cloud_domain::error_chain(&e), "observation refused; dropped");
                queue.pop_front();
            }
        }
    }
}
