//! The JSON documents of an image (index, manifest, config) as the OCI image spec and Docker's v2 schema write
//! them, and the parts of them the platform runs by.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Digest, OciError};

/// Media types we read.
pub mod media {
    /// An OCI image index (a list of manifests, one per platform).
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    /// An OCI image manifest.
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    /// An OCI image config.
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    /// Docker's manifest list, the index's predecessor.
    pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
    /// Docker's v2 schema 2 manifest.
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    /// An uncompressed OCI layer.
    pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
    /// A gzip OCI layer.
    pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
}

/// A reference from one document to a blob.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// What the blob is.
    #[serde(default)]
    pub media_type: String,
    /// Its digest.
    pub digest: String,
    /// Its size in bytes.
    pub size: i64,
    /// For an index entry: the platform it is built for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Free-form annotations (e.g. `org.opencontainers.image.ref.name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// An operating system and CPU architecture.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Platform {
    /// e.g. `amd64`.
    pub architecture: String,
    /// e.g. `linux`.
    pub os: String,
    /// e.g. `v8`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// An image index or Docker manifest list.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    /// The manifests it lists.
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
}

/// An image manifest: one config and the layers, bottom first.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// Always 2.
    pub schema_version: u32,
    /// The manifest's own media type, when it states it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The config blob.
    pub config: Descriptor,
    /// The layers, bottom first.
    pub layers: Vec<Descriptor>,
}

/// The image config blob, as far as we read it.
#[derive(Debug, Clone, Deserialize)]
pub struct ConfigFile {
    /// CPU architecture.
    #[serde(default)]
    pub architecture: String,
    /// Operating system.
    #[serde(default)]
    pub os: String,
    /// How to run it.
    #[serde(default)]
    pub config: Option<RunConfig>,
    /// The uncompressed layers' digests.
    pub rootfs: RootFs,
}

/// The `config` object of an image config.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RunConfig {
    /// Program and leading arguments.
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    /// Default arguments (or the program, without an entrypoint).
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    /// `KEY=value` entries.
    #[serde(default)]
    pub env: Option<Vec<String>>,
    /// The working directory.
    #[serde(default)]
    pub working_dir: Option<String>,
    /// `user`, `uid`, `user:group` or `uid:gid`.
    #[serde(default)]
    pub user: Option<String>,
    /// `"8080/tcp": {}` entries.
    #[serde(default)]
    pub exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
}

/// The `rootfs` object of an image config.
#[derive(Debug, Clone, Deserialize)]
pub struct RootFs {
    /// The uncompressed layers' digests, bottom first.
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

/// What the platform runs an image by: the image config's run settings, normalized.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// Program and leading arguments.
    pub entrypoint: Vec<String>,
    /// Default arguments.
    pub cmd: Vec<String>,
    /// `KEY=value` entries.
    pub env: Vec<String>,
    /// Working directory (absolute; `/` when the image names none).
    pub working_dir: String,
    /// The user to run as, as the image names it (empty: root of the sandbox).
    pub user: String,
    /// TCP ports the image says it listens on, ascending.
    pub exposed_ports: Vec<u16>,
}

impl ImageConfig {
    /// The run settings of a config blob; fails for another platform than `want`.
    pub fn from_config(config: &ConfigFile, want: &TargetPlatform) -> Result<Self, OciError> {
        if !want.accepts(&config.os, &config.architecture) {
            return Err(OciError::Platform {
                found: format!("{}/{}", config.os, config.architecture),
                want: want.to_string(),
            });
        }
        let run = config.config.clone().unwrap_or_default();
        let mut exposed_ports = Vec::new();
        for key in run.exposed_ports.unwrap_or_default().keys() {
            let (port, proto) = key.split_once('/').unwrap_or((key, "tcp"));
            if proto != "tcp" {
                continue;
            }
            let port = port.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| OciError::Corrupt {
                what: "image config".into(),
                reason: format!("ExposedPorts entry {key:?} is not a port"),
            })?;
            exposed_ports.push(port);
        }
        exposed_ports.sort_unstable();
        exposed_ports.dedup();
        let working_dir = match run.working_dir.filter(|w| !w.is_empty()) {
            Some(w) if w.starts_with('/') => w,
            Some(w) => format!("/{w}"),
            None => "/".into(),
        };
        Ok(Self {
            entrypoint: run.entrypoint.unwrap_or_default(),
            cmd: run.cmd.unwrap_or_default(),
            env: run.env.unwrap_or_default(),
            working_dir,
            user: run.user.unwrap_or_default(),
            exposed_ports,
        })
    }

    /// The command line: entrypoint then cmd, as Docker and Kubernetes combine them.
    pub fn argv(&self) -> Vec<String> {
        self.entrypoint.iter().chain(&self.cmd).cloned().collect()
    }
}

/// The platform images must be built for: this node's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetPlatform {
    /// Always `linux`.
    pub os: String,
    /// The OCI name of the CPU architecture (`amd64`, `arm64`, ...).
    pub architecture: String,
}

impl TargetPlatform {
    /// The platform this program runs on.
    pub fn host() -> Self {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            other => other,
        };
        Self { os: "linux".into(), architecture: architecture.into() }
    }

    /// Whether an image built for `os`/`architecture` runs here.
    pub fn accepts(&self, os: &str, architecture: &str) -> bool {
        os == self.os && architecture == self.architecture
    }
}

impl std::fmt::Display for TargetPlatform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)
    }
}

/// Parses a JSON document, naming it in the error.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, OciError> {
    serde_json::from_slice(bytes).map_err(|e| OciError::Corrupt { what: what.into(), reason: e.to_string() })
}

/// The digest a descriptor names, checked.
pub(crate) fn descriptor_digest(d: &Descriptor) -> Result<Digest, OciError> {
    Digest::parse(&d.digest)
}

/// How a layer blob is compressed, judged by its first bytes rather than by a media type a producer may have
/// got wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
}

impl Compression {
    /// Recognizes the magic number at the start of a blob.
    pub fn detect(head: &[u8]) -> Self {
        match head {
            [0x1f, 0x8b, ..] => Self::Gzip,
            [0x28, 0xb5, 0x2f, 0xfd, ..] => Self::Zstd,
            _ => Self::None,
        }
    }

    /// The OCI media type of a layer compressed this way.
    pub fn layer_media_type(self) -> &'static str {
        match self {
            Self::None => media::OCI_LAYER_TAR,
            Self::Gzip => media::OCI_LAYER_GZIP,
            Self::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> ConfigFile {
        parse_json("config", json.as_bytes()).unwrap()
    }

    #[test]
    fn run_settings_are_read_and_normalized() {
        let amd64 = TargetPlatform { os: "linux".into(), architecture: "amd64".into() };
        let c = ImageConfig::from_config(
            &config(
                r#"{"architecture":"amd64","os":"linux","config":{"Entrypoint":["/bin/srv"],"Cmd":["-v"],
                "Env":["A=1"],"WorkingDir":"app","User":"1000:1000",
                "ExposedPorts":{"9000/tcp":{},"53/udp":{},"8080/tcp":{}}},"rootfs":{"type":"layers","diff_ids":[]}}"#,
            ),
            &amd64,
        )
        .unwrap();
        assert_eq!(c.argv(), ["/bin/srv", "-v"]);
        assert_eq!(c.working_dir, "/app");
        assert_eq!(c.exposed_ports, [8080, 9000]);
        assert_eq!(c.user, "1000:1000");
        let bare = ImageConfig::from_config(
            &config(r#"{"architecture":"amd64","os":"linux","rootfs":{"diff_ids":[]}}"#),
            &amd64,
        )
        .unwrap();
        assert_eq!((bare.working_dir.as_str(), bare.argv().len()), ("/", 0));
        let e = ImageConfig::from_config(
            &config(r#"{"architecture":"arm64","os":"linux","rootfs":{"diff_ids":[]}}"#),
            &amd64,
        )
        .unwrap_err();
        assert!(matches!(e, OciError::Platform { .. }), "{e}");
        let e = ImageConfig::from_config(
            &config(r#"{"architecture":"amd64","os":"linux","config":{"ExposedPorts":{"x/tcp":{}}},"rootfs":{}}"#),
            &amd64,
        )
        .unwrap_err();
        assert!(e.to_string().contains("x/tcp"), "{e}");
    }

    #[test]
    fn compression_is_recognized_by_magic() {
        assert_eq!(Compression::detect(&[0x1f, 0x8b, 8]), Compression::Gzip);
        assert_eq!(Compression::detect(&[0x28, 0xb5, 0x2f, 0xfd]), Compression::Zstd);
        assert_eq!(Compression::detect(b"etc/\0\0"), Compression::None);
    }
}
