//! `cloudctl deploy`: create instances attached to a service (or to an ephemeral one for `-p`) and wait until
//! they run, showing progress. The image is an existing one, or one pushed or pulled first (see [`crate::image`]).

use std::time::{Duration, Instant};

use anyhow::bail;
use cloud_domain::api::{CreateInstance, CreatedInstances, Instance, PortInput, Service};
use cloud_domain::state::InstanceState;

use crate::client::{Client, seg};
use crate::output::{self, Format};
use crate::progress::Progress;

/// Creates the instances and waits until all run (unless they are not started).
pub async fn create_and_wait(
    client: &Client,
    req: CreateInstance,
    timeout: Duration,
) -> anyhow::Result<CreatedInstances> {
    let mut progress = Progress::new();
    let start = req.start;
    let mut created: CreatedInstances = client.post("/v1/instances", &req).await?;
    let names: Vec<String> = created.instances.iter().map(|i| i.name.clone()).collect();
    progress.done(&format!("created {}", names.join(", ")));
    if !start {
        return Ok(created);
    }
    let t0 = Instant::now();
    loop {
        let mut now: Vec<Instance> = Vec::new();
        for n in &names {
            now.push(client.get(&format!("/v1/instances/{}", seg(n))).await?);
        }
        if let Some(failed) = now.iter().find(|i| i.state == InstanceState::Failed) {
            bail!("instance {} failed: {}", failed.name, failed.state_reason.as_deref().unwrap_or("no reason given"));
        }
        let running = now.iter().filter(|i| i.state == InstanceState::Running).count();
        let states: Vec<String> = now.iter().map(|i| format!("{} {}", i.name, i.state)).collect();
        if running == now.len() {
            progress.done(&format!("running ({:.1}s)", t0.elapsed().as_secs_f32()));
            created.instances = now;
            if let Some(s) = &created.service {
                created.service = Some(client.get::<Service>(&format!("/v1/services/{}", seg(&s.name))).await?);
            }
            return Ok(created);
        }
        if t0.elapsed() > timeout {
            let reasons: Vec<String> =
                now.iter().filter_map(|i| i.state_reason.as_ref().map(|r| format!("{}: {r}", i.name))).collect();
            bail!(
                "instances not running after {}s ({}){}",
                timeout.as_secs(),
                states.join(", "),
                if reasons.is_empty() { String::new() } else { format!("; {}", reasons.join("; ")) }
            );
        }
        progress.step(&format!("waiting: {}", states.join(", ")));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Prints what was created in the chosen format (`deploy`, `instance copy`).
pub fn print(out: &Format, created: &CreatedInstances) -> anyhow::Result<()> {
    match out {
        Format::Table => print!("{}", summary(created)),
        Format::Json => println!("{}", serde_json::to_string_pretty(created)?),
        Format::Yaml => print!("{}", output::yaml(created)?),
        Format::Name => created.instances.iter().for_each(|i| println!("{}", i.name)),
        Format::Value(path) => output::values(&[created], path)?,
    }
    Ok(())
}

/// What `deploy` prints on success: the URL when the service serves https, then each instance.
pub fn summary(created: &CreatedInstances) -> String {
    let mut out = String::new();
    if let Some(s) = &created.service {
        if s.ports.iter().any(|p| p.port == 443) {
            out.push_str(&format!("https://{}\n", s.fqdn));
        }
        let kind = if s.persistent { "service" } else { "service (ephemeral: deleted with its last instance)" };
        out.push_str(&format!("{kind}: {} {}\n", s.name, s.fqdn));
    }
    for i in &created.instances {
        out.push_str(&format!("instance: {}  {}  {}  {}\n", i.name, i.state, i.private_ip, i.private_fqdn));
    }
    out
}

/// Port specs for the request, checked locally first so a typo fails before anything is created.
pub fn port_inputs(specs: &[String]) -> anyhow::Result<Vec<PortInput>> {
    cloud_domain::ports::parse_specs(specs, &cloud_domain::ports::PortPolicy::default())?;
    Ok(specs.iter().cloned().map(PortInput::Spec).collect())
}
