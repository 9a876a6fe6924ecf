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

/// The configuration of one sandbox whose id range starts at `base`, running as `account`.
pub(crate) fn config(spec: &SandboxSpec, base: u32, account: &Account, files: &BundleFiles) -> Value {
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
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        // A user namespace cannot mount sysfs for a network namespace it does not own: the host's, read-only,
        // with its sensitive parts masked below.
        json!({"destination": "/sys", "type": "bind", "source": "/sys", "options": ["rbind", "ro", "nosuid", "noexec", "nodev"]}),
        bind(&files.hosts, "/etc/hosts"),
        bind(&files.hostname, "/etc/hostname"),
        // The init, the one host file a sandbox runs (root-owned, so nobody's inside: read-only to it).
        json!({"destination": crate::INIT_PATH, "type": "bind", "source": files.init, "options": ["bind", "ro", "nosuid", "nodev"]}),
    ];
    if let Some(resolv) = &spec.resolv_conf {
        mounts.push(bind(resolv, "/etc/resolv.conf"));
    }
    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "mount"}),
        json!({"type": "user"}),
    ];
    namespaces.push(match &spec.netns {
        Some(path) => json!({"type": "network", "path": path}),
        None => json!({"type": "network"}),
    });
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
    let mapping = json!([{"containerID": 0, "hostID": base, "size": RANGE_SIZE}]);
    json!({
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
        "root": {"path": "rootfs", "readonly": false},
        "hostname": spec.hostname,
        "mounts": mounts,
        "linux": {
            "uidMappings": mapping,
            "gidMappings": mapping,
            "namespaces": namespaces,
            "resources": resources,
            "cgroupsPath": format!("/cloud-sandbox/{}", spec.id),
            "maskedPaths": MASKED,
            "readonlyPaths": READ_ONLY,
            "seccomp": crate::seccomp::profile(),
        },
    })
}

/// Files the runtime bind-mounts into the sandbox, kept in its bundle directory.
#[derive(Debug)]
pub(crate) struct BundleFiles {
    pub hosts: std::path::PathBuf,
    pub hostname: std::path::PathBuf,
    pub init: std::path::PathBuf,
}

/// This process's hard limit on open files.
#[allow(unsafe_code)]
fn open_files_limit() -> u64 {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit fills the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0 { r.rlim_max } else { 1024 }
}
