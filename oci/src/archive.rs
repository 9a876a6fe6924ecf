//! Image archives users upload: an OCI image layout in a tar (`skopeo copy ... oci-archive:`, `podman save
//! --format oci-archive`) or a `docker save` tar, either possibly gzipped. Both become the same verified
//! [`Image`]; for a docker archive we write the OCI manifest it lacks, so every image has a manifest digest.

use std::collections::HashMap;
use std::io::Read;
use std::ops::Range;

use bytes::Bytes;
use serde::Deserialize;

use crate::layer::{self, Budget};
use crate::spec::{self, ConfigFile, Descriptor, ImageConfig, Index, Manifest, TargetPlatform, media};
use crate::{Blob, Compression, Digest, Image, LayerInfo, Limits, OciError};

/// Largest JSON document we parse (manifests, indexes, configs).
pub(crate) const MAX_DOCUMENT: usize = 4 << 20;
/// Files an archive may hold (its layers are checked with the image's own entry limit).
const MAX_ARCHIVE_FILES: usize = 100_000;

/// What an upload holds, judged from its content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveKind {
    /// An OCI image layout (`oci-layout`, `index.json`, `blobs/`).
    OciLayout,
    /// A `docker save` archive (a `manifest.json` listing configs and layers).
    Docker,
    /// Neither: e.g. the platform's older bundle format, whose `manifest.json` is an object.
    Other,
}

/// A tar held in memory with its files indexed by path.
struct Archive {
    data: Bytes,
    files: HashMap<String, Range<usize>>,
}

impl Archive {
    fn open(upload: Bytes, limits: &Limits) -> Result<Self, OciError> {
        let data = if Compression::detect(&upload) == Compression::Gzip {
            // An archive holds uncompressed layers at worst: the unpacked limit bounds it.
            let cap = limits.max_unpacked_bytes + limits.max_stored_bytes;
            let mut out = Vec::new();
            flate2::read::MultiGzDecoder::new(&upload[..])
                .take(cap + 1)
                .read_to_end(&mut out)
                .map_err(|e| OciError::Corrupt { what: "the archive (gzip)".into(), reason: e.to_string() })?;
            if out.len() as u64 > cap {
                return Err(OciError::TooLarge { what: "the archive uncompressed".into(), limit: mib(cap) });
            }
            Bytes::from(out)
        } else {
            upload
        };
        let corrupt = |e: std::io::Error| OciError::Corrupt { what: "the archive".into(), reason: e.to_string() };
        let mut files = HashMap::new();
        let mut links = Vec::new();
        let mut tar = tar::Archive::new(&data[..]);
        for entry in tar.entries().map_err(corrupt)? {
            let entry = entry.map_err(corrupt)?;
            if files.len() + links.len() >= MAX_ARCHIVE_FILES {
                return Err(OciError::TooLarge {
                    what: "the archive's number of files".into(),
                    limit: MAX_ARCHIVE_FILES.to_string(),
                });
            }
            let path = normalize(&String::from_utf8_lossy(&entry.path_bytes()));
            let kind = entry.header().entry_type();
            if kind.is_file() {
                let start = entry.raw_file_position() as usize;
                let len = entry.size() as usize;
                if start.checked_add(len).is_none_or(|end| end > data.len()) {
                    return Err(OciError::Corrupt {
                        what: "the archive".into(),
                        reason: format!("{path} is truncated"),
                    });
                }
                files.insert(path, start..start + len);
            } else if kind.is_symlink() || kind.is_hard_link() {
                // Older `docker save` links a layer shared by two images to its first copy.
                if let Some(target) = entry.link_name_bytes() {
                    let target = String::from_utf8_lossy(&target).into_owned();
                    let base = if kind.is_symlink() { path.rsplit_once('/').map_or("", |(d, _)| d) } else { "" };
                    let target = normalize(&format!("{base}/{target}"));
                    links.push((path, target));
                }
            }
        }
        for (path, target) in links {
            if let Some(range) = files.get(&target).cloned() {
                files.insert(path, range);
            }
        }
        Ok(Self { data, files })
    }

    fn file(&self, path: &str) -> Option<Bytes> {
        self.files.get(path).map(|r| self.data.slice(r.clone()))
    }

    fn kind(&self) -> ArchiveKind {
        if self.files.contains_key("index.json") && self.files.contains_key("oci-layout") {
            ArchiveKind::OciLayout
        } else if self.file("manifest.json").is_some_and(|m| m.trim_ascii_start().starts_with(b"[")) {
            ArchiveKind::Docker
        } else {
            ArchiveKind::Other
        }
    }

    fn blob(&self, digest: &Digest) -> Option<Bytes> {
        self.file(&format!("blobs/sha256/{}", digest.hex()))
    }
}

/// `./a//b/../c` -> `a/c`-like: leading `./` and `/` and empty components removed; `..` pops.
fn normalize(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for p in path.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    parts.join("/")
}

fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes >> 20)
}

/// What an upload is, without reading it fully.
pub fn kind(upload: &Bytes, limits: &Limits) -> ArchiveKind {
    Archive::open(upload.clone(), limits).map_or(ArchiveKind::Other, |a| a.kind())
}

/// Reads and verifies an uploaded image archive.
pub fn read(upload: Bytes, limits: &Limits, platform: &TargetPlatform) -> Result<Image, OciError> {
    read_if_image(upload, limits, platform)?.ok_or_else(|| OciError::Corrupt {
        what: "the archive".into(),
        reason: "it is neither an OCI image layout (oci-layout, index.json) nor a docker save archive \
                 (manifest.json listing images)"
            .into(),
    })
}

/// Reads and verifies an upload that may be an image archive, opening it once. `Ok(None)`: it is a tar (or a
/// gzipped tar) of neither kind, such as the platform's directory bundle, for the caller to read as its own.
pub fn read_if_image(upload: Bytes, limits: &Limits, platform: &TargetPlatform) -> Result<Option<Image>, OciError> {
    let archive = Archive::open(upload, limits)?;
    match archive.kind() {
        ArchiveKind::OciLayout => read_layout(&archive, limits, platform).map(Some),
        ArchiveKind::Docker => read_docker(&archive, limits, platform).map(Some),
        ArchiveKind::Other => Ok(None),
    }
}

fn document(what: &str, bytes: Option<Bytes>) -> Result<Bytes, OciError> {
    let bytes = bytes.ok_or_else(|| OciError::Missing { what: what.into() })?;
    if bytes.len() > MAX_DOCUMENT {
        return Err(OciError::TooLarge { what: what.into(), limit: mib(MAX_DOCUMENT as u64) });
    }
    Ok(bytes)
}

fn read_layout(archive: &Archive, limits: &Limits, platform: &TargetPlatform) -> Result<Image, OciError> {
    let index: Index = spec::parse_json("index.json", &document("index.json", archive.file("index.json"))?)?;
    let mut chosen = choose(&index, platform)?.clone();
    // An index may point at a nested index (one per platform); two levels is all real producers write.
    for _ in 0..2 {
        if !is_index(&chosen.media_type) {
            break;
        }
        let digest = spec::descriptor_digest(&chosen)?;
        let bytes = document(&format!("index {digest}"), archive.blob(&digest))?;
        digest.verify("an image index", &bytes)?;
        chosen = choose(&spec::parse_json("an image index", &bytes)?, platform)?.clone();
    }
    let digest = spec::descriptor_digest(&chosen)?;
    let manifest = document(&format!("manifest {digest}"), archive.blob(&digest))?;
    digest.verify("the image manifest", &manifest)?;
    assemble(manifest, &|d| archive.blob(d), limits, platform)
}

/// One image of a `docker save` archive.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerImage {
    config: String,
    layers: Vec<String>,
}

fn read_docker(archive: &Archive, limits: &Limits, platform: &TargetPlatform) -> Result<Image, OciError> {
    let list: Vec<DockerImage> =
        spec::parse_json("manifest.json", &document("manifest.json", archive.file("manifest.json"))?)?;
    let image = match list.as_slice() {
        [one] => one,
        [] => return Err(OciError::Missing { what: "an image in manifest.json".into() }),
        more => {
            return Err(OciError::Unsupported {
                what: format!("an archive of {} images; save and push one image at a time", more.len()),
            });
        }
    };
    let config = document(&format!("config {}", image.config), archive.file(&normalize(&image.config)))?;
    let mut blobs: HashMap<Digest, Bytes> = HashMap::new();
    let config_digest = Digest::of(&config);
    blobs.insert(config_digest.clone(), config.clone());
    let mut layers = Vec::new();
    for path in &image.layers {
        let data = archive.file(&normalize(path)).ok_or_else(|| OciError::Missing { what: format!("layer {path}") })?;
        let digest = Digest::of(&data);
        layers.push(Descriptor {
            media_type: Compression::detect(&data).layer_media_type().into(),
            digest: digest.to_string(),
            size: data.len() as i64,
            platform: None,
            annotations: None,
        });
        blobs.insert(digest, data);
    }
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(media::OCI_MANIFEST.into()),
        config: Descriptor {
            media_type: media::OCI_CONFIG.into(),
            digest: config_digest.to_string(),
            size: config.len() as i64,
            platform: None,
            annotations: None,
        },
        layers,
    };
    let manifest = Bytes::from(serde_json::to_vec(&manifest).expect("a manifest serializes"));
    assemble(manifest, &|d| blobs.get(d).cloned(), limits, platform)
}

fn is_index(media_type: &str) -> bool {
    media_type == media::OCI_INDEX || media_type == media::DOCKER_LIST
}

/// The manifest of an index to run here: the first entry for our platform, or the only entry when none says
/// its platform.
pub(crate) fn choose<'a>(index: &'a Index, platform: &TargetPlatform) -> Result<&'a Descriptor, OciError> {
    let with_platform: Vec<&Descriptor> = index.manifests.iter().filter(|d| d.platform.is_some()).collect();
    if let Some(d) =
        with_platform.iter().find(|d| d.platform.as_ref().is_some_and(|p| platform.accepts(&p.os, &p.architecture)))
    {
        return Ok(d);
    }
    let without: Vec<&Descriptor> = index.manifests.iter().filter(|d| d.platform.is_none()).collect();
    match (without.as_slice(), with_platform.as_slice()) {
        ([one, ..], _) => Ok(one),
        ([], []) => Err(OciError::Missing { what: "a manifest in the index".into() }),
        ([], others) => Err(OciError::Platform {
            found: others
                .iter()
                .filter_map(|d| d.platform.as_ref().map(|p| format!("{}/{}", p.os, p.architecture)))
                .collect::<Vec<_>>()
                .join(", "),
            want: platform.to_string(),
        }),
    }
}

/// Builds the verified image from its manifest and a source of blobs: every blob is checked against its
/// digest and every layer is walked once (limits, paths, diff_id).
pub(crate) fn assemble(
    manifest_bytes: Bytes,
    blobs: &dyn Fn(&Digest) -> Option<Bytes>,
    limits: &Limits,
    platform: &TargetPlatform,
) -> Result<Image, OciError> {
    let manifest: Manifest = spec::parse_json("the image manifest", &manifest_bytes)?;
    if manifest.schema_version != 2 {
        return Err(OciError::Unsupported { what: format!("manifest schema version {}", manifest.schema_version) });
    }
    match manifest.media_type.as_deref() {
        None | Some(media::OCI_MANIFEST) | Some(media::DOCKER_MANIFEST) => {}
        Some(other) => return Err(OciError::Unsupported { what: format!("manifest media type {other}") }),
    }
    let config_digest = spec::descriptor_digest(&manifest.config)?;
    let config_bytes = document(&format!("config {config_digest}"), blobs(&config_digest))?;
    config_digest.verify("the image config", &config_bytes)?;
    let config_file: ConfigFile = spec::parse_json("the image config", &config_bytes)?;
    let config = ImageConfig::from_config(&config_file, platform)?;
    if manifest.layers.len() > limits.max_layers {
        return Err(OciError::TooLarge {
            what: "the image's number of layers".into(),
            limit: limits.max_layers.to_string(),
        });
    }
    if manifest.layers.len() != config_file.rootfs.diff_ids.len() {
        return Err(OciError::Corrupt {
            what: "the image config".into(),
            reason: format!(
                "the manifest lists {} layers, the config {} diff_ids",
                manifest.layers.len(),
                config_file.rootfs.diff_ids.len()
            ),
        });
    }
    let mut stored = config_bytes.len() as u64;
    let mut budget = Budget::new(*limits);
    let mut layers = Vec::new();
    let mut layer_blobs = Vec::new();
    for (i, (desc, diff_id)) in manifest.layers.iter().zip(&config_file.rootfs.diff_ids).enumerate() {
        let n = i + 1;
        if desc.media_type.contains("foreign") || desc.media_type.contains("nondistributable") {
            return Err(OciError::Unsupported { what: format!("layer {n} is foreign ({})", desc.media_type) });
        }
        if !desc.media_type.is_empty() && !desc.media_type.contains("tar") {
            return Err(OciError::Unsupported { what: format!("layer {n} media type {}", desc.media_type) });
        }
        let digest = spec::descriptor_digest(desc)?;
        let diff_id = Digest::parse(diff_id)?;
        let data = blobs(&digest).ok_or_else(|| OciError::Missing { what: format!("layer {n} ({digest})") })?;
        stored += data.len() as u64;
        if stored > limits.max_stored_bytes {
            return Err(OciError::TooLarge { what: "the image".into(), limit: mib(limits.max_stored_bytes) });
        }
        digest.verify(&format!("layer {n}"), &data)?;
        let stats = layer::inspect(&data, &mut budget).map_err(|e| match e {
            OciError::Corrupt { reason, .. } => OciError::Corrupt { what: format!("layer {n}"), reason },
            e => e,
        })?;
        if stats.diff_id != diff_id {
            return Err(OciError::DigestMismatch {
                what: format!("layer {n} uncompressed"),
                expected: diff_id.to_string(),
                actual: stats.diff_id.to_string(),
            });
        }
        layers.push(LayerInfo {
            digest: digest.clone(),
            diff_id,
            size: data.len() as u64,
            compression: Compression::detect(&data),
        });
        layer_blobs.push(Blob { digest, data });
    }
    Ok(Image {
        digest: Digest::of(&manifest_bytes),
        manifest: manifest_bytes,
        config,
        config_blob: Blob { digest: config_digest, data: config_bytes },
        layers,
        layer_blobs,
    })
}
