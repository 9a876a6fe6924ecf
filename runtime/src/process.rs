//! Instances as host processes, in loopback mode (an agent without root, so without sandboxes): run as the
//! agent's user in the host's namespaces, from the image's directory, without a way to gain privilege
//! (`no_new_privs`), dying with the agent. No isolation is claimed (the agent says so when it starts).

use std::path::{Path, PathBuf};
use std::process::Stdio;

use nix::sys::prctl;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// What PATH is for host processes: the host's programs (an image's PATH names directories inside it).
const HOST_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// How to start one host process.
#[derive(Debug, Clone)]
pub struct HostLaunch {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Working directory.
    pub cwd: PathBuf,
    /// `KEY=value` entries, the complete environment.
    pub env: Vec<String>,
}

impl HostLaunch {
    /// Runs `argv` from the image's directory `root` as its sandbox would: an absolute program is the image's
    /// file, a relative one with a `/` is relative to the working directory `cwd`; a bare name is the host's.
    pub fn from_image(root: &Path, cwd: &str, mut argv: Vec<String>, env: Vec<String>) -> Self {
        let inside = |p: &str| root.join(p.trim_start_matches('/'));
        let dir = Some(inside(cwd)).filter(|d| d.is_dir()).unwrap_or_else(|| root.to_path_buf());
        if let Some(program) = argv.first_mut() {
            if program.starts_with('/') {
                *program = inside(program).display().to_string();
            } else if program.contains('/') {
                *program = dir.join(&*program).display().to_string();
            }
        }
        let mut env: Vec<String> = env.into_iter().filter(|e| !e.starts_with("PATH=")).collect();
        env.push(format!("PATH={HOST_PATH}"));
        Self { argv, cwd: dir, env }
    }
}

/// Sends a signal to a process; one that is already gone is no error.
pub fn kill(pid: i32, signal: Signal) {
    let _ = nix::sys::signal::kill(Pid::from_raw(pid), signal);
}

/// Starts the process with piped stdout and stderr.
pub fn spawn(launch: &HostLaunch) -> std::io::Result<Child> {
    let (program, args) = launch
        .argv
        .split_first()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty command"))?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .current_dir(&launch.cwd)
        .env_clear()
        .envs(launch.env.iter().filter_map(|e| e.split_once('=')))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    without_privilege(&mut cmd);
    cmd.spawn()
}

#[allow(unsafe_code)]
fn without_privilege(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only calls prctl, which is async-signal-safe;
    // nix's errors are plain errno values, built without allocating.
    unsafe {
        cmd.pre_exec(|| {
            // No exec from here on gains privilege: setuid and setgid bits and file capabilities are ignored,
            // whatever file the instance finds (its image, the host's own setuid programs).
            prctl::set_no_new_privs()?;
            let _ = prctl::set_pdeathsig(Signal::SIGKILL);
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_resolve_inside_the_image_or_on_the_hosts_path() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("app")).unwrap();
        let l = HostLaunch::from_image(root.path(), "/app", vec!["/hello".into()], vec!["PATH=/".into()]);
        assert_eq!(l.argv[0], root.path().join("hello").display().to_string());
        assert_eq!(l.cwd, root.path().join("app"));
        assert_eq!(l.env, [format!("PATH={HOST_PATH}")]);
        let l = HostLaunch::from_image(root.path(), "/app", vec!["./run.sh".into()], vec![]);
        assert_eq!(l.argv[0], root.path().join("app/./run.sh").display().to_string());
        let l = HostLaunch::from_image(root.path(), "/missing", vec!["sh".into(), "x".into()], vec![]);
        assert_eq!((l.argv[0].as_str(), l.cwd.as_path()), ("sh", root.path()));
    }
}
