//! Whether PostgreSQL answers, as `/readyz` and `cloud_api_database_up` say. A background probe keeps the gauge
//! current whether or not anyone asks `/readyz`, so a dashboard sees an outage as it happens; `/readyz` asks
//! afresh, so a load balancer never acts on an answer older than its own question.

use std::time::Duration;

use cloud_store::Store;
use prometheus::IntGauge;
use tokio::sync::oneshot;

/// How long `/readyz` and the probe wait for PostgreSQL. A healthy server answers a `SELECT 1` in milliseconds;
/// half a second leaves `/readyz` time to answer within a second on a busy machine whatever the database does.
pub(crate) const READY_WAIT: Duration = Duration::from_millis(500);

/// Time between two background probes.
pub(crate) const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Whether the database answers within [`READY_WAIT`], recorded in `up`.
pub(crate) async fn check(store: &Store, up: &IntGauge) -> bool {
    let answered = store.ping_within(READY_WAIT).await;
    up.set(answered as i64);
    answered
}

/// The background probe; it stops when this is dropped (with the API's state).
#[derive(Debug)]
pub(crate) struct DatabaseProbe {
    _stop: oneshot::Sender<()>,
}

impl DatabaseProbe {
    /// Probes every [`PROBE_INTERVAL`], the first time at once.
    pub(crate) fn start(store: Store, up: IntGauge) -> Self {
        let (stop, mut stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            loop {
                check(&store, &up).await;
                tokio::select! {
                    _ = &mut stopped => return,
                    _ = tokio::time::sleep(PROBE_INTERVAL) => {}
                }
            }
        });
        Self { _stop: stop }
    }
}
