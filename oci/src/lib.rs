//! OCI images for the platform: reading the archives users upload (an OCI image layout as `skopeo copy ...
//! oci-archive:` or `podman save --format oci-archive` write it, and `docker save` archives), pulling from
//! registries, verifying every blob by digest, and unpacking layers into directories an overlay mount stacks.
//!
//! Nothing here trusts the image: documents are size-checked before parsing, blobs are checked against their
//! digests, archives and layers are bounded in size and entries, layer paths that climb out or write through a
//! link are refused, and what would carry privilege out of an image (setuid and setgid bits, device nodes) is
//! neutralised while unpacking. The crate knows nothing of PostgreSQL or of sandboxes: the API stores what
//! [`archive`] and [`registry`] return and exports with [`export`], node agents unpack with [`layer`].

pub mod archive;
pub mod build;
mod digest;
pub mod export;
pub mod layer;
pub mod reference;
pub mod registry;
pub mod spec;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub use digest::Digest;
pub use reference::Reference;
pub use spec::{Compression, ImageConfig, TargetPlatform};

/// Why an image could not be read, pulled or unpacked. Every variant but [`Io`](OciError::Io) is the image's or
/// the registry's fault and maps to a 4xx for whoever supplied it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OciError {
    /// A document, archive or layer is malformed or truncated.
    #[error("{what} is not valid: {reason}")]
    Corrupt {
        /// What was being read.
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// Something the image needs is not in the archive or the registry.
    #[error("{what} is missing from the image")]
    Missing {
        /// What is missing.
        what: String,
    },
    /// A blob does not have the digest it is referred to by.
    #[error("{what} does not match its digest {expected} (its content has {actual})")]
    DigestMismatch {
        /// The blob.
        what: String,
        /// The digest it should have.
        expected: String,
        /// The digest it has.
        actual: String,
    },
    /// The image is built for another platform.
    #[error("the image is built for {found}; this platform runs {want}")]
    Platform {
        /// The image's os/architecture.
        found: String,
        /// Ours.
        want: String,
    },
    /// A limit was exceeded.
    #[error("{what} exceeds the limit of {limit}")]
    TooLarge {
        /// What grew too large.
        what: String,
        /// The limit, with its unit.
        limit: String,
    },
    /// The image uses something we do not run (a media type, a foreign layer, a hash algorithm).
    #[error("unsupported: {what}")]
    Unsupported {
        /// What.
        what: String,
    },
    /// A layer tries to write outside its directory or to give itself ids it cannot have.
    #[error("layer entry {path:?} refused: {reason}")]
    Unsafe {
        /// The entry's path in the layer.
        path: String,
        /// Why.
        reason: String,
    },
    /// An image reference does not parse.
    #[error("image reference {input:?} is not valid: {reason}")]
    Reference {
        /// What was given.
        input: String,
        /// What is wrong.
        reason: String,
    },
    /// A plain-http registry that is not configured as insecure.
    #[error(
        "registry {registry} does not speak https; add it to the insecure registries to pull from it over plain http"
    )]
    InsecureRegistry {
        /// The registry host.
        registry: String,
    },
    /// The registry is on a loopback, private or link-local address the platform is not configured to reach.
    #[error(
        "registry {registry} is not on a public address; add it to the private (or insecure) registries to pull from it"
    )]
    RegistryNotAllowed {
        /// The registry host.
        registry: String,
    },
    /// The registry could not be reached or answered something unusable.
    #[error("registry {registry}: {reason}")]
    RegistryUnavailable {
        /// The registry host.
        registry: String,
        /// What happened.
        reason: String,
    },
    /// The registry refused access (401/403).
    #[error("registry refused access to {reference} ({status})")]
    RegistryDenied {
        /// The reference.
        reference: String,
        /// The HTTP status.
        status: u16,
    },
    /// The registry has no such image (404).
    #[error("registry has no image {reference}")]
    NotFound {
        /// The reference.
        reference: String,
    },
    /// Writing the unpacked layer failed on this host.
    #[error("unpacking into {path}")]
    Io {
        /// The file or directory.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Bounds on what an image may make us read, store and write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The sum of an image's blobs as stored (compressed layers, config).
    pub max_stored_bytes: u64,
    /// The sum of an image's layers unpacked.
    pub max_unpacked_bytes: u64,
    /// Entries over all layers.
    pub max_entries: u64,
    /// Layers per image (overlay stacks are bounded, and Docker stops at 127 too).
    pub max_layers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_stored_bytes: 256 << 20, max_unpacked_bytes: 1 << 30, max_entries: 200_000, max_layers: 127 }
    }
}

/// A blob and its digest.
#[derive(Debug, Clone)]
pub struct Blob {
    /// Its digest, checked.
    pub digest: Digest,
    /// Its bytes.
    pub data: Bytes,
}

/// One layer of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerInfo {
    /// The digest of the blob as stored (compressed).
    pub digest: Digest,
    /// The digest of the uncompressed tar (the config's diff_id), checked when the layer is unpacked.
    pub diff_id: Digest,
    /// The blob's size.
    pub size: u64,
    /// How the blob is compressed.
    pub compression: Compression,
}

/// An image read from an archive or a registry, with every blob verified.
#[derive(Debug, Clone)]
pub struct Image {
    /// The manifest's digest: the image's identity.
    pub digest: Digest,
    /// The manifest as stored (for docker archives, the OCI manifest we wrote for it).
    pub manifest: Bytes,
    /// How to run it.
    pub config: ImageConfig,
    /// The config blob.
    pub config_blob: Blob,
    /// The layers, bottom first.
    pub layers: Vec<LayerInfo>,
    /// The layers' blobs, in the same order.
    pub layer_blobs: Vec<Blob>,
}

impl Image {
    /// Bytes stored for this image (config and layer blobs).
    pub fn stored_bytes(&self) -> u64 {
        self.config_blob.data.len() as u64 + self.layer_blobs.iter().map(|b| b.data.len() as u64).sum::<u64>()
    }
}
