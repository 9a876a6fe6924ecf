//! `REMOTE:NAME` addressing through the real binary, without a server: two remotes point at closed local ports,
//! so the "cannot reach" error of each command names the remote its arguments chose.

use std::path::Path;
use std::process::{Command, Stdio};

/// Runs cloudctl with its configuration in `config`, and CLOUD_REMOTE only if `cloud_remote` says so.
fn cloudctl_with(config: &Path, cloud_remote: Option<&str>, args: &[&str]) -> (bool, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cloudctl"));
    cmd.args(args)
        .env("XDG_CONFIG_HOME", config)
        .env_remove("CLOUD_API_URL")
        .env_remove("CLOUD_TOKEN")
        .env_remove("CLOUD_REMOTE")
        .stdin(Stdio::null());
    if let Some(remote) = cloud_remote {
        cmd.env("CLOUD_REMOTE", remote);
    }
    let out = cmd.output().unwrap();
    (out.status.success(), String::from_utf8(out.stderr).unwrap())
}

fn cloudctl(config: &Path, args: &[&str]) -> (bool, String) {
    cloudctl_with(config, None, args)
}

/// Runs cloudctl, expecting it to fail with one error line that contains `want`.
#[track_caller]
fn fails_with(config: &Path, args: &[&str], want: &str) {
    fails_with_env(config, None, args, want);
}

#[track_caller]
fn fails_with_env(config: &Path, cloud_remote: Option<&str>, args: &[&str], want: &str) {
    let (ok, stderr) = cloudctl_with(config, cloud_remote, args);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error: ")).collect();
    assert!(!ok && errors.len() == 1 && errors[0].contains(want), "cloudctl {args:?}: want {want:?}, got:\n{stderr}");
}

#[test]
fn a_prefix_chooses_the_remote() {
    let config = tempfile::tempdir().unwrap();
    let config = config.path();
    // Ports 9 and 10 on loopback: nothing listens there, so every request fails fast and says where it went.
    for (name, url, token) in [("a", "http://127.0.0.1:9", "x"), ("b", "http://127.0.0.1:10", "y")] {
        let (ok, stderr) = cloudctl(config, &["remote", "add", name, url, "--token", token]);
        assert!(ok, "remote add {name}: {stderr}");
    }
    let reaches_a = r#"cannot reach remote "a" at http://127.0.0.1:9"#;
    let reaches_b = r#"cannot reach remote "b" at http://127.0.0.1:10"#;

    // Without a prefix the default (the first remote added) is used; a prefix picks the other one.
    fails_with(config, &["service", "get", "web"], reaches_a);
    fails_with(config, &["service", "get", "b:web"], reaches_b);
    fails_with(config, &["instance", "list", "a:"], reaches_a);
    fails_with(config, &["instance", "list", "b:"], reaches_b);
    fails_with(config, &["instance", "delete", "b:web-1", "b:web-2"], reaches_b);
    fails_with(config, &["service", "create", "b:web", "443:8080"], reaches_b);
    fails_with(config, &["deploy", "--service", "b:web", "--image", "hello"], reaches_b);
    fails_with(config, &["--remote", "b", "service", "get", "b:web"], reaches_b);
    // CLOUD_REMOTE is a default like the configured one: a prefix overrides it.
    fails_with_env(config, Some("a"), &["service", "get", "b:web"], reaches_b);
    fails_with_env(config, Some("b"), &["service", "get", "web"], reaches_b);

    // Colons that are not remotes: the default remote is asked.
    fails_with(config, &["deploy", "--image", "127.0.0.1:5000/web:v1", "-p", "443:80"], reaches_a);
    fails_with(config, &["service", "create", "443:8080"], reaches_a);

    // Refusals, before any request.
    fails_with(config, &["service", "get", "nope:web"], r#"no remote "nope" (cloudctl remote list shows them)"#);
    fails_with(config, &["--remote", "a", "service", "get", "b:web"], r#"is on remote "b" but --remote says "a""#);
    fails_with(config, &["instance", "delete", "a:x", "b:y"], r#""a:x" is on remote "a" but "b:y" on remote "b""#);
    fails_with(config, &["instance", "delete", "web-1", "b:web-2"], r#""web-1" has no remote but "b:web-2" has one"#);
    fails_with(config, &["service", "get", "b:"], "a name must follow the remote");
}
