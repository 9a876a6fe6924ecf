//! Hosts modelled as network namespaces: an underlay switch (a bridge in a namespace of its own), hosts plugged
//! into it as `eth0` at `198.18.0.<i>`, and a leg from the caller's own namespace at `198.18.0.254`, where the
//! caller relays PostgreSQL and sends its clients from. Everything is deleted when dropped. Needs root.

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The underlay's /24 (RFC 2544's benchmarking range: no real network uses it).
const UNDERLAY: [u8; 3] = [198, 18, 0];
/// The host number of the caller's own leg.
const LEG: u8 = 254;

/// Runs `ip`, panicking with its error when it fails.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip (scripts/setup installs iproute2)");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// A network namespace, deleted when dropped.
#[derive(Debug)]
pub struct Netns(pub String);

impl Netns {
    /// Creates `name` (replacing a leftover of that name) with its loopback up.
    pub fn new(name: String) -> Self {
        let _ = Command::new("ip").args(["netns", "del", &name]).stderr(Stdio::null()).status();
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Self(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A switch, hosts plugged into it, and the caller's leg.
#[derive(Debug)]
pub struct Underlay {
    /// The hosts, host `i + 1` at index `i`.
    pub hosts: Vec<Netns>,
    /// The switch, where captures see what crosses between hosts.
    pub switch: Netns,
    /// The caller's end of its leg.
    pub leg: String,
}

impl Underlay {
    /// Builds `hosts` hosts named `<tag>-h<i>` and a switch `<tag>-sw` (`tag`: a few characters unique to the
    /// caller, e.g. from its pid).
    pub fn build(tag: &str, hosts: u8) -> Self {
        let switch = Netns::new(format!("{tag}-sw"));
        ip(&["-n", &switch.0, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &switch.0, "link", "set", "br0", "up"]);
        let leg = format!("{tag}u");
        let _ = Command::new("ip").args(["link", "del", &leg]).stderr(Stdio::null()).status();
        ip(&["link", "add", &leg, "type", "veth", "peer", "name", "up0", "netns", &switch.0]);
        ip(&["-n", &switch.0, "link", "set", "up0", "master", "br0", "up"]);
        ip(&["addr", "add", &format!("{}/24", Self::leg_address()), "dev", &leg]);
        ip(&["link", "set", &leg, "up"]);
        let hosts = (1..=hosts)
            .map(|i| {
                let ns = Netns::new(format!("{tag}-h{i}"));
                let port = format!("p{i}");
                ip(&["-n", &switch.0, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns.0]);
                ip(&["-n", &switch.0, "link", "set", &port, "master", "br0", "up"]);
                ip(&["-n", &ns.0, "addr", "add", &format!("{}/24", Self::address(i)), "dev", "eth0"]);
                ip(&["-n", &ns.0, "link", "set", "eth0", "up"]);
                ns
            })
            .collect();
        Self { hosts, switch, leg }
    }

    /// Host `i`'s address (from 1).
    pub fn address(i: u8) -> Ipv4Addr {
        Ipv4Addr::new(UNDERLAY[0], UNDERLAY[1], UNDERLAY[2], i)
    }

    /// The caller's address on the underlay.
    pub fn leg_address() -> Ipv4Addr {
        Self::address(LEG)
    }
}

impl Drop for Underlay {
    fn drop(&mut self) {
        // The switch namespace may outlive its deletion a moment (a process still in it); the leg goes now.
        let _ = Command::new("ip").args(["link", "del", &self.leg]).stderr(Stdio::null()).status();
    }
}

/// A `cloudd` process, stopped (SIGTERM, then SIGKILL after 20 s) when dropped.
#[derive(Debug)]
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).stderr(Stdio::null()).status();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `cloudd` roles on one platform, in hosts' namespaces or the caller's, with their configuration and
/// output in `dir`.
#[derive(Debug, Clone)]
pub struct Roles {
    /// The `cloudd` binary.
    pub cloudd: PathBuf,
    /// Where each role's `<name>.toml` and `<name>.log` go.
    pub dir: PathBuf,
    /// `DATABASE_URL` of every role.
    pub url: String,
    /// The platform secret key's file.
    pub key_file: PathBuf,
    /// `platform.tenant_pool`.
    pub pool: String,
}

impl Roles {
    /// Starts `cloudd <role>` in `netns` (or in the caller's namespace) with `config` as its file and `env` on top.
    pub fn start(&self, name: &str, netns: Option<&Netns>, role: &str, config: &str, env: &[(&str, String)]) -> Proc {
        let config_path = self.dir.join(format!("{name}.toml"));
        std::fs::write(&config_path, config).expect("writing a role's configuration");
        let log = std::fs::File::create(self.dir.join(format!("{name}.log"))).expect("creating a role's log");
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns.0]).arg(&self.cloudd);
                c
            }
            None => Command::new(&self.cloudd),
        };
        cmd.args(["--config", &config_path.display().to_string(), role])
            .env("DATABASE_URL", &self.url)
            .env("CLOUD_SECRET_KEY_FILE", &self.key_file)
            .env("CLOUD_TENANT_POOL", &self.pool)
            .stdout(log.try_clone().expect("a log file"))
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Proc(cmd.spawn().expect("starting cloudd"))
    }

    /// The last lines of every role's log.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        let mut files: Vec<_> =
            std::fs::read_dir(&self.dir).into_iter().flatten().flatten().map(|e| e.path()).collect();
        files.sort();
        for path in files.iter().filter(|p| p.extension().is_some_and(|x| x == "log")) {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            out.push_str(&format!("--- {}\n", path.display()));
            tail.iter().rev().for_each(|l| out.push_str(&format!("{l}\n")));
        }
        out
    }

    /// Waits until `ok`, panicking with the logs after `within`.
    pub async fn wait(&self, what: &str, within: Duration, mut ok: impl AsyncFnMut() -> bool) {
        let t0 = Instant::now();
        while !ok().await {
            assert!(t0.elapsed() < within, "never {what} (within {within:?}):\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Whether an operations endpoint answers `/readyz` with 200.
pub async fn ready(addr: std::net::SocketAddr) -> bool {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().expect("a client");
    client.get(format!("http://{addr}/readyz")).send().await.is_ok_and(|r| r.status() == 200)
}

/// A packet capture (tcpdump), ended when dropped.
#[derive(Debug)]
pub struct Capture(Child);

impl Capture {
    /// Captures what crosses `switch`'s bridge (`filter`: tcpdump's expression, may be empty) into `file`, each
    /// packet written as it is read; returns once tcpdump listens.
    pub fn start(switch: &Netns, file: &Path, filter: &[&str]) -> Self {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &switch.0, "tcpdump", "-i", "br0", "-U", "-n", "-w"])
            .arg(file)
            .args(filter)
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcpdump (scripts/setup installs it)");
        let mut line = String::new();
        let stderr = child.stderr.as_mut().expect("tcpdump's stderr");
        BufReader::new(stderr).read_line(&mut line).expect("tcpdump's first line");
        assert!(line.contains("listening on br0"), "tcpdump: {line}");
        Self(child)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-INT", &self.0.id().to_string()]).status();
        let _ = self.0.wait();
    }
}
