//! Finding the PostgreSQL server binaries.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::Error;

/// Where Debian and Ubuntu install each major version's server binaries.
const DEBIAN_ROOT: &str = "/usr/lib/postgresql";

/// The programs a bin dir must hold.
const REQUIRED: [&str; 2] = ["postgres", "initdb"];

/// The bin dir to use: `given` when set (checked), else the first of
/// 1. `/usr/lib/postgresql/<cluster_version>/bin` when an existing cluster names its version (a newer server
///    refuses an older cluster's files),
/// 2. `pg_config --bindir`,
/// 3. `/usr/lib/postgresql/<highest version>/bin`,
/// 4. the directory of `postgres` on `PATH`,
///
/// that holds a `postgres` program.
pub(crate) fn bin_dir(given: Option<&Path>, cluster_version: Option<&str>) -> Result<PathBuf, Error> {
    if let Some(dir) = given {
        check(dir)?;
        return Ok(dir.to_owned());
    }
    let mut searched = Vec::new();
    let mut candidates = Vec::new();
    if let Some(version) = cluster_version {
        candidates.push(Path::new(DEBIAN_ROOT).join(version).join("bin"));
    }
    match pg_config_bindir() {
        Some(dir) => candidates.push(dir),
        None => searched.push("`pg_config --bindir`".to_owned()),
    }
    match highest_debian_version(Path::new(DEBIAN_ROOT)) {
        Some(dir) => candidates.push(dir),
        None => searched.push(format!("{DEBIAN_ROOT}/<version>/bin")),
    }
    candidates.extend(std::env::var_os("PATH").iter().flat_map(std::env::split_paths));
    searched.push("PATH".to_owned());
    for dir in candidates {
        if is_program(&dir.join("postgres")) {
            check(&dir)?;
            tracing::debug!(bin_dir = %dir.display(), "found the PostgreSQL server binaries");
            return Ok(dir);
        }
    }
    Err(Error::BinariesNotFound { searched: searched.join(", ") })
}

fn check(dir: &Path) -> Result<(), Error> {
    match REQUIRED.into_iter().find(|p| !is_program(&dir.join(p))) {
        Some(program) => Err(Error::ProgramMissing { program, bin_dir: dir.to_owned() }),
        None => Ok(()),
    }
}

fn is_program(path: &Path) -> bool {
    path.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn pg_config_bindir() -> Option<PathBuf> {
    let out = Command::new("pg_config").arg("--bindir").stdin(Stdio::null()).stderr(Stdio::null()).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let dir = text.trim();
    (out.status.success() && !dir.is_empty()).then(|| PathBuf::from(dir))
}

/// `<root>/<highest version>/bin` among the versions that have a `postgres` program.
fn highest_debian_version(root: &Path) -> Option<PathBuf> {
    std::fs::read_dir(root)
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = parse_version(entry.file_name().to_str()?)?;
            let bin = entry.path().join("bin");
            is_program(&bin.join("postgres")).then_some((version, bin))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, bin)| bin)
}

/// `"15"` -> `[15]`, `"9.6"` -> `[9, 6]`; anything else is not a version directory.
fn parse_version(name: &str) -> Option<Vec<u32>> {
    name.split('.').map(|part| part.parse().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically() {
        assert_eq!(parse_version("15"), Some(vec![15]));
        assert_eq!(parse_version("9.6"), Some(vec![9, 6]));
        assert_eq!(parse_version("common"), None);
        assert!(parse_version("10") > parse_version("9.6"));
    }

    #[test]
    fn highest_version_with_a_server_wins() {
        let root = tempfile::tempdir().unwrap();
        let make = |version: &str, with_server: bool| {
            let bin = root.path().join(version).join("bin");
            std::fs::create_dir_all(&bin).unwrap();
            if with_server {
                let program = bin.join("postgres");
                std::fs::write(&program, "").unwrap();
                std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
            }
        };
        make("9.6", true);
        make("13", true);
        make("16", false); // client-only install
        std::fs::create_dir_all(root.path().join("common")).unwrap();
        assert_eq!(highest_debian_version(root.path()), Some(root.path().join("13/bin")));
    }

    #[test]
    fn a_given_dir_without_initdb_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = bin_dir(Some(dir.path()), None).unwrap_err();
        assert!(matches!(err, Error::ProgramMissing { program: "postgres", .. }), "{err}");
    }
}
