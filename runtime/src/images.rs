//! The node's image cache: each bundle is fetched once, checked against its digest and unpacked into a
//! directory named by the digest.

use std::path::{Path, PathBuf};

use cloud_domain::api::ImageManifest;
use cloud_store::Store;
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

/// Why an image could not be prepared.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    /// The bundle could not be fetched.
    #[error("fetching the bundle {digest}")]
    Fetch {
        /// The digest.
        digest: String,
        /// The cause.
        #[source]
        source: cloud_store::StoreError,
    },
    /// The fetched bytes do not match the digest.
    #[error("the bundle does not match its digest {digest} (got {actual})")]
    Integrity {
        /// Expected.
        digest: String,
        /// Computed.
        actual: String,
    },
    /// Unpacking or reading the manifest failed.
    #[error("unpacking the bundle {digest}: {reason}")]
    Unpack {
        /// The digest.
        digest: String,
        /// What went wrong.
        reason: String,
    },
}

/// Unpacked bundles under a directory.
#[derive(Debug)]
pub struct ImageCache {
    dir: PathBuf,
    // One unpack at a time: two instances of a new image must not unpack it twice into the same place.
    lock: Mutex<()>,
}

impl ImageCache {
    /// A cache in `dir`.
    pub fn new(dir: PathBuf) -> Self {
        Self { dir, lock: Mutex::new(()) }
    }

    /// The unpacked bundle of `digest` and its manifest, fetching it when missing.
    pub async fn prepare(&self, store: &Store, digest: &str) -> Result<(PathBuf, ImageManifest), ImageError> {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        let target = self.dir.join(hex);
        let _guard = self.lock.lock().await;
        if !target.join("manifest.json").exists() {
            let bytes = store
                .image_bundle(digest)
                .await
                .map_err(|source| ImageError::Fetch { digest: digest.into(), source })?;
            let actual = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
            if actual != digest {
                return Err(ImageError::Integrity { digest: digest.into(), actual });
            }
            let (dir, target2, d) = (self.dir.clone(), target.clone(), digest.to_owned());
            tokio::task::spawn_blocking(move || unpack(&bytes, &dir, &target2))
                .await
                .map_err(|e| ImageError::Unpack { digest: d.clone(), reason: e.to_string() })?
                .map_err(|reason| ImageError::Unpack { digest: d, reason })?;
        }
        let text = std::fs::read_to_string(target.join("manifest.json"))
            .map_err(|e| ImageError::Unpack { digest: digest.into(), reason: e.to_string() })?;
        let manifest = serde_json::from_str(&text)
            .map_err(|e| ImageError::Unpack { digest: digest.into(), reason: e.to_string() })?;
        Ok((target, manifest))
    }
}

/// Unpacks into a temporary directory and renames it into place, so a crash never leaves half a bundle.
fn unpack(bytes: &[u8], dir: &Path, target: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let tmp = dir.join(format!(".unpack-{}", uuid::Uuid::new_v4().simple()));
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(bytes));
    archive.set_preserve_permissions(true);
    archive.set_overwrite(false);
    // `unpack` refuses entries that would land outside `tmp`.
    archive.unpack(&tmp).map_err(|e| e.to_string())?;
    // Instances run as an unprivileged account: the bundle must be readable (and its programs runnable) by it.
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(target);
    std::fs::rename(&tmp, target).map_err(|e| e.to_string())
}
