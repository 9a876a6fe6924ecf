//! The platform's controller: ends drains, moves rollouts on and autoscales services. Every API process runs
//! one; a PostgreSQL session lock lets exactly one act at a time ([`Store::lead`]), and another takes over when
//! its process or connection goes.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use cloud_domain::autoscale::{Decision, Load, decide};
use cloud_store::{Store, StoreError};
use uuid::Uuid;

/// How often drains and rollouts are looked at.
const TICK: Duration = Duration::from_millis(250);
/// How often a process that does not lead tries to.
const STANDBY: Duration = Duration::from_secs(2);
/// How often autoscale samples the load and decides.
const AUTOSCALE_EVERY: Duration = Duration::from_secs(1);
/// Samples the load must stay above (or below) the target for before autoscale acts.
const WINDOW: usize = 3;
/// An edge that has not reported for this long counts as gone (it holds no drain up, its load is not counted).
pub const EDGE_LIVE: Duration = Duration::from_secs(10);

/// Runs until aborted.
pub async fn run(store: Store) {
    let mut held = None;
    let mut samples: HashMap<Uuid, VecDeque<u64>> = HashMap::new();
    let mut last_autoscale = Instant::now();
    let mut failing = false;
    loop {
        if !store.lead(&mut held).await {
            samples.clear();
            tokio::time::sleep(STANDBY).await;
            continue;
        }
        let mut result = store.finish_drains(EDGE_LIVE).await.map(|_| ());
        if result.is_ok() {
            result = store.step_rollouts().await.map(|_| ());
        }
        if result.is_ok() && last_autoscale.elapsed() >= AUTOSCALE_EVERY {
            last_autoscale = Instant::now();
            result = autoscale(&store, &mut samples).await;
        }
        match result {
            Ok(()) if std::mem::take(&mut failing) => tracing::info!("the controller works again"),
            Ok(()) => {}
            Err(e) if !std::mem::replace(&mut failing, true) => {
                tracing::warn!(error = %cloud_domain::error_chain(&e), "the controller failed; retrying");
            }
            Err(_) => {}
        }
        tokio::time::sleep(TICK).await;
    }
}

async fn autoscale(store: &Store, samples: &mut HashMap<Uuid, VecDeque<u64>>) -> Result<(), StoreError> {
    let inputs = store.autoscale_inputs(EDGE_LIVE).await?;
    samples.retain(|id, _| inputs.iter().any(|i| i.service == *id));
    for i in inputs {
        let seen = samples.entry(i.service).or_default();
        seen.push_back(i.in_flight);
        while seen.len() > WINDOW {
            seen.pop_front();
        }
        if i.rolling_out {
            continue;
        }
        // Until the window is full, only the bounds count: no load is sustained yet.
        let full = seen.len() == WINDOW;
        let load = Load {
            running: i.running,
            starting: i.starting,
            low: if full { seen.iter().copied().min().unwrap_or(0) } else { 0 },
            high: if full { seen.iter().copied().max().unwrap_or(0) } else { u64::MAX },
            since_last_change: i.since_last_change,
        };
        let done = match decide(&i.policy, &load) {
            Decision::Stay => continue,
            Decision::Up(n) => store.scale_up(i.tenant, i.service, n).await.map(|n| ("added", n)),
            Decision::Down(n) => store.scale_down(i.tenant, i.service, n).await.map(|n| ("drained", n)),
        };
        match done {
            Ok((what, n)) => {
                tracing::info!(service = %i.service, in_flight = i.in_flight, running = i.running, what, n, "autoscale");
                // The next decision waits for samples of the new shape.
                samples.remove(&i.service);
            }
            // A quota the tenant reached is the tenant's limit, not the controller's failure.
            Err(StoreError::QuotaExceeded { detail }) => {
                tracing::info!(service = %i.service, %detail, "autoscale cannot add instances");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
