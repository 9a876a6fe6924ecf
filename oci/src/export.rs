//! Stored images written back out as an OCI image layout in a tar: what `skopeo copy ... oci-archive:` writes and
//! what uploads take ([`crate::archive`]). The archive is built piece by piece, so that a caller can fetch one
//! blob at a time and send it as it comes instead of holding the whole image.
//!
//! The manifest, config and layers go out byte for byte as stored: read back, the archive is the same image with
//! the same manifest digest. Entries have fixed modes, owners and times, so one image always makes one archive.

use bytes::Bytes;
use serde_json::json;

use crate::spec::{self, Manifest, media};
use crate::{Digest, OciError};

/// A tar block: headers take one, file contents are padded to a whole number of them.
const BLOCK: usize = 512;

/// The OCI image layout of one image, minus the blobs its manifest names, which the caller supplies.
#[derive(Debug, Clone)]
pub struct LayoutArchive {
    manifest: Bytes,
    digest: Digest,
    index: Vec<u8>,
    blobs: Vec<Digest>,
}

impl LayoutArchive {
    /// The layout of the image whose manifest is `manifest`, tagged `name` in its index (as skopeo tags an
    /// `oci-archive:FILE:NAME`).
    pub fn new(manifest: Bytes, name: &str) -> Result<Self, OciError> {
        let parsed: Manifest = spec::parse_json("the image manifest", &manifest)?;
        let digest = Digest::of(&manifest);
        // Registries serve Docker's manifests too: the index says which kind this one is, as it did in theirs.
        let media_type = parsed.media_type.as_deref().unwrap_or(media::OCI_MANIFEST);
        let index = json!({
            "schemaVersion": 2,
            "mediaType": media::OCI_INDEX,
            "manifests": [{
                "mediaType": media_type,
                "digest": digest.as_str(),
                "size": manifest.len(),
                "annotations": {"org.opencontainers.image.ref.name": name},
            }],
        });
        let mut blobs: Vec<Digest> = Vec::new();
        for descriptor in std::iter::once(&parsed.config).chain(&parsed.layers) {
            let blob = spec::descriptor_digest(descriptor)?;
            // A layer listed twice (two identical steps of a build) is one file of the layout.
            if blob != digest && !blobs.contains(&blob) {
                blobs.push(blob);
            }
        }
        Ok(Self { manifest, digest, index: serde_json::to_vec(&index).expect("JSON serializes"), blobs })
    }

    /// The manifest's digest: the image's identity, the same on whichever platform stores the archive.
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// The blobs the caller writes with [`entry`](Self::entry) after [`head`](Self::head): the config, then the
    /// layers bottom first, each once.
    pub fn blobs(&self) -> &[Digest] {
        &self.blobs
    }

    /// The archive's first files: `oci-layout`, `index.json` and the manifest.
    pub fn head(&self) -> Bytes {
        let mut out = Vec::new();
        for (path, data) in [
            ("oci-layout", LAYOUT_VERSION),
            ("index.json", &self.index[..]),
            (&blob_path(&self.digest), &self.manifest[..]),
        ] {
            out.extend_from_slice(&header(path, data.len() as u64));
            out.extend_from_slice(data);
            out.extend_from_slice(padding(data.len() as u64));
        }
        Bytes::from(out)
    }

    /// One blob's file: its header, its bytes as given (not copied) and the padding after them.
    pub fn entry(digest: &Digest, data: Bytes) -> [Bytes; 3] {
        let size = data.len() as u64;
        [Bytes::copy_from_slice(&header(&blob_path(digest), size)), data, Bytes::from_static(padding(size))]
    }

    /// What ends the archive.
    pub fn tail() -> Bytes {
        Bytes::from_static(&[0; 2 * BLOCK])
    }

    /// The archive's length in bytes, given the sizes of [`blobs`](Self::blobs) (for a `Content-Length` before
    /// the blobs are read).
    pub fn size(&self, blob_sizes: impl IntoIterator<Item = u64>) -> u64 {
        let file = |size: u64| BLOCK as u64 + size + padding(size).len() as u64;
        self.head().len() as u64 + blob_sizes.into_iter().map(file).sum::<u64>() + 2 * BLOCK as u64
    }
}

const LAYOUT_VERSION: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

fn blob_path(digest: &Digest) -> String {
    format!("blobs/sha256/{}", digest.hex())
}

/// A regular file's ustar header: owned by root, mode 0644, time 0.
fn header(path: &str, size: u64) -> [u8; BLOCK] {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Regular);
    // The longest path, a blob's, is 77 bytes: within ustar's 100 for a name.
    h.set_path(path).expect("layout paths fit a ustar header");
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_cksum();
    *h.as_bytes()
}

/// The zeros that round a file of `size` bytes up to whole blocks.
fn padding(size: u64) -> &'static [u8] {
    const ZEROS: [u8; BLOCK] = [0; BLOCK];
    &ZEROS[..(BLOCK - size as usize % BLOCK) % BLOCK]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::{self, LayerBuilder};
    use crate::{ImageConfig, Limits, TargetPlatform};

    fn image() -> crate::Image {
        let config = ImageConfig { entrypoint: vec!["/run".into()], ..Default::default() };
        let layer = LayerBuilder::new().file("run", 0o755, b"#!/bin/sh\n").into_tar();
        // The same layer twice: one file in the layout.
        build::image(&config, &[layer.clone(), LayerBuilder::new().file("a", 0o644, &[7; 600]).into_tar(), layer])
    }

    #[test]
    fn an_exported_image_reads_back_as_the_same_image() {
        let image = image();
        let layout = LayoutArchive::new(image.manifest.clone(), "app").unwrap();
        assert_eq!(layout.blobs().len(), 3, "config and two distinct layers");
        assert_eq!(layout.blobs()[0], image.config_blob.digest);
        let archive = build::oci_archive(&image, "app");
        let all: Vec<&crate::Blob> = std::iter::once(&image.config_blob).chain(&image.layer_blobs).collect();
        let size_of = |d: &Digest| all.iter().find(|b| &b.digest == d).unwrap().data.len() as u64;
        let sizes = layout.blobs().iter().map(size_of);
        assert_eq!(layout.size(sizes), archive.len() as u64, "the announced length is the written one");
        let read =
            crate::archive::read(Bytes::from(archive.clone()), &Limits::default(), &TargetPlatform::host()).unwrap();
        assert_eq!((&read.digest, &read.manifest), (&image.digest, &image.manifest));
        assert_eq!(read.config_blob.data, image.config_blob.data);
        assert_eq!(build::oci_archive(&image, "app"), archive, "one image, one archive");

        // A standard tar whose index tags the image and names its manifest.
        let mut tar = tar::Archive::new(&archive[..]);
        let mut names = Vec::new();
        for entry in tar.entries().unwrap() {
            let mut entry = entry.unwrap();
            names.push(entry.path().unwrap().to_string_lossy().into_owned());
            if names.last().unwrap() == "index.json" {
                let index: serde_json::Value = serde_json::from_reader(&mut entry).unwrap();
                assert_eq!(index["manifests"][0]["digest"], image.digest.as_str());
                assert_eq!(index["manifests"][0]["mediaType"], media::OCI_MANIFEST);
                assert_eq!(index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"], "app");
            }
        }
        assert_eq!(names[..3], ["oci-layout", "index.json", &blob_path(&image.digest)]);
        assert_eq!(names.len(), 6);
    }

    #[test]
    fn a_docker_manifest_keeps_its_media_type_and_garbage_is_refused() {
        let image = image();
        let mut manifest: serde_json::Value = serde_json::from_slice(&image.manifest).unwrap();
        manifest["mediaType"] = json!(media::DOCKER_MANIFEST);
        let layout = LayoutArchive::new(Bytes::from(serde_json::to_vec(&manifest).unwrap()), "x").unwrap();
        let head = String::from_utf8_lossy(&layout.head()).into_owned();
        assert!(head.contains(media::DOCKER_MANIFEST), "{head}");
        assert!(LayoutArchive::new(Bytes::from_static(b"\x1f\x8b not a manifest"), "x").is_err());
    }

    #[test]
    fn files_are_padded_to_whole_blocks() {
        assert_eq!(padding(0).len(), 0);
        assert_eq!(padding(1).len(), 511);
        assert_eq!(padding(512).len(), 0);
        assert_eq!(padding(1025).len(), 511);
    }
}
