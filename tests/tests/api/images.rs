//! Images: uploads, the built-in `hello`, deletion rules.

use cloud_tests::TestApi;
use serde_json::json;

use crate::{Res, delete, get, post};

/// A tar.gz bundle with a manifest and one file.
pub fn bundle(manifest: &str) -> Vec<u8> {
    cloud_tests::bundle(&[("manifest.json", manifest), ("run", "#!/bin/sh\necho hi\n")])
}

pub async fn upload(api: &TestApi, token: &str, name: &str, body: &[u8]) -> Res {
    let res = reqwest::Client::new()
        .post(api.url(&format!("/v1/images?name={name}")))
        .bearer_auth(token)
        .header("content-type", "application/gzip")
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    crate::into_res(res).await
}

#[tokio::test]
async fn hello_is_built_in_and_uploads_are_content_addressed() {
    let api = TestApi::start().await;
    let t = &api.token;
    let hello = get(&api, "/v1/images/hello", t).await;
    assert_eq!(hello.status, 200, "{}", hello.body);
    assert_eq!(hello.body["builtin"], true);
    assert_eq!(hello.body["port"], 8080);

    let b = bundle(r#"{"command": ["./run", "--fast"], "port": 9000}"#);
    let img = upload(&api, t, "app", &b).await;
    assert_eq!(img.status, 201, "{}", img.body);
    assert_eq!(img.body["command"], json!(["./run", "--fast"]));
    assert_eq!(img.body["port"], 9000);
    assert_eq!(img.body["size_bytes"], b.len());
    let digest = img.body["digest"].as_str().unwrap().to_owned();
    assert!(digest.starts_with("sha256:") && digest.len() == 71);

    let inst = post(&api, "/v1/instances", t, json!({"image": "app", "name": "app-1"})).await;
    assert_eq!(inst.body["instances"][0]["image_digest"], digest.as_str());
    delete(&api, "/v1/images/app", t).await.problem(409, "image_in_use", "1 instance");

    // A new push of the name points it at the new bundle; the instance keeps the one it was created with.
    let v2 = upload(&api, t, "app", &bundle(r#"{"command": ["./run"], "port": 9001}"#)).await;
    assert_eq!(v2.status, 201);
    assert_ne!(v2.body["digest"], digest.as_str());
    assert_eq!(get(&api, "/v1/instances/app-1", t).await.body["image_digest"], digest.as_str());

    delete(&api, "/v1/instances/app-1", t).await;
    assert_eq!(delete(&api, "/v1/images/app", t).await.status, 204);
    delete(&api, "/v1/images/hello", t).await.problem(400, "invalid_request", "built in");
}

#[tokio::test]
async fn bad_bundles_are_refused_with_reasons() {
    let api = TestApi::start().await;
    let t = &api.token;
    upload(&api, t, "x", b"definitely not gzip").await.problem(400, "invalid_image", "tar.gz");
    upload(&api, t, "x", &bundle("{")).await.problem(400, "invalid_image", "manifest.json");
    upload(&api, t, "x", &bundle(r#"{"command": [], "port": 1}"#)).await.problem(400, "invalid_image", "command");
    upload(&api, t, "Bad", &bundle(r#"{"command": ["a"], "port": 1}"#)).await.problem(400, "invalid_name", "Bad");
    let res = reqwest::Client::new()
        .post(api.url("/v1/images?name=x"))
        .bearer_auth(t)
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    crate::into_res(res).await.problem(415, "unsupported_media_type", "application/gzip");
    let list = get(&api, "/v1/images", t).await;
    assert_eq!(list.body["items"].as_array().unwrap().len(), 1, "only hello");
}

#[tokio::test]
async fn oversize_uploads_are_refused() {
    let api = TestApi::start_with(cloud_api::ApiConfig { max_image_bytes: 1024, ..Default::default() }).await;
    let big = vec![0u8; 4096];
    upload(&api, &api.token, "big", &big).await.problem(413, "payload_too_large", "1024");
    // The same through the idempotency layer, which reads bodies whole.
    let res = reqwest::Client::new()
        .post(api.url("/v1/images?name=big"))
        .bearer_auth(&api.token)
        .header("content-type", "application/gzip")
        .header("idempotency-key", "big-1")
        .body(big)
        .send()
        .await
        .unwrap();
    crate::into_res(res).await.problem(413, "payload_too_large", "");
}

/// An upgrade from a platform whose `hello` was a bundle run by the host's `cloudd`: its instances run the new
/// image from their next start, and the old bundle goes.
#[tokio::test]
async fn an_earlier_platforms_hello_is_replaced_under_its_instances() {
    let api = TestApi::start().await;
    let t = &api.token;
    let created = post(&api, "/v1/instances", t, json!({"image": "hello", "name": "old-hello"})).await;
    assert_eq!(created.status, 201, "{}", created.body);
    let current = get(&api, "/v1/images/hello", t).await.body["digest"].as_str().unwrap().to_owned();
    // What the earlier platform stored: its hello bundle, the image and the instance pointing at it.
    let old = cloud_tests::bundle(&[("manifest.json", r#"{"command": ["cloudd", "hello"], "port": 8080}"#)]);
    let old_digest = cloud_oci::Digest::of(&old).to_string();
    let pool = api.store.pool();
    sqlx::query("INSERT INTO image_blobs (digest, data) VALUES ($1, $2)")
        .bind(&old_digest)
        .bind(&old)
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("UPDATE images SET digest = $1, format = 'bundle' WHERE name = 'hello' AND tenant_id IS NULL")
        .bind(&old_digest)
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("UPDATE instances SET image_digest = $1").bind(&old_digest).execute(pool).await.unwrap();

    // The new version starts (every role migrates, which registers the built-in images).
    api.store.migrate().await.unwrap();
    let (digest,): (String,) =
        sqlx::query_as("SELECT image_digest FROM instances WHERE name = 'old-hello'").fetch_one(pool).await.unwrap();
    assert_eq!(digest, current, "the instance runs the new hello");
    let (left,): (i64,) = sqlx::query_as("SELECT count(*) FROM image_blobs WHERE digest = $1")
        .bind(&old_digest)
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(left, 0, "the old bundle is gone");
}
