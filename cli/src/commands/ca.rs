//! `cloudctl ca`: the platform CA certificate, printed or installed in the system's trust store.

use anyhow::{Context, bail};

use crate::client::Client;

pub(crate) async fn run(c: &Client, install: bool) -> anyhow::Result<()> {
    let pem = c.send(c.request(reqwest::Method::GET, "/v1/ca.pem")).await?.text().await?;
    if !pem.starts_with("-----BEGIN CERTIFICATE-----") {
        bail!("{} did not answer with a PEM certificate", c.base());
    }
    if install {
        install_ca(c.name(), &pem)?;
    } else {
        print!("{pem}");
    }
    Ok(())
}

/// Puts the platform CA where Debian's `update-ca-certificates` picks it up, and runs it.
fn install_ca(remote: &str, pem: &str) -> anyhow::Result<()> {
    let dir = std::path::Path::new("/usr/local/share/ca-certificates");
    if !dir.is_dir() {
        bail!(
            "{} does not exist: install the CA by hand (cloudctl ca > ca.pem) with your system's tool",
            dir.display()
        );
    }
    let file = dir.join(format!("cloud-{remote}.crt"));
    std::fs::write(&file, pem).with_context(|| {
        format!(
            "cannot write {} (run as root: sudo cloudctl ca --install, or save it: cloudctl ca > ca.pem)",
            file.display()
        )
    })?;
    let status = std::process::Command::new("update-ca-certificates")
        .stdout(std::process::Stdio::null())
        .status()
        .context("running update-ca-certificates")?;
    if !status.success() {
        bail!("update-ca-certificates failed ({status})");
    }
    eprintln!("installed {}; curl and other OpenSSL clients now trust remote {remote}'s services", file.display());
    Ok(())
}
