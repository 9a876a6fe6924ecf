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
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let tmp = dir.join(format!(".unpack-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir(&tmp).map_err(|e| e.to_string())?;
    let unpacked = unpack_entries(bytes, &tmp).and_then(|()| without_privilege(&tmp));
    if let Err(e) = unpacked {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let _ = std::fs::remove_dir_all(target);
    std::fs::rename(&tmp, target).map_err(|e| e.to_string())
}

/// Unpacks the entries as files owned by the agent (root), never carrying privilege: no setuid, setgid or
/// sticky bit, no write bit for group or others, no extended attributes (`security.capability` would be file
/// capabilities), no device nodes or FIFOs.
///
/// The files stay owned by root rather than by the account instances run as: one unpacked directory serves every
/// instance of its digest, whatever their tenant (two tenants may upload the same bundle), so an owner that
/// instances run as could change what another tenant's instance runs. Root-owned and not writable by others,
/// the files can be read and run but not changed by any instance.
fn unpack_entries(bytes: &[u8], tmp: &Path) -> Result<(), String> {
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(bytes));
    archive.set_preserve_permissions(false);
    archive.set_mask(0o022);
    archive.set_preserve_ownerships(false);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(false);
    // Directories last, deepest first, as `Archive::unpack` does: a directory without write permission must not
    // stop its own entries from being unpacked (an agent without root is bound by it).
    let mut directories = Vec::new();
    for entry in archive.entries().map_err(|e| e.to_string())? {
        let mut entry = entry.map_err(|e| e.to_string())?;
        let path = entry.path().map(|p| p.display().to_string()).unwrap_or_else(|_| "?".into());
        let kind = entry.header().entry_type();
        // Refused at upload too; a bundle stored before that check is refused here.
        if let Some(what) = cloud_store::special_file(kind) {
            return Err(format!("the entry \"{path}\" is {what}: images may not carry device nodes or FIFOs"));
        }
        if kind.is_dir() {
            directories.push((path, entry));
        } else {
            unpack_in(tmp, &path, &mut entry)?;
        }
    }
    directories.sort_by(|a, b| b.0.cmp(&a.0));
    for (path, mut entry) in directories {
        unpack_in(tmp, &path, &mut entry)?;
    }
    Ok(())
}

fn unpack_in<R: std::io::Read>(tmp: &Path, path: &str, entry: &mut tar::Entry<'_, R>) -> Result<(), String> {
    // `unpack_in` refuses entries (and hard link targets) that would land outside `tmp`, also through a symlink
    // unpacked earlier, and skips those with a `..` component, which we refuse outright.
    if entry.unpack_in(tmp).map_err(|e| format!("the entry \"{path}\": {e}"))? {
        Ok(())
    } else {
        Err(format!("the entry \"{path}\" climbs out of the bundle with '..'"))
    }
}

/// Clears what the mask could not reach (directories created for entries' parents follow the agent's umask),
/// and checks that everything is the agent's own. Symlinks are not followed (their own mode is meaningless).
fn without_privilege(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let me = crate::current_uid();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        let meta = std::fs::symlink_metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        if meta.file_type().is_symlink() {
            continue;
        }
        if meta.uid() != me {
            return Err(format!("{} is owned by uid {}, not the agent's", path.display(), meta.uid()));
        }
        let mode = meta.mode() & 0o7777;
        // The bundle's root is the instances' working directory: it must be searchable by them.
        let wanted = if path == dir { 0o755 } else { mode & 0o755 };
        if mode != wanted {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(wanted))
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).map_err(|e| format!("{}: {e}", path.display()))? {
                pending.push(entry.map_err(|e| e.to_string())?.path());
            }
        }
    }
    Ok(())
}
