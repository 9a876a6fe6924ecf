//! Sandboxes started for real through runc, as root, from a busybox image built and unpacked by cloud-oci.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use cloud_oci::build::LayerBuilder;
use cloud_oci::layer::{self, Budget};
use cloud_sandbox::{Limits, Network, SandboxConfig, SandboxSpec, Sandboxes};
use tokio::io::AsyncReadExt;

fn is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// A busybox root filesystem (the static binary from Debian's busybox-static, with its applets as links)
/// unpacked as a node agent unpacks layers.
fn busybox_layer(dir: &std::path::Path) -> PathBuf {
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static is installed by scripts/setup");
    let mut l = LayerBuilder::new().dir("bin", 0o755).file("bin/busybox", 0o755, &busybox);
    for applet in ["sh", "id", "cat", "ls", "echo", "mount", "mknod", "sleep", "kill", "touch", "hostname"] {
        l = l.symlink(&format!("bin/{applet}"), "busybox");
    }
    let l = l
        .dir("etc", 0o755)
        .file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n")
        .file("etc/secret", 0o600, b"image secret\n")
        .dir("tmp", 0o1777)
        .dir("root", 0o700);
    let out = dir.join("layer");
    std::fs::create_dir(&out).unwrap();
    layer::unpack(&l.into_tar(), &out, &mut Budget::new(cloud_oci::Limits::default())).unwrap();
    out
}

struct Fixture {
    _dir: tempfile::TempDir,
    sandboxes: Sandboxes,
    layer: PathBuf,
}

async fn fixture() -> Option<Fixture> {
    if !is_root() {
        eprintln!("skipped: sandboxes need root");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let layer = busybox_layer(dir.path());
    let sandboxes = node(dir.path(), "a").await;
    Some(Fixture { _dir: dir, sandboxes, layer })
}

/// The sandboxes of node `name`, beside the other nodes' in `dir/nodes`. The host's id ranges are shared by
/// every agent of the host, tests included.
async fn node(dir: &std::path::Path, name: &str) -> Sandboxes {
    let config = SandboxConfig {
        dir: dir.join("nodes").join(name),
        ids: cloud_sandbox::ids::DEFAULT_DIR.into(),
        runc: "runc".into(),
    };
    Sandboxes::new(config).await.unwrap()
}

fn spec(f: &Fixture, id: &str, script: &str) -> SandboxSpec {
    SandboxSpec {
        id: id.into(),
        layers: vec![f.layer.clone()],
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: vec!["GREETING=hello".into()],
        cwd: "/".into(),
        user: String::new(),
        hostname: "box".into(),
        network: Network::Own,
        address: None,
        resolv_conf: None,
        secret_files: Vec::new(),
        limits: Limits { memory_bytes: 64 << 20, pids: 64, cpu_millicores: Some(500) },
    }
}

async fn output(mut s: cloud_sandbox::Sandbox) -> (String, Option<i32>) {
    let mut out = String::new();
    s.stdout.take().unwrap().read_to_string(&mut out).await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), s.wait()).await.unwrap().unwrap();
    (out, status.code())
}

#[tokio::test]
async fn a_sandbox_runs_as_root_of_its_own_mapped_ids_and_reports_its_exit() {
    let Some(f) = fixture().await else { return };
    let s = f
        .sandboxes
        .start(&spec(&f, "t1", "id -u; hostname; echo $GREETING; cat /etc/secret; touch /new && echo wrote; exit 3"))
        .await
        .unwrap();
    let host_uid = std::fs::metadata(format!("/proc/{}", s.pid)).unwrap().uid();
    assert!(host_uid >= 1 << 30, "root inside is host uid {host_uid}");
    let (out, code) = output(s).await;
    assert_eq!(out, "0\nbox\nhello\nimage secret\nwrote\n");
    assert_eq!(code, Some(3));
    f.sandboxes.remove("t1").await.unwrap();
    assert!(!f._dir.path().join("sandboxes/t1").exists());
}

#[tokio::test]
async fn inside_a_sandbox_the_host_is_out_of_reach() {
    let Some(f) = fixture().await else { return };
    let script = "ls /proc | grep -c '^[0-9]'; \
                  cat /etc/shadow 2>/dev/null && echo READ-SHADOW; \
                  mount -t tmpfs t /tmp 2>/dev/null && echo MOUNTED; \
                  mknod /tmp/mem c 1 1 2>/dev/null && echo MKNOD; \
                  echo 1 > /proc/sys/kernel/panic 2>/dev/null && echo SYSCTL; \
                  ls /sys/fs/cgroup | grep -c . ; \
                  kill -0 1 && echo SELF";
    let s = f.sandboxes.start(&spec(&f, "t2", script)).await.unwrap();
    let (out, _) = output(s).await;
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].parse::<u32>().unwrap() <= 4, "only its own processes: {out}");
    for bad in ["READ-SHADOW", "MOUNTED", "MKNOD", "SYSCTL"] {
        assert!(!out.contains(bad), "{bad}: {out}");
    }
    assert!(out.contains("\n0\n"), "the host's cgroups are masked: {out}");
    assert!(out.ends_with("SELF\n"), "{out}");
    f.sandboxes.remove("t2").await.unwrap();
}

#[tokio::test]
async fn stop_and_remove_all_leave_nothing_behind() {
    let Some(f) = fixture().await else { return };
    let mut s = f.sandboxes.start(&spec(&f, "t3", "trap 'exit 0' TERM; while true; do sleep 1; done")).await.unwrap();
    let _other = f.sandboxes.start(&spec(&f, "t4", "sleep 1000")).await.unwrap();
    let status = f.sandboxes.stop(&mut s, Duration::from_secs(10)).await.unwrap();
    // The program's trap exits 0; SIGTERM itself would be signal 15.
    let by_term = std::os::unix::process::ExitStatusExt::signal(&status) == Some(15);
    assert!(status.code() == Some(0) || by_term, "{status:?}");
    // A restarted agent removes what is left: t4 still runs.
    assert_eq!(f.sandboxes.remove_all().await.unwrap(), 2);
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(f._dir.path().to_str().unwrap()), "no mount left");
    let mut left: Vec<_> =
        std::fs::read_dir(f._dir.path().join("nodes/a")).unwrap().flatten().map(|e| e.file_name()).collect();
    left.sort();
    assert_eq!(left, ["init", "lock", "runc"], "only runc's state dir, the init and the node's lock");
}

/// Programs rarely handle SIGTERM as a pid namespace's first process must (they would ignore it): the init
/// passes it on, so a stop takes as long as the program needs, not the grace period.
#[tokio::test]
async fn a_program_without_a_handler_stops_at_once_and_reaped_orphans_do_not_pile_up() {
    let Some(f) = fixture().await else { return };
    // `sleep` has no handler; the subshells are orphaned at once and must be reaped by someone.
    let script = "for i in 1 2 3; do (sleep 0 &); done; echo ready; exec sleep 1000";
    let mut s = f.sandboxes.start(&spec(&f, "t5", script)).await.unwrap();
    let mut out = s.stdout.take().unwrap();
    let mut first = [0u8; 6];
    out.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"ready\n");
    let t0 = std::time::Instant::now();
    let status = f.sandboxes.stop(&mut s, Duration::from_secs(20)).await.unwrap();
    // Well under the 20 s grace period; runc takes its time on a busy machine.
    assert!(t0.elapsed() < Duration::from_secs(15), "stopped after {:?}", t0.elapsed());
    assert_eq!(status.code(), Some(128 + 15), "the program's end, as a shell reports it: {status:?}");
    f.sandboxes.remove("t5").await.unwrap();
}

/// A sandbox ends with the `Sandboxes` that started it (as with the agent's process, killed or not): nothing
/// runs unsupervised, and the next agent removes what is left on disk.
#[tokio::test]
async fn no_sandbox_outlives_its_supervisor() {
    let Some(f) = fixture().await else { return };
    let s = f.sandboxes.start(&spec(&f, "t6", "exec sleep 1000")).await.unwrap();
    let pid = s.pid;
    let Fixture { _dir: dir, sandboxes, .. } = f;
    drop(sandboxes);
    let gone = || {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .map_or(true, |st| st.lines().any(|l| l.starts_with("State:") && l.contains("Z")))
    };
    let t0 = std::time::Instant::now();
    while !gone() {
        assert!(t0.elapsed() < Duration::from_secs(10), "the sandbox outlived its supervisor");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(s);
    let next = node(dir.path(), "a").await;
    assert_eq!(next.remove_all().await.unwrap(), 1);
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(dir.path().to_str().unwrap()), "no mount left");
}

/// What an agent that never comes back left (its node renamed, or its database reset) is removed by the next
/// agent to start beside it; a live agent's sandboxes are left alone.
#[tokio::test]
async fn abandoned_sandboxes_are_removed_and_live_ones_kept() {
    let Some(f) = fixture().await else { return };
    let gone = node(f._dir.path(), "gone").await;
    let _ = gone.start(&spec(&f, "t7", "exec sleep 1000")).await.unwrap();
    drop(gone);
    let live = f.sandboxes.start(&spec(&f, "t8", "exec sleep 1000")).await.unwrap();
    let next = node(f._dir.path(), "next").await;
    assert_eq!(next.remove_abandoned().await.unwrap(), ["gone"]);
    assert!(!f._dir.path().join("nodes/gone").exists());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains("/nodes/gone/"), "no mount of the abandoned node left");
    assert!(mounts.contains("/nodes/a/t8/"), "the live node's sandbox is kept");
    assert!(std::path::Path::new(&format!("/proc/{}", live.pid)).exists());
    f.sandboxes.remove("t8").await.unwrap();
    assert!(next.remove_abandoned().await.unwrap().is_empty(), "a is alive, next is the caller");
}

/// Set (to the working directory) in the copy of this test binary that runs as `nobody`.
const ROOTLESS_CHILD: &str = "CLOUD_SANDBOX_ROOTLESS_CHILD";

/// An unprivileged agent's sandboxes: this test runs a copy of itself as `nobody` (the child half below), which
/// flattens a busybox image without root and starts a rootless sandbox on it.
#[tokio::test]
async fn an_unprivileged_agent_makes_rootless_sandboxes() {
    if let Some(dir) = std::env::var_os(ROOTLESS_CHILD) {
        return rootless_child(PathBuf::from(dir)).await;
    }
    if !is_root() {
        eprintln!("skipped: the test becomes nobody, which needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).unwrap();
    // The test binary may sit where nobody cannot read it (under /root): a copy nobody can run.
    let exe = dir.path().join("sandbox-test");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    let out = std::os::unix::process::CommandExt::gid(
        std::os::unix::process::CommandExt::uid(&mut std::process::Command::new(&exe), 65534),
        65534,
    )
    .args(["--exact", "an_unprivileged_agent_makes_rootless_sandboxes", "--nocapture"])
    .env(ROOTLESS_CHILD, dir.path())
    .env_remove("HOME")
    .output()
    .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && stdout.contains("1 passed"), "as nobody:\n{stdout}\n{stderr}");
}

async fn rootless_child(dir: PathBuf) {
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static is installed by scripts/setup");
    let mut layer = LayerBuilder::new().dir("bin", 0o755).file("bin/busybox", 0o755, &busybox);
    for applet in ["sh", "id", "cat", "ls", "grep", "echo", "mount", "touch", "kill"] {
        layer = layer.symlink(&format!("bin/{applet}"), "busybox");
    }
    let root = dir.join("root");
    std::fs::create_dir(&root).unwrap();
    layer::flatten(&layer.into_tar(), &root, &mut Budget::new(cloud_oci::Limits::default())).unwrap();
    let sandboxes =
        Sandboxes::new(SandboxConfig { dir: dir.join("sandboxes"), ids: dir.join("ids"), runc: "runc".into() })
            .await
            .unwrap();
    assert!(sandboxes.rootless());
    let script = "id -u; cat /proc/self/uid_map; echo scratch > /tmp/x && cat /tmp/x; \
                  touch /bin/new 2>/dev/null || echo read-only; ls /proc | grep -c '^[0-9]'; \
                  mount -t tmpfs t /tmp 2>/dev/null && echo MOUNTED; grep NoNewPrivs /proc/self/status; \
                  kill -0 1 && echo init";
    let spec = SandboxSpec {
        id: "rootless1".into(),
        layers: vec![root],
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: Vec::new(),
        cwd: "/".into(),
        user: String::new(),
        hostname: "box".into(),
        network: Network::Host,
        address: None,
        resolv_conf: None,
        secret_files: Vec::new(),
        limits: Limits { memory_bytes: 64 << 20, pids: 64, cpu_millicores: None },
    };
    let s = sandboxes.start(&spec).await.unwrap();
    let host_uid = std::fs::metadata(format!("/proc/{}", s.pid)).unwrap().uid();
    assert_eq!(host_uid, 65534, "root inside is the agent's user outside");
    let (out, code) = output(s).await;
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(lines[0], "0", "root inside: {out}");
    assert!(lines[1].split_whitespace().eq(["0", "65534", "1"]), "only the agent's own uid is mapped: {out}");
    assert_eq!(lines[2..4], ["scratch", "read-only"], "a /tmp of its own on a read-only root: {out}");
    // Its init, the shell, ls and grep.
    assert!(lines[4].parse::<u32>().unwrap() <= 4, "only its own processes: {out}");
    assert!(!out.contains("MOUNTED"), "{out}");
    assert!(out.contains("NoNewPrivs:\t1") && out.ends_with("init\n"), "{out}");
    sandboxes.remove("rootless1").await.unwrap();
    assert!(!dir.join("sandboxes/rootless1").exists());
}
