//! Image archives as users upload them: written by us, by skopeo (the reference tool for OCI and docker archives)
//! and by hand where an archive is broken on purpose.

use std::io::Write;
use std::path::Path;
use std::process::Command;

use bytes::Bytes;
use cloud_oci::build::{self, LayerBuilder};
use cloud_oci::{Image, ImageConfig, Limits, OciError, TargetPlatform, archive};

fn config() -> ImageConfig {
    ImageConfig {
        entrypoint: vec!["/bin/serve".into()],
        cmd: vec!["--port".into(), "8080".into()],
        env: vec!["PATH=/bin".into(), "GREETING=hi".into()],
        working_dir: "/srv".into(),
        user: "1000".into(),
        exposed_ports: vec![8080],
    }
}

fn sample() -> Image {
    let base = LayerBuilder::new().dir("bin", 0o755).file("bin/serve", 0o755, b"#!/bin/sh\necho hi\n").into_tar();
    let top = LayerBuilder::new().dir("srv", 0o755).file("srv/index.html", 0o644, b"<p>hi</p>").into_tar();
    build::image(&config(), &[base, top])
}

fn read(bytes: Vec<u8>) -> Result<Image, OciError> {
    archive::read(Bytes::from(bytes), &Limits::default(), &TargetPlatform::host())
}

fn same(a: &Image, b: &Image) {
    assert_eq!(a.config, b.config);
    assert_eq!(
        a.layers.iter().map(|l| &l.diff_id).collect::<Vec<_>>(),
        b.layers.iter().map(|l| &l.diff_id).collect::<Vec<_>>()
    );
}

#[test]
fn an_oci_archive_reads_back_verified_plain_or_gzipped() {
    let image = sample();
    let tar = build::oci_archive(&image, "v1");
    assert_eq!(archive::kind(&Bytes::from(tar.clone()), &Limits::default()), archive::ArchiveKind::OciLayout);
    let back = read(tar.clone()).unwrap();
    assert_eq!(back.digest, image.digest);
    same(&back, &image);
    assert_eq!(back.config.argv(), ["/bin/serve", "--port", "8080"]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    assert_eq!(read(gz.finish().unwrap()).unwrap().digest, image.digest);
}

/// The archive without one of its files.
fn without(tar: &[u8], path: &str) -> Vec<u8> {
    let mut out = tar::Builder::new(Vec::new());
    let mut archive = tar::Archive::new(tar);
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        if entry.path().unwrap().to_str() != Some(path) {
            let mut h = entry.header().clone();
            let p = entry.path().unwrap().into_owned();
            out.append_data(&mut h, p, &mut entry).unwrap();
        }
    }
    out.into_inner().unwrap()
}

#[test]
fn broken_archives_are_refused_with_what_is_wrong() {
    let image = sample();
    let tar = build::oci_archive(&image, "v1");
    // A layer blob altered: its digest no longer matches.
    let layer = &image.layer_blobs[1].data;
    let at = tar.windows(layer.len()).position(|w| w == &layer[..]).expect("the layer is in the archive");
    let mut altered = tar.clone();
    altered[at + 20] ^= 0xff;
    let e = read(altered).unwrap_err();
    assert!(matches!(&e, OciError::DigestMismatch { what, .. } if what == "layer 2"), "{e}");
    // Truncated in the middle of the blobs.
    let e = read(tar[..tar.len() / 2].to_vec()).unwrap_err();
    assert!(matches!(e, OciError::Corrupt { .. } | OciError::Missing { .. }), "{e}");
    // Not an archive at all, and a tar of something else.
    assert!(matches!(read(b"hello".to_vec()), Err(OciError::Corrupt { .. })));
    let other = LayerBuilder::new().file("manifest.json", 0o644, br#"{"command":["x"],"port":1}"#).into_tar();
    assert_eq!(archive::kind(&Bytes::from(other.clone()), &Limits::default()), archive::ArchiveKind::Other);
    assert!(matches!(read(other), Err(OciError::Corrupt { .. })));
    // The config blob missing.
    let e = read(without(&tar, &format!("blobs/sha256/{}", image.config_blob.digest.hex()))).unwrap_err();
    assert!(matches!(&e, OciError::Missing { what } if what.contains("config")), "{e}");
    // Over the size limit.
    let small = Limits { max_stored_bytes: 100, ..Limits::default() };
    let e = archive::read(Bytes::from(tar), &small, &TargetPlatform::host()).unwrap_err();
    assert!(matches!(e, OciError::TooLarge { .. }), "{e}");
}

#[test]
fn an_image_for_another_architecture_is_refused() {
    let image = sample();
    let tar = build::oci_archive(&image, "v1");
    let other = TargetPlatform { os: "linux".into(), architecture: "riscv64".into() };
    let e = archive::read(Bytes::from(tar), &Limits::default(), &other).unwrap_err();
    assert!(matches!(&e, OciError::Platform { found, .. } if found.starts_with("linux/")), "{e}");
}

fn skopeo(args: &[&str]) {
    let out = Command::new("skopeo").args(args).output().expect("skopeo is installed by scripts/setup");
    assert!(out.status.success(), "skopeo {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn copy_with_skopeo(image: &Image, dir: &Path, dest: &str) -> Vec<u8> {
    let src = dir.join("ours.tar");
    std::fs::write(&src, build::oci_archive(image, "v1")).unwrap();
    let out = dir.join(format!("{dest}.tar"));
    skopeo(&[
        "copy",
        &format!("oci-archive:{}", src.display()),
        &format!("{dest}:{}{}", out.display(), if dest == "docker-archive" { ":hello:v1" } else { "" }),
    ]);
    std::fs::read(out).unwrap()
}

#[test]
fn archives_written_by_skopeo_read_as_the_same_image() {
    let dir = tempfile::tempdir().unwrap();
    let image = sample();
    let oci = copy_with_skopeo(&image, dir.path(), "oci-archive");
    let back = read(oci).unwrap();
    same(&back, &image);
    let docker = copy_with_skopeo(&image, dir.path(), "docker-archive");
    assert_eq!(archive::kind(&Bytes::from(docker.clone()), &Limits::default()), archive::ArchiveKind::Docker);
    let back = read(docker).unwrap();
    same(&back, &image);
    // docker archives hold uncompressed layers: the same content, another blob digest.
    assert_eq!(back.layers[0].compression, cloud_oci::Compression::None);
    assert_eq!(back.layers[0].digest, back.layers[0].diff_id);
}
