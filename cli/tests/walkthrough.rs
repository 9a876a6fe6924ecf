//! The README's quick start, verbatim: the real `cloudd dev` with its documented defaults (API on 7300, edge on
//! 443 and 80, DNS on 5353) and the README's lines run by bash as a newcomer would paste them, each output
//! checked; then Ctrl-C and a second start on the same data dir. Everything runs in a network namespace the test
//! creates, so the default ports are free and no traffic leaves it. Needs root (for the namespace and the node
//! agent), as CI has.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The commands of the README's walkthrough block, in order; the README must say exactly these.
const WALKTHROUGH: [&str; 10] = [
    "cloudctl service create my-service 443:8080",
    "cloudctl deploy --service my-service --image hello",
    "FQDN=$(cloudctl service get my-service -o value=fqdn)",
    "cloudctl ca > ca.pem",
    "curl --cacert ca.pem https://$FQDN/",
    "dig @127.0.0.1 -p 5353 +short $FQDN",
    "cloudctl deploy -p 443:8080 --image hello --name demo",
    "cloudctl service list",
    "cloudctl instance delete demo",
    "cloudctl service list",
];

/// Generous: a busy 2-core machine, and a first start that runs initdb.
const TIMEOUT: Duration = Duration::from_secs(120);

/// The lines between the README's walkthrough markers, comments and all.
fn readme_lines() -> Vec<String> {
    let readme = include_str!("../../README.md");
    let block = readme
        .split("<!-- walkthrough:begin -->")
        .nth(1)
        .and_then(|rest| rest.split("<!-- walkthrough:end -->").next())
        .expect("README.md has a walkthrough block between <!-- walkthrough:begin --> and <!-- walkthrough:end -->");
    block.lines().filter(|l| !l.trim().is_empty() && !l.starts_with("```")).map(str::to_owned).collect()
}

fn without_comment(line: &str) -> &str {
    line.split("  #").next().unwrap_or(line).trim_end()
}

#[test]
fn the_readme_walkthrough_is_what_this_test_runs() {
    let lines = readme_lines();
    let commands: Vec<&str> = lines.iter().map(|l| without_comment(l)).collect();
    assert_eq!(commands, WALKTHROUGH, "README.md's walkthrough and this test's must stay the same");
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false)
}

fn bin_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_cloudctl")).parent().unwrap().to_path_buf();
    assert!(dir.join("cloudd").exists(), "cloudd is missing beside cloudctl: build the workspace first");
    dir
}

/// A network namespace of the test's own, with loopback up; deleted with it.
struct Netns(String);

impl Netns {
    fn new() -> Self {
        let name = format!("walkthrough-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).stderr(Stdio::null()).status();
        for args in [vec!["netns", "add", &name], vec!["-n", &name, "link", "set", "lo", "up"]] {
            assert!(Command::new("ip").args(&args).status().unwrap().success(), "ip {args:?}");
        }
        Self(name)
    }

    /// A command run inside the namespace, as a user of this machine (`HOME` the test's), with none of the
    /// platform's overriding variables.
    fn command(&self, home: &Path, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0, program]);
        for (key, _) in std::env::vars() {
            if key.starts_with("CLOUD_") || key == "DATABASE_URL" {
                c.env_remove(key);
            }
        }
        let path = format!("{}:{}", bin_dir().display(), std::env::var("PATH").unwrap_or_default());
        c.env("HOME", home).env("XDG_CONFIG_HOME", home.join("config")).env("PATH", path);
        c
    }

    /// The processes in the namespace, as `ip netns pids` lists them.
    fn pids(&self) -> String {
        let out = Command::new("ip").args(["netns", "pids", &self.0]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// `cloudd dev` as the README starts it (its data dir in the test's home rather than /var/lib/cloudd).
struct Dev {
    child: Child,
    log: PathBuf,
}

impl Dev {
    fn start(ns: &Netns, home: &Path, run: u32) -> Self {
        let log = home.join(format!("cloudd-{run}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = ns
            .command(home, "cloudd")
            .arg("dev")
            .env("CLOUD_DATA_DIR", home.join("data"))
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let mut dev = Self { child, log };
        let t0 = Instant::now();
        while !dev.output().contains("cloudd dev is up.") {
            if let Ok(Some(status)) = dev.child.try_wait() {
                panic!("cloudd dev exited ({status}) before it was up: {}", dev.output());
            }
            assert!(t0.elapsed() < TIMEOUT, "cloudd dev did not come up: {}", dev.output());
            std::thread::sleep(Duration::from_millis(100));
        }
        dev
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Ctrl-C; how it exited.
    fn interrupt(&mut self) -> ExitStatus {
        let status = self.stop();
        status.unwrap_or_else(|| panic!("cloudd dev did not stop on Ctrl-C: {}", self.output()))
    }

    /// Ctrl-C and the wait for the exit, `None` past the timeout.
    fn stop(&mut self) -> Option<ExitStatus> {
        let _ = Command::new("kill").args(["-INT", &self.child.id().to_string()]).status();
        let t0 = Instant::now();
        while t0.elapsed() < TIMEOUT {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Dev {
    /// After a failure too: Ctrl-C lets it remove its instances' namespaces.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait()
            && self.stop().is_none()
        {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What one line printed.
#[derive(Debug)]
struct Outcome {
    line: String,
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs the lines in one bash session in `dir` (so `FQDN=...` carries to the next lines), each line's output
/// kept apart.
fn run_lines(ns: &Netns, home: &Path, dir: &Path, lines: &[String]) -> Vec<Outcome> {
    let mut script = String::new();
    for (i, line) in lines.iter().enumerate() {
        script.push_str(&format!("{{ {line}\n}} >out.{i} 2>err.{i}; echo $? >rc.{i}\n"));
    }
    std::fs::write(dir.join("walkthrough.sh"), script).unwrap();
    let status = ns.command(home, "bash").arg("walkthrough.sh").current_dir(dir).status().unwrap();
    assert!(status.success());
    let read = |name: String| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    (0..lines.len())
        .map(|i| Outcome {
            line: lines[i].clone(),
            code: read(format!("rc.{i}")).trim().parse().unwrap_or(-1),
            stdout: read(format!("out.{i}")),
            stderr: read(format!("err.{i}")),
        })
        .collect()
}

#[track_caller]
fn check(o: &Outcome, ok: bool) {
    assert!(o.code == 0 && ok, "`{}` exited {}:\n{}\n{}", o.line, o.code, o.stdout, o.stderr);
}

#[test]
fn the_readme_walkthrough_works_verbatim_and_survives_a_restart() {
    if !is_root() {
        eprintln!("skipped: the walkthrough's namespace and cloudd dev's node agent need root");
        return;
    }
    let ns = Netns::new();
    let home = tempfile::tempdir().unwrap();
    let work = home.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let mut dev = Dev::start(&ns, home.path(), 1);
    let banner = dev.output();
    assert!(banner.contains("API:       https://127.0.0.1:7300/v1"), "{banner}");
    assert!(banner.contains("DNS:       127.0.0.1:5353"), "{banner}");
    assert!(banner.contains("edge:      https://127.0.0.1:443  http://127.0.0.1:80"), "{banner}");

    let out = run_lines(&ns, home.path(), &work, &readme_lines());
    let [create, deploy, fqdn, ca, curl, dig, demo, list, delete, list_after] = &out[..] else {
        panic!("{} outcomes", out.len())
    };

    // The service: its generated FQDN and both port mappings.
    check(create, create.stdout.starts_with("created service my-service my-service-"));
    let name = create.stdout.split_whitespace().nth(3).unwrap_or_default().to_owned();
    assert!(name.ends_with(".dev.cloud.localhost"), "{}", create.stdout);
    check(create, create.stdout.contains("443:8080/tls+http") && create.stdout.contains("80:443/http+redirect"));

    // The deploy waited for running and printed the URL and the instance's private IP and name.
    check(deploy, deploy.stdout.starts_with(&format!("https://{name}\nservice: my-service {name}\n")));
    let line = deploy.stdout.lines().find(|l| l.starts_with("instance: ")).unwrap_or_default();
    let fields: Vec<&str> = line.split_whitespace().collect();
    let [_, instance, state, ip, private_fqdn] = fields[..] else { panic!("{}", deploy.stdout) };
    check(deploy, instance.starts_with("hello-") && state == "running" && ip.parse::<std::net::Ipv4Addr>().is_ok());
    assert_eq!(private_fqdn, format!("{instance}.internal"));

    check(fqdn, fqdn.stdout.is_empty());
    check(ca, ca.stdout.is_empty());
    let pem = std::fs::read_to_string(work.join("ca.pem")).unwrap();
    assert_eq!(pem, std::fs::read_to_string(home.path().join("data/ca.pem")).unwrap(), "the CA cloudd dev wrote");

    // Through the edge on 443, verified against the platform CA, to the instance.
    check(curl, true);
    assert_eq!(curl.stdout, format!("hello from {instance} ({ip})\n"));
    check(dig, true);
    assert_eq!(dig.stdout, "127.0.0.1\n", "our DNS answers the FQDN with the edge's address");

    // deploy -p: an ephemeral service named after the instance, listed, then deleted with it.
    check(demo, demo.stdout.starts_with("https://demo-") && demo.stdout.contains("service (ephemeral"));
    check(demo, demo.stdout.contains("instance: demo  running"));
    check(list, list.stdout.starts_with("NAME"));
    assert_eq!(names(list), ["my-service", "demo"], "{}", list.stdout);
    // It drained first (the edge sent it nothing new, what was in flight finished), then went.
    check(delete, delete.stderr == "instance demo: draining\ndeleted instance demo and its ephemeral service demo\n");
    check(list_after, true);
    assert_eq!(names(list_after), ["my-service"], "{}", list_after.stdout);

    // Ctrl-C stops everything cleanly: the instance and the embedded PostgreSQL go with it.
    let status = dev.interrupt();
    assert!(status.success(), "cloudd dev exited {status} on Ctrl-C: {}", dev.output());
    assert_eq!(ns.pids(), "", "processes outlived cloudd dev in its network namespace");
    assert_eq!(processes_with_env(&format!("INSTANCE={instance}")), Vec::<u32>::new(), "the instance outlived it");

    // A second start on the same data dir: the same service, its instance running again, the same CA and token.
    let mut dev = Dev::start(&ns, home.path(), 2);
    let again = run_lines(
        &ns,
        home.path(),
        &work,
        &[
            "cloudctl service list -o name".into(),
            // Answered once the instance runs again (the edge holds the request while it starts).
            format!("curl --retry 30 --retry-delay 1 --retry-all-errors --cacert ca.pem https://{name}/"),
            format!("cloudctl instance get {instance} -o value=state"),
        ],
    );
    let [services, curl, state] = &again[..] else { unreachable!() };
    check(services, services.stdout == "my-service\n");
    check(state, state.stdout == "running\n");
    check(curl, curl.stdout.starts_with(&format!("hello from {instance} (")));
    assert!(dev.interrupt().success(), "{}", dev.output());
    assert_eq!(processes_with_env(&format!("INSTANCE={instance}")), Vec::<u32>::new());
}

/// The first column of a table, without its header.
fn names(o: &Outcome) -> Vec<&str> {
    o.stdout.lines().skip(1).filter_map(|l| l.split_whitespace().next()).collect()
}

/// Processes whose environment has `var` (`NAME=value`).
fn processes_with_env(var: &str) -> Vec<u32> {
    let needle = format!("{var}\0");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.windows(needle.len()).any(|w| w == needle.as_bytes()))
        })
        .collect()
}
