//! Layers as hostile images write them, unpacked for real (as root, as node agents run).

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

use cloud_oci::build::LayerBuilder;
use cloud_oci::layer::{self, Budget};
use cloud_oci::{Digest, Limits, OciError};

fn is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

fn header(kind: tar::EntryType, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h
}

fn unpack(tar: &[u8]) -> (tempfile::TempDir, Result<layer::LayerStats, OciError>) {
    let dir = tempfile::tempdir().unwrap();
    let r = layer::unpack(tar, dir.path(), &mut Budget::new(Limits::default()));
    (dir, r)
}

#[test]
fn privilege_never_survives_unpacking() {
    if !is_root() {
        eprintln!("skipped: unpacking layers needs root");
        return;
    }
    let mut dev = header(tar::EntryType::Char, 0o666);
    dev.set_device_major(1).unwrap();
    dev.set_device_minor(1).unwrap();
    let tar = LayerBuilder::new()
        .dir("bin", 0o755)
        .file("bin/suid", 0o4755, b"#!/bin/sh\n")
        .file("bin/sgid", 0o2755, b"#!/bin/sh\n")
        .file_owned("bin/user", 0o640, (1000, 1001), b"x")
        .file_owned("bin/high", 0o644, (200_000, 300_000), b"x")
        .dir("tmp", 0o1777)
        .raw(dev, b"dev/mem", b"")
        .into_tar();
    let (dir, stats) = unpack(&tar);
    let stats = stats.unwrap();
    let mode = |p: &str| std::fs::symlink_metadata(dir.path().join(p)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode("bin/suid"), 0o755, "setuid dropped");
    assert_eq!(mode("bin/sgid"), 0o755, "setgid dropped");
    assert_eq!(mode("tmp"), 0o1777, "a sticky directory stays sticky");
    assert!(!dir.path().join("dev/mem").exists(), "no device node is created");
    assert_eq!(stats.neutralised, 3);
    let owner = |p: &str| {
        let m = std::fs::symlink_metadata(dir.path().join(p)).unwrap();
        (m.uid(), m.gid())
    };
    assert_eq!(owner("bin/user"), (1000, 1001), "ids as the image says, shifted later by the sandbox's mapping");
    assert_eq!(owner("bin/high"), (65534, 65534), "ids a sandbox cannot map become the overflow id");
    assert_eq!(owner("bin/suid"), (0, 0));
    assert_eq!(stats.diff_id, Digest::of(&tar));
}

#[test]
fn whiteouts_hide_lower_layers_in_an_overlay_mount() {
    if !is_root() {
        eprintln!("skipped: unpacking layers needs root");
        return;
    }
    let base = LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/passwd", 0o644, b"root:x:0:0")
        .file("etc/hosts", 0o644, b"127.0.0.1")
        .dir("var/cache", 0o755)
        .file("var/cache/old", 0o644, b"o")
        .into_tar();
    let top = LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/.wh.passwd", 0o644, b"")
        .dir("var/cache", 0o755)
        .file("var/cache/.wh..wh..opq", 0o644, b"")
        .file("var/cache/new", 0o644, b"n")
        .into_tar();
    let (lower, r) = unpack(&base);
    r.unwrap();
    let (upper, r) = unpack(&top);
    r.unwrap();
    let wh = std::fs::symlink_metadata(upper.path().join("etc/passwd")).unwrap();
    assert!(wh.file_type().is_char_device() && wh.rdev() == 0, "a 0/0 character device");
    assert!(!upper.path().join("etc/.wh.passwd").exists());
    assert!(!upper.path().join("var/cache/.wh..wh..opq").exists());

    // Stacked as a sandbox stacks them: the top layer first.
    let merged = tempfile::tempdir().unwrap();
    let opts = format!("lowerdir={}:{}", upper.path().display(), lower.path().display());
    let status = std::process::Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &opts])
        .arg(merged.path())
        .status()
        .unwrap();
    assert!(status.success(), "mount overlay");
    let seen = |p: &str| merged.path().join(p).exists();
    let view = (seen("etc/passwd"), seen("etc/hosts"), seen("var/cache/old"), seen("var/cache/new"));
    std::process::Command::new("umount").arg(merged.path()).status().unwrap();
    assert_eq!(view, (false, true, false, true), "(passwd, hosts, old, new) as the image's last layer says");
}

#[test]
fn paths_that_climb_out_or_write_through_links_are_refused() {
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("victim");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("dot-dot", LayerBuilder::new().raw(header(tar::EntryType::Regular, 0o644), b"../../victim", b"x").into_tar()),
        (
            "through a symlink",
            LayerBuilder::new()
                .symlink("escape", outside.path().to_str().unwrap())
                .file("escape/victim", 0o644, b"x")
                .into_tar(),
        ),
        ("hard link to the host", {
            let mut h = header(tar::EntryType::Link, 0o644);
            h.set_link_name("etc/shadow").unwrap();
            LayerBuilder::new().raw(h, b"shadow", b"").into_tar()
        }),
    ];
    for (what, tar) in cases {
        // Inspecting refuses as unpacking does, without root.
        let e = layer::inspect(&tar, &mut Budget::new(Limits::default()));
        if what != "through a symlink" {
            assert!(matches!(e, Err(OciError::Unsafe { .. })), "{what}: {e:?}");
        }
        if is_root() || what != "through a symlink" {
            let (_dir, r) = unpack(&tar);
            assert!(matches!(r, Err(OciError::Unsafe { .. })), "{what}: {r:?}");
        }
        assert!(!victim.exists(), "{what}: wrote outside");
    }
}

#[test]
fn limits_bound_bytes_and_entries_across_layers() {
    let big = LayerBuilder::new().file("a", 0o644, &[7; 4096]).file("b", 0o644, &[7; 4096]).into_tar();
    let limits = Limits { max_unpacked_bytes: 6000, ..Limits::default() };
    let e = layer::inspect(&big, &mut Budget::new(limits)).unwrap_err();
    assert!(matches!(e, OciError::TooLarge { .. }), "{e}");
    let limits = Limits { max_entries: 3, ..Limits::default() };
    let mut budget = Budget::new(limits);
    layer::inspect(&big, &mut budget).unwrap();
    let e = layer::inspect(&big, &mut budget).unwrap_err();
    assert!(e.to_string().contains("number of files"), "{e}");
}

#[test]
fn truncated_and_garbage_layers_are_corrupt_not_panics() {
    let tar = LayerBuilder::new().file("a", 0o644, &[1; 10_000]).into_tar();
    for bad in
        [&tar[..700], &[0x1f, 0x8b, 1, 2, 3][..], &[0x28, 0xb5, 0x2f, 0xfd, 9][..], b"not a tar at all".as_slice()]
    {
        let e = layer::inspect(bad, &mut Budget::new(Limits::default()));
        assert!(matches!(e, Err(OciError::Corrupt { .. })), "{e:?}");
    }
}

/// Without root (a node in loopback mode), layers are applied one onto the other in one directory: the same
/// view as the overlay stack, and links from lower layers are replaced, never followed.
#[test]
fn flattened_layers_give_the_overlays_view_without_following_links() {
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("victim"), "keep").unwrap();
    std::fs::create_dir(outside.path().join("dir")).unwrap();
    std::fs::write(outside.path().join("dir/inner"), "keep").unwrap();
    let base = LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/passwd", 0o644, b"root:x:0:0")
        .file("etc/hosts", 0o644, b"127.0.0.1")
        .dir("var/cache", 0o555)
        .file("var/cache/old", 0o644, b"o")
        .dir("var/cache/sub", 0o755)
        .file("var/cache/sub/old", 0o644, b"o")
        .symlink("out", outside.path().to_str().unwrap())
        .symlink("opq", outside.path().join("dir").to_str().unwrap())
        .into_tar();
    let top = LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/.wh.passwd", 0o644, b"")
        .file("var/cache/sub/kept", 0o644, b"k")
        .file("var/cache/.wh..wh..opq", 0o644, b"")
        .file("var/cache/new", 0o644, b"n")
        .file("out/.wh.victim", 0o644, b"")
        .file("out/file", 0o644, b"f")
        .file("opq/.wh..wh..opq", 0o644, b"")
        .into_tar();
    let root = tempfile::tempdir().unwrap();
    let mut budget = Budget::new(Limits::default());
    assert_eq!(layer::flatten(&base, root.path(), &mut budget).unwrap().diff_id, Digest::of(&base));
    assert_eq!(layer::flatten(&top, root.path(), &mut budget).unwrap().diff_id, Digest::of(&top));
    let seen = |p: &str| root.path().join(p).exists();
    assert_eq!(
        (seen("etc/passwd"), seen("etc/hosts"), seen("var/cache/old"), seen("var/cache/new")),
        (false, true, false, true),
        "(passwd, hosts, old, new) as the image's last layer says"
    );
    assert!(seen("var/cache/sub/kept") && !seen("var/cache/sub/old"), "opaque hides below, keeps its own layer's");
    assert!(std::fs::symlink_metadata(root.path().join("out")).unwrap().is_dir(), "the link became a directory");
    assert_eq!(std::fs::read_to_string(outside.path().join("victim")).unwrap(), "keep");
    assert_eq!(std::fs::read_to_string(outside.path().join("dir/inner")).unwrap(), "keep");
    assert!(!outside.path().join("file").exists(), "nothing written through the link");
}
