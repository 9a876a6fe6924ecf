//! OCI images: archives written by skopeo uploaded, pulls from a real registry on loopback, layers stored once,
//! every way an image is refused, each with its code and nothing stored, and exports that upload back as the same
//! image.

use cloud_api::ApiConfig;
use cloud_domain::api::Scope;
use cloud_oci::build::{self, LayerBuilder};
use cloud_oci::{Digest, Image, ImageConfig, TargetPlatform};
use cloud_tests::TestApi;
use cloud_tests::registry::{self, ArchiveFormat, Registry, sample_image};
use serde_json::{Value, json};

use crate::{Res, get, post};

/// Uploads `body` as an image named `name` with a content type.
async fn upload(api: &TestApi, token: &str, name: &str, content_type: &str, body: Vec<u8>) -> Res {
    let res = reqwest::Client::new()
        .post(api.url(&format!("/v1/images?name={name}")))
        .bearer_auth(token)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    crate::into_res(res).await
}

/// Asks the API to pull `reference` as `name`.
async fn pull(api: &TestApi, name: &str, reference: &str) -> Res {
    post(api, "/v1/images", &api.token, json!({"name": name, "reference": reference})).await
}

/// Tenants' images and stored blobs: what a refused image must leave unchanged.
async fn stored(api: &TestApi) -> (i64, i64) {
    sqlx::query_as(
        "SELECT (SELECT count(*) FROM images WHERE tenant_id IS NOT NULL), (SELECT count(*) FROM image_blobs)",
    )
    .fetch_one(api.store.pool())
    .await
    .unwrap()
}

/// The files of a tar, in order.
fn files(tar: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut archive = tar::Archive::new(tar);
    archive
        .entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let path = e.path().unwrap().to_string_lossy().into_owned();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut data).unwrap();
            (path, data)
        })
        .collect()
}

/// A tar of files.
fn tar_of(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        tar.append_data(&mut h, path, &data[..]).unwrap();
    }
    tar.into_inner().unwrap()
}

/// An OCI image layout holding `index` and `blobs` (each under its digest).
fn layout(index: &Value, blobs: &[&[u8]]) -> Vec<u8> {
    let mut out = vec![
        ("oci-layout".to_owned(), br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec()),
        ("index.json".to_owned(), serde_json::to_vec(index).unwrap()),
    ];
    for b in blobs {
        out.push((format!("blobs/sha256/{}", Digest::of(b).hex()), b.to_vec()));
    }
    tar_of(&out)
}

/// An index naming one manifest, optionally for a platform.
fn index(manifest: &[u8], platform: Option<Value>) -> Value {
    let mut entry = json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": Digest::of(manifest).to_string(),
        "size": manifest.len(),
    });
    if let Some(p) = platform {
        entry["platform"] = p;
    }
    json!({"schemaVersion": 2, "manifests": [entry]})
}

/// The image's archive with its config edited (and its manifest and index rewritten to match).
fn with_config(image: &Image, edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut config: Value = serde_json::from_slice(&image.config_blob.data).unwrap();
    edit(&mut config);
    let config = serde_json::to_vec(&config).unwrap();
    let mut manifest: Value = serde_json::from_slice(&image.manifest).unwrap();
    manifest["config"]["digest"] = json!(Digest::of(&config).to_string());
    manifest["config"]["size"] = json!(config.len());
    let manifest = serde_json::to_vec(&manifest).unwrap();
    let mut blobs: Vec<&[u8]> = vec![&manifest, &config];
    blobs.extend(image.layer_blobs.iter().map(|b| &b.data[..]));
    layout(&index(&manifest, None), &blobs)
}

/// An architecture other than this machine's.
fn foreign_architecture() -> &'static str {
    if TargetPlatform::host().architecture == "arm64" { "amd64" } else { "arm64" }
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, bytes).unwrap();
    gz.finish().unwrap()
}

/// The manifest digest an OCI archive's index names (what the platform must report as the image's digest).
fn archive_digest(tar: &[u8]) -> String {
    let index = files(tar).into_iter().find(|(p, _)| p == "index.json").expect("index.json").1;
    let index: Value = serde_json::from_slice(&index).unwrap();
    index["manifests"][0]["digest"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn archives_written_by_skopeo_upload_as_oci_images_and_instances_take_their_port() {
    let api = TestApi::start().await;
    let t = &api.token;
    let dir = tempfile::tempdir().unwrap();
    let image = sample_image(9000, "a");

    let oci = std::fs::read(registry::skopeo_archive(&image, dir.path(), ArchiveFormat::Oci)).unwrap();
    let res = upload(&api, t, "web", "application/vnd.oci.image.layout.v1+tar", oci.clone()).await;
    assert_eq!(res.status, 201, "{}", res.body);
    assert_eq!(res.body["format"], "oci");
    assert_eq!(res.body["source"], "upload");
    assert_eq!(res.body["command"], json!(["/bin/serve", "--quiet"]));
    assert_eq!(res.body["port"], 9000);
    assert_eq!(res.body["digest"], archive_digest(&oci).as_str());

    let docker = std::fs::read(registry::skopeo_archive(&image, dir.path(), ArchiveFormat::Docker)).unwrap();
    let res = upload(&api, t, "web-docker", "application/x-tar", docker.clone()).await;
    assert_eq!(res.status, 201, "{}", res.body);
    assert_eq!((&res.body["format"], &res.body["port"]), (&json!("oci"), &json!(9000)));
    assert_eq!(res.body["command"], json!(["/bin/serve", "--quiet"]));
    let docker_digest = res.body["digest"].as_str().unwrap().to_owned();
    assert!(docker_digest.starts_with("sha256:") && docker_digest.len() == 71, "{docker_digest}");
    // Gzipped, as `docker save | gzip` writes it, and as application/octet-stream: the content decides.
    let res = upload(&api, t, "web-docker-gz", "application/gzip", gzip(&docker)).await;
    assert_eq!((res.status, &res.body["digest"]), (201, &json!(docker_digest)), "{}", res.body);
    let res = upload(&api, t, "web-oci-gz", "application/octet-stream", gzip(&oci)).await;
    assert_eq!((res.status, &res.body["digest"]), (201, &json!(archive_digest(&oci))), "{}", res.body);

    // Instances take the image's port unless created with another, and nodes are told which.
    let default = post(&api, "/v1/instances", t, json!({"image": "web", "name": "w1"})).await;
    assert_eq!(default.status, 201, "{}", default.body);
    assert_eq!(default.body["instances"][0]["port"], 9000);
    assert_eq!(default.body["instances"][0]["image_digest"], archive_digest(&oci).as_str());
    let custom = post(&api, "/v1/instances", t, json!({"image": "web", "name": "w2", "port": 7000})).await;
    assert_eq!(custom.body["instances"][0]["port"], 7000, "{}", custom.body);
    post(&api, "/v1/instances", t, json!({"image": "web", "port": 0})).await.problem(400, "invalid_json", "port");
    post(&api, "/v1/instances", t, json!({"image": "web", "port": 70000})).await.problem(400, "invalid_json", "port");
    let node = api.store.register_node("n1", "127.0.0.1", 1 << 20).await.unwrap();
    api.store.schedule_pending(std::time::Duration::from_secs(60)).await.unwrap();
    let mut ports: Vec<(String, u16)> =
        api.store.assignments(node).await.unwrap().into_iter().map(|a| (a.name, a.port)).collect();
    ports.sort();
    assert_eq!(ports, [("w1".to_owned(), 9000), ("w2".to_owned(), 7000)]);
    assert_eq!(get(&api, "/v1/instances/w2", t).await.body["port"], 7000);
}

#[tokio::test]
async fn layers_are_stored_once_across_images_and_tenants() {
    let api = TestApi::start().await;
    let (_, other) = api.tenant("globex", &[cloud_domain::api::Scope::Read, cloud_domain::api::Scope::Write]).await;
    let (a, b) = (sample_image(8080, "a"), sample_image(8080, "b"));
    assert_eq!(a.layers[0].digest, b.layers[0].digest, "the images share their base layer");
    let (_, before) = stored(&api).await;
    let blobs = || async { stored(&api).await.1 - before };

    let ct = "application/x-tar";
    assert_eq!(upload(&api, &api.token, "a", ct, build::oci_archive(&a, "v1")).await.status, 201);
    assert_eq!(blobs().await, 4, "manifest, config, base layer, top layer");
    assert_eq!(upload(&api, &api.token, "b", ct, build::oci_archive(&b, "v1")).await.status, 201);
    assert_eq!(blobs().await, 7, "b adds its manifest, config and top layer; the base layer is shared");
    // Another tenant, and another name: nothing new to store.
    assert_eq!(upload(&api, &other, "a", ct, build::oci_archive(&a, "v1")).await.status, 201);
    assert_eq!(upload(&api, &api.token, "a-again", ct, build::oci_archive(&a, "v1")).await.status, 201);
    assert_eq!(blobs().await, 7);
    let (base,): (i64,) = sqlx::query_as("SELECT count(*) FROM manifest_blobs WHERE blob = $1")
        .bind(a.layers[0].digest.as_str())
        .fetch_one(api.store.pool())
        .await
        .unwrap();
    assert_eq!(base, 2, "both manifests name the one stored base layer");
    assert_eq!(stored(&api).await.0, 4);
}

#[tokio::test]
async fn an_image_pulled_from_a_registry_is_stored_with_its_reference() {
    let reg = Registry::start();
    let image = sample_image(9000, "pulled");
    let reference = reg.push(&image, "team/web:v1");
    let api =
        TestApi::start_with(ApiConfig { insecure_registries: vec![reg.host.clone()], ..Default::default() }).await;

    let res = pull(&api, "web", &reference).await;
    assert_eq!(res.status, 201, "{}", res.body);
    assert_eq!(res.body["format"], "oci");
    assert_eq!(res.body["source"], reference.as_str());
    assert_eq!(res.body["command"], json!(["/bin/serve", "--quiet"]));
    assert_eq!(res.body["port"], 9000);
    // The digest is the manifest's as the registry serves it.
    let served = reqwest::Client::new()
        .get(format!("http://{}/v2/team/web/manifests/v1", reg.host))
        .header(
            "accept",
            "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json",
        )
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let digest = Digest::of(&served).to_string();
    assert_eq!(res.body["digest"], digest.as_str());

    // Pinned by digest: the same image, nothing new stored.
    let blobs = stored(&api).await.1;
    let pinned = pull(&api, "web-pinned", &format!("{}/team/web@{digest}", reg.host)).await;
    assert_eq!((pinned.status, &pinned.body["digest"]), (201, &json!(digest)), "{}", pinned.body);
    assert_eq!(stored(&api).await.1, blobs);
    let inst = post(&api, "/v1/instances", &api.token, json!({"image": "web"})).await;
    assert_eq!((inst.status, &inst.body["instances"][0]["image_digest"]), (201, &json!(digest)), "{}", inst.body);
}

#[tokio::test]
async fn refused_uploads_answer_a_code_naming_the_problem_and_store_nothing() {
    let api = TestApi::start().await;
    let t = &api.token;
    let image = sample_image(8080, "x");
    let good = build::oci_archive(&image, "v1");
    let layer_hex = image.layer_blobs[1].digest.hex().to_owned();
    let config_hex = image.config_blob.digest.hex().to_owned();

    // A layer altered after it was digested, as a bit flip in transit would.
    let tampered = {
        let mut f = files(&good);
        let layer = f.iter_mut().find(|(p, _)| p.ends_with(&layer_hex)).unwrap();
        let last = layer.1.len() - 1;
        layer.1[last] ^= 0xff;
        tar_of(&f)
    };
    let without_config =
        tar_of(&files(&good).into_iter().filter(|(p, _)| !p.ends_with(&config_hex)).collect::<Vec<_>>());
    let corrupt_index = tar_of(
        &files(&good)
            .into_iter()
            .map(
                |(p, d)| {
                    if p == "index.json" { (p, b"{\"schemaVersion\": 2, \"manifests\": [".to_vec()) } else { (p, d) }
                },
            )
            .collect::<Vec<_>>(),
    );
    let foreign = foreign_architecture();
    let index_for_another_platform = layout(
        &index(&image.manifest, Some(json!({"os": "linux", "architecture": foreign}))),
        &[&image.manifest, &image.config_blob.data, &image.layer_blobs[0].data, &image.layer_blobs[1].data],
    );
    let config_for_another_platform = with_config(&image, |c| c["architecture"] = json!(foreign));
    let nothing_to_run = build::oci_archive(
        &build::image(&ImageConfig::default(), &[LayerBuilder::new().file("a", 0o644, b"a").into_tar()]),
        "v1",
    );
    let climbing = {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        let layer = LayerBuilder::new().raw(h, b"../../etc/cron.d/x", b"* * * * * root id\n").into_tar();
        let config = ImageConfig { entrypoint: vec!["/x".into()], ..Default::default() };
        build::oci_archive(&build::image(&config, &[layer]), "v1")
    };

    let cases: Vec<(&str, Vec<u8>, u16, &str, &str)> = vec![
        ("garbage", b"definitely not an image, at all".to_vec(), 400, "invalid_image", "neither an OCI image archive"),
        ("truncated", good[..good.len() / 2].to_vec(), 400, "invalid_image", "not valid"),
        ("truncated gzip", gzip(&good)[..200].to_vec(), 400, "invalid_image", "gzip"),
        ("corrupt index", corrupt_index, 400, "invalid_image", "index.json"),
        ("tampered layer", tampered, 400, "image_digest_mismatch", "layer 2"),
        ("missing config", without_config, 400, "invalid_image", "missing"),
        ("index for another platform", index_for_another_platform, 422, "image_platform", foreign),
        ("config for another platform", config_for_another_platform, 422, "image_platform", foreign),
        ("nothing to run", nothing_to_run, 400, "invalid_image", "Entrypoint"),
        ("a path climbing out", climbing, 400, "invalid_image", "../../etc/cron.d/x"),
    ];
    let before = stored(&api).await;
    for (what, body, status, code, needle) in cases {
        let res = upload(&api, t, "bad", "application/x-tar", body).await;
        assert_eq!(res.status, status, "{what}: {}", res.body);
        assert_eq!(res.code(), code, "{what}: {}", res.body);
        let detail = res.body["detail"].as_str().unwrap();
        assert!(detail.contains(needle), "{what}: {detail:?} should mention {needle:?}");
        assert_eq!(stored(&api).await, before, "{what}: nothing stored");
    }

    // The request itself: no name, a content type that is neither an upload nor a pull.
    let res = reqwest::Client::new()
        .post(api.url("/v1/images"))
        .bearer_auth(t)
        .header("content-type", "application/x-tar")
        .body(good.clone())
        .send()
        .await
        .unwrap();
    crate::into_res(res).await.problem(400, "invalid_query", "?name=");
    let res = upload(&api, t, "x", "text/plain", good.clone()).await;
    res.problem(415, "unsupported_media_type", "application/vnd.oci.image.layout.v1+tar");
    assert_eq!(stored(&api).await, before);

    // Limits: the body, the unpacked size, the number of entries.
    for (config, status, code, needle) in [
        (ApiConfig { max_image_bytes: 4096, ..Default::default() }, 413, "payload_too_large", "api.max_image_bytes"),
        (ApiConfig { max_image_unpacked_bytes: 64, ..Default::default() }, 413, "image_too_large", "unpacked"),
        (ApiConfig { max_image_entries: 2, ..Default::default() }, 413, "image_too_large", "entries"),
    ] {
        let small = TestApi::start_with(config).await;
        let before = stored(&small).await;
        let big = sample_image(8080, &"x".repeat(8192));
        let res = upload(&small, &small.token, "big", "application/x-tar", build::oci_archive(&big, "v1")).await;
        res.problem(status, code, needle);
        assert_eq!(stored(&small).await, before);
    }
}

#[tokio::test]
async fn refused_pulls_answer_a_code_naming_the_problem_and_store_nothing() {
    let reg = Registry::start();
    let reference = reg.push(&sample_image(8080, "p"), "team/app:v1");
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let unauthorized = registry::answering("401 Unauthorized", "www-authenticate: Basic realm=\"registry\"\r\n").await;
    let failing = registry::answering("500 Internal Server Error", "").await;
    let insecure = vec![reg.host.clone(), closed.clone(), unauthorized.clone(), failing.clone()];
    let api = TestApi::start_with(ApiConfig { insecure_registries: insecure.clone(), ..Default::default() }).await;
    let before_all = stored(&api).await;

    let cases: Vec<(String, u16, &str, String)> = vec![
        (format!("{closed}/app:v1"), 424, "registry_unavailable", closed.clone()),
        (format!("{failing}/app:v1"), 424, "registry_unavailable", "500".into()),
        (format!("{unauthorized}/private/app:v1"), 403, "registry_denied", "401".into()),
        (format!("{}/team/app:v2", reg.host), 404, "image_not_found", "team/app:v2".into()),
        (format!("{}/team/nothing:v1", reg.host), 404, "image_not_found", "team/nothing".into()),
        ("Not/A:Reference:".into(), 400, "invalid_image_reference", "Not/A:Reference:".into()),
    ];
    for (reference, status, code, needle) in &cases {
        pull(&api, "app", reference).await.problem(*status, code, needle);
        assert_eq!(stored(&api).await, before_all, "{reference}: nothing stored");
    }
    // The body of a pull: JSON with a name and a reference, nothing else; a name in the query too must agree.
    post(&api, "/v1/images", &api.token, json!({"name": "app", "reference": reference, "tag": "x"})).await.problem(
        400,
        "invalid_json",
        "tag",
    );
    post(&api, "/v1/images?name=other", &api.token, json!({"name": "app", "reference": reference})).await.problem(
        409,
        "names_conflict",
        "\"other\"",
    );
    post(&api, "/v1/images", &api.token, json!({"name": "Bad", "reference": reference})).await.problem(
        400,
        "invalid_name",
        "Bad",
    );

    // A registry that is down is not the client's fault and may come back: under an Idempotency-Key the
    // answer is not recorded, so a retry pulls again.
    for _ in 0..2 {
        let res = reqwest::Client::new()
            .post(api.url("/v1/images"))
            .bearer_auth(&api.token)
            .header("idempotency-key", "pull-1")
            .json(&json!({"name": "app", "reference": format!("{closed}/app:v1")}))
            .send()
            .await
            .unwrap();
        assert!(res.headers().get("idempotent-replayed").is_none());
        crate::into_res(res).await.problem(424, "registry_unavailable", &closed);
    }

    // A registry on a loopback address this platform was not told to reach: a tenant may not make the API knock
    // on private addresses (by name, by address, or through a registry's redirect or token service).
    let strict = TestApi::start().await;
    let before = stored(&strict).await;
    pull(&strict, "app", &reference).await.problem(403, "registry_not_allowed", &reg.host);
    let by_name = reference.replace("127.0.0.1", "localhost");
    pull(&strict, "app", &by_name).await.problem(403, "registry_not_allowed", "localhost");
    assert_eq!(stored(&strict).await, before);
    // Allowed as private, but it speaks plain http and is not listed as insecure.
    let private_only =
        TestApi::start_with(ApiConfig { private_registries: vec![reg.host.clone()], ..Default::default() }).await;
    let before = stored(&private_only).await;
    pull(&private_only, "app", &reference).await.problem(403, "insecure_registry", &reg.host);
    assert_eq!(stored(&private_only).await, before);

    // Over the size limit.
    let small =
        TestApi::start_with(ApiConfig { max_image_bytes: 128, insecure_registries: insecure, ..Default::default() })
            .await;
    let before = stored(&small).await;
    pull(&small, "app", &reference).await.problem(413, "image_too_large", "the image");
    assert_eq!(stored(&small).await, before);

    // A blob altered in the registry's storage.
    let image = sample_image(8080, "tampered");
    let tampered = reg.push(&image, "team/tampered:v1");
    let hex = image.layer_blobs[1].digest.hex();
    let data = reg.dir.path().join(format!("data/docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]));
    let mut bytes = std::fs::read(&data).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&data, bytes).unwrap();
    pull(&api, "app", &tampered).await.problem(400, "image_digest_mismatch", &hex[..12]);
    assert_eq!(stored(&api).await, before_all);
}

/// `GET /v1/images/{image}/archive` as `token`: the status, content type and body as bytes.
async fn export(api: &TestApi, token: &str, path: &str) -> (u16, String, Vec<u8>) {
    let res = reqwest::Client::new().get(api.url(path)).bearer_auth(token).send().await.unwrap();
    let status = res.status().as_u16();
    let content_type = res.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    let length = res.content_length();
    let body = res.bytes().await.unwrap().to_vec();
    if status == 200 {
        assert_eq!(length, Some(body.len() as u64), "{path}: Content-Length is the body's length");
    }
    (status, content_type, body)
}

/// Asserts an export succeeded as an OCI archive and returns it.
async fn exported(api: &TestApi, token: &str, path: &str) -> Vec<u8> {
    let (status, content_type, body) = export(api, token, path).await;
    assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&body));
    assert_eq!(content_type, "application/x-tar", "{path}");
    body
}

/// An export is the problem `code` naming `needle`.
async fn export_refused(api: &TestApi, token: &str, path: &str, status: u16, code: &str, needle: &str) {
    let res = reqwest::Client::new().get(api.url(path)).bearer_auth(token).send().await.unwrap();
    crate::into_res(res).await.problem(status, code, needle);
}

#[tokio::test]
async fn an_exported_image_uploads_as_the_same_image_for_another_name_or_tenant() {
    let api = TestApi::start().await;
    let t = &api.token;
    let (globex, other) = api.tenant("globex", &[Scope::Read, Scope::Write]).await;
    let dir = tempfile::tempdir().unwrap();
    let ct = "application/x-tar";

    // Written by skopeo, stored, exported, and stored again under another name and by another tenant.
    let image = sample_image(9000, "export");
    let skopeo = std::fs::read(registry::skopeo_archive(&image, dir.path(), ArchiveFormat::Oci)).unwrap();
    let stored = upload(&api, t, "web", ct, skopeo).await;
    assert_eq!(stored.status, 201, "{}", stored.body);
    let digest = stored.body["digest"].as_str().unwrap().to_owned();
    let archive = exported(&api, t, "/v1/images/web/archive").await;
    assert_eq!(archive_digest(&archive), digest);
    assert_eq!(
        exported(&api, t, &format!("/v1/images/{}/archive", stored.body["id"].as_str().unwrap())).await,
        archive
    );
    for (token, name) in [(t, "web-again"), (&other, "web")] {
        let again = upload(&api, token, name, ct, archive.clone()).await;
        assert_eq!((again.status, &again.body["digest"]), (201, &json!(digest)), "{name}: {}", again.body);
        assert_eq!((&again.body["command"], &again.body["port"]), (&stored.body["command"], &json!(9000)));
    }
    // What skopeo makes of it: the same manifest, byte for byte.
    let file = dir.path().join("exported.tar");
    std::fs::write(&file, &archive).unwrap();
    let out = std::process::Command::new("skopeo")
        .args(["inspect", "--raw", &format!("oci-archive:{}", file.display())])
        .output()
        .unwrap();
    assert!(out.status.success(), "skopeo inspect: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(Digest::of(&out.stdout).to_string(), digest);

    // A docker archive is stored with the OCI manifest written for it, and exports as that.
    let docker = std::fs::read(registry::skopeo_archive(&image, dir.path(), ArchiveFormat::Docker)).unwrap();
    let from_docker = upload(&api, t, "from-docker", ct, docker).await;
    let archive = exported(&api, t, "/v1/images/from-docker/archive").await;
    let again = upload(&api, &other, "from-docker", ct, archive).await;
    assert_eq!((again.status, &again.body["digest"]), (201, &from_docker.body["digest"]), "{}", again.body);

    // The built-in hello, which the README deploys, exports too.
    let hello = get(&api, "/v1/images/hello", t).await.body["digest"].as_str().unwrap().to_owned();
    let archive = exported(&api, &other, "/v1/images/hello/archive").await;
    let again = upload(&api, &other, "hello-copy", ct, archive).await;
    assert_eq!((again.status, again.body["digest"].as_str()), (201, Some(hello.as_str())), "{}", again.body);

    // A bundle exports as itself.
    let bundle = crate::images::bundle(r#"{"command": ["./run"], "port": 9001}"#);
    let app = crate::images::upload(&api, t, "app", &bundle).await;
    let (status, content_type, body) = export(&api, t, "/v1/images/app/archive").await;
    assert_eq!((status, content_type.as_str()), (200, "application/gzip"));
    assert_eq!(body, bundle);
    let again = crate::images::upload(&api, &other, "app", &body).await;
    assert_eq!(again.body["digest"], app.body["digest"]);

    // Read scope is enough; another tenant's image is not found, by name or id; nor is a missing one.
    let reader = api.issue_token(&globex, &[Scope::Read]).await.jwt;
    exported(&api, &reader, "/v1/images/web/archive").await;
    let acme_web = stored.body["id"].as_str().unwrap();
    let (_, initech) = api.tenant("initech", &[Scope::Read, Scope::Write]).await;
    export_refused(&api, &initech, "/v1/images/web/archive", 404, "not_found", "web").await;
    export_refused(&api, &initech, &format!("/v1/images/{acme_web}/archive"), 404, "not_found", acme_web).await;
    export_refused(&api, t, "/v1/images/nothing/archive", 404, "not_found", "nothing").await;
    let res = reqwest::Client::new().get(api.url("/v1/images/web/archive")).send().await.unwrap();
    crate::into_res(res).await.problem(401, "missing_token", "Bearer");
}

#[tokio::test]
async fn an_image_pushed_again_still_exports_the_version_its_instances_run() {
    let api = TestApi::start().await;
    let t = &api.token;
    let ct = "application/x-tar";
    let (v1, v2) = (sample_image(8080, "v1"), sample_image(8080, "v2"));
    assert_eq!(upload(&api, t, "web", ct, build::oci_archive(&v1, "v1")).await.status, 201);
    let inst = post(&api, "/v1/instances", t, json!({"image": "web", "name": "w1"})).await;
    assert_eq!(inst.body["instances"][0]["image_digest"], v1.digest.as_str(), "{}", inst.body);
    assert_eq!(upload(&api, t, "web", ct, build::oci_archive(&v2, "v2")).await.status, 201);

    assert_eq!(archive_digest(&exported(&api, t, "/v1/images/web/archive").await), v2.digest.as_str());
    let old = format!("/v1/images/web/archive?digest={}", v1.digest);
    assert_eq!(archive_digest(&exported(&api, t, &old).await), v1.digest.as_str());
    let current = format!("/v1/images/web/archive?digest={}", v2.digest);
    assert_eq!(archive_digest(&exported(&api, t, &current).await), v2.digest.as_str());

    // A version no instance runs, another tenant asking, a digest that is not one.
    let never = format!("/v1/images/web/archive?digest={}", Digest::of(b"never stored"));
    export_refused(&api, t, &never, 404, "not_found", "web@sha256:").await;
    let (_, other) = api.tenant("globex", &[Scope::Read, Scope::Write]).await;
    assert_eq!(upload(&api, &other, "web", ct, build::oci_archive(&v2, "v2")).await.status, 201);
    export_refused(&api, &other, &old, 404, "not_found", v1.digest.as_str()).await;
    export_refused(&api, t, "/v1/images/web/archive?digest=sha256:AB", 400, "invalid_query", "sha256:AB").await;
    export_refused(&api, t, "/v1/images/web/archive?tag=v1", 400, "invalid_query", "tag").await;
}
