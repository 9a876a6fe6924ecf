//! Which account PostgreSQL runs as, and whether that account can reach the data dir.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::Error;

/// The unprivileged account initdb and postgres run as when we are root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Account {
    /// For messages: the user name, or `uid N` when taken from a data dir's owner.
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl Account {
    /// `None` when we are not root: then the programs run as ourselves.
    ///
    /// As root, an existing cluster is run as its owner (so a cluster made with `nobody` keeps working after a
    /// `postgres` account appears); a new one as `postgres`, else `nobody`.
    pub fn for_cluster(existing_owner: Option<(u32, u32)>) -> Result<Option<Account>, Error> {
        if effective_uid() != 0 {
            return Ok(None);
        }
        if let Some((uid, gid)) = existing_owner.filter(|(uid, _)| *uid != 0) {
            return Ok(Some(Account { name: format!("uid {uid}"), uid, gid }));
        }
        ["postgres", "nobody"]
            .into_iter()
            .find_map(|name| lookup_user(name).map(|(uid, gid)| Account { name: name.to_owned(), uid, gid }))
            .map(Some)
            .ok_or(Error::NoUnprivilegedAccount)
    }

    /// Whether the account may enter `dir`, by its mode bits. Groups are cleared when we switch uid, so only
    /// the primary group counts. ACLs are not consulted.
    pub fn can_traverse(&self, dir: &Path) -> std::io::Result<bool> {
        let meta = fs::metadata(dir)?;
        let bit = if meta.uid() == self.uid {
            0o100
        } else if meta.gid() == self.gid {
            0o010
        } else {
            0o001
        };
        Ok(meta.mode() & bit != 0)
    }

    /// Fails with a clear error naming the first directory from `/` down to `dir` the account cannot enter.
    pub fn check_reaches(&self, dir: &Path, data_dir: &Path) -> Result<(), Error> {
        let mut chain: Vec<&Path> = dir.ancestors().collect();
        chain.reverse();
        for step in chain {
            let ok = self.can_traverse(step).map_err(Error::io("inspect the directory", step))?;
            if !ok {
                return Err(Error::DirNotTraversable {
                    dir: step.to_owned(),
                    data_dir: data_dir.to_owned(),
                    account: self.name.clone(),
                });
            }
        }
        Ok(())
    }

    /// Gives a file or directory we created to the account.
    pub fn chown(&self, path: &Path) -> Result<(), Error> {
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid)).map_err(Error::io("change the owner of", path))
    }
}

/// Gives `path` to the account, if we switch to one.
pub(crate) fn chown_to(account: Option<&Account>, path: &Path) -> Result<(), Error> {
    account.map_or(Ok(()), |a| a.chown(path))
}

pub(crate) fn effective_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// The uid and primary gid of a user, through NSS (so not only /etc/passwd).
fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let user = nix::unistd::User::from_name(name).ok()??;
    Some((user.uid.as_raw(), user.gid.as_raw()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_exists_and_a_made_up_user_does_not() {
        assert_eq!(lookup_user("root"), Some((0, 0)));
        assert_eq!(lookup_user("no-such-user-cloud-epg"), None);
    }

    #[test]
    fn traversal_follows_owner_group_other_bits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path();
        let meta = fs::metadata(path).unwrap();
        let owner = Account { name: "owner".into(), uid: meta.uid(), gid: meta.gid() };
        let stranger = Account { name: "stranger".into(), uid: meta.uid() + 4242, gid: meta.gid() + 4242 };
        let group_member = Account { name: "member".into(), uid: meta.uid() + 4242, gid: meta.gid() };
        use std::os::unix::fs::PermissionsExt;
        for (mode, o, g, s) in [(0o700, true, false, false), (0o710, true, true, false), (0o701, true, false, true)] {
            fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(owner.can_traverse(path).unwrap(), o, "{mode:o} owner");
            assert_eq!(group_member.can_traverse(path).unwrap(), g, "{mode:o} group");
            assert_eq!(stranger.can_traverse(path).unwrap(), s, "{mode:o} other");
        }
    }
}
