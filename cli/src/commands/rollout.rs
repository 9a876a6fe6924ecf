//! Rollouts as cloudctl drives them: started through the API, then followed until they end. Interrupting
//! cloudctl leaves a rollout running on the platform; `cloudctl service rollouts` shows where it is.

use std::time::{Duration, Instant};

use anyhow::bail;
use cloud_domain::api::{CreateRollout, Rollout};
use cloud_domain::state::RolloutState;

use crate::client::{Client, seg};
use crate::progress::Progress;

/// Starts a rollout of `service` and follows it to its end; a failed one is an error naming why.
pub(crate) async fn roll_out(c: &Client, service: &str, req: &CreateRollout) -> anyhow::Result<Rollout> {
    let started: Rollout = c.post(&format!("/v1/services/{}/rollouts", seg(service)), req).await?;
    eprintln!(
        "rolling out {} to service {} ({}, {} new instance(s)); interrupting leaves it running (cloudctl service \
         cancel-rollout {} stops it)",
        started.image, started.service, started.strategy, started.replicas, started.service
    );
    follow(c, service, started).await
}

/// Follows a rollout until it ends, showing its progress.
pub(crate) async fn follow(c: &Client, service: &str, mut r: Rollout) -> anyhow::Result<Rollout> {
    let path = format!("/v1/services/{}/rollouts/{}", seg(service), r.id);
    let mut progress = Progress::new();
    let t0 = Instant::now();
    loop {
        match r.state {
            RolloutState::Running => {
                let doing = r.state_reason.clone().unwrap_or_else(|| "starting".into());
                progress.step(&format!("{}: {doing} ({:.0}s)", r.service, t0.elapsed().as_secs_f32()));
            }
            RolloutState::Succeeded => {
                let names: Vec<&str> = r.new_instances.iter().map(|i| i.name.as_str()).collect();
                progress.done(&format!(
                    "rolled out {} to service {}: {} ({:.1}s)",
                    r.image,
                    r.service,
                    names.join(", "),
                    t0.elapsed().as_secs_f32()
                ));
                return Ok(r);
            }
            RolloutState::Failed | RolloutState::Cancelled => {
                bail!(
                    "rollout of {} to service {} {}: {}",
                    r.image,
                    r.service,
                    r.state,
                    r.state_reason.unwrap_or_default()
                )
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        r = c.get(&path).await?;
    }
}
