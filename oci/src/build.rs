//! Writing images: the platform builds a few itself (the built-in `hello`, images from directory bundles),
//! and tests build the archives users would upload.

use std::collections::BTreeMap;
use std::io::Write;

use bytes::Bytes;
use serde_json::json;

use crate::export::LayoutArchive;
use crate::spec::{Descriptor, Manifest, TargetPlatform, media};
use crate::{Blob, Compression, Digest, Image, ImageConfig, LayerInfo};

/// A layer tar built entry by entry, owned by root unless said otherwise.
pub struct LayerBuilder {
    tar: tar::Builder<Vec<u8>>,
}

impl std::fmt::Debug for LayerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LayerBuilder(..)")
    }
}

impl Default for LayerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl LayerBuilder {
    /// An empty layer.
    pub fn new() -> Self {
        let mut tar = tar::Builder::new(Vec::new());
        tar.mode(tar::HeaderMode::Deterministic);
        Self { tar }
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64, owner: (u64, u64)) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(owner.0);
        h.set_gid(owner.1);
        h.set_mtime(0);
        h
    }

    /// A directory.
    pub fn dir(mut self, path: &str, mode: u32) -> Self {
        let mut h = Self::header(tar::EntryType::Directory, mode, 0, (0, 0));
        self.tar.append_data(&mut h, path, std::io::empty()).expect("writing to memory");
        self
    }

    /// A regular file.
    pub fn file(self, path: &str, mode: u32, data: &[u8]) -> Self {
        self.file_owned(path, mode, (0, 0), data)
    }

    /// A regular file with an owner.
    pub fn file_owned(mut self, path: &str, mode: u32, owner: (u64, u64), data: &[u8]) -> Self {
        let mut h = Self::header(tar::EntryType::Regular, mode, data.len() as u64, owner);
        self.tar.append_data(&mut h, path, data).expect("writing to memory");
        self
    }

    /// A symbolic link.
    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0, (0, 0));
        self.tar.append_link(&mut h, path, target).expect("writing to memory");
        self
    }

    /// Any entry, written as given (tests use it for what a hostile image holds).
    pub fn raw(mut self, mut header: tar::Header, path: &[u8], data: &[u8]) -> Self {
        header.set_size(data.len() as u64);
        // Set the name by hand: `append_data` refuses `..`, which is exactly what hostile layers hold.
        let name = &mut header.as_old_mut().name;
        name.fill(0);
        name[..path.len()].copy_from_slice(path);
        header.set_cksum();
        self.tar.append(&header, data).expect("writing to memory");
        self
    }

    /// The uncompressed tar.
    pub fn into_tar(self) -> Vec<u8> {
        self.tar.into_inner().expect("writing to memory")
    }
}

/// Compresses layer tars and writes the config and manifest around them: a complete image for this platform.
pub fn image(config: &ImageConfig, layer_tars: &[Vec<u8>]) -> Image {
    let platform = TargetPlatform::host();
    let mut layers = Vec::new();
    let mut layer_blobs = Vec::new();
    for tar in layer_tars {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(tar).expect("writing to memory");
        let data = Bytes::from(gz.finish().expect("writing to memory"));
        let digest = Digest::of(&data);
        layers.push(LayerInfo {
            digest: digest.clone(),
            diff_id: Digest::of(tar),
            size: data.len() as u64,
            compression: Compression::Gzip,
        });
        layer_blobs.push(Blob { digest, data });
    }
    let exposed: BTreeMap<String, serde_json::Value> =
        config.exposed_ports.iter().map(|p| (format!("{p}/tcp"), json!({}))).collect();
    let config_json = json!({
        "architecture": platform.architecture,
        "os": platform.os,
        "config": {
            "Entrypoint": config.entrypoint,
            "Cmd": config.cmd,
            "Env": config.env,
            "WorkingDir": config.working_dir,
            "User": config.user,
            "ExposedPorts": exposed,
        },
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.to_string()).collect::<Vec<_>>()},
    });
    let config_bytes = Bytes::from(serde_json::to_vec(&config_json).expect("JSON serializes"));
    let config_blob = Blob { digest: Digest::of(&config_bytes), data: config_bytes };
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(media::OCI_MANIFEST.into()),
        config: descriptor(media::OCI_CONFIG, &config_blob),
        layers: layer_blobs.iter().map(|b| descriptor(media::OCI_LAYER_GZIP, b)).collect(),
    };
    let manifest = Bytes::from(serde_json::to_vec(&manifest).expect("JSON serializes"));
    Image { digest: Digest::of(&manifest), manifest, config: config.clone(), config_blob, layers, layer_blobs }
}

fn descriptor(media_type: &str, blob: &Blob) -> Descriptor {
    Descriptor {
        media_type: media_type.into(),
        digest: blob.digest.to_string(),
        size: blob.data.len() as i64,
        platform: None,
        annotations: None,
    }
}

/// The image as an OCI image layout in a tar, as `skopeo copy ... oci-archive:` writes one (and as the API exports
/// it: [`LayoutArchive`]).
pub fn oci_archive(image: &Image, tag: &str) -> Vec<u8> {
    let layout = LayoutArchive::new(image.manifest.clone(), tag).expect("a manifest this crate wrote parses");
    let mut out = layout.head().to_vec();
    for digest in layout.blobs() {
        let blob = std::iter::once(&image.config_blob)
            .chain(&image.layer_blobs)
            .find(|b| &b.digest == digest)
            .expect("the manifest names the image's own blobs");
        LayoutArchive::entry(digest, blob.data.clone()).iter().for_each(|part| out.extend_from_slice(part));
    }
    out.extend_from_slice(&LayoutArchive::tail());
    out
}
