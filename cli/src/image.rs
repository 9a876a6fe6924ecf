//! Images from the command line: what a path holds (a directory bundle, an OCI image layout, an OCI or docker
//! archive), uploading it with progress, and pulls from registries through the API.

use std::fmt;
use std::io::Read;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use cloud_domain::api::{Image, PullImage};
use futures_util::StreamExt;
use reqwest::Method;

use crate::client::{Client, seg};
use crate::progress::{self, Progress};

/// What a path to push holds, judged by its content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A directory with `manifest.json` at its root, packed as a tar.gz bundle.
    Directory,
    /// A directory holding an OCI image layout (`skopeo copy ... oci:DIR`), packed as a tar.
    OciLayout,
    /// A bundle already packed (a tar.gz with `manifest.json` at its root).
    Bundle,
    /// An OCI image layout in a tar, possibly gzipped (`skopeo copy ... oci-archive:`, `podman save --format
    /// oci-archive`).
    OciArchive,
    /// A `docker save` archive, possibly gzipped.
    DockerArchive,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Directory => "directory bundle",
            Self::OciLayout => "OCI image layout",
            Self::Bundle => "bundle",
            Self::OciArchive => "OCI archive",
            Self::DockerArchive => "docker archive",
        })
    }
}

/// An image ready to upload.
#[derive(Debug)]
pub struct Upload {
    /// What it is.
    pub kind: Kind,
    /// The body.
    pub body: Vec<u8>,
}

impl Upload {
    /// The Content-Type it is sent with (the API tells formats apart by content; this is for the record).
    fn content_type(&self) -> &'static str {
        match (self.body.starts_with(&GZIP), self.kind) {
            (true, _) => "application/gzip",
            (false, Kind::OciArchive | Kind::OciLayout) => "application/vnd.oci.image.layout.v1+tar",
            (false, _) => "application/x-tar",
        }
    }
}

const GZIP: [u8; 2] = [0x1f, 0x8b];

/// Reads what `path` holds into an upload: a directory is packed, a file must be an image archive or a bundle.
pub fn load(path: &Path) -> anyhow::Result<Upload> {
    let meta = std::fs::metadata(path).with_context(|| format!("{} does not exist", path.display()))?;
    if meta.is_dir() {
        if path.join("oci-layout").is_file() && path.join("index.json").is_file() {
            return Ok(Upload { kind: Kind::OciLayout, body: pack_tar(path)? });
        }
        return Ok(Upload { kind: Kind::Directory, body: pack(path)? });
    }
    let body = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let Some(kind) = detect(&body) else {
        bail!(
            "{} is neither an OCI image archive (skopeo copy ... oci-archive:FILE, podman save --format oci-archive), a \
             docker archive (docker save) nor a bundle (a tar.gz with manifest.json at its root)",
            path.display()
        );
    };
    Ok(Upload { kind, body })
}

/// What an archive holds, from the names (and `manifest.json`'s first character) of its entries.
fn detect(bytes: &[u8]) -> Option<Kind> {
    let gzip = bytes.starts_with(&GZIP);
    let reader: Box<dyn Read + '_> =
        if gzip { Box::new(flate2::read::MultiGzDecoder::new(bytes)) } else { Box::new(bytes) };
    let mut archive = tar::Archive::new(reader);
    let (mut layout, mut index, mut manifest) = (false, false, None);
    for entry in archive.entries().ok()? {
        let mut entry = entry.ok()?;
        let path = entry.path().ok()?.to_string_lossy().trim_start_matches("./").to_owned();
        match path.as_str() {
            "oci-layout" => layout = true,
            "index.json" => index = true,
            "manifest.json" => {
                let mut head = Vec::new();
                entry.by_ref().take(4096).read_to_end(&mut head).ok()?;
                manifest = head.iter().copied().find(|b| !b.is_ascii_whitespace());
            }
            _ => {}
        }
    }
    match manifest {
        _ if layout && index => Some(Kind::OciArchive),
        Some(b'[') => Some(Kind::DockerArchive),
        Some(b'{') if gzip => Some(Kind::Bundle),
        _ => None,
    }
}

/// Packs a directory into a tar.gz bundle; it must have `manifest.json` at its root.
pub fn pack(dir: &Path) -> anyhow::Result<Vec<u8>> {
    let manifest = dir.join("manifest.json");
    let text = std::fs::read_to_string(&manifest).with_context(|| {
        format!(
            "{} has no manifest.json: an image is a directory with manifest.json {{\"command\": [...], \"port\": N}} at its root, an OCI image layout, or an image archive",
            dir.display()
        )
    })?;
    serde_json::from_str::<cloud_domain::api::ImageManifest>(&text)
        .with_context(|| format!("{} is not a valid manifest", manifest.display()))?;
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default()));
    tar.follow_symlinks(false);
    tar.append_dir_all(".", dir).with_context(|| format!("packing {}", dir.display()))?;
    Ok(tar.into_inner()?.finish()?)
}

/// Packs a directory as it is into a tar (an OCI image layout's blobs are compressed already).
fn pack_tar(dir: &Path) -> anyhow::Result<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    tar.follow_symlinks(false);
    tar.append_dir_all(".", dir).with_context(|| format!("packing {}", dir.display()))?;
    Ok(tar.into_inner()?)
}

/// Uploads an image under a name, showing how much is sent (the platform verifies it before answering).
pub async fn push(client: &Client, name: &str, upload: Upload) -> anyhow::Result<Image> {
    const CHUNK: usize = 256 << 10;
    let total = upload.body.len() as u64;
    let content_type = upload.content_type();
    let body = Bytes::from(upload.body);
    let chunks = futures_util::stream::iter(0..body.len().div_ceil(CHUNK))
        .map(move |i| Ok::<_, std::io::Error>(body.slice(i * CHUNK..((i + 1) * CHUNK).min(body.len()))));
    let shown = Shown { sending: format!("uploading {name}"), sent: format!("pushed {name}") };
    send(client, name, content_type, Some(total), chunks, shown).await
}

/// How an upload is shown on stderr: `sending` while bytes go, `sent` the line kept on a terminal after.
pub struct Shown {
    /// What is being sent, e.g. `uploading app`.
    pub sending: String,
    /// What was done, e.g. `pushed app`.
    pub sent: String,
}

/// Uploads an image arriving as `chunks` (of `total` bytes when known) under a name, showing how much is sent.
pub async fn send<S, E>(
    client: &Client,
    name: &str,
    content_type: &str,
    total: Option<u64>,
    chunks: S,
    shown: Shown,
) -> anyhow::Result<Image>
where
    S: futures_util::Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
{
    let progress = Arc::new(Mutex::new(Progress::new()));
    let (what, counter) = (shown.sending, progress.clone());
    let mut sent = 0u64;
    let chunks = chunks.inspect(move |chunk| {
        let Ok(chunk) = chunk else { return };
        sent += chunk.len() as u64;
        let total = total.unwrap_or(sent).max(sent);
        if let Ok(mut p) = counter.lock() {
            match sent == total && p.is_tty() {
                // The answer comes once the platform has checked every blob: say why it takes a moment.
                true => p.step(&format!("{what}: {} sent; the platform is verifying it", progress::size(total))),
                false => p.bytes(&what, sent, total),
            }
        }
    });
    let mut req = client
        .request(Method::POST, &format!("/v1/images?name={}", seg(name)))
        .header(reqwest::header::CONTENT_TYPE, content_type);
    if let Some(total) = total {
        req = req.header(reqwest::header::CONTENT_LENGTH, total);
    }
    let res = client.send(req.body(reqwest::Body::wrap_stream(chunks))).await;
    let tty = match progress.lock() {
        Ok(mut p) => {
            p.clear();
            p.is_tty()
        }
        Err(_) => false,
    };
    let image: Image = res?.json().await?;
    if tty {
        Progress::new().done(&format!("{} ({})", shown.sent, progress::size(total.unwrap_or(image.size_bytes))));
    }
    Ok(image)
}

/// Has the platform pull an image from a registry and store it under a name.
pub async fn pull(client: &Client, name: &str, reference: &str) -> anyhow::Result<Image> {
    let mut progress = Progress::new();
    let body = PullImage { name: name.to_owned(), reference: reference.to_owned() };
    let send = client.send(client.request(Method::POST, "/v1/images").json(&body));
    tokio::pin!(send);
    // A pull is one request that takes as long as the registry does: a spinner on a terminal says it is alive.
    let res = loop {
        tokio::select! {
            res = &mut send => break res,
            _ = tokio::time::sleep(Duration::from_millis(120)), if progress.is_tty() => {
                progress.step(&format!("pulling {reference}"));
            }
        }
    };
    progress.clear();
    let image: Image = res?.json().await?;
    if progress.is_tty() {
        progress.done(&format!("pulled {reference} as {name} ({})", progress::size(image.size_bytes)));
    }
    Ok(image)
}

/// Whether `--image` names a registry reference rather than a stored image: image names and ids never hold
/// `/`, `:`, `@` or `.`, and every reference of a registry host or a tag does.
pub fn is_reference(s: &str) -> bool {
    s.contains(['/', ':', '@', '.'])
}

/// The image name for a reference: its repository's last component (`127.0.0.1:5000/team/web:v1` -> `web`).
pub fn name_from_reference(reference: &str) -> anyhow::Result<String> {
    let path = reference.split('@').next().unwrap_or(reference);
    let last = path.rsplit('/').next().unwrap_or(path);
    let repo = last.split(':').next().unwrap_or(last);
    label(repo).with_context(|| format!("cannot make an image name from {reference}: pass --image-name NAME"))
}

/// The image name for a path: a directory's name, or a file's up to its first `.` (`app.oci.tar.gz` -> `app`).
pub fn name_from_path(path: &Path) -> anyhow::Result<String> {
    let abs = std::fs::canonicalize(path).with_context(|| format!("{} does not exist", path.display()))?;
    let raw = abs.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let raw = if abs.is_dir() { raw.as_str() } else { raw.split('.').next().unwrap_or_default() };
    label(raw).with_context(|| format!("cannot make an image name from {}: pass --name NAME", path.display()))
}

/// `s` made a valid image name: lowercase, other characters as `-`.
fn label(s: &str) -> Option<String> {
    let lower = s.to_lowercase();
    let name: String = lower.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    let name: String = name.trim_matches('-').chars().take(63).collect();
    let name = name.trim_end_matches('-').to_owned();
    cloud_domain::names::validate_name(cloud_domain::names::NameKind::Image, &name).ok().map(|()| name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_and_names_are_told_apart() {
        for r in ["127.0.0.1:5000/hello:v1", "nginx:1.25", "user/app", "ghcr.io/org/app", "app@sha256:ab"] {
            assert!(is_reference(r), "{r}");
        }
        for n in ["hello", "my-app", "0b6f3c2e-5d6a-4d1e-9f0a-2b7c8d9e0f1a"] {
            assert!(!is_reference(n), "{n}");
        }
        assert_eq!(name_from_reference("127.0.0.1:5000/team/web:v1").unwrap(), "web");
        assert_eq!(name_from_reference("ghcr.io/org/My_App@sha256:ab").unwrap(), "my-app");
        assert_eq!(name_from_reference("localhost:5000/hello").unwrap(), "hello");
    }

    #[test]
    fn archives_are_recognised_by_content() {
        let tar = |files: &[(&str, &[u8])]| {
            let mut b = tar::Builder::new(Vec::new());
            for (path, data) in files {
                let mut h = tar::Header::new_ustar();
                h.set_size(data.len() as u64);
                h.set_mode(0o644);
                b.append_data(&mut h, path, *data).unwrap();
            }
            b.into_inner().unwrap()
        };
        let gz = |bytes: &[u8]| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            std::io::Write::write_all(&mut e, bytes).unwrap();
            e.finish().unwrap()
        };
        let oci = tar(&[("blobs/sha256/ab", b"x"), ("index.json", b"{}"), ("oci-layout", b"{}")]);
        assert_eq!(detect(&oci), Some(Kind::OciArchive));
        assert_eq!(detect(&gz(&oci)), Some(Kind::OciArchive));
        let docker = tar(&[("abc/layer.tar", b"x"), ("manifest.json", b" [{\"Config\":\"c.json\"}]")]);
        assert_eq!(detect(&docker), Some(Kind::DockerArchive));
        let bundle = tar(&[("./manifest.json", b"{\"command\":[\"x\"],\"port\":80}")]);
        assert_eq!(detect(&gz(&bundle)), Some(Kind::Bundle));
        assert_eq!(detect(&bundle), None, "bundles are tar.gz");
        assert_eq!(detect(b"plain text"), None);
        assert_eq!(detect(&tar(&[("README", b"hi")])), None);
    }
}
