//! `cloudctl instance copy`: an instance made again on another remote, or under another name on the same one,
//! from its image and settings, as `lxc copy c1 prod:` makes a container again. The image goes along when the
//! destination lacks the version the instance runs; the instance's service is found there by name, or made
//! with the same ports.
//!
//! What is copied is what the instance was created with, not what it has become: the copy starts fresh from the
//! image with the same environment, arguments, port, memory limit and restart policy, and gets a private IP of
//! its own. Its two names are the one place where a command talks to two remotes, so it connects to both itself
//! (the crate root connects every other command to one, see [`crate::target`]).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use cloud_domain::api::{
    CreateInstance, CreateService, CreatedInstances, Image, Instance, PortInput, Service, ServiceRef,
};
use cloud_domain::names::{NameKind, validate_name};
use cloud_domain::ports::{Handler, PortMapping, PortSpec};
use futures_util::StreamExt;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;

use crate::client::{Client, seg};
use crate::output::Format;
use crate::progress::Progress;
use crate::target::{AddressError, Target};
use crate::{deploy, image};

/// `cloudctl instance copy [REMOTE:]NAME [REMOTE:][NEW]`
#[derive(Debug, Args)]
pub struct CopyArgs {
    /// The instance to copy.
    #[arg(value_name = "[REMOTE:]NAME")]
    source: String,
    /// The copy: a new name, a remote (`prod:` keeps the name), or both.
    #[arg(value_name = "[REMOTE:][NEW]")]
    destination: String,
    /// The image's name on the destination (default: its name on the source), for when the destination has
    /// another image by that name.
    #[arg(long, value_name = "NAME")]
    image_name: Option<String>,
    /// Create the copy stopped.
    #[arg(long)]
    no_start: bool,
    /// Seconds to wait for the copy to run.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
}

/// The two ends of a copy as written: each side's remote (none: the default one) and names.
#[derive(Debug, PartialEq, Eq)]
struct Ends {
    from_remote: Option<String>,
    instance: String,
    to_remote: Option<String>,
    /// The copy's name; none keeps the instance's.
    copy: Option<String>,
}

impl Ends {
    fn parse(source: &str, destination: &str) -> anyhow::Result<Self> {
        let from = Target::parse(source)?;
        if from.name.is_empty() {
            return Err(AddressError::MissingName { arg: source.to_owned() }.into());
        }
        let to = Target::parse(destination)?;
        if to.remote.is_none() && to.name.is_empty() {
            bail!("the copy needs a name (web-2), a remote (prod:) or both (prod:web-2)");
        }
        let copy = Some(to.name).filter(|n| !n.is_empty());
        if let Some(n) = &copy {
            validate_name(NameKind::Instance, n)?;
        }
        Ok(Self { from_remote: from.remote, instance: from.name, to_remote: to.remote, copy })
    }
}

/// What this copy made on the destination, for saying so (or undoing it) when the instance cannot be made.
#[derive(Debug, Default)]
struct Made {
    /// The image, when it was sent.
    image: Option<Image>,
    /// The service, when it was created for the copy.
    service: Option<String>,
}

pub(crate) async fn run(
    args: &CopyArgs,
    default_remote: Option<&str>,
    out: Format,
    env: &dyn Fn(&str) -> Option<String>,
) -> anyhow::Result<()> {
    let ends = Ends::parse(&args.source, &args.destination)?;
    if let Some(n) = &args.image_name {
        validate_name(NameKind::Image, n)?;
    }
    let src = crate::connect(ends.from_remote.as_deref().or(default_remote), env)?;
    let dst = crate::connect(ends.to_remote.as_deref().or(default_remote), env)?;
    // These variables override whichever remote is chosen: between two remotes they would make both one.
    let overriding = ["CLOUD_API_URL", "CLOUD_TOKEN"].into_iter().find(|v| env(v).is_some_and(|x| !x.is_empty()));
    if let Some(var) = overriding.filter(|_| src.name() != dst.name()) {
        bail!(
            "{var} would stand for both remotes \"{}\" and \"{}\": unset it to copy between them",
            src.name(),
            dst.name()
        );
    }
    let source: Instance = src
        .get(&format!("/v1/instances/{}", seg(&ends.instance)))
        .await
        .with_context(|| format!("remote \"{}\"", src.name()))?;
    let name = ends.copy.clone().unwrap_or_else(|| source.name.clone());
    if src.name() == dst.name() && name == source.name {
        bail!("the copy would be instance {name} itself on remote \"{}\": give it another name or remote", dst.name());
    }
    if find::<Instance>(&dst, &format!("/v1/instances/{}", seg(&name))).await?.is_some() {
        bail!("remote \"{}\" has an instance {name} already: give the copy another name", dst.name());
    }

    let mut made = Made::default();
    match make(&src, &dst, &source, &name, args, &mut made).await {
        Ok(created) => deploy::print(&out, &created),
        Err(e) => Err(undo(&dst, &name, made, e).await),
    }
}

/// Makes the copy on the destination: its image and service when missing there, then the instance, running
/// unless asked not to. `made` records what was made, for the error to say.
async fn make(
    src: &Client,
    dst: &Client,
    source: &Instance,
    name: &str,
    args: &CopyArgs,
    made: &mut Made,
) -> anyhow::Result<CreatedInstances> {
    let image = image_on(src, dst, source, args.image_name.as_deref(), made).await?;
    let service = match &source.service {
        Some(s) => Some(service_on(src, dst, s, made).await?),
        None => None,
    };
    let req = CreateInstance {
        image,
        name: Some(name.to_owned()),
        env: source.env.clone(),
        args: source.args.clone(),
        service,
        ports: None,
        replicas: 1,
        restart_policy: source.restart_policy,
        memory_mb: Some(source.memory_mb),
        port: Some(source.port),
        start: !args.no_start,
    };
    deploy::create_and_wait(dst, req, Duration::from_secs(args.timeout))
        .await
        .with_context(|| format!("creating instance {name} on remote \"{}\"", dst.name()))
}

/// A GET that answers `None` for a 404.
async fn find<T: DeserializeOwned>(c: &Client, path: &str) -> anyhow::Result<Option<T>> {
    let res = c.request(Method::GET, path).send().await.map_err(|e| c.unreachable(&e))?;
    match res.status() {
        StatusCode::NOT_FOUND => Ok(None),
        s if s.is_success() => Ok(Some(res.json().await?)),
        _ => Err(c.failure(res).await),
    }
}

/// The first hex digits of a digest, enough to tell versions apart in a message.
fn short(digest: &str) -> &str {
    &digest[..digest.len().min("sha256:".len() + 12)]
}

/// The name of the image the copy runs on the destination; the version the instance runs is sent there first
/// unless the destination has it under that name.
async fn image_on(
    src: &Client,
    dst: &Client,
    source: &Instance,
    rename: Option<&str>,
    made: &mut Made,
) -> anyhow::Result<String> {
    let name = rename.unwrap_or(&source.image);
    let digest = source.image_digest.as_str();
    let there = find::<Image>(dst, &format!("/v1/images/{}", seg(name))).await?;
    let Some(there) = there else {
        made.image = Some(send_image(src, dst, source, name).await?);
        return Ok(name.to_owned());
    };
    if there.digest == digest {
        Progress::new().done(&format!("image {name}: remote \"{}\" has it already ({})", dst.name(), short(digest)));
        return Ok(name.to_owned());
    }
    // Both platforms ship their own build of a built-in image (hello): the destination's is the one to run
    // there, and a tenant's copy of it under the same name would hide it from every later deploy.
    if there.builtin && rename.is_none() {
        let origin: Image = src.get(&format!("/v1/images/{}", seg(&source.image))).await?;
        if origin.builtin {
            Progress::new().done(&format!(
                "image {name}: runs remote \"{}\"'s built-in {name} ({}), another build than remote \"{}\"'s ({})",
                dst.name(),
                short(&there.digest),
                src.name(),
                short(digest)
            ));
            return Ok(name.to_owned());
        }
    }
    bail!(
        "remote \"{}\" has another image named {name} ({}; the instance runs {}): send it under another name with --image-name NAME",
        dst.name(),
        short(&there.digest),
        short(digest)
    )
}

/// Exports the version of the image the instance runs from `src` and uploads it to `dst` as it arrives.
async fn send_image(src: &Client, dst: &Client, source: &Instance, name: &str) -> anyhow::Result<Image> {
    let path = format!("/v1/images/{}/archive?digest={}", seg(&source.image), source.image_digest);
    let reading = || format!("reading image {} from remote \"{}\"", source.image, src.name());
    let res = src.send(src.request(Method::GET, &path)).await.with_context(reading)?;
    let total = res.content_length();
    let content_type = res
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/x-tar")
        .to_owned();
    // A download that breaks off shows on the upload side as a body that ended: keep why, to blame the right end.
    let broke: Arc<Mutex<Option<String>>> = Arc::default();
    let seen = broke.clone();
    let chunks = res.bytes_stream().inspect(move |chunk| {
        if let (Err(e), Ok(mut seen)) = (chunk, seen.lock()) {
            seen.get_or_insert_with(|| cloud_domain::error_chain(e));
        }
    });
    let size = total.map(|t| format!(", {}", crate::progress::size(t))).unwrap_or_default();
    eprintln!(
        "copying image {name} ({}{size}) from remote \"{}\" to remote \"{}\"",
        short(&source.image_digest),
        src.name(),
        dst.name()
    );
    let shown = image::Shown {
        sending: format!("copying image {name}"),
        sent: format!("copied image {name} to remote \"{}\"", dst.name()),
    };
    let stored = match image::send(dst, name, &content_type, total, chunks, shown).await {
        Ok(stored) => stored,
        Err(e) => match broke.lock().ok().and_then(|mut b| b.take()) {
            Some(why) => bail!("{}: {why}", reading()),
            None => return Err(e.context(format!("storing image {name} on remote \"{}\"", dst.name()))),
        },
    };
    if stored.digest != source.image_digest {
        bail!(
            "remote \"{}\" stored image {name} as {}, not as the {} the instance runs",
            dst.name(),
            short(&stored.digest),
            short(&source.image_digest)
        );
    }
    Ok(stored)
}

/// The destination's service of the same name as the instance's, made with the same ports and limits (as a
/// persistent service) when it has none.
async fn service_on(src: &Client, dst: &Client, s: &ServiceRef, made: &mut Made) -> anyhow::Result<String> {
    if let Some(there) = find::<Service>(dst, &format!("/v1/services/{}", seg(&s.name))).await? {
        Progress::new().done(&format!("service {}: joins remote \"{}\"'s ({})", there.name, dst.name(), there.fqdn));
        return Ok(there.name);
    }
    let origin: Service = src
        .get(&format!("/v1/services/{}", s.id))
        .await
        .with_context(|| format!("reading service {} on remote \"{}\"", s.name, src.name()))?;
    let req = CreateService {
        name: Some(origin.name.clone()),
        ports: port_inputs(&origin.ports),
        soft_limit: origin.soft_limit,
        hard_limit: origin.hard_limit,
        scale_to_zero_after: origin.scale_to_zero_after,
        // Custom domains are verified per platform, and extra platform names are global: neither moves along.
        ..Default::default()
    };
    let service: Service = dst
        .post("/v1/services", &req)
        .await
        .with_context(|| format!("creating service {} on remote \"{}\"", origin.name, dst.name()))?;
    Progress::new().done(&format!("created service {} {} on remote \"{}\"", service.name, service.fqdn, dst.name()));
    made.service = Some(service.name.clone());
    Ok(service.name)
}

/// A service's ports as a request that expands to the same mappings: each spelled out in full. A raw TCP port
/// was allocated by the source's platform; the destination allocates its own.
fn port_inputs(mappings: &[PortMapping]) -> Vec<PortInput> {
    mappings
        .iter()
        .map(|m| {
            PortInput::Object(PortSpec {
                port: if m.handlers.contains(&Handler::Tcp) { 0 } else { m.port },
                destination_port: Some(m.destination_port),
                handlers: Some(m.handlers.clone()),
                proxy: m.proxy,
            })
        })
        .collect()
}

/// The error of a copy that was not made, with what was made for it: a service made for it goes again (empty,
/// it serves nothing); an image sent stays, as images are the user's to delete.
async fn undo(dst: &Client, name: &str, made: Made, e: anyhow::Error) -> anyhow::Error {
    // Created but not running: the instance stays, for its state and logs to say why, as after a deploy.
    if !matches!(find::<Instance>(dst, &format!("/v1/instances/{}", seg(name))).await, Ok(None)) {
        return e;
    }
    let mut notes = Vec::new();
    if let Some(service) = made.service {
        match dst.delete(&format!("/v1/services/{}", seg(&service))).await {
            Ok(()) => notes.push(format!("service {service}, made for it, was removed")),
            Err(d) => notes.push(format!("service {service}, made for it, stays (removing it: {d:#})")),
        }
    }
    if let Some(image) = made.image {
        notes.push(format!("image {} ({}) was stored and stays", image.name, short(&image.digest)));
    }
    match notes.is_empty() {
        true => e,
        false => anyhow::anyhow!("{e:#}; {}", notes.join("; ")),
    }
}

#[cfg(test)]
mod tests {
    use cloud_domain::ports::{PortPolicy, expand_inputs, parse_specs};

    use super::*;

    #[test]
    fn the_two_ends() {
        let ends = |s: &str, d: &str| Ends::parse(s, d).map_err(|e| e.to_string());
        let want = |from: Option<&str>, instance: &str, to: Option<&str>, copy: Option<&str>| {
            Ok(Ends {
                from_remote: from.map(str::to_owned),
                instance: instance.to_owned(),
                to_remote: to.map(str::to_owned),
                copy: copy.map(str::to_owned),
            })
        };
        assert_eq!(ends("local:web", "b:web2"), want(Some("local"), "web", Some("b"), Some("web2")));
        assert_eq!(ends("local:web", "b:"), want(Some("local"), "web", Some("b"), None));
        assert_eq!(ends("web-1", "web-1-copy"), want(None, "web-1", None, Some("web-1-copy")));
        assert_eq!(ends("web", "prod:"), want(None, "web", Some("prod"), None));
        for (s, d, needle) in [
            ("local:", "b:", "a name must follow the remote"),
            ("web", "", "the copy needs a name"),
            ("a.b:web", "b:", "remote name \"a.b\""),
            ("web", "b:Web", "invalid character 'W'"),
        ] {
            let e = ends(s, d).unwrap_err();
            assert!(e.contains(needle), "{s} {d}: {e:?} should mention {needle:?}");
        }
    }

    #[test]
    fn ports_are_asked_for_as_they_expanded() {
        let policy = PortPolicy::default();
        let mappings = parse_specs(&["443:8080", "8443:9000/tls+proxy", "80:8080/http"], &policy).unwrap();
        assert_eq!(expand_inputs(&port_inputs(&mappings), &policy).unwrap(), mappings);
        // The web form with its implicit redirect, spelled out, is the same.
        let web = parse_specs(&["443:8080"], &policy).unwrap();
        assert_eq!(expand_inputs(&port_inputs(&web), &policy).unwrap(), web);
        let allocated =
            PortMapping { port: 30_007, destination_port: 5432, handlers: vec![Handler::Tcp], proxy: false };
        let again = expand_inputs(&port_inputs(&[allocated]), &policy).unwrap();
        assert_eq!((again[0].port, again[0].destination_port), (0, 5432), "the destination allocates its own");
    }
}
