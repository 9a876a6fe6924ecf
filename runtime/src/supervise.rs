//! One task per instance: start it, wait until it listens, watch it, restart it per policy with backoff, stop
//! it, clean up after it, and report every state it passes through.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cloud_domain::state::{InstanceState, RestartPolicy};
use cloud_sandbox::{Sandbox, SandboxSpec};
use cloud_store::{Assignment, Observation};
use tokio::io::AsyncRead;
use tokio::net::TcpStream;
use tokio::process::Child;
use tokio::sync::watch;

use crate::logs::{LogEntry, Output, OutputBudget, Tail};
use crate::process::{HostLaunch, kill, spawn};
use crate::{Shared, Want};

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
    /// Hands an observation over to be written (see [`crate::reports`]) and goes on.
    fn report(&self, state: InstanceState, reason: Option<String>, exit_code: Option<i32>, boot: Option<u64>) {
        drop(self.submit(state, reason, exit_code, boot));
    }

    /// The last observation of a supervisor, waited for until it is written: the run is over for good only once
    /// the database says so.
    async fn report_last(&self, state: InstanceState, reason: Option<String>, exit_code: Option<i32>) {
        let _ = self.submit(state, reason, exit_code, None).await;
    }

    fn submit(
        &self,
        state: InstanceState,
        reason: Option<String>,
        exit_code: Option<i32>,
        boot: Option<u64>,
    ) -> tokio::sync::oneshot::Receiver<()> {
        let obs = Observation { state, reason, exit_code, boot_time_us: boot, restart_count: self.restarts };
        self.shared.reports.submit(self.id, obs)
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
                r.report_last(InstanceState::Stopped, None, None).await;
                return;
            }
            Want::Remove => {
                cleanup(&shared, id, tenant).await;
                return;
            }
        };
        r.report(InstanceState::Starting, None, None, None);
        match run_once(&shared, &r, &a, &budget, &mut want).await {
            Outcome::Wanted(Want::Stop) => {
                cleanup(&shared, id, tenant).await;
                r.note("stopped".into()).await;
                r.report_last(InstanceState::Stopped, None, None).await;
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
                    r.report_last(state, Some(reason), exit_code).await;
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
                r.report(InstanceState::Starting, Some(why), exit_code, None);
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = want.changed() => {}
                }
                backoff = (backoff * 2).min(shared.config.max_backoff);
            }
        }
    }
}

/// Removes what the instance had on the host: its sandbox (processes, mounts, writable layer, cgroup), its
/// network namespace, its tenant's bridge when it was the last, its resolv.conf.
async fn cleanup(shared: &Shared, id: uuid::Uuid, tenant: uuid::Uuid) {
    let Some(sandboxes) = &shared.sandboxes else { return };
    if let Err(e) = sandboxes.remove(&crate::sandbox_id(shared.node, id)).await {
        tracing::warn!(instance = %id, error = %cloud_domain::error_chain(&e), "could not remove the sandbox");
    }
    if sandboxes.rootless() {
        return;
    }
    if let Err(e) = shared.networks.destroy(id).await {
        tracing::warn!(instance = %id, error = %e, "could not remove the namespace");
    }
    crate::net::remove_idle_bridge(tenant).await;
    let _ = tokio::fs::remove_file(resolv_conf_path(shared, id)).await;
}

/// Why an instance cannot run on a node without root, which puts instances in the host's network.
fn loopback_only(ip: std::net::Ipv4Addr) -> String {
    format!(
        "this node runs without root (in the host's network) and needs 127.x private IPs, not {ip}: set platform.tenant_pool inside 127.0.0.0/8"
    )
}

/// A started instance: a sandbox, or a host process in loopback mode.
enum Started {
    Sandbox(Sandbox),
    Host(Child),
}

impl Started {
    fn pid(&self) -> u32 {
        match self {
            Self::Sandbox(s) => s.pid as u32,
            Self::Host(c) => c.id().unwrap_or(0),
        }
    }

    /// Its standard output and error, once.
    fn take_output(&mut self) -> Vec<(Box<dyn AsyncRead + Unpin + Send>, &'static str)> {
        let mut out: Vec<(Box<dyn AsyncRead + Unpin + Send>, &'static str)> = Vec::new();
        match self {
            Self::Sandbox(s) => {
                out.extend(s.stdout.take().map(|r| (Box::new(r) as _, "stdout")));
                out.extend(s.stderr.take().map(|r| (Box::new(r) as _, "stderr")));
            }
            Self::Host(c) => {
                out.extend(c.stdout.take().map(|r| (Box::new(r) as _, "stdout")));
                out.extend(c.stderr.take().map(|r| (Box::new(r) as _, "stderr")));
            }
        }
        out
    }

    /// Waits for its end: the exit code, none when a signal ended it.
    async fn wait(&mut self) -> Option<i32> {
        match self {
            Self::Sandbox(s) => s.wait().await.ok().and_then(|s| s.code()),
            Self::Host(c) => c.wait().await.ok().and_then(|s| s.code()),
        }
    }

    /// SIGTERM, then SIGKILL after the grace period.
    async fn stop(&mut self, shared: &Shared) {
        let grace = shared.config.stop_grace;
        match self {
            Self::Sandbox(s) => {
                let sandboxes = shared.sandboxes.as_ref().expect("sandboxes run only in namespace mode");
                if let Err(e) = sandboxes.stop(s, grace).await {
                    tracing::warn!(sandbox = %s.id, error = %cloud_domain::error_chain(&e), "could not stop the sandbox");
                }
            }
            Self::Host(c) => {
                if let Some(pid) = c.id() {
                    kill(pid as i32, nix::sys::signal::Signal::SIGTERM);
                }
                if tokio::time::timeout(grace, c.wait()).await.is_err() {
                    let _ = c.start_kill();
                    let _ = c.wait().await;
                }
            }
        }
    }

    /// SIGKILL, and the wait for the end.
    async fn kill(&mut self, shared: &Shared) {
        match self {
            Self::Sandbox(s) => {
                let sandboxes = shared.sandboxes.as_ref().expect("sandboxes run only in namespace mode");
                let _ = sandboxes.signal(&s.id, "KILL").await;
                let _ = s.wait().await;
            }
            Self::Host(c) => {
                let _ = c.start_kill();
                let _ = c.wait().await;
            }
        }
    }
}

/// Where an instance's resolv.conf is kept while it runs.
fn resolv_conf_path(shared: &Shared, id: uuid::Uuid) -> std::path::PathBuf {
    shared.config.state_dir.join("resolv").join(format!("{}.conf", id.simple()))
}

/// The assignment with its secrets opened: variables into its environment (over plain ones of the same name), and
/// the files it gets in `/run/secrets`.
async fn secrets(shared: &Shared, a: &Assignment) -> Result<(Assignment, Vec<(String, Vec<u8>)>), String> {
    let sealed = shared.store.instance_secrets(a.id).await.map_err(|e| format!("secrets: {e}"))?;
    if sealed.is_empty() {
        return Ok((a.clone(), Vec::new()));
    }
    let Some(key) = &shared.config.secret_key else {
        return Err("the instance has secrets and this node lacks the platform secret key that opens them".into());
    };
    let (mut with, mut files) = (a.clone(), Vec::new());
    for (name, value, as_file) in sealed {
        let opened = key.open(&value).map_err(|_| format!("secret {name} does not open with this node's key"))?;
        // A service's secret comes after the tenant's of the same name and wins, as a file or a variable.
        with.env.remove(&name);
        files.retain(|(n, _): &(String, Vec<u8>)| *n != name);
        if as_file {
            files.push((name, opened));
        } else {
            with.env.insert(name, String::from_utf8_lossy(&opened).into_owned());
        }
    }
    Ok((with, files))
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
    let image = match shared.images.prepare(&shared.store, &a.image_digest).await {
        Ok(x) => x,
        Err(e) => return ended(format!("image: {}", cloud_domain::error_chain(&e)), None),
    };
    // Secrets are read at each start, so a changed one reaches the next start; opened here only.
    let (with_secrets, secret_files) = match secrets(shared, a).await {
        Ok(x) => x,
        Err(reason) => return ended(reason, None),
    };
    let launch = match image.run.launch(&with_secrets) {
        Ok(l) => l,
        Err(reason) => return ended(reason, None),
    };
    let port = a.port;
    let mut instance = match &shared.sandboxes {
        Some(sandboxes) if sandboxes.rootless() && !a.private_ip.is_loopback() => {
            return ended(loopback_only(a.private_ip), None);
        }
        Some(sandboxes) => {
            let network = if sandboxes.rootless() {
                // An unprivileged agent cannot make a network namespace the host reaches: the host's, where the
                // instance binds its own 127.x address.
                cloud_sandbox::Network::Host
            } else {
                if let Err(e) = shared.networks.create(a.id, a.tenant_id, a.network, a.private_ip).await {
                    return ended(format!("network: {e}"), None);
                }
                cloud_sandbox::Network::Join(shared.networks.netns_path(a.id).into())
            };
            let resolv_conf = match shared.config.dns {
                Some(_) if !sandboxes.rootless() => {
                    let path = resolv_conf_path(shared, a.id);
                    let written = tokio::fs::create_dir_all(path.parent().expect("a file in a directory"))
                        .await
                        .and(tokio::fs::write(&path, crate::net::resolv_conf(a.network)).await);
                    if let Err(e) = written {
                        return ended(format!("cannot write {}: {e}", path.display()), None);
                    }
                    Some(path)
                }
                // Without a DNS for private names (or in the host's network): the host's.
                _ => Some(std::path::PathBuf::from("/etc/resolv.conf")).filter(|p| p.exists()),
            };
            let spec = SandboxSpec {
                id: crate::sandbox_id(shared.node, a.id),
                layers: image.layers.clone(),
                argv: launch.argv.clone(),
                env: launch.env,
                cwd: image.run.cwd.clone(),
                user: image.run.user.clone(),
                hostname: a.name.clone(),
                network,
                address: Some(a.private_ip.into()),
                resolv_conf,
                secret_files,
                limits: cloud_sandbox::Limits {
                    memory_bytes: u64::from(a.memory_mb) << 20,
                    pids: shared.config.pids_limit,
                    cpu_millicores: shared.config.cpu_millicores,
                },
            };
            match sandboxes.start(&spec).await {
                Ok(s) => Started::Sandbox(s),
                Err(e) => return ended(format!("cannot start the sandbox: {}", cloud_domain::error_chain(&e)), None),
            }
        }
        None => {
            if !a.private_ip.is_loopback() {
                return ended(loopback_only(a.private_ip), None);
            }
            if let Some((name, _)) = secret_files.first() {
                return ended(
                    format!(
                        "secret {name} is a file, which a host process (no sandboxes on this node) cannot be given"
                    ),
                    None,
                );
            }
            let host = HostLaunch::from_image(&image.layers[0], &image.run.cwd, launch.argv.clone(), launch.env);
            match spawn(&host) {
                Ok(c) => Started::Host(c),
                Err(e) => return ended(format!("cannot start {:?}: {e}", host.argv[0]), None),
            }
        }
    };
    shared.metrics.starts.inc();
    r.note(format!("started {:?} as pid {}", launch.argv, instance.pid())).await;
    let mut output = capture_output(shared, a.id, budget, &mut instance);
    let exited = |code: Option<i32>| code.map_or("none (killed by a signal)".into(), |c| c.to_string());

    // Ready once the port accepts connections from the host, as the edge will connect.
    let addr = (a.private_ip, port);
    loop {
        tokio::select! {
            code = instance.wait() => {
                let reason = format!("exited with code {} before listening on port {port}", exited(code));
                return ended(output.with_tail(reason).await, code);
            }
            changed = want.changed() => {
                let w = if changed.is_err() { Want::Remove } else { want.borrow().clone() };
                if !matches!(w, Want::Run(_)) {
                    instance.stop(shared).await;
                    return Outcome::Wanted(w);
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(10)) => {
                if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(250), TcpStream::connect(addr)).await {
                    break;
                }
                if started.elapsed() > shared.config.ready_timeout {
                    instance.kill(shared).await;
                    let reason = format!("did not listen on port {port} within {}s", shared.config.ready_timeout.as_secs());
                    return ended(output.with_tail(reason).await, None);
                }
            }
        }
    }
    let boot = started.elapsed().as_micros() as u64;
    r.note(format!("listening on {}:{port} after {} ms", a.private_ip, boot / 1000)).await;
    // Counted before the report, so that whoever sees the instance running sees it in the metrics too.
    shared.metrics.boot.observe(boot as f64 / 1e6);
    shared.metrics.running.inc();
    // Counted down however the run ends.
    let _running = GaugeGuard(shared.metrics.running.clone());
    r.report(InstanceState::Running, None, None, Some(boot));

    loop {
        tokio::select! {
            code = instance.wait() => {
                return ended(output.with_tail(format!("exited with code {}", exited(code))).await, code);
            }
            changed = want.changed() => {
                let w = if changed.is_err() { Want::Remove } else { want.borrow().clone() };
                if !matches!(w, Want::Run(_)) {
                    instance.stop(shared).await;
                    return Outcome::Wanted(w);
                }
            }
        }
    }
}

/// A run's output on its way to the log shipper.
struct Captured {
    /// The last few lines, for failure reasons.
    tail: Arc<Mutex<Tail>>,
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl Captured {
    /// `reason`, followed by the last lines of output once read to their end: an instance's last words are
    /// still in its pipes when its end is seen. A process it left behind may hold them open: not waited for long.
    async fn with_tail(&mut self, reason: String) -> String {
        let readers = std::mem::take(&mut self.readers);
        let _ = tokio::time::timeout(Duration::from_secs(1), join_all(readers)).await;
        let tail = self.tail.lock().map(|t| t.joined()).unwrap_or_default();
        if tail.is_empty() { reason } else { format!("{reason}; last output:\n{tail}") }
    }
}

async fn join_all(handles: Vec<tokio::task::JoinHandle<()>>) {
    for h in handles {
        let _ = h.await;
    }
}

/// Sends the instance's output to the log shipper, within the instance's budget, and keeps the last few lines
/// for failure reasons.
fn capture_output(
    shared: &Arc<Shared>,
    id: uuid::Uuid,
    budget: &Arc<Mutex<OutputBudget>>,
    instance: &mut Started,
) -> Captured {
    let output = Output {
        instance: id,
        queue: shared.logs.clone(),
        budget: budget.clone(),
        tail: Arc::new(Mutex::new(Tail::default())),
        dropped_bytes: shared.metrics.log_dropped_bytes.clone(),
    };
    let readers =
        instance.take_output().into_iter().map(|(stream, name)| tokio::spawn(output.clone().capture(stream, name)));
    Captured { readers: readers.collect(), tail: output.tail }
}

/// Decrements a gauge when dropped.
struct GaugeGuard(prometheus::IntGauge);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
