//! Image bundles: a directory packed as tar.gz with `manifest.json` at its root, addressed by its SHA-256.

use std::io::Read;
use std::path::Component;

use cloud_domain::api::ImageManifest;
use flate2::read::GzDecoder;
use sha2::{Digest, Sha256};

/// Bounds on what a bundle may unpack to, so a small upload cannot exhaust a node's disk (a "zip bomb").
const MAX_UNPACKED_BYTES: u64 = 2 << 30;
const MAX_ENTRIES: usize = 100_000;

/// Why a bundle was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// Not gzip, or not a tar archive inside.
    #[error("the bundle is not a valid tar.gz archive: {0}")]
    Archive(String),
    /// No `manifest.json` at the root.
    #[error("the bundle has no manifest.json at its root")]
    MissingManifest,
    /// `manifest.json` does not parse or breaks a rule.
    #[error("manifest.json is invalid: {0}")]
    Manifest(String),
    /// An entry would unpack outside the bundle directory.
    #[error("the bundle entry \"{0}\" is an absolute path or climbs out with '..'")]
    UnsafePath(String),
    /// A device node or a FIFO: images never carry one (a node refuses to unpack them).
    #[error("the bundle entry \"{path}\" is {kind}: images may not carry device nodes or FIFOs")]
    SpecialFile {
        /// The entry.
        path: String,
        /// What it is ("a character device", ...).
        kind: &'static str,
    },
    /// Too big or too many entries once unpacked.
    #[error("the bundle unpacks to more than {MAX_UNPACKED_BYTES} bytes or {MAX_ENTRIES} entries")]
    TooLarge,
}

/// Checks a bundle and returns its manifest and digest (`sha256:<hex>` of the compressed bytes).
pub fn parse_bundle(bytes: &[u8]) -> Result<(ImageManifest, String), BundleError> {
    let mut archive = tar::Archive::new(GzDecoder::new(bytes));
    let mut manifest = None;
    let (mut total, mut count) = (0u64, 0usize);
    let entries = archive.entries().map_err(|e| BundleError::Archive(e.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| BundleError::Archive(e.to_string()))?;
        count += 1;
        total = total.saturating_add(entry.header().size().unwrap_or(0));
        if count > MAX_ENTRIES || total > MAX_UNPACKED_BYTES {
            return Err(BundleError::TooLarge);
        }
        let path = entry.path().map_err(|e| BundleError::Archive(e.to_string()))?.into_owned();
        let shown = path.display().to_string();
        let mut normal = Vec::new();
        for c in path.components() {
            match c {
                Component::Normal(p) => normal.push(p.to_owned()),
                Component::CurDir => {}
                _ => return Err(BundleError::UnsafePath(shown)),
            }
        }
        if let Some(kind) = special_file(entry.header().entry_type()) {
            return Err(BundleError::SpecialFile { path: shown, kind });
        }
        if normal.len() == 1 && normal[0] == "manifest.json" {
            let mut text = String::new();
            entry
                .by_ref()
                .take(64 * 1024)
                .read_to_string(&mut text)
                .map_err(|e| BundleError::Manifest(e.to_string()))?;
            let m: ImageManifest = serde_json::from_str(&text).map_err(|e| BundleError::Manifest(e.to_string()))?;
            if m.command.is_empty() || m.command[0].is_empty() {
                return Err(BundleError::Manifest("command must name a program".into()));
            }
            if m.port == 0 {
                return Err(BundleError::Manifest("port must be between 1 and 65535".into()));
            }
            manifest = Some(m);
        }
    }
    let manifest = manifest.ok_or(BundleError::MissingManifest)?;
    Ok((manifest, digest(bytes)))
}

/// What a refused kind of entry is ("a character device"), or `None` for the kinds images may hold: device nodes
/// would give access to the host's devices and FIFOs a channel between instances sharing an unpacked image. (tar
/// unpacks either as an empty regular file; refusing makes an image that needs one say so.)
pub fn special_file(kind: tar::EntryType) -> Option<&'static str> {
    if kind.is_character_special() {
        Some("a character device")
    } else if kind.is_block_special() {
        Some("a block device")
    } else if kind.is_fifo() {
        Some("a FIFO")
    } else {
        None
    }
}

/// `sha256:<hex>` of some bytes.
pub(crate) fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

#[cfg(test)]
mod tests {
    use flate2::Compression;
    use flate2::write::GzEncoder;

    use super::*;

    fn bundle(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::default()));
        for (path, data) in files {
            let mut header = tar::Header::new_gnu();
            // A name ending in '|' stands for a FIFO, in '%' for a character device.
            let path = match (path.strip_suffix('|'), path.strip_suffix('%')) {
                (Some(p), _) => {
                    header.set_entry_type(tar::EntryType::Fifo);
                    p
                }
                (_, Some(p)) => {
                    header.set_entry_type(tar::EntryType::Char);
                    p
                }
                _ => path,
            };
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            // set_path refuses '..'; write the raw name so the parser's own check is what is tested.
            let name = header.as_gnu_mut().unwrap();
            name.name[..path.len()].copy_from_slice(path.as_bytes());
            header.set_cksum();
            builder.append(&header, *data).unwrap();
        }
        builder.into_inner().unwrap().finish().unwrap()
    }

    #[test]
    fn rejects_bad_bundles_with_reasons() {
        let ok = br#"{"command":["./server"],"port":8080}"#;
        assert!(parse_bundle(&bundle(&[("manifest.json", ok), ("server", b"#!/bin/sh")])).is_ok());
        assert!(parse_bundle(&bundle(&[("./manifest.json", ok)])).is_ok());
        let cases: [(&[(&str, &[u8])], &str); 7] = [
            (&[("server", b"x")], "no manifest.json"),
            (&[("manifest.json", b"{")], "manifest.json is invalid"),
            (&[("manifest.json", br#"{"command":[],"port":80}"#)], "command must name a program"),
            (&[("manifest.json", br#"{"command":["a"],"port":80,"x":1}"#)], "unknown field"),
            (&[("manifest.json", ok), ("../evil", b"x")], "climbs out"),
            (&[("manifest.json", ok), ("dev/mem%", b"")], "\"dev/mem\" is a character device"),
            (&[("manifest.json", ok), ("pipe|", b"")], "\"pipe\" is a FIFO"),
        ];
        for (files, want) in cases {
            let err = parse_bundle(&bundle(files)).unwrap_err().to_string();
            assert!(err.contains(want), "{err} should contain {want}");
        }
        let err = parse_bundle(b"not gzip").unwrap_err().to_string();
        assert!(err.contains("not a valid tar.gz"), "{err}");
    }
}
