//! `cloudctl deploy`: an image, a directory or archive (pushed first) or a registry reference (pulled first) run as
//! instances.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::Args;
use cloud_domain::api::{CreateInstance, CreateRollout, Image, Instance};
use cloud_domain::state::{RestartPolicy, RolloutStrategy};

use crate::client::Client;
use crate::output::Format;
use crate::{deploy, image, progress};

/// `cloudctl deploy ...`
#[derive(Debug, Args)]
pub struct DeployArgs {
    /// Directory (with manifest.json at its root, or an OCI image layout) or image archive (OCI or docker) to
    /// push as an image.
    path: Option<PathBuf>,
    /// Attach to this service.
    #[arg(long, short, conflicts_with = "ports")]
    pub(crate) service: Option<String>,
    /// Create an ephemeral service with these port specs, deleted with its last instance.
    #[arg(long = "port", short = 'p')]
    ports: Vec<String>,
    /// Image to run: a name, or a registry reference (host[:port]/repository[:tag]) to pull first. With PATH:
    /// the name to push it as (default the file's or directory's name).
    #[arg(long, short)]
    pub(crate) image: Option<String>,
    /// Name to store a pulled image under (default: the repository's last component).
    #[arg(long, conflicts_with = "path")]
    pub(crate) image_name: Option<String>,
    /// The port the instances listen on (their PORT; default the image's exposed port).
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    internal_port: Option<u16>,
    /// Instance name.
    #[arg(long, short)]
    pub(crate) name: Option<String>,
    /// Environment variable KEY=VALUE (repeatable).
    #[arg(long = "env", short = 'e')]
    env: Vec<String>,
    /// Number of instances (default 1; with a rollout, as many as the service runs).
    #[arg(long = "replicas", short = 'R')]
    replicas: Option<u32>,
    /// Restart policy (default never).
    #[arg(long, value_parser = parse_restart)]
    restart: Option<RestartPolicy>,
    /// Replace the service's instances: new ones start, and each old one drains and goes (`replace`) or stops
    /// (`stop`) once a new one runs, or stays (`keep`). Default `replace` when the service runs another image and
    /// no instance options (--name, --memory, ...) are given.
    #[arg(long, value_name = "STRATEGY", requires = "service", value_parser = parse_strategy)]
    rollout: Option<RolloutStrategy>,
    /// With a rollout: new instances started ahead of the old ones' removal.
    #[arg(long, value_name = "N")]
    max_surge: Option<u32>,
    /// With a rollout: seconds each new instance gets to run and listen before the rollout fails.
    #[arg(long, value_name = "SECONDS")]
    rollout_wait: Option<u32>,
    /// Memory limit per instance, MiB.
    #[arg(long, short)]
    memory: Option<u32>,
    /// Create the instances stopped.
    #[arg(long)]
    no_start: bool,
    /// After they run, stream the first instance's logs.
    #[arg(long, short)]
    follow: bool,
    /// Seconds to wait for the instances to run.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
}

fn parse_restart(s: &str) -> Result<RestartPolicy, String> {
    s.parse()
}

fn parse_strategy(s: &str) -> Result<RolloutStrategy, String> {
    s.parse()
}

pub(crate) fn parse_env(pairs: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    pairs
        .iter()
        .map(|p| match p.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => bail!("-e {p}: write KEY=VALUE"),
        })
        .collect()
}

/// `replace` when the service runs instances of another image than `image` (a new deploy of it), else none
/// (the new instances join those that run, as before).
async fn default_rollout(c: &Client, service: &str, image: &str) -> anyhow::Result<Option<RolloutStrategy>> {
    let wanted: Image = c.get(&format!("/v1/images/{}", crate::client::seg(image))).await?;
    let instances: Vec<Instance> = c.list_all("/v1/instances").await?;
    let other = instances.iter().any(|i| {
        i.service.as_ref().is_some_and(|s| s.name == service || s.id.to_string() == service)
            && i.desired_state == cloud_domain::state::DesiredState::Running
            && i.image_digest != wanted.digest
    });
    Ok(other.then_some(RolloutStrategy::Replace))
}

pub(crate) async fn run(c: &Client, args: &DeployArgs, out: Format) -> anyhow::Result<()> {
    let env = parse_env(&args.env)?;
    let ports = if args.ports.is_empty() { None } else { Some(deploy::port_inputs(&args.ports)?) };
    if let Some(n) = &args.name {
        cloud_domain::names::validate_name(cloud_domain::names::NameKind::Instance, n)?;
    }
    let image = match (&args.path, &args.image) {
        (Some(path), image) => {
            let name = match image {
                Some(i) => i.clone(),
                None => image::name_from_path(path)?,
            };
            let upload = image::load(path)?;
            eprintln!(
                "pushing {} ({}, {}) as image {name}",
                path.display(),
                upload.kind,
                progress::size(upload.body.len() as u64)
            );
            image::push(c, &name, upload).await?.name
        }
        (None, Some(reference)) if image::is_reference(reference) => {
            let name = match &args.image_name {
                Some(n) => n.clone(),
                None => image::name_from_reference(reference)?,
            };
            eprintln!("pulling {reference} as image {name}");
            image::pull(c, &name, reference).await?.name
        }
        (None, Some(_)) if args.image_name.is_some() => {
            bail!("--image-name names a pulled image: give --image a registry reference (host[:port]/repository[:tag])")
        }
        (None, Some(image)) => image.clone(),
        (None, None) => bail!(
            "nothing to deploy: give a directory or archive (cloudctl deploy ./app), --image NAME or --image REGISTRY/REPO:TAG"
        ),
    };
    // What a rollout's new instances take from the service's newest instance instead.
    let fixed = [
        (args.name.is_some(), "--name"),
        (args.no_start, "--no-start"),
        (args.memory.is_some(), "--memory"),
        (args.internal_port.is_some(), "--internal-port"),
        (args.restart.is_some(), "--restart"),
    ];
    let given = fixed.iter().find(|(given, _)| *given).map(|(_, flag)| *flag);
    let strategy = match (args.rollout, &args.service, given) {
        (Some(s), _, _) => Some(s),
        // Instances configured here join the service, as before rollouts.
        (None, Some(service), None) => default_rollout(c, service, &image).await?,
        (None, _, _) => None,
    };
    if let (Some(strategy), Some(service)) = (strategy, &args.service) {
        if let Some(flag) = given {
            bail!(
                "{flag} does not go with a rollout: its new instances take the configuration of the service's newest instance (and -e, -R)"
            );
        }
        let req = CreateRollout {
            image: Some(image),
            strategy,
            replicas: args.replicas,
            max_surge: args.max_surge,
            ready_timeout_seconds: args.rollout_wait,
            env: if args.env.is_empty() { None } else { Some(env) },
            args: None,
        };
        let done = super::rollout::roll_out(c, service, &req).await?;
        return crate::output::print(out, &[done], crate::output::rollouts, |r| r.id.to_string(), true);
    }
    if args.rollout_wait.is_some() || args.max_surge.is_some() {
        bail!("--max-surge and --rollout-wait go with a rollout (--rollout, or a service running another image)");
    }
    let req = CreateInstance {
        image,
        name: args.name.clone(),
        env,
        args: Vec::new(),
        service: args.service.clone(),
        ports,
        replicas: args.replicas.unwrap_or(1),
        restart_policy: args.restart.unwrap_or_default(),
        memory_mb: args.memory,
        port: args.internal_port,
        start: !args.no_start,
    };
    let created = deploy::create_and_wait(c, req, Duration::from_secs(args.timeout)).await?;
    deploy::print(&out, &created)?;
    if args.follow
        && let Some(first) = created.instances.first()
    {
        super::instance::logs(c, &first.name, true, 100).await?;
    }
    Ok(())
}
