//! Layers: a tar stream (plain, gzip or zstd) checked entry by entry, and optionally written out as one
//! directory of an overlay stack.
//!
//! The same walk serves the API, which checks a layer before storing it ([`inspect`]), and the node agent, which
//! unpacks it ([`unpack`]): limits, path rules and the diff_id are computed once, in one place. Unpacked
//! directories use overlayfs' own formats: a whiteout (`.wh.NAME`) becomes a 0/0 character device and an opaque
//! directory (`.wh..wh..opq`) gets the `trusted.overlay.opaque` attribute, so that the layer directories stack
//! as lower layers without a flattening copy. Ownership is written as the image says (ids are the sandbox's,
//! shifted by an idmapped mount when a sandbox mounts the layer); setuid and setgid bits are dropped and device
//! nodes are skipped, so nothing in an image can carry privilege.

use std::collections::HashSet;
use std::io::{self, Read};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::{Compression, Digest, Limits, OciError};

/// Ids a sandbox maps: an entry owned by a larger id is given to the overflow id instead.
const MAPPED_IDS: u64 = 65536;
/// The kernel's overflow id ("nobody").
const OVERFLOW_ID: u32 = 65534;
/// The prefix of whiteout entries.
const WHITEOUT: &str = ".wh.";
/// The entry that makes its directory opaque.
const OPAQUE: &str = ".wh..wh..opq";

/// What is left of an image's budget while its layers are walked one after another.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    bytes_left: u64,
    entries_left: u64,
    limits: Limits,
}

impl Budget {
    /// A full budget.
    pub fn new(limits: Limits) -> Self {
        Self { bytes_left: limits.max_unpacked_bytes, entries_left: limits.max_entries, limits }
    }

    fn take(&mut self, bytes: u64) -> Result<(), OciError> {
        self.entries_left = self.entries_left.checked_sub(1).ok_or_else(|| OciError::TooLarge {
            what: "the image's number of files".into(),
            limit: format!("{} entries", self.limits.max_entries),
        })?;
        self.bytes_left = self.bytes_left.checked_sub(bytes).ok_or_else(|| OciError::TooLarge {
            what: "the image unpacked".into(),
            limit: format!("{} MiB", self.limits.max_unpacked_bytes >> 20),
        })?;
        Ok(())
    }
}

/// What a walk found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerStats {
    /// The digest of the uncompressed tar.
    pub diff_id: Digest,
    /// Bytes of file content.
    pub bytes: u64,
    /// Entries, whiteouts included.
    pub entries: u64,
    /// Entries changed or skipped because they would carry privilege (setuid/setgid bits, device nodes).
    pub neutralised: u64,
}

/// Checks a layer without writing anything: compression, tar structure, paths, limits; returns its diff_id.
pub fn inspect(blob: &[u8], budget: &mut Budget) -> Result<LayerStats, OciError> {
    walk(blob, budget, None)
}

/// Writes a layer into `dest`, an empty directory; returns the same as [`inspect`]. On error `dest` holds part
/// of the layer: unpack into a temporary directory and rename it into place. Needs root (ownership, whiteout
/// devices, `trusted.` attributes).
pub fn unpack(blob: &[u8], dest: &Path, budget: &mut Budget) -> Result<LayerStats, OciError> {
    walk(blob, budget, Some(&mut Writer::new(dest, false)))
}

/// Applies a layer onto `dest`, a directory holding the layers below it already applied: one flat root
/// filesystem, for hosts that cannot stack layers (no root, so no overlay mounts, ownership or whiteout
/// devices). Whiteouts delete what they hide; files belong to whoever runs this; a parent that a lower layer
/// made a link or a file is replaced by a directory, never followed. Returns the same as [`inspect`]; on error
/// `dest` holds part of the image.
pub fn flatten(blob: &[u8], dest: &Path, budget: &mut Budget) -> Result<LayerStats, OciError> {
    walk(blob, budget, Some(&mut Writer::new(dest, true)))
}

/// A reader that hashes what passes through it.
struct Hashing<R> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

fn decompressed(blob: &[u8]) -> Result<Box<dyn Read + '_>, OciError> {
    Ok(match Compression::detect(blob) {
        Compression::None => Box::new(blob),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(blob)),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::with_buffer(blob)
                .map_err(|e| OciError::Corrupt { what: "layer (zstd)".into(), reason: e.to_string() })?,
        ),
    })
}

fn corrupt(e: impl std::fmt::Display) -> OciError {
    OciError::Corrupt { what: "layer".into(), reason: e.to_string() }
}

fn walk(blob: &[u8], budget: &mut Budget, mut out: Option<&mut Writer>) -> Result<LayerStats, OciError> {
    let reader = Hashing { inner: decompressed(blob)?, hash: Sha256::new() };
    let mut archive = tar::Archive::new(reader);
    let mut stats = LayerStats { diff_id: Digest::of(b""), bytes: 0, entries: 0, neutralised: 0 };
    // Regular files seen so far, for hard links (which may only point at a file of the same layer).
    let mut files: HashSet<PathBuf> = HashSet::new();
    for entry in archive.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let Some(path) = clean(&raw, &shown)? else { continue };
        let header = entry.header();
        let kind = header.entry_type();
        let size = if kind.is_file() { header.size().map_err(corrupt)? } else { 0 };
        budget.take(size)?;
        stats.entries += 1;
        stats.bytes += size;
        let mode = header.mode().map_err(corrupt)?;
        let owner = (id(header.uid().map_err(corrupt)?), id(header.gid().map_err(corrupt)?));
        let mtime = mtime(&entry);
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let parent = path.parent().unwrap_or(Path::new("")).to_path_buf();
        if name == OPAQUE {
            if let Some(w) = out.as_deref_mut() {
                w.opaque(&parent)?;
            }
            continue;
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT) {
            if hidden.is_empty() || hidden == "." || hidden == ".." {
                return Err(OciError::Unsafe { path: shown, reason: "a whiteout must name an entry".into() });
            }
            if let Some(w) = out.as_deref_mut() {
                w.whiteout(&parent.join(hidden))?;
            }
            continue;
        }
        if mode & 0o6000 != 0 && !kind.is_dir() {
            stats.neutralised += 1;
        }
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                if kind == tar::EntryType::GNUSparse {
                    return Err(OciError::Unsupported { what: format!("sparse file {shown:?} in a layer") });
                }
                if let Some(w) = out.as_deref_mut() {
                    w.file(&path, &mut entry, size, mode & 0o777, owner, mtime)?;
                } else {
                    io::copy(&mut entry, &mut io::sink()).map_err(corrupt)?;
                }
                files.insert(path);
            }
            tar::EntryType::Directory => {
                if let Some(w) = out.as_deref_mut() {
                    w.dir(&path, mode & 0o1777, owner, mtime)?;
                }
            }
            tar::EntryType::Symlink => {
                let target =
                    entry.link_name_bytes().ok_or_else(|| corrupt(format!("symlink {shown:?} has no target")))?;
                if let Some(w) = out.as_deref_mut() {
                    w.symlink(&path, &target, owner)?;
                }
            }
            tar::EntryType::Link => {
                let raw_target =
                    entry.link_name_bytes().ok_or_else(|| corrupt(format!("hard link {shown:?} has no target")))?;
                let target_shown = String::from_utf8_lossy(&raw_target).into_owned();
                let target = clean(&raw_target, &target_shown)?
                    .ok_or_else(|| OciError::Unsafe { path: shown.clone(), reason: "links to the root".into() })?;
                if !files.contains(&target) {
                    return Err(OciError::Unsafe {
                        path: shown,
                        reason: format!("hard link to {target_shown:?}, which is not a file earlier in this layer"),
                    });
                }
                if let Some(w) = out.as_deref_mut() {
                    w.hard_link(&path, &target)?;
                }
                files.insert(path);
            }
            tar::EntryType::Fifo => {
                if let Some(w) = out.as_deref_mut() {
                    w.fifo(&path, mode & 0o777, owner)?;
                }
            }
            // A device node would give the sandbox a door to the host's hardware; the runtime gives each sandbox
            // the standard few itself.
            tar::EntryType::Char | tar::EntryType::Block => stats.neutralised += 1,
            // Metadata entries the tar reader has already applied, and types with no meaning in a root filesystem.
            _ => {}
        }
    }
    // The diff_id covers the whole uncompressed stream, the end-of-archive blocks and any padding included.
    let mut rest = archive.into_inner();
    io::copy(&mut (&mut rest).take(1 << 20), &mut io::sink()).map_err(corrupt)?;
    stats.diff_id = Digest::from_hasher(rest.hash);
    Ok(stats)
}

/// The modification time an entry records.
fn mtime<R: Read>(entry: &tar::Entry<'_, R>) -> Option<std::time::SystemTime> {
    let secs = entry.header().mtime().ok()?;
    std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_secs(secs))
}

fn id(raw: u64) -> u32 {
    if raw < MAPPED_IDS { raw as u32 } else { OVERFLOW_ID }
}

/// A layer path made relative and checked: `None` for the layer's root itself; an error for a path that climbs
/// out (`..`). Leading `/` and `./` are dropped, as every tar producer writes one or the other.
fn clean(raw: &[u8], shown: &str) -> Result<Option<PathBuf>, OciError> {
    use std::os::unix::ffi::OsStrExt;
    let mut out = PathBuf::new();
    for c in Path::new(std::ffi::OsStr::from_bytes(raw)).components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(OciError::Unsafe { path: shown.into(), reason: "the path climbs out of the layer".into() });
            }
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// Writes entries under a directory, never through a link: every parent is checked to be a real directory, and
/// nothing else writes there while the walk runs (a fresh temporary directory).
struct Writer {
    root: PathBuf,
    /// Directories' times, applied at the end (creating their children changes them).
    dir_times: Vec<(PathBuf, std::time::SystemTime)>,
    /// Flattening (see [`flatten`]): the paths this layer wrote, with their parents, which an opaque directory
    /// keeps while it removes what lower layers put there.
    flat: Option<HashSet<PathBuf>>,
}

impl Writer {
    fn new(root: &Path, flat: bool) -> Self {
        Self { root: root.to_path_buf(), dir_times: Vec::new(), flat: flat.then(HashSet::new) }
    }

    /// Notes that this layer wrote `rel` (flattening only).
    fn wrote(&mut self, rel: &Path) {
        if let Some(written) = &mut self.flat {
            written.extend(rel.ancestors().filter(|a| !a.as_os_str().is_empty()).map(Path::to_path_buf));
        }
    }

    /// Sets the owner, unless flattening (then everything is the caller's).
    fn chown(&self, path: &Path, (uid, gid): (u32, u32)) -> Result<(), OciError> {
        if self.flat.is_some() {
            return Ok(());
        }
        std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(Self::io(path))
    }

    fn io(path: &Path) -> impl FnOnce(io::Error) -> OciError + '_ {
        move |source| OciError::Io { path: path.display().to_string(), source }
    }

    /// The full path of `rel`, with its parents created as needed and none of them a link or a file.
    fn place(&self, rel: &Path) -> Result<PathBuf, OciError> {
        let mut at = self.root.clone();
        if let Some(parent) = rel.parent() {
            for part in parent.components() {
                at.push(part);
                match std::fs::symlink_metadata(&at) {
                    Ok(m) if m.is_dir() => {}
                    // A lower layer's link or file where this layer has a directory: the directory wins, as in
                    // an overlay stack.
                    Ok(_) if self.flat.is_some() => {
                        std::fs::remove_file(&at).map_err(Self::io(&at))?;
                        std::fs::create_dir(&at).map_err(Self::io(&at))?;
                    }
                    Ok(_) => {
                        return Err(OciError::Unsafe {
                            path: rel.display().to_string(),
                            reason: format!(
                                "{} is not a directory in this layer",
                                at.strip_prefix(&self.root).unwrap_or(&at).display()
                            ),
                        });
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        std::fs::create_dir(&at).map_err(Self::io(&at))?;
                        std::fs::set_permissions(&at, std::fs::Permissions::from_mode(0o755)).map_err(Self::io(&at))?;
                    }
                    Err(e) => return Err(Self::io(&at)(e)),
                }
            }
        }
        Ok(self.root.join(rel))
    }

    /// Removes what an entry replaces (a later entry of the same path wins), keeping a directory that a
    /// directory entry replaces.
    fn clear(path: &Path, keep_dir: bool) -> Result<(), OciError> {
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() && keep_dir => Ok(()),
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(path).map_err(Self::io(path)),
            Ok(_) => std::fs::remove_file(path).map_err(Self::io(path)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Self::io(path)(e)),
        }
    }

    fn file(
        &mut self,
        rel: &Path,
        data: &mut dyn Read,
        size: u64,
        mode: u32,
        (uid, gid): (u32, u32),
        mtime: Option<std::time::SystemTime>,
    ) -> Result<(), OciError> {
        let path = self.place(rel)?;
        Self::clear(&path, false)?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(&path)
            .map_err(Self::io(&path))?;
        let written = io::copy(&mut data.take(size), &mut file).map_err(corrupt)?;
        if written != size {
            return Err(corrupt(format!("{} is truncated", rel.display())));
        }
        if self.flat.is_none() {
            std::os::unix::fs::fchown(&file, Some(uid), Some(gid)).map_err(Self::io(&path))?;
        }
        // After the chown, which would clear setuid bits anyway; `mode` has none.
        file.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(Self::io(&path))?;
        if let Some(t) = mtime {
            file.set_modified(t).map_err(Self::io(&path))?;
        }
        self.wrote(rel);
        Ok(())
    }

    fn dir(
        &mut self,
        rel: &Path,
        mode: u32,
        owner: (u32, u32),
        mtime: Option<std::time::SystemTime>,
    ) -> Result<(), OciError> {
        let path = self.place(rel)?;
        Self::clear(&path, true)?;
        match std::fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Self::io(&path)(e)),
        }
        self.chown(&path, owner)?;
        // Flattening without root, later layers must be able to write here.
        let mode = if self.flat.is_some() { mode | 0o700 } else { mode };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).map_err(Self::io(&path))?;
        self.wrote(rel);
        if let Some(t) = mtime {
            self.dir_times.push((path, t));
        }
        Ok(())
    }

    fn symlink(&mut self, rel: &Path, target: &[u8], owner: (u32, u32)) -> Result<(), OciError> {
        use std::os::unix::ffi::OsStrExt;
        let path = self.place(rel)?;
        Self::clear(&path, false)?;
        // The target is resolved inside the sandbox's root, never by us.
        std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(target), &path).map_err(Self::io(&path))?;
        self.wrote(rel);
        self.chown(&path, owner)
    }

    fn hard_link(&mut self, rel: &Path, target: &Path) -> Result<(), OciError> {
        let source = self.place(target)?;
        let path = self.place(rel)?;
        if source == path {
            return Ok(());
        }
        Self::clear(&path, false)?;
        std::fs::hard_link(&source, &path).map_err(Self::io(&path))?;
        self.wrote(rel);
        Ok(())
    }

    fn fifo(&mut self, rel: &Path, mode: u32, owner: (u32, u32)) -> Result<(), OciError> {
        let path = self.place(rel)?;
        Self::clear(&path, false)?;
        mknod(&path, libc::S_IFIFO | mode, 0).map_err(Self::io(&path))?;
        self.wrote(rel);
        self.chown(&path, owner)
    }

    /// Hides `rel` of the layers below: overlayfs' whiteout, a 0/0 character device; flattening, its removal.
    fn whiteout(&mut self, rel: &Path) -> Result<(), OciError> {
        if self.flat.is_some() {
            // Nothing to remove where a parent is missing or not a directory (never followed).
            return match self.existing(rel) {
                Some(path) => Self::clear(&path, false),
                None => Ok(()),
            };
        }
        let path = self.place(rel)?;
        Self::clear(&path, false)?;
        mknod(&path, libc::S_IFCHR, 0).map_err(Self::io(&path))
    }

    /// The full path of `rel` when every parent is a real directory.
    fn existing(&self, rel: &Path) -> Option<PathBuf> {
        let mut at = self.root.clone();
        for part in rel.parent()?.components() {
            at.push(part);
            if !std::fs::symlink_metadata(&at).is_ok_and(|m| m.is_dir()) {
                return None;
            }
        }
        Some(self.root.join(rel))
    }

    /// Flattening: removes under `rel` (a real directory) whatever this layer did not write.
    fn prune(&self, rel: &Path) -> Result<(), OciError> {
        let written = self.flat.as_ref().expect("flattening");
        let dir = self.root.join(rel);
        for entry in std::fs::read_dir(&dir).map_err(Self::io(&dir))? {
            let entry = entry.map_err(Self::io(&dir))?;
            let child = rel.join(entry.file_name());
            if !written.contains(&child) {
                Self::clear(&entry.path(), false)?;
            } else if entry.file_type().is_ok_and(|t| t.is_dir()) {
                self.prune(&child)?;
            }
        }
        Ok(())
    }

    /// Hides everything the layers below hold in directory `rel`.
    fn opaque(&mut self, rel: &Path) -> Result<(), OciError> {
        if self.flat.is_some() {
            if !rel.as_os_str().is_empty() {
                let path = self.place(rel)?;
                // A lower layer's link or file there is replaced, never followed.
                Self::clear(&path, true)?;
                match std::fs::create_dir(&path) {
                    Ok(()) => std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                        .map_err(Self::io(&path))?,
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(Self::io(&path)(e)),
                }
                self.wrote(rel);
            }
            return self.prune(rel);
        }
        let path = if rel.as_os_str().is_empty() {
            self.root.clone()
        } else {
            let p = self.place(rel)?;
            match std::fs::create_dir(&p) {
                Ok(()) => std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).map_err(Self::io(&p))?,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Self::io(&p)(e)),
            }
            p
        };
        set_xattr(&path, "trusted.overlay.opaque", b"y").map_err(Self::io(&path))
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        for (path, t) in self.dir_times.drain(..).rev() {
            if let Ok(dir) = std::fs::File::open(&path) {
                let _ = dir.set_modified(t);
            }
        }
    }
}

fn c_path(path: &Path) -> io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)
}

#[allow(unsafe_code)]
fn mknod(path: &Path, mode: u32, dev: libc::dev_t) -> io::Result<()> {
    let c = c_path(path)?;
    // SAFETY: a valid NUL-terminated path; mknod(2) reads nothing else.
    if unsafe { libc::mknod(c.as_ptr(), mode, dev) } == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

#[allow(unsafe_code)]
fn set_xattr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let c = c_path(path)?;
    let n = std::ffi::CString::new(name).map_err(io::Error::other)?;
    // SAFETY: valid NUL-terminated strings and a value slice with its length; lsetxattr(2) only reads them.
    let r = unsafe { libc::lsetxattr(c.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    if r == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}
