//! One task per instance: start it, wait until it listens, watch it, restart it per policy with backoff, stop
//! it, clean up after it, and report every state it passes through.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cloud_domain::state::{InstanceState, RestartPolicy};
use cloud_store::{Assignment, Observation};
use tokio::net::TcpStream;
use tokio::process::Child;
use tokio::sync::watch;

use crate::logs::{LogEntry, Output, OutputBudget, Tail};
use crate::process::{Launch, MemoryCgroup, kill, spawn};
use crate::{Isolation, Shared, Want};

/// How a run of the instance ended.
enum Outcome {
    /// The tenant asked for something else (stop or removal).
    Wanted(Want),
    /// It failed to start, or exited.
    Ended { reason: String, exit_code: Option<i32>, ran: Duration },
}

/// The observed facts the supervisor reports.
struct Reporter {
    shared: Arc<Shared>,
    id: uuid::Uuid,
    restarts: u32,
}

impl Reporter {
    async fn report(&self, state: InstanceState, reason: Option<String>, exit_code: Option<i32>, boot: Option<u64>) {
        let obs = Observation { state, reason, exit_code, boot_time_us: boot, restart_count: self.restarts };
        if let Err(e) = self.shared.store.report(self.shared.node, self.id, &obs).await {
            tracing::warn!(instance = %self.id, error = %e, "could not report state");
        }
    }

    async fn note(&self, line: String) {
        self.shared.logs.send(LogEntry { instance: self.id, at: chrono::Utc::now(), stream: "system", line }).await;
    }
}

pub(crate) async fn supervise(shared: Arc<Shared>, first: Assignment, mut want: watch::Receiver<Want>) {
    let (id, tenant) = (first.id, first.tenant_id);
    let mut r = Reporter { shared: shared.clone(), id, restarts: first.restart_count };
    let mut backoff = shared.config.min_backoff;
    // Kept across restarts, so that restarting does not renew the allowance of an instance that floods.
    let budget = Arc::new(Mutex::new(OutputBudget::new(shared.config.logs, Instant::now())));
    loop {
        let current = want.borrow_and_update().clone();
        let a = match current {
            Want::Run(a) => *a,
            Want::Stop => {
                cleanup(&shared, id, tenant).await;
                r.report(InstanceState::Stopped, None, None, None).await;
                return;
            }
            Want::Remove => {
                cleanup(&shared, id, tenant).await;
                return;
            }
        };
        r.report(InstanceState::Starting, None, None, None).await;
        match run_once(&shared, &r, &a, &budget, &mut want).await {
            Outcome::Wanted(Want::Stop) => {
                cleanup(&shared, id, tenant).await;
                r.note("stopped".into()).await;
                r.report(InstanceState::Stopped, None, None, None).await;
                return;
            }
            Outcome::Wanted(_) => {
                cleanup(&shared, id, tenant).await;
                return;
            }
            Outcome::Ended { reason, exit_code, ran } => {
                cleanup(&shared, id, tenant).await;
                r.note(reason.clone()).await;
                let restart = match a.restart_policy {
                    RestartPolicy::Always => true,
                    RestartPolicy::OnFailure => exit_code != Some(0),
                    RestartPolicy::Never => false,
                };
                if !restart {
                    let state = if exit_code == Some(0) { InstanceState::Stopped } else { InstanceState::Failed };
                    shared.metrics.ends.with_label_values(&[state.as_str()]).inc();
                    r.report(state, Some(reason), exit_code, None).await;
                    return;
                }
                // A run that lasted a while was healthy: start the backoff over.
                if ran > Duration::from_secs(60) {
                    backoff = shared.config.min_backoff;
                }
                r.restarts += 1;
                shared.metrics.ends.with_label_values(&["restarted"]).inc();
                let why = format!("{reason}; restarting in {}s (restart {})", backoff.as_secs_f32(), r.restarts);
                r.note(format!("restarting in {}s (restart {})", backoff.as_secs_f32(), r.restarts)).await;
                r.report(InstanceState::Starting, Some(why), exit_code, None).await;
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = want.changed() => {}
                }
                backoff = (backoff * 2).min(shared.config.max_backoff);
            }
        }
    }
}

/// Stops whatever runs and removes the sandbox and cgroup.
async fn cleanup(shared: &Shared, id: uuid::Uuid, tenant: uuid::Uuid) {
    if shared.config.isolation == Isolation::Loopback {
        return;
    }
    if let Err(e) = shared.sandboxes.destroy(id).await {
        tracing::warn!(instance = %id, error = %e, "could not remove the namespace");
    }
    let cgroup = id.simple().to_string();
    tokio::task::spawn_blocking(move || MemoryCgroup::remove_named(&cgroup)).await.ok();
    crate::net::remove_idle_bridge(tenant).await;
    let _ = tokio::fs::remove_file(resolv_conf_path(shared, id)).await;
}

/// Where an instance's resolv.conf is kept while it runs.
fn resolv_conf_path(shared: &Shared, id: uuid::Uuid) -> std::path::PathBuf {
    shared.config.state_dir.join("resolv").join(format!("{}.conf", id.simple()))
}

/// Starts the instance once and follows it until it ends or the tenant wants something else.
async fn run_once(
    shared: &Arc<Shared>,
    r: &Reporter,
    a: &Assignment,
    budget: &Arc<Mutex<OutputBudget>>,
    want: &mut watch::Receiver<Want>,
) -> Outcome {
    let started = Instant::now();
    let ended = |reason: String, exit_code: Option<i32>| Outcome::Ended { reason, exit_code, ran: started.elapsed() };
    let (bundle, manifest) = match shared.images.prepare(&shared.store, &a.image_digest).await {
        Ok(x) => x,
        Err(e) => return ended(format!("image: {}", cloud_domain::error_chain(&e)), None),
    };
    let namespaced = shared.config.isolation == Isolation::Namespaces;
    if namespaced {
        if let Err(e) = shared.sandboxes.create(a.id, a.tenant_id, a.network, a.private_ip).await {
            return ended(format!("network: {e}"), None);
        }
    } else if !a.private_ip.is_loopback() {
        return ended(
            format!(
                "this node runs without root (loopback mode) and needs 127.x private IPs, not {}: set platform.tenant_pool inside 127.0.0.0/8",
                a.private_ip
            ),
            None,
        );
    }
    let resolv_conf = match (namespaced, shared.config.dns) {
        (true, Some(_)) => {
            let path = resolv_conf_path(shared, a.id);
            let written = tokio::fs::create_dir_all(path.parent().expect("a file in a directory"))
                .await
                .and(tokio::fs::write(&path, crate::net::resolv_conf(a.network)).await);
            if let Err(e) = written {
                return ended(format!("cannot write {}: {e}", path.display()), None);
            }
            Some(path)
        }
        _ => None,
    };
    let cgroup = namespaced
        .then(|| MemoryCgroup::create(&a.id.simple().to_string(), a.memory_mb as u64 * 1024 * 1024))
        .flatten();
    if cgroup.is_none() {
        tracing::debug!(instance = %a.id, "no memory cgroup available: the memory limit is not enforced");
    }

    let mut env: BTreeMap<String, String> = BTreeMap::new();
    env.insert("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into());
    env.insert("HOME".into(), "/tmp".into());
    env.extend(a.env.clone());
    env.insert("PORT".into(), manifest.port.to_string());
    env.insert("PRIVATE_IP".into(), a.private_ip.to_string());
    env.insert("INSTANCE".into(), a.name.clone());
    env.insert("SERVICE".into(), a.service.clone().unwrap_or_default());
    let mut argv: Vec<String> = manifest.command.iter().chain(&a.args).cloned().collect();
    argv[0] = if argv[0] == "cloudd" {
        shared.config.self_exe.display().to_string()
    } else if argv[0].contains('/') {
        bundle.join(&argv[0]).display().to_string()
    } else {
        argv[0].clone()
    };
    let launch = Launch {
        argv,
        cwd: bundle,
        env,
        netns: namespaced.then(|| shared.sandboxes.netns_path(a.id)),
        user: namespaced.then_some(shared.config.user),
        cgroup_procs: cgroup.as_ref().map(|c| c.procs()),
        private_mounts: namespaced,
        resolv_conf,
    };
    let mut child = match spawn(&launch) {
        Ok(c) => c,
        Err(e) => return ended(format!("cannot start {:?}: {e}", manifest.command[0]), None),
    };
    shared.metrics.starts.inc();
    r.note(format!("started {:?} as pid {}", launch.argv, child.id().unwrap_or(0))).await;
    let tail = capture_output(shared, a.id, budget, &mut child);
    let with_tail = |reason: String| {
        let tail = tail.lock().map(|t| t.joined()).unwrap_or_default();
        if tail.is_empty() { reason } else { format!("{reason}; last output:\n{tail}") }
    };

    // Ready once the port accepts connections from the host, as the edge will connect.
    let addr = (a.private_ip, manifest.port);
    loop {
        tokio::select! {
            status = child.wait() => {
                let code = status.ok().and_then(|s| s.code());
                return ended(with_tail(format!("exited with code {} before listening on port {}", code.map_or("none (killed)".into(), |c| c.to_string()), manifest.port)), code);
            }
            changed = want.changed() => {
                let w = if changed.is_err() { Want::Remove } else { want.borrow().clone() };
                if !matches!(w, Want::Run(_)) {
                    return Outcome::Wanted(stop_child(&mut child, shared.config.stop_grace, w).await);
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(10)) => {
                if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(250), TcpStream::connect(addr)).await {
                    break;
                }
                if started.elapsed() > shared.config.ready_timeout {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                    return ended(with_tail(format!("did not listen on port {} within {}s", manifest.port, shared.config.ready_timeout.as_secs())), None);
                }
            }
        }
    }
    let boot = started.elapsed().as_micros() as u64;
    r.note(format!("listening on {}:{} after {} ms", a.private_ip, manifest.port, boot / 1000)).await;
    r.report(InstanceState::Running, None, None, Some(boot)).await;
    shared.metrics.boot.observe(boot as f64 / 1e6);
    shared.metrics.running.inc();
    // Counted down however the run ends.
    let _running = GaugeGuard(shared.metrics.running.clone());

    loop {
        tokio::select! {
            status = child.wait() => {
                let code = status.ok().and_then(|s| s.code());
                return ended(with_tail(format!("exited with code {}", code.map_or("none (killed by a signal)".into(), |c| c.to_string()))), code);
            }
            changed = want.changed() => {
                let w = if changed.is_err() { Want::Remove } else { want.borrow().clone() };
                if !matches!(w, Want::Run(_)) {
                    return Outcome::Wanted(stop_child(&mut child, shared.config.stop_grace, w).await);
                }
            }
        }
    }
}

/// SIGTERM, then SIGKILL after the grace period.
async fn stop_child(child: &mut Child, grace: Duration, want: Want) -> Want {
    if let Some(pid) = child.id() {
        kill(pid as i32, libc::SIGTERM);
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
    want
}

/// Sends the child's output to the log shipper, within the instance's budget, and keeps the last few lines for
/// failure reasons.
fn capture_output(
    shared: &Arc<Shared>,
    id: uuid::Uuid,
    budget: &Arc<Mutex<OutputBudget>>,
    child: &mut Child,
) -> Arc<Mutex<Tail>> {
    let output = Output {
        instance: id,
        queue: shared.logs.clone(),
        budget: budget.clone(),
        tail: Arc::new(Mutex::new(Tail::default())),
        dropped_bytes: shared.metrics.log_dropped_bytes.clone(),
    };
    if let Some(stdout) = child.stdout.take() {
        tokio::spawn(output.clone().capture(stdout, "stdout"));
    }
    if let Some(stderr) = child.stderr.take() {
        tokio::spawn(output.clone().capture(stderr, "stderr"));
    }
    output.tail
}

/// Decrements a gauge when dropped.
struct GaugeGuard(prometheus::IntGauge);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
