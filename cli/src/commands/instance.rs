//! `cloudctl instance`: instances, their state and their output.

use anyhow::Context;
use clap::Subcommand;
use cloud_domain::api::{Instance, LogLine};

use crate::client::{Client, seg};
use crate::output::{self, Format, print};
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
        InstanceCmd::Delete { names } => {
            for name in names {
                let path = format!("/v1/instances/{}", seg(name));
                let before: Instance = c.get(&path).await?;
                c.delete(&path).await?;
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
        // Copy talks to two remotes: the crate root runs it before connecting to one.
        InstanceCmd::Copy(_) => unreachable!("crate::run runs instance copy"),
    }
    Ok(())
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
