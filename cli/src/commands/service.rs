//! `cloudctl service`: services, their ports, limits and custom domains.

use clap::{Args, Subcommand};
use cloud_domain::api::{Autoscale, CreateRollout, CreateService, DomainState, Rollout, Service, UpdateService};

use crate::client::{Client, seg};
use crate::deploy;
use crate::output::{self, Format, print};
use crate::target::ListRemote;

/// `cloudctl service ...`
#[derive(Debug, Subcommand)]
pub enum ServiceCmd {
    /// Create a service. The first argument is its name unless it is a port spec.
    #[command(
        after_help = "Examples:\n  cloudctl service create my-service 443:8080\n  cloudctl service create 443:8080 8443:9000/tls --domain shop --domain www.example.com.\n\nPort specs: PUBLIC[:DEST][/HANDLER[+HANDLER]]; handlers tls, http, redirect, tcp, and the option proxy."
    )]
    Create {
        /// [NAME] PORTSPEC...
        #[arg(value_name = "NAME|PORTSPEC")]
        args: Vec<String>,
        /// Service name (instead of the first argument).
        #[arg(long, short)]
        name: Option<String>,
        #[command(flatten)]
        opts: ServiceOpts,
    },
    /// List services.
    #[command(
        after_help = "Examples:\n  cloudctl service list -o json\n  cloudctl service list prod:",
        visible_alias = "ls"
    )]
    List {
        #[command(flatten)]
        remote: ListRemote,
        /// Re-render whenever something changes.
        #[arg(long, short)]
        watch: bool,
    },
    /// Show a service.
    #[command(
        after_help = "Examples:\n  cloudctl service get my-service -o yaml\n  cloudctl service get prod:my-service"
    )]
    Get {
        /// Name or id.
        name: String,
    },
    /// Change a service's ports, limits or domains.
    #[command(
        after_help = "Example:\n  cloudctl service update my-service -p 443:8080 --hard-limit 100 --domain www.example.com."
    )]
    Update {
        /// Name or id.
        name: String,
        /// Replace the port specs.
        #[arg(long = "port", short = 'p')]
        ports: Vec<String>,
        #[command(flatten)]
        opts: ServiceOpts,
    },
    /// Check a custom domain's ownership record now (the platform also checks pending domains periodically).
    #[command(
        after_help = "Example:\n  cloudctl service verify my-service www.example.com\n\nThe domain is routed, and gets certificates, once TXT _cloud-challenge.<domain> holds the token\n`cloudctl service get` shows."
    )]
    Verify {
        /// Service name or id.
        name: String,
        /// The custom domain.
        domain: String,
    },
    /// Set how the platform scales a service on load: instances are added while the requests in flight per
    /// instance stay above the target, and drained away after the cooldown when below.
    #[command(
        after_help = "Examples:\n  cloudctl service autoscale web --min 1 --max 5 --target 20\n  cloudctl service autoscale web --off"
    )]
    Autoscale {
        /// Name or id.
        name: String,
        /// Fewest instances.
        #[arg(long, required_unless_present = "off")]
        min: Option<u32>,
        /// Most instances.
        #[arg(long, required_unless_present = "off")]
        max: Option<u32>,
        /// Requests in flight per instance to aim at.
        #[arg(long, required_unless_present = "off")]
        target: Option<u32>,
        /// Seconds after a change before instances are removed.
        #[arg(long, default_value_t = 30, value_name = "SECONDS")]
        cooldown: u32,
        /// Stop autoscaling (the instances stay as they are).
        #[arg(long, conflicts_with_all = ["min", "max", "target"])]
        off: bool,
    },
    /// Restart a service's instances one at a time (a rollout of the same image and configuration): each new
    /// instance runs before an old one drains, so the service keeps answering. New secrets take effect.
    #[command(after_help = "Example:\n  cloudctl service restart web")]
    Restart {
        /// Name or id.
        name: String,
    },
    /// A service's latest rollouts, newest first.
    #[command(after_help = "Example:\n  cloudctl service rollouts web")]
    Rollouts {
        /// Name or id.
        name: String,
    },
    /// Cancel a service's rollout under way: its new instances that do not run yet go; every other instance
    /// stays as it is.
    #[command(after_help = "Example:\n  cloudctl service cancel-rollout web")]
    CancelRollout {
        /// Name or id.
        name: String,
        /// The rollout's id (default: the one under way).
        id: Option<String>,
    },
    /// Delete a service.
    #[command(after_help = "Example:\n  cloudctl service delete my-service --force", visible_alias = "rm")]
    Delete {
        /// Name or id.
        name: String,
        /// Also delete its instances.
        #[arg(long)]
        force: bool,
    },
}

/// Options shared by create and update.
#[derive(Debug, Args)]
pub struct ServiceOpts {
    /// Extra name: `shop` for shop.<region>.<base>, or a custom domain with a trailing dot (repeatable).
    #[arg(long = "domain")]
    domains: Vec<String>,
    /// In-flight requests per instance above which others are preferred.
    #[arg(long)]
    soft_limit: Option<u32>,
    /// In-flight requests per instance above which requests are refused.
    #[arg(long)]
    hard_limit: Option<u32>,
    /// Stop the instances after SECONDS without a request; the next request starts them (0: never).
    #[arg(long, value_name = "SECONDS")]
    scale_to_zero: Option<u32>,
}

/// Whether a positional argument of `service create` is a port spec rather than a name.
pub(crate) fn looks_like_port_spec(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_digit())
}

fn name_of_service(s: &Service) -> String {
    s.name.clone()
}

pub(crate) async fn run(c: &Client, cmd: &ServiceCmd, out: Format) -> anyhow::Result<()> {
    match cmd {
        ServiceCmd::Create { args, name, opts } => {
            let mut args = args.clone();
            let name = match name {
                Some(n) => Some(n.clone()),
                None if args.first().is_some_and(|a| !looks_like_port_spec(a)) => Some(args.remove(0)),
                None => None,
            };
            if let Some(n) = &name {
                cloud_domain::names::validate_name(cloud_domain::names::NameKind::Service, n)?;
            }
            let body = CreateService {
                name,
                ports: deploy::port_inputs(&args)?,
                soft_limit: opts.soft_limit,
                hard_limit: opts.hard_limit,
                scale_to_zero_after: opts.scale_to_zero.filter(|s| *s > 0),
                domains: opts.domains.clone(),
            };
            let s: Service = c.post("/v1/services", &body).await?;
            if out == Format::Table {
                println!("created service {} {}", s.name, s.fqdn);
                for p in &s.ports {
                    println!("  {p}");
                }
                print!("{}", domain_notes(&s));
            } else {
                print(out, &[s], output::services, name_of_service, true)?;
            }
        }
        ServiceCmd::List { watch, .. } => {
            crate::list(c, "/v1/services", *watch, out, output::services, name_of_service).await?;
        }
        ServiceCmd::Get { name } => {
            let s: Service = c.get(&format!("/v1/services/{}", seg(name))).await?;
            let notes = domain_notes(&s);
            print(out, &[s], output::services, name_of_service, true)?;
            if out == Format::Table {
                print!("{notes}");
            }
        }
        ServiceCmd::Update { name, ports, opts } => {
            let body = UpdateService {
                ports: if ports.is_empty() { None } else { Some(deploy::port_inputs(ports)?) },
                soft_limit: opts.soft_limit.map(Some),
                hard_limit: opts.hard_limit.map(Some),
                scale_to_zero_after: opts.scale_to_zero.map(|s| (s > 0).then_some(s)),
                domains: if opts.domains.is_empty() { None } else { Some(opts.domains.clone()) },
            };
            let s: Service = c.patch(&format!("/v1/services/{}", seg(name)), &body).await?;
            let notes = domain_notes(&s);
            print(out, &[s], output::services, name_of_service, true)?;
            if out == Format::Table {
                print!("{notes}");
            }
        }
        ServiceCmd::Verify { name, domain } => {
            let path = format!("/v1/services/{}/domains/{}/verify", seg(name), seg(domain.trim_end_matches('.')));
            let s: Service = c.post(&path, &serde_json::json!({})).await?;
            match out {
                Format::Table => println!(
                    "domain {} verified: routed to service {} ({})",
                    domain.trim_end_matches('.'),
                    s.name,
                    s.fqdn
                ),
                _ => print(out, &[s], output::services, name_of_service, true)?,
            }
        }
        ServiceCmd::Autoscale { name, min, max, target, cooldown, off } => {
            let path = format!("/v1/services/{}/autoscale", seg(name));
            let s: Service = match (off, min, max, target) {
                (true, ..) => c.send(c.request(reqwest::Method::DELETE, &path)).await?.json().await?,
                (false, Some(min), Some(max), Some(target)) => {
                    let policy =
                        Autoscale { min: *min, max: *max, target_in_flight: *target, cooldown_seconds: *cooldown };
                    c.send(c.request(reqwest::Method::PUT, &path).json(&policy)).await?.json().await?
                }
                _ => anyhow::bail!("give --min, --max and --target, or --off"),
            };
            match (out, s.autoscale) {
                (Format::Table, Some(a)) => println!(
                    "service {}: {} to {} instances, {} requests in flight per instance, cooldown {}s",
                    s.name, a.min, a.max, a.target_in_flight, a.cooldown_seconds
                ),
                (Format::Table, None) => println!("service {}: not autoscaled", s.name),
                _ => print(out, &[s], output::services, name_of_service, true)?,
            }
        }
        ServiceCmd::Restart { name } => {
            let done = super::rollout::roll_out(c, name, &CreateRollout::default()).await?;
            print(out, &[done], output::rollouts, |r| r.id.to_string(), true)?;
        }
        ServiceCmd::Rollouts { name } => {
            let all: Vec<Rollout> = c.get(&format!("/v1/services/{}/rollouts", seg(name))).await?;
            print(out, &all, output::rollouts, |r| r.id.to_string(), false)?;
        }
        ServiceCmd::CancelRollout { name, id } => {
            let id = match id {
                Some(id) => id.clone(),
                None => {
                    let all: Vec<Rollout> = c.get(&format!("/v1/services/{}/rollouts", seg(name))).await?;
                    let running = all.iter().find(|r| r.state == cloud_domain::state::RolloutState::Running);
                    let running = running.ok_or_else(|| anyhow::anyhow!("service {name} has no rollout under way"))?;
                    running.id.to_string()
                }
            };
            let path = format!("/v1/services/{}/rollouts/{}/cancel", seg(name), seg(&id));
            let r: Rollout = c.post(&path, &serde_json::json!({})).await?;
            match out {
                Format::Table => eprintln!("cancelled rollout {id}: {}", r.state_reason.unwrap_or_default()),
                _ => print(out, &[r], output::rollouts, |r| r.id.to_string(), true)?,
            }
        }
        ServiceCmd::Delete { name, force } => {
            let q = if *force { "?force=true" } else { "" };
            c.delete(&format!("/v1/services/{}{q}", seg(name))).await?;
            eprintln!("deleted service {name}");
        }
    }
    Ok(())
}

/// The state of a service's extra domains, and for each unverified one exactly which records to create.
fn domain_notes(s: &Service) -> String {
    let mut text = String::new();
    for d in &s.domains {
        let expires = d.expires_at.map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string()).unwrap_or_default();
        match (d.state, &d.verification) {
            (DomainState::Verified, _) => text.push_str(&format!("  domain {}: verified\n", d.name)),
            (DomainState::Pending, Some(v)) => text.push_str(&format!(
                "  domain {name}: unverified (the claim lapses {expires}); create these records at its DNS provider:\n    {txt} TXT \"{value}\"   (proves ownership)\n    {name} CNAME {target}   (routes it here; an apex takes A/AAAA records of the edge instead)\n  then: cloudctl service verify {service} {name}\n",
                name = d.name,
                txt = v.txt_name,
                value = v.txt_value,
                target = v.cname_target,
                service = s.name,
            )),
            (DomainState::Taken, _) => text.push_str(&format!(
                "  domain {}: taken: another tenant verified it first; this claim is not routed (it lapses {expires})\n",
                d.name
            )),
            (DomainState::Expired | DomainState::Pending, _) => text.push_str(&format!(
                "  domain {}: expired {expires} before it was verified; list it again to claim it anew\n",
                d.name
            )),
        }
    }
    text
}
