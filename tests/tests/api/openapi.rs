//! The checked-in OpenAPI document matches the code. Regenerate with `scripts/openapi` after an API change.

use std::path::Path;

#[test]
fn the_checked_in_spec_matches_the_code() {
    let generated = serde_json::to_string_pretty(&cloud_api::openapi()).expect("serialisable") + "\n";
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../openapi/openapi.json");
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    if checked_in != generated {
        panic!(
            "openapi/openapi.json is out of date with the code: run `scripts/openapi` and commit the result\n\
             (first differing line: {:?})",
            checked_in.lines().zip(generated.lines()).find(|(a, b)| a != b)
        );
    }
    let spec: serde_json::Value = serde_json::from_str(&generated).unwrap();
    assert!(spec["openapi"].as_str().unwrap().starts_with("3."));
    let codes = spec["components"]["schemas"]["ErrorCode"].to_string();
    for code in ["invalid_port_spec", "not_found", "quota_exceeded", "idempotency_key_reused"] {
        assert!(codes.contains(code), "ErrorCode lists {code}");
    }
}
