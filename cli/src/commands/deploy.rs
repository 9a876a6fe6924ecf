//! `cloudctl deploy`: an image, a directory or archive (pushed first) or a registry reference (pulled first) run as
//! instances.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::Args;
use cloud_domain::api::CreateInstance;
use cloud_domain::state::RestartPolicy;

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
    /// Number of instances.
    #[arg(long = "replicas", short = 'R', default_value_t = 1)]
    replicas: u32,
    /// Restart policy.
    #[arg(long, default_value = "never", value_parser = parse_restart)]
    restart: RestartPolicy,
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

pub(crate) fn parse_env(pairs: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    pairs
        .iter()
        .map(|p| match p.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => bail!("-e {p}: write KEY=VALUE"),
        })
        .collect()
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
    let req = CreateInstance {
        image,
        name: args.name.clone(),
        env,
        args: Vec::new(),
        service: args.service.clone(),
        ports,
        replicas: args.replicas,
        restart_policy: args.restart,
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
