//! The node's images, prepared to run: every blob fetched once from PostgreSQL and checked against its digest,
//! unpacked once per node into a directory named by what it holds, and shared by every image and tenant that
//! uses it.
//!
//! - An OCI image's layers go to `<state_dir>/layers/<diff_id>`, each checked against the diff_id its config
//!   names, in overlayfs' format: a sandbox stacks them read-only under its own writable layer.
//! - A directory bundle (the tar.gz of `cloudctl deploy ./dir`) becomes two layers: a minimal base the node
//!   builds once from the host's static busybox (`layers/busybox-<hash>`), and the bundle's files under `/app`
//!   (`layers/bundle-<digest>`), unpacked without privilege (see [`unpack_bundle`]).
//! - Without root (loopback mode) nothing is stacked: an OCI image's layers are applied in order into one
//!   directory (`<state_dir>/roots/<manifest digest>`), and instances run as host processes from there.
//!
//! A directory appears under its final name only complete and verified: it is written under a temporary name
//! and renamed, so a crash leaves no half layer, and agents sharing a state directory never race (the first
//! rename wins; the others discard their copy).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cloud_domain::api::ImageManifest;
use cloud_oci::layer::Budget;
use cloud_oci::spec::{ConfigFile, Manifest};
use cloud_oci::{Digest, ImageConfig, TargetPlatform};
use cloud_store::{Assignment, Store};
use tokio::sync::Mutex;

/// Why an image could not be prepared.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    /// A blob could not be fetched.
    #[error("fetching the blob {digest}")]
    Fetch {
        /// The digest.
        digest: String,
        /// The cause.
        #[source]
        source: cloud_store::StoreError,
    },
    /// The fetched bytes do not match the digest.
    #[error("the blob does not match its digest {digest} (got {actual})")]
    Integrity {
        /// Expected.
        digest: String,
        /// Computed.
        actual: String,
    },
    /// Unpacking, or reading the manifest or config, failed.
    #[error("unpacking the image {digest}: {reason}")]
    Unpack {
        /// The digest.
        digest: String,
        /// What went wrong.
        reason: String,
    },
    /// The base layer of bundles could not be built from the host's busybox.
    #[error("building the bundles' base layer from {busybox}: {reason}")]
    Base {
        /// The busybox executable.
        busybox: String,
        /// What went wrong.
        reason: String,
    },
}

/// How instances run on this node, which decides how images are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Layers stacked by each sandbox (as root).
    Stacked,
    /// One directory per image holding its whole root filesystem, a rootless sandbox's read-only root (a
    /// bundle's includes the base layer).
    Rooted,
    /// One directory per image, run from by host processes (loopback mode).
    Flat,
}

/// How to run an image, from its config (or a bundle's manifest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunConfig {
    /// Program and leading arguments.
    pub entrypoint: Vec<String>,
    /// Default arguments, replaced by an instance's own.
    pub cmd: Vec<String>,
    /// `KEY=value` entries.
    pub env: Vec<String>,
    /// Working directory inside.
    pub cwd: String,
    /// User to run as inside (empty: root of the sandbox).
    pub user: String,
}

/// An image ready to run.
#[derive(Debug)]
pub struct Prepared {
    /// Stacked: the layer directories, bottom first. Flat: the one root directory.
    pub layers: Vec<PathBuf>,
    /// How to run it.
    pub run: RunConfig,
}

/// What an instance runs: its image's settings with the instance's own applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// `KEY=value` entries, one per key.
    pub env: Vec<String>,
}

impl RunConfig {
    /// The command line and environment of an instance: the entrypoint, then the instance's arguments if it has
    /// any, else the image's cmd (as Docker and Kubernetes combine them); the image's environment, the
    /// instance's over it, and the platform's variables over both.
    pub fn launch(&self, a: &Assignment) -> Result<Launch, String> {
        let args = if a.args.is_empty() { &self.cmd } else { &a.args };
        let argv: Vec<String> = self.entrypoint.iter().chain(args).cloned().collect();
        if argv.is_empty() {
            return Err("the image names no program to run (no Entrypoint or Cmd) and the instance no args".into());
        }
        let mut env: BTreeMap<String, String> =
            self.env.iter().filter_map(|e| e.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned()))).collect();
        env.extend(a.env.clone());
        // The instance's port: the image's, unless it was created with another (the store decided which).
        env.insert("PORT".into(), a.port.to_string());
        env.insert("PRIVATE_IP".into(), a.private_ip.to_string());
        env.insert("INSTANCE".into(), a.name.clone());
        env.insert("SERVICE".into(), a.service.clone().unwrap_or_default());
        Ok(Launch { argv, env: env.into_iter().map(|(k, v)| format!("{k}={v}")).collect() })
    }
}

/// Where a bundle's files are inside its sandbox, and its working directory.
pub const APP_DIR: &str = "/app";

/// The account bundles run as: `nobody` of the base layer, to whom the bundle's files are read-only.
const BUNDLE_USER: &str = "65534:65534";

/// PATH of bundles: the base layer's busybox applets.
const BUNDLE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Where layers are unpacked, under the state directory.
const LAYERS: &str = "layers";
/// Where images are flattened (loopback mode), under the state directory.
const ROOTS: &str = "roots";

/// Removes what unpacking processes that are gone left half done under `state_dir` (their temporary
/// directories); those of live processes (another agent sharing the directory) stay.
pub fn remove_leftovers(state_dir: &Path) {
    for dir in [LAYERS, ROOTS] {
        let Ok(entries) = std::fs::read_dir(state_dir.join(dir)) else { continue };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name.strip_prefix(".tmp-").and_then(|r| r.split('-').next()) else { continue };
            if !Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// The node's prepared images.
#[derive(Debug)]
pub struct ImageCache {
    state_dir: PathBuf,
    layout: Layout,
    busybox: PathBuf,
    prepared: std::sync::Mutex<HashMap<String, Arc<Prepared>>>,
    // One preparation at a time: two instances of a new image unpack it once.
    lock: Mutex<()>,
}

impl ImageCache {
    /// Images under `state_dir`, laid out for `layout`; bundles' base is built from `busybox`.
    pub fn new(state_dir: PathBuf, layout: Layout, busybox: PathBuf) -> Self {
        Self { state_dir, layout, busybox, prepared: Default::default(), lock: Mutex::new(()) }
    }

    fn layers_dir(&self) -> PathBuf {
        self.state_dir.join(LAYERS)
    }

    fn roots_dir(&self) -> PathBuf {
        self.state_dir.join(ROOTS)
    }

    /// The image of `digest` (a bundle's or an OCI manifest's), fetched and unpacked when missing.
    pub async fn prepare(&self, store: &Store, digest: &str) -> Result<Arc<Prepared>, ImageError> {
        if let Some(p) = self.cached(digest) {
            return Ok(p);
        }
        let _guard = self.lock.lock().await;
        if let Some(p) = self.cached(digest) {
            return Ok(p);
        }
        let top = fetch(store, digest).await?;
        let prepared = if top.starts_with(&[0x1f, 0x8b]) {
            self.prepare_bundle(digest, top).await?
        } else {
            self.prepare_oci(store, digest, &top).await?
        };
        let prepared = Arc::new(prepared);
        self.prepared.lock().expect("image cache lock").insert(digest.to_owned(), prepared.clone());
        Ok(prepared)
    }

    fn cached(&self, digest: &str) -> Option<Arc<Prepared>> {
        self.prepared.lock().expect("image cache lock").get(digest).cloned()
    }

    async fn prepare_bundle(&self, digest: &str, bytes: Vec<u8>) -> Result<Prepared, ImageError> {
        let unpack_error = |reason: String| ImageError::Unpack { digest: digest.into(), reason };
        let hex = Digest::parse(digest).map_err(|e| unpack_error(e.to_string()))?.hex().to_owned();
        let target = self.layers_dir().join(format!("bundle-{hex}"));
        if !target.is_dir() {
            let (dir, target) = (self.layers_dir(), target.clone());
            blocking(move || {
                let tmp = temporary(&dir)?;
                let unpacked = unpack_bundle(&bytes, &tmp);
                publish(&tmp, &target, unpacked)
            })
            .await
            .map_err(unpack_error)?;
        }
        let app = target.join(APP_DIR.trim_start_matches('/'));
        let text = std::fs::read_to_string(app.join("manifest.json")).map_err(|e| unpack_error(e.to_string()))?;
        let manifest: ImageManifest = serde_json::from_str(&text).map_err(|e| unpack_error(e.to_string()))?;
        let mut entrypoint = manifest.command.clone();
        if let Some(program) = entrypoint.first_mut() {
            *program = bundle_program(program, &app);
        }
        let run = RunConfig {
            entrypoint,
            cmd: Vec::new(),
            env: vec![format!("PATH={BUNDLE_PATH}"), "HOME=/tmp".into()],
            cwd: APP_DIR.into(),
            user: BUNDLE_USER.into(),
        };
        let layers = match self.layout {
            Layout::Stacked => vec![self.base_layer().await?, target],
            Layout::Rooted => vec![self.rooted_bundle(&hex, &target).await?],
            Layout::Flat => vec![target],
        };
        Ok(Prepared { layers, run })
    }

    async fn prepare_oci(&self, store: &Store, digest: &str, top: &[u8]) -> Result<Prepared, ImageError> {
        let unpack_error = |reason: String| ImageError::Unpack { digest: digest.into(), reason };
        let manifest: Manifest = serde_json::from_slice(top)
            .map_err(|e| unpack_error(format!("neither a bundle nor an OCI image manifest ({e})")))?;
        let config_digest = Digest::parse(&manifest.config.digest).map_err(|e| unpack_error(e.to_string()))?;
        let config_bytes = fetch(store, config_digest.as_str()).await?;
        let config_file: ConfigFile =
            serde_json::from_slice(&config_bytes).map_err(|e| unpack_error(format!("its config: {e}")))?;
        let config =
            ImageConfig::from_config(&config_file, &TargetPlatform::host()).map_err(|e| unpack_error(e.to_string()))?;
        if config_file.rootfs.diff_ids.len() != manifest.layers.len() {
            return Err(unpack_error(format!(
                "the manifest has {} layers and the config {} diff_ids",
                manifest.layers.len(),
                config_file.rootfs.diff_ids.len()
            )));
        }
        let mut layers = Vec::new();
        for (descriptor, diff_id) in manifest.layers.iter().zip(&config_file.rootfs.diff_ids) {
            let blob = Digest::parse(&descriptor.digest).map_err(|e| unpack_error(e.to_string()))?;
            let diff_id = Digest::parse(diff_id).map_err(|e| unpack_error(e.to_string()))?;
            layers.push((blob, diff_id));
        }
        let run = RunConfig {
            entrypoint: config.entrypoint.clone(),
            cmd: config.cmd.clone(),
            env: config.env.clone(),
            cwd: config.working_dir.clone(),
            user: config.user.clone(),
        };
        // Bounds the node's work even for an image stored before the API checked it.
        let mut budget = Budget::new(cloud_oci::Limits::default());
        let dirs = match self.layout {
            Layout::Stacked => {
                let mut dirs = Vec::new();
                for (blob, diff_id) in layers {
                    let target = self.layers_dir().join(diff_id.hex());
                    if !target.is_dir() {
                        let bytes = fetch(store, blob.as_str()).await?;
                        let dir = self.layers_dir();
                        let (target, mut b) = (target.clone(), budget);
                        budget = blocking(move || {
                            let tmp = temporary(&dir)?;
                            let unpacked = apply(&bytes, &tmp, &diff_id, &mut b, cloud_oci::layer::unpack);
                            publish(&tmp, &target, unpacked).map(|()| b)
                        })
                        .await
                        .map_err(unpack_error)?;
                    }
                    dirs.push(target);
                }
                dirs
            }
            Layout::Flat | Layout::Rooted => {
                let target =
                    self.roots_dir().join(Digest::parse(digest).map_err(|e| unpack_error(e.to_string()))?.hex());
                if !target.is_dir() {
                    let tmp = blocking({
                        let dir = self.roots_dir();
                        move || temporary(&dir)
                    })
                    .await
                    .map_err(unpack_error)?;
                    let mut result = Ok(());
                    for (blob, diff_id) in layers {
                        let bytes = match fetch(store, blob.as_str()).await {
                            Ok(b) => b,
                            Err(e) => {
                                let _ = std::fs::remove_dir_all(&tmp);
                                return Err(e);
                            }
                        };
                        let (root, mut b) = (tmp.clone(), budget);
                        let applied = blocking(move || {
                            apply(&bytes, &root, &diff_id, &mut b, cloud_oci::layer::flatten).map(|()| b)
                        })
                        .await;
                        match applied {
                            Ok(b) => budget = b,
                            Err(e) => {
                                result = Err(e);
                                break;
                            }
                        }
                    }
                    let target2 = target.clone();
                    blocking(move || publish(&tmp, &target2, result)).await.map_err(unpack_error)?;
                }
                vec![target]
            }
        };
        Ok(Prepared { layers: dirs, run })
    }

    /// The base layer of bundles, built from the host's busybox the first time.
    /// A bundle's whole root for a rootless sandbox: the base layer applied without root, then the bundle's
    /// unpacked files (`bundle`, as for the other layouts) copied under `/app`.
    async fn rooted_bundle(&self, hex: &str, bundle: &Path) -> Result<PathBuf, ImageError> {
        let (busybox, dir, bundle) = (self.busybox.clone(), self.roots_dir(), bundle.to_owned());
        let target = dir.join(format!("bundle-{hex}"));
        if target.is_dir() {
            return Ok(target);
        }
        let target2 = target.clone();
        blocking(move || {
            let binary = std::fs::read(&busybox).map_err(|e| e.to_string())?;
            if !is_static(&binary) {
                return Err("it is not a static executable (install busybox-static)".into());
            }
            let tar = base_layer_tar(&busybox, &binary)?;
            let tmp = temporary(&dir)?;
            let built = cloud_oci::layer::flatten(&tar, &tmp, &mut Budget::new(cloud_oci::Limits::default()))
                .map_err(|e| cloud_domain::error_chain(&e))
                .and_then(|_| {
                    copy_tree(&bundle.join(APP_DIR.trim_start_matches('/')), &tmp.join(APP_DIR.trim_start_matches('/')))
                });
            publish(&tmp, &target2, built)
        })
        .await
        .map_err(|reason| ImageError::Base { busybox: self.busybox.display().to_string(), reason })?;
        Ok(target)
    }

    async fn base_layer(&self) -> Result<PathBuf, ImageError> {
        let busybox = self.busybox.clone();
        let dir = self.layers_dir();
        blocking(move || {
            let binary = std::fs::read(&busybox).map_err(|e| e.to_string())?;
            if !is_static(&binary) {
                return Err("it is not a static executable (install busybox-static)".into());
            }
            let target = dir.join(format!("busybox-{}", &Digest::of(&binary).hex()[..16]));
            if target.is_dir() {
                return Ok(target);
            }
            let tar = base_layer_tar(&busybox, &binary)?;
            let tmp = temporary(&dir)?;
            let unpacked = cloud_oci::layer::unpack(&tar, &tmp, &mut Budget::new(cloud_oci::Limits::default()))
                .map(drop)
                .map_err(|e| cloud_domain::error_chain(&e));
            publish(&tmp, &target, unpacked)?;
            Ok(target)
        })
        .await
        .map_err(|reason| ImageError::Base { busybox: self.busybox.display().to_string(), reason })
    }
}

async fn fetch(store: &Store, digest: &str) -> Result<Vec<u8>, ImageError> {
    let bytes =
        store.image_bundle(digest).await.map_err(|source| ImageError::Fetch { digest: digest.into(), source })?;
    let actual = Digest::of(&bytes);
    if actual.as_str() != digest {
        return Err(ImageError::Integrity { digest: digest.into(), actual: actual.to_string() });
    }
    Ok(bytes)
}

/// Copies a directory tree of regular files, directories and symbolic links (never followed), keeping modes.
fn copy_tree(from: &Path, to: &Path) -> Result<(), String> {
    let err = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
    let meta = std::fs::symlink_metadata(from).map_err(|e| err(from, e))?;
    if meta.file_type().is_symlink() {
        let target = std::fs::read_link(from).map_err(|e| err(from, e))?;
        return std::os::unix::fs::symlink(target, to).map_err(|e| err(to, e));
    }
    if meta.is_dir() {
        std::fs::create_dir_all(to).map_err(|e| err(to, e))?;
        for entry in std::fs::read_dir(from).map_err(|e| err(from, e))? {
            let entry = entry.map_err(|e| err(from, e))?;
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
    } else {
        std::fs::copy(from, to).map_err(|e| err(from, e))?;
    }
    std::fs::set_permissions(to, meta.permissions()).map_err(|e| err(to, e))
}

/// Runs blocking file work off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, String> + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(f).await.map_err(|e| e.to_string())?
}

/// A new temporary directory in `dir`, named after this process so that leftovers of dead ones can be told
/// apart ([`remove_leftovers`]).
fn temporary(dir: &Path) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    // Tenants' files: for the agent alone (sandboxes reach their layers through their own mounts).
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let tmp = dir.join(format!(".tmp-{}-{}", std::process::id(), uuid::Uuid::new_v4().simple()));
    std::fs::create_dir(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    Ok(tmp)
}

/// Renames a complete temporary directory into place, or removes it when it is not complete or another agent
/// put the same content there first.
fn publish(tmp: &Path, target: &Path, complete: Result<(), String>) -> Result<(), String> {
    if let Err(e) = complete {
        let _ = std::fs::remove_dir_all(tmp);
        return Err(e);
    }
    match std::fs::rename(tmp, target) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = std::fs::remove_dir_all(tmp);
            if target.is_dir() { Ok(()) } else { Err(format!("{}: {e}", target.display())) }
        }
    }
}

type LayerWriter = fn(&[u8], &Path, &mut Budget) -> Result<cloud_oci::layer::LayerStats, cloud_oci::OciError>;

/// Writes a layer blob with `write` and checks it against the diff_id the image's config names.
fn apply(bytes: &[u8], dest: &Path, diff_id: &Digest, budget: &mut Budget, write: LayerWriter) -> Result<(), String> {
    let stats = write(bytes, dest, budget).map_err(|e| cloud_domain::error_chain(&e))?;
    if &stats.diff_id != diff_id {
        return Err(format!("a layer does not match its diff_id {diff_id} (its content has {})", stats.diff_id));
    }
    Ok(())
}

/// A bundle's program inside its sandbox: a path with a `/` is relative to the bundle (`./server`), as is a
/// bare name the bundle holds (`server.sh`); any other bare name (`sh`) is looked up in PATH.
fn bundle_program(program: &str, app: &Path) -> String {
    if program.starts_with('/') {
        return program.to_owned();
    }
    let relative = program.trim_start_matches("./");
    if program.contains('/') || std::fs::symlink_metadata(app.join(relative)).is_ok_and(|m| m.is_file()) {
        return format!("{APP_DIR}/{relative}");
    }
    program.to_owned()
}

/// Whether an ELF executable needs no loader (has no PT_INTERP program header).
fn is_static(elf: &[u8]) -> bool {
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u64_at = |o: usize| elf.get(o..o + 8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize);
    // 64-bit little-endian ELF only: what the node's own architecture runs.
    if elf.get(..6) != Some(b"\x7fELF\x02\x01") {
        return false;
    }
    let (Some(phoff), Some(size), Some(count)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else { return false };
    (0..count).all(|i| {
        let at = phoff + i * size;
        elf.get(at..at + 4).is_some_and(|t| u32::from_le_bytes(t.try_into().expect("4 bytes")) != 3)
    })
}

/// The bundles' base: `/bin/busybox` and a link to it for each of its applets where busybox installs them,
/// `/etc/passwd` and `/etc/group` with root and nobody, a world-writable sticky `/tmp`.
fn base_layer_tar(busybox: &Path, binary: &[u8]) -> Result<Vec<u8>, String> {
    let out =
        std::process::Command::new(busybox).arg("--list-full").output().map_err(|e| format!("running it: {e}"))?;
    if !out.status.success() {
        return Err("`--list-full` failed: not busybox?".into());
    }
    let mut layer = cloud_oci::build::LayerBuilder::new();
    for dir in ["bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "root"] {
        layer = layer.dir(dir, if dir == "root" { 0o700 } else { 0o755 });
    }
    layer = layer
        .dir("tmp", 0o1777)
        .file("bin/busybox", 0o755, binary)
        .file(
            "etc/passwd",
            0o644,
            b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        )
        .file("etc/group", 0o644, b"root:x:0:\nnobody:x:65534:\nnogroup:x:65534:\n");
    let applets = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut seen = std::collections::HashSet::new();
    for path in applets.lines().map(str::trim) {
        let known = ["bin/", "sbin/", "usr/bin/", "usr/sbin/"].iter().any(|d| path.starts_with(d));
        // Applets elsewhere (`linuxrc`) or with odd names are of no use to a server.
        if !known || path == "bin/busybox" || path.contains("..") || !seen.insert(path.to_owned()) {
            continue;
        }
        layer = layer.symlink(path, "/bin/busybox");
    }
    Ok(layer.into_tar())
}

/// Unpacks a bundle into `dir/app`, never carrying privilege: files owned by the agent, no setuid, setgid or
/// sticky bit, no write bit for group or others, no extended attributes (`security.capability` would be file
/// capabilities), no device nodes or FIFOs.
///
/// The files stay owned by the agent (root, which is also root inside every sandbox) rather than by the account
/// instances run as: one unpacked bundle serves every instance of its digest, whatever their tenant (two tenants
/// may upload the same bundle). Not writable by others, the files can be read and run but not changed by any
/// instance (a sandbox's writes go to its own writable layer).
pub fn unpack_bundle(bytes: &[u8], dir: &Path) -> Result<(), String> {
    let app = dir.join(APP_DIR.trim_start_matches('/'));
    std::fs::create_dir(&app).map_err(|e| e.to_string())?;
    unpack_entries(bytes, &app)?;
    without_privilege(dir)
}

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
    let app = dir.join(APP_DIR.trim_start_matches('/'));
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
        // The layer's root and the bundle's are the way to instances' working directory: searchable by them.
        let wanted = if path == dir || path == app { 0o755 } else { mode & 0o755 };
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

#[cfg(test)]
mod tests {
    use super::*;
    use cloud_domain::state::{DesiredState, InstanceState, RestartPolicy};

    fn assignment(args: &[&str], env: &[(&str, &str)]) -> Assignment {
        Assignment {
            id: uuid::Uuid::nil(),
            tenant_id: uuid::Uuid::nil(),
            network: "10.0.0.0/24".parse().unwrap(),
            name: "web-1".into(),
            service: Some("web".into()),
            image_digest: String::new(),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            memory_mb: 128,
            port: 8080,
            restart_policy: RestartPolicy::Never,
            desired: DesiredState::Running,
            state: InstanceState::Pending,
            private_ip: "10.0.0.5".parse().unwrap(),
            restart_count: 0,
        }
    }

    fn run() -> RunConfig {
        RunConfig {
            entrypoint: vec!["/srv".into()],
            cmd: vec!["--default".into()],
            env: vec!["PATH=/bin".into(), "MODE=image".into(), "PORT=1".into(), "broken".into()],
            cwd: "/".into(),
            user: String::new(),
        }
    }

    #[test]
    fn instance_args_replace_cmd_and_its_env_overrides_the_images() {
        let l = run().launch(&assignment(&[], &[])).unwrap();
        assert_eq!(l.argv, ["/srv", "--default"]);
        let l = run().launch(&assignment(&["-v", "x"], &[("MODE", "mine"), ("PORT", "2")])).unwrap();
        assert_eq!(l.argv, ["/srv", "-v", "x"], "args replace cmd, as Docker does");
        assert_eq!(
            l.env,
            ["INSTANCE=web-1", "MODE=mine", "PATH=/bin", "PORT=8080", "PRIVATE_IP=10.0.0.5", "SERVICE=web"],
            "the instance's over the image's, the platform's over both"
        );
        let empty = RunConfig { entrypoint: vec![], cmd: vec![], ..run() };
        assert!(empty.launch(&assignment(&[], &[])).unwrap_err().contains("no program"));
        assert_eq!(empty.launch(&assignment(&["sh"], &[])).unwrap().argv, ["sh"]);
    }

    #[test]
    fn bundle_programs_resolve_in_the_bundle_or_on_path() {
        let app = tempfile::tempdir().unwrap();
        std::fs::write(app.path().join("server.sh"), "").unwrap();
        assert_eq!(bundle_program("./server", app.path()), "/app/server");
        assert_eq!(bundle_program("bin/server", app.path()), "/app/bin/server");
        assert_eq!(bundle_program("server.sh", app.path()), "/app/server.sh", "a file of the bundle");
        assert_eq!(bundle_program("sh", app.path()), "sh", "looked up in PATH");
        assert_eq!(bundle_program("/bin/sh", app.path()), "/bin/sh");
    }

    #[test]
    fn only_executables_without_a_loader_count_as_static() {
        let busybox = std::fs::read("/bin/busybox");
        if let Ok(b) = busybox {
            assert!(is_static(&b), "Debian's busybox-static");
        }
        assert!(!is_static(&std::fs::read("/bin/sh").unwrap()), "a dynamically linked program");
        assert!(!is_static(b"#!/bin/sh\n"));
    }
}
