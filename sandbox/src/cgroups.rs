//! runc finds the cgroup hierarchies through this process's mounts. A process started with `ip netns exec`
//! (as `cloudd dev` is in some set-ups, and in tests) has a mount namespace of its own with a fresh `/sys`
//! that holds none: they are mounted again there, as the host's first process has them. In the host's own
//! mount namespace nothing changes.

use std::ffi::CString;
use std::path::Path;

/// One mount, as `/proc/<pid>/mountinfo` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mount {
    point: String,
    fstype: String,
    /// Superblock options without `rw`/`ro`: for cgroup v1, the controllers (`memory`, `name=systemd`).
    options: String,
}

fn mounts(mountinfo: &str) -> Vec<Mount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let point = before.split_whitespace().nth(4)?.to_owned();
            let mut after = after.split_whitespace();
            let fstype = after.next()?.to_owned();
            let options = after
                .nth(1)
                .unwrap_or("")
                .split(',')
                .filter(|o| *o != "rw" && *o != "ro")
                .collect::<Vec<_>>()
                .join(",");
            Some(Mount { point, fstype, options })
        })
        .collect()
}

fn is_cgroup(m: &Mount) -> bool {
    m.fstype == "cgroup" || m.fstype == "cgroup2"
}

/// The mounts to make so that this namespace sees the host's cgroup hierarchies: none when it sees some already.
fn missing(ours: &str, host: &str) -> Vec<Mount> {
    if mounts(ours).iter().any(is_cgroup) {
        return Vec::new();
    }
    mounts(host)
        .into_iter()
        .filter(|m| m.point.starts_with("/sys/fs/cgroup"))
        .filter(|m| is_cgroup(m) || (m.point == "/sys/fs/cgroup" && m.fstype == "tmpfs"))
        .collect()
}

/// Mounts the host's cgroup hierarchies where this process's mount namespace lacks them.
pub(crate) fn ensure_visible() -> std::io::Result<()> {
    let ours = std::fs::read_to_string("/proc/self/mountinfo")?;
    let host = std::fs::read_to_string("/proc/1/mountinfo").unwrap_or_default();
    for m in missing(&ours, &host) {
        std::fs::create_dir_all(&m.point)?;
        let options = if m.fstype == "tmpfs" { "mode=755".to_owned() } else { m.options.clone() };
        tracing::info!(point = %m.point, fstype = %m.fstype, %options, "mounting a cgroup hierarchy this mount namespace lacks");
        mount(&m.fstype, Path::new(&m.point), &options)?;
    }
    Ok(())
}

#[allow(unsafe_code)]
fn mount(fstype: &str, point: &Path, options: &str) -> std::io::Result<()> {
    let c = |s: &[u8]| CString::new(s).map_err(std::io::Error::other);
    let (source, target, kind, data) = (
        c(fstype.as_bytes())?,
        c(point.as_os_str().as_encoded_bytes())?,
        c(fstype.as_bytes())?,
        c(options.as_bytes())?,
    );
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    // SAFETY: mount(2) with valid NUL-terminated strings that outlive the call.
    let r = unsafe { libc::mount(source.as_ptr(), target.as_ptr(), kind.as_ptr(), flags, data.as_ptr().cast()) };
    if r == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str = "\
23 1 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn only_a_namespace_without_cgroups_gets_the_hosts() {
        let netns_exec = "99 1 0:50 / /sys rw,relatime - sysfs cloud-x rw\n";
        let want: Vec<(&str, &str, &str)> = vec![
            ("/sys/fs/cgroup", "tmpfs", "mode=755"),
            ("/sys/fs/cgroup/cpu", "cgroup", "cpu"),
            ("/sys/fs/cgroup/systemd", "cgroup", "name=systemd"),
            ("/sys/fs/cgroup/unified", "cgroup2", ""),
        ];
        let got = missing(netns_exec, HOST);
        let got: Vec<(&str, &str, &str)> =
            got.iter().map(|m| (m.point.as_str(), m.fstype.as_str(), m.options.as_str())).collect();
        assert_eq!(got, want);
        assert!(missing(HOST, HOST).is_empty(), "the host's own namespace is left alone");
    }
}
