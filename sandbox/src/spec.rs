//! The OCI runtime configuration (`config.json`) of a sandbox, as runc reads it.

use serde_json::{Value, json};

use crate::user::Account;
use crate::{SandboxSpec, ids::RANGE_SIZE};

/// Capabilities a sandbox keeps (over its own user namespace only): what ordinary server software uses.
/// Compared with Docker's default set, NET_RAW, MKNOD and AUDIT_WRITE are gone.
const CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_NET_BIND_SERVICE",
    "CAP_SETFCAP",
    "CAP_SETGID",
    "CAP_SETPCAP",
    "CAP_SETUID",
    "CAP_SYS_CHROOT",
];

/// Kernel interfaces hidden from sandboxes (runc's and Docker's list, plus the host's cgroup tree, which
/// would name other instances and list their host pids).
const MASKED: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/fs/cgroup",
    "/sys/kernel/debug",
    "/sys/kernel/tracing",
    "/sys/kernel/security",
];

/// Kernel interfaces sandboxes may read but not write.
const READ_ONLY: &[&str] = &["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"];

/// Whose ids a sandbox's user namespace maps.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Ids {
    /// A range of 65536 host ids of its own, from this base (as root).
    Range(u32),
    /// The agent's own uid and gid, as root inside (rootless: an unprivileged agent maps nothing else).
    Own { uid: u32, gid: u32 },
}

/// The configuration of one sandbox whose ids are `ids`, running as `account`.
pub(crate) fn config(spec: &SandboxSpec, ids: Ids, account: &Account, files: &BundleFiles) -> Value {
    let mut env = spec.env.clone();
    let has = |env: &[String], key: &str| env.iter().any(|e| e.split_once('=').is_some_and(|(k, _)| k == key));
    if !has(&env, "PATH") {
        env.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    }
    if !has(&env, "HOME") {
        env.push(format!("HOME={}", account.home));
    }
    if !has(&env, "HOSTNAME") {
        env.push(format!("HOSTNAME={}", spec.hostname));
    }
    let bind = |source: &std::path::Path, destination: &str| json!({"destination": destination, "type": "bind", "source": source, "options": ["bind", "ro", "nosuid", "nodev", "noexec"]});
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": match ids {
            Ids::Range(_) => &["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"][..],
            // Group 5 (tty) is not mapped.
            Ids::Own { .. } => &["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"][..],
        }}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        // A user namespace cannot mount sysfs for a network namespace it does not own: the host's, read-only,
        // with its sensitive parts masked below.
        json!({"destination": "/sys", "type": "bind", "source": "/sys", "options": ["rbind", "ro", "nosuid", "noexec", "nodev"]}),
        bind(&files.hosts, "/etc/hosts"),
        bind(&files.hostname, "/etc/hostname"),
        // The init, the one host file a sandbox runs (root-owned, so nobody's inside: read-only to it).
        json!({"destination": crate::INIT_PATH, "type": "bind", "source": files.init, "options": ["bind", "ro", "nosuid", "nodev"]}),
        // Where the init takes `instance exec` requests from the agent (see exec.rs): the sandbox's own directory.
        json!({"destination": crate::EXEC_DIR, "type": "bind", "source": files.exec, "options": ["bind", "rw", "nosuid", "nodev", "noexec"]}),
    ];
    if let Some(resolv) = &spec.resolv_conf {
        mounts.push(bind(resolv, "/etc/resolv.conf"));
    }
    if let Ids::Own { .. } = ids {
        // The root filesystem is shared and read-only: scratch space of the sandbox's own.
        for dir in ["/tmp", "/run"] {
            mounts.push(json!({"destination": dir, "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777", "size=65536k"]}));
        }
    }
    if let Some(secrets) = &files.secrets {
        // After /run (rootless), so that it shows over it.
        mounts.push(bind(secrets, "/run/secrets"));
    }
    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "mount"}),
        json!({"type": "user"}),
    ];
    match &spec.network {
        crate::Network::Join(path) => namespaces.push(json!({"type": "network", "path": path})),
        crate::Network::Own => namespaces.push(json!({"type": "network"})),
        crate::Network::Host => {}
    }
    let mut resources = json!({
        "devices": [{"allow": false, "access": "rwm"}],
        "memory": {"limit": spec.limits.memory_bytes},
        "pids": {"limit": spec.limits.pids},
    });
    if let Some(millicores) = spec.limits.cpu_millicores {
        resources["cpu"] = json!({"quota": millicores * 100, "period": 100_000});
    }
    // Raising a hard limit needs a capability over the host: at most what the agent has.
    let nofile = open_files_limit().min(65536);
    let (uid_map, gid_map) = match ids {
        Ids::Range(base) => (
            json!([{"containerID": 0, "hostID": base, "size": RANGE_SIZE}]),
            json!([{"containerID": 0, "hostID": base, "size": RANGE_SIZE}]),
        ),
        Ids::Own { uid, gid } => (
            json!([{"containerID": 0, "hostID": uid, "size": 1}]),
            json!([{"containerID": 0, "hostID": gid, "size": 1}]),
        ),
    };
    let root = match (ids, files.root.as_deref()) {
        (Ids::Own { .. }, Some(dir)) => json!({"path": dir, "readonly": true}),
        _ => json!({"path": "rootfs", "readonly": false}),
    };
    let mut config = json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": account.uid, "gid": account.gid},
            "args": std::iter::once(crate::INIT_PATH).chain(spec.argv.iter().map(String::as_str)).collect::<Vec<_>>(),
            "env": env,
            "cwd": spec.cwd,
            "capabilities": {
                "bounding": CAPABILITIES,
                "effective": CAPABILITIES,
                "permitted": CAPABILITIES,
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile}],
            "noNewPrivileges": true,
            // A sandbox is killed before the platform when memory runs out.
            "oomScoreAdj": 500,
        },
        "root": root,
        "hostname": spec.hostname,
        "mounts": mounts,
        "linux": {
            "uidMappings": uid_map,
            "gidMappings": gid_map,
            "namespaces": namespaces,
            "maskedPaths": MASKED,
            "readonlyPaths": READ_ONLY,
            "seccomp": crate::seccomp::profile(),
        },
    });
    // Cgroups are root's to hand out (v1): an unprivileged agent's sandboxes have no limits of their own.
    if let Ids::Range(_) = ids {
        config["linux"]["resources"] = resources;
        config["linux"]["cgroupsPath"] = json!(format!("/cloud-sandbox/{}", spec.id));
    }
    config
}

/// Files the runtime bind-mounts into the sandbox, kept in its bundle directory.
#[derive(Debug)]
pub(crate) struct BundleFiles {
    pub hosts: std::path::PathBuf,
    pub hostname: std::path::PathBuf,
    pub init: std::path::PathBuf,
    /// The directory of the init's exec socket, the sandbox user's own.
    pub exec: std::path::PathBuf,
    /// The root filesystem when it is a directory of its own (rootless: the flattened image), else `rootfs`.
    pub root: Option<std::path::PathBuf>,
    /// The directory of its secret files, when it has some: `/run/secrets` inside.
    pub secrets: Option<std::path::PathBuf>,
}

/// This process's hard limit on open files.
#[allow(unsafe_code)]
fn open_files_limit() -> u64 {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit fills the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0 { r.rlim_max } else { 1024 }
}
