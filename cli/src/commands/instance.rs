//! `cloudctl instance`: instances, their state and their output.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Subcommand;
use cloud_domain::api::{Instance, LogLine, MoveInstance};
use cloud_domain::state::{DesiredState, InstanceState};

use crate::client::{Client, seg};
use crate::output::{self, Format, print};
use crate::progress::Progress;
use crate::stream;
use crate::target::ListRemote;

/// `cloudctl instance ...`
#[derive(Debug, Subcommand)]
pub enum InstanceCmd {
    /// List instances.
    #[command(
        after_help = "Examples:\n  cloudctl instance list --watch\n  cloudctl instance list prod:",
        visible_alias = "ls"
    )]
    List {
        #[command(flatten)]
        remote: ListRemote,
        /// Re-render whenever something changes.
        #[arg(long, short)]
        watch: bool,
    },
    /// Show an instance.
    #[command(after_help = "Example:\n  cloudctl instance get web-1 -o json")]
    Get {
        /// Name or id.
        name: String,
    },
    /// Delete an instance (its ephemeral service goes with the last one).
    #[command(
        after_help = "Examples:\n  cloudctl instance delete hello-x1y2z\n  cloudctl instance delete prod:web-1 prod:web-2",
        visible_alias = "rm"
    )]
    Delete {
        /// Names or ids.
        #[arg(required = true)]
        names: Vec<String>,
        /// Return once the deletion is accepted: a running instance drains (its requests in flight finish,
        /// no new one reaches it) before it goes, which is otherwise waited for.
        #[arg(long)]
        no_wait: bool,
    },
    /// Start a stopped instance.
    #[command(after_help = "Example:\n  cloudctl instance start web-1")]
    Start {
        /// Name or id.
        name: String,
    },
    /// Stop an instance.
    #[command(after_help = "Example:\n  cloudctl instance stop web-1")]
    Stop {
        /// Name or id.
        name: String,
    },
    /// Move an instance to another node: stopped on its node, then started on the new one, with the same name,
    /// private IP, service and configuration (the edge and the DNS follow). Waits until it runs there.
    #[command(
        after_help = "Examples:\n  cloudctl instance move web-1 --node node-2\n  cloudctl instance move prod:web-1 --node node-3"
    )]
    Move {
        /// Name or id.
        name: String,
        /// The node to run it on (`cloudctl instance get` shows where it runs now).
        #[arg(long)]
        node: String,
        /// Seconds to wait until it runs there.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Run a command in an instance's sandbox (a shell by default), as `lxc exec` and `kubectl exec` do: on a
    /// terminal when stdin and stdout are terminals (or with -t), its exit code cloudctl's own.
    #[command(
        after_help = "Examples:\n  cloudctl instance exec web-1\n  cloudctl instance exec web-1 -- id\n  cloudctl instance exec prod:web-1 -- sh -c 'ps; df -h'\n  echo 'select 1;' | cloudctl instance exec db-1 -T -- psql"
    )]
    Exec {
        /// Name or id.
        name: String,
        /// Run on a terminal even when stdin or stdout is not one.
        #[arg(short = 't', long, conflicts_with = "no_tty")]
        tty: bool,
        /// Never run on a terminal (stdout and stderr stay apart).
        #[arg(short = 'T', long)]
        no_tty: bool,
        /// The command and its arguments, after `--` (default /bin/sh).
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Show an instance's output.
    #[command(after_help = "Example:\n  cloudctl instance logs web-1 -f")]
    Logs {
        /// Name or id.
        name: String,
        /// Keep streaming new lines.
        #[arg(long, short)]
        follow: bool,
        /// Lines to show.
        #[arg(long, default_value_t = 100)]
        tail: u32,
    },
    /// Copy an instance to another remote or under another name.
    #[command(
        after_help = "Examples:\n  cloudctl instance copy local:web prod:\n  cloudctl instance copy local:web prod:web-2\n  cloudctl instance copy web-1 web-1-copy\n  cloudctl instance copy prod:app staging:app --image-name app-prod --no-start\n\nA side without REMOTE: is on the default remote (--remote, CLOUD_REMOTE, else the configured one). The copy\nruns the version of the image the instance runs, with its environment, arguments, port, memory and restart\npolicy, and joins the destination's service of the same name, created with the same ports when missing."
    )]
    Copy(crate::commands::copy::CopyArgs),
}

fn name_of_instance(i: &Instance) -> String {
    i.name.clone()
}

pub(crate) async fn run(c: &Client, cmd: &InstanceCmd, out: Format) -> anyhow::Result<()> {
    match cmd {
        InstanceCmd::List { watch, .. } => {
            crate::list(c, "/v1/instances", *watch, out, output::instances, name_of_instance).await?;
        }
        InstanceCmd::Get { name } => {
            let i: Instance = c.get(&format!("/v1/instances/{}", seg(name))).await?;
            print(out, &[i], output::instances, name_of_instance, true)?;
        }
        InstanceCmd::Delete { names, no_wait } => {
            for name in names {
                let path = format!("/v1/instances/{}", seg(name));
                let before: Instance = c.get(&path).await?;
                let res = c.send(c.request(reqwest::Method::DELETE, &path)).await?;
                if res.status() == reqwest::StatusCode::ACCEPTED {
                    if *no_wait {
                        eprintln!("instance {name} is draining; it goes once its requests in flight have finished");
                        continue;
                    }
                    wait_gone(c, &path, name).await?;
                }
                // An ephemeral service goes in the same transaction as its last instance: say so.
                let service_went = match &before.service {
                    Some(s) => c
                        .request(reqwest::Method::GET, &format!("/v1/services/{}", s.id))
                        .send()
                        .await
                        .is_ok_and(|r| r.status() == reqwest::StatusCode::NOT_FOUND)
                        .then(|| s.name.clone()),
                    None => None,
                };
                match service_went {
                    Some(service) => eprintln!("deleted instance {name} and its ephemeral service {service}"),
                    None => eprintln!("deleted instance {name}"),
                }
            }
        }
        InstanceCmd::Start { name } | InstanceCmd::Stop { name } => {
            let verb = if matches!(cmd, InstanceCmd::Start { .. }) { "start" } else { "stop" };
            let i: Instance = c.post(&format!("/v1/instances/{}/{verb}", seg(name)), &serde_json::json!({})).await?;
            print(out, &[i], output::instances, name_of_instance, true)?;
        }
        InstanceCmd::Logs { name, follow, tail } => logs(c, name, *follow, *tail).await?,
        InstanceCmd::Exec { name, tty, no_tty, command } => {
            use std::io::IsTerminal;
            let on_terminal = *tty || (!*no_tty && std::io::stdin().is_terminal() && std::io::stdout().is_terminal());
            let code = super::exec::run(c, name, command, on_terminal).await?;
            // Now, rather than after the runtime waits on a read of stdin that may never end.
            std::process::exit(code);
        }
        InstanceCmd::Move { name, node, timeout } => {
            let before: Instance = c.get(&format!("/v1/instances/{}", seg(name))).await?;
            let body = MoveInstance { node: node.clone() };
            let _: Instance = c.post(&format!("/v1/instances/{}/move", seg(name)), &body).await?;
            let moved = wait_on_node(c, &before, node, Duration::from_secs(*timeout)).await?;
            match before.node.as_deref() {
                Some(from) if from == node => eprintln!("instance {} is on node {node} already", moved.name),
                from => eprintln!("moved instance {} from {} to {node}", moved.name, from.unwrap_or("no node")),
            }
            print(out, &[moved], output::instances, name_of_instance, true)?;
        }
        // Copy talks to two remotes: the crate root runs it before connecting to one.
        InstanceCmd::Copy(_) => unreachable!("crate::run runs instance copy"),
    }
    Ok(())
}

/// Waits until the instance is on `node` and, if it was wanted running, runs there; shows the steps.
async fn wait_on_node(c: &Client, before: &Instance, node: &str, timeout: Duration) -> anyhow::Result<Instance> {
    let mut progress = Progress::new();
    let path = format!("/v1/instances/{}", before.id);
    let t0 = Instant::now();
    loop {
        let now: Instance = c.get(&path).await?;
        let there = now.node.as_deref() == Some(node);
        let reason = now.state_reason.clone().unwrap_or_default();
        if there && now.state == InstanceState::Failed {
            bail!("instance {} failed on {node}: {reason}", now.name);
        }
        if there && (now.state == InstanceState::Running || now.desired_state != DesiredState::Running) {
            progress.done(&format!("on {node}, {} ({:.1}s)", now.state, t0.elapsed().as_secs_f32()));
            return Ok(now);
        }
        if t0.elapsed() > timeout {
            bail!(
                "instance {} is not running on {node} after {}s: {} {reason}",
                now.name,
                timeout.as_secs(),
                now.state
            );
        }
        let at = now.node.as_deref().unwrap_or("no node");
        progress.step(&format!(
            "{} on {at}: {}{}",
            now.name,
            now.state,
            if reason.is_empty() { String::new() } else { format!(" ({reason})") }
        ));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until a draining instance is gone, showing its state.
pub(crate) async fn wait_gone(c: &Client, path: &str, name: &str) -> anyhow::Result<()> {
    let mut progress = Progress::new();
    let t0 = Instant::now();
    loop {
        let res = c.request(reqwest::Method::GET, path).send().await.map_err(|e| c.unreachable(&e))?;
        if res.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(());
        }
        if !res.status().is_success() {
            return Err(c.failure(res).await);
        }
        let now: Instance = res.json().await?;
        // A log gets a line per state; a terminal sees the time pass too.
        match progress.is_tty() {
            true => progress.step(&format!("instance {name}: {} ({:.0}s)", now.state, t0.elapsed().as_secs_f32())),
            false => progress.step(&format!("instance {name}: {}", now.state)),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub(crate) async fn logs(c: &Client, name: &str, follow: bool, tail: u32) -> anyhow::Result<()> {
    let path = format!("/v1/instances/{}/logs?limit={tail}", seg(name));
    if !follow {
        let lines: Vec<LogLine> = c.get(&path).await?;
        lines.iter().for_each(print_log);
        return Ok(());
    }
    stream::follow(c, &format!("{path}&follow=true"), |message| {
        if let stream::Message::Event { data, .. } = message {
            let line: LogLine = serde_json::from_str(&data)
                .with_context(|| format!("remote \"{}\" sent a log line that is not a LogLine", c.name()))?;
            print_log(&line);
        }
        Ok(())
    })
    .await?;
    eprintln!("instance {name} was deleted: its log ends");
    Ok(())
}

fn print_log(l: &LogLine) {
    let mark = match l.stream.as_str() {
        "stderr" => "err",
        "system" => "sys",
        _ => "out",
    };
    println!("{} {mark} {}", l.at.format("%H:%M:%S%.3f"), l.line);
}
