//! `REMOTE:NAME` addressing, as LXD's `lxc` has it (`lxc list prod:`, `lxc info prod:c1`): a name can say which
//! remote it lives on.
//!
//! The prefixes are stripped once, right after parsing and before any client exists, so a command talks to one
//! remote and its handler sees plain names. Only arguments that name a service, instance, image or tenant are
//! split: port specs, image references, paths and `KEY=VALUE` pairs have colons of their own, and resource names
//! never do (they are DNS labels), so a colon in a name argument can only be a remote prefix.
//!
//! `instance copy` is the exception: its two names are on two remotes by design (`lxc copy c1 prod:`), so it
//! is left alone here and splits them itself ([`crate::commands::copy`]).

use std::fmt;

use crate::Command;
use crate::commands::service::looks_like_port_spec;
use crate::{ImageCmd, InstanceCmd, ServiceCmd, TenantCmd};

/// Why a command's addresses were refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AddressError {
    /// The part before the first ':' cannot be a remote name.
    InvalidRemote {
        /// The argument as typed.
        arg: String,
        /// Its prefix.
        remote: String,
    },
    /// `REMOTE:` alone where a name is required.
    MissingName {
        /// The argument as typed.
        arg: String,
    },
    /// A list command's argument that is not `REMOTE:`.
    NotARemote {
        /// The argument as typed.
        arg: String,
    },
    /// Some names of a repeated argument have a remote and some do not, which reads as two remotes.
    PartlyPrefixed {
        /// A name without a remote.
        bare: String,
        /// A name with one.
        prefixed: String,
    },
    /// Two arguments of one command are on different remotes.
    Mixed {
        /// The earlier argument.
        first: String,
        /// Its remote.
        first_remote: String,
        /// The later one.
        second: String,
        /// Its remote.
        second_remote: String,
    },
    /// An argument's remote is not the one `--remote` names.
    FlagDisagrees {
        /// The value of `--remote`.
        flag: String,
        /// The argument as typed.
        arg: String,
        /// Its remote.
        remote: String,
    },
}

impl fmt::Display for AddressError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidRemote { arg, remote } => {
                write!(f, "\"{arg}\": remote name \"{remote}\" must be letters, digits, '-' or '_'")
            }
            Self::MissingName { arg } => write!(f, "\"{arg}\": a name must follow the remote (\"{arg}NAME\")"),
            Self::NotARemote { arg } => {
                let remote = arg.split(':').next().unwrap_or(arg);
                write!(f, "\"{arg}\": a list takes a remote only, as \"{remote}:\"")
            }
            Self::PartlyPrefixed { bare, prefixed } => write!(
                f,
                "\"{bare}\" has no remote but \"{prefixed}\" has one: write the remote on every name or on none"
            ),
            Self::Mixed { first, first_remote, second, second_remote } => write!(
                f,
                "\"{first}\" is on remote \"{first_remote}\" but \"{second}\" on remote \"{second_remote}\": one command talks to one remote"
            ),
            Self::FlagDisagrees { flag, arg, remote } => {
                write!(f, "\"{arg}\" is on remote \"{remote}\" but --remote says \"{flag}\": give the remote once")
            }
        }
    }
}

impl std::error::Error for AddressError {}

/// A name argument split at its first ':'.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The remote before the colon, if there is a colon.
    pub remote: Option<String>,
    /// What follows the colon, or the whole argument; empty for `REMOTE:`.
    pub name: String,
}

impl Target {
    /// Splits an argument. The prefix is checked as a name only (the configuration says whether such a remote
    /// exists); an empty name is left for the caller, since list commands want exactly that.
    pub fn parse(arg: &str) -> Result<Self, AddressError> {
        let Some((remote, name)) = arg.split_once(':') else {
            return Ok(Self { remote: None, name: arg.to_owned() });
        };
        // The same rule as `Config::add`, so every remote that can exist can be written.
        if remote.is_empty() || !remote.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(AddressError::InvalidRemote { arg: arg.to_owned(), remote: remote.to_owned() });
        }
        Ok(Self { remote: Some(remote.to_owned()), name: name.to_owned() })
    }
}

/// The optional `REMOTE:` of a list command, as `lxc list prod:` has it.
#[derive(Debug, clap::Args)]
pub struct ListRemote {
    /// The remote to list, written with its colon (e.g. prod:).
    // Its own id: "remote" is the global --remote's.
    #[arg(id = "list_remote", value_name = "REMOTE:")]
    remote: Option<String>,
}

/// An argument of a parsed command that addresses something on a remote.
enum Slot<'a> {
    /// A resource name: `NAME` or `REMOTE:NAME`.
    Name(&'a mut String),
    /// Names of one repeated argument: prefixed all or none, since `web-1 prod:web-2` reads as two remotes.
    Names(&'a mut Vec<String>),
    /// A list command's `REMOTE:`.
    List(&'a mut ListRemote),
}

/// The name arguments of a command. Everything else (port specs, `--image`, paths, `-e`, `-o`) is left alone.
fn slots(cmd: &mut Command) -> Vec<Slot<'_>> {
    use Slot::{List, Name, Names};
    match cmd {
        Command::Service(cmd) => match cmd {
            ServiceCmd::Create { name: Some(name), .. } => vec![Name(name)],
            // Without --name the first argument is the name unless it is a port spec, as the handler decides.
            ServiceCmd::Create { args, name: None, .. } => {
                args.first_mut().filter(|a| !looks_like_port_spec(a)).map(Name).into_iter().collect()
            }
            ServiceCmd::List { remote, .. } => vec![List(remote)],
            ServiceCmd::Get { name }
            | ServiceCmd::Update { name, .. }
            | ServiceCmd::Verify { name, .. }
            | ServiceCmd::Autoscale { name, .. }
            | ServiceCmd::Restart { name }
            | ServiceCmd::Rollouts { name }
            | ServiceCmd::CancelRollout { name, .. }
            | ServiceCmd::Delete { name, .. } => vec![Name(name)],
        },
        Command::Deploy(args) => {
            [&mut args.service, &mut args.name, &mut args.image_name].into_iter().flatten().map(Name).collect()
        }
        Command::Instance(cmd) => match cmd {
            InstanceCmd::List { remote, .. } => vec![List(remote)],
            InstanceCmd::Delete { names, .. } => vec![Names(names)],
            // Its two names are on two remotes by design: it parses them itself (commands::copy), and the
            // remote chosen here is only the default of a name without one.
            InstanceCmd::Copy(_) => Vec::new(),
            InstanceCmd::Get { name }
            | InstanceCmd::Start { name }
            | InstanceCmd::Stop { name }
            | InstanceCmd::Logs { name, .. }
            | InstanceCmd::Move { name, .. }
            | InstanceCmd::Exec { name, .. } => vec![Name(name)],
        },
        Command::Image(cmd) => match cmd {
            ImageCmd::List { remote } => vec![List(remote)],
            ImageCmd::Get { name } | ImageCmd::Delete { name } => vec![Name(name)],
            ImageCmd::Push { name, .. } | ImageCmd::Pull { name, .. } => name.iter_mut().map(Name).collect(),
        },
        Command::Tenant(cmd) => match cmd {
            TenantCmd::List { remote } => vec![List(remote)],
            TenantCmd::Get { name }
            | TenantCmd::Create { name, .. }
            | TenantCmd::Update { name, .. }
            | TenantCmd::Delete { name } => vec![Name(name)],
        },
        Command::Remote(_)
        | Command::Token(_)
        | Command::Secret(_)
        | Command::Whoami
        | Command::Ca { .. }
        | Command::Completion { .. } => Vec::new(),
    }
}

/// A prefixed argument as typed, and its remote.
type Prefixed = (String, String);

/// Strips a name's prefix; the argument as typed and its remote when it had one.
fn strip_name(name: &mut String) -> Result<Option<Prefixed>, AddressError> {
    let target = Target::parse(name)?;
    if target.name.is_empty() {
        return Err(AddressError::MissingName { arg: name.clone() });
    }
    let arg = std::mem::replace(name, target.name);
    Ok(target.remote.map(|remote| (arg, remote)))
}

/// Takes a list command's `REMOTE:` out, so its handler has nothing left to interpret.
fn strip_list(list: &mut ListRemote) -> Result<Option<Prefixed>, AddressError> {
    let Some(arg) = list.remote.take() else { return Ok(None) };
    match Target::parse(&arg)? {
        Target { remote: Some(remote), name } if name.is_empty() => Ok(Some((arg, remote))),
        _ => Err(AddressError::NotARemote { arg }),
    }
}

/// Strips the `REMOTE:` prefixes of a command's names and returns the remote to use: `typed` (`--remote` on the
/// command line), else the prefixes' remote, else `ambient` (`CLOUD_REMOTE`, which a prefix overrides as it
/// overrides the configured default). `None` leaves the choice to the configured default.
pub fn choose_remote(
    cmd: &mut Command,
    typed: Option<&str>,
    ambient: Option<&str>,
) -> Result<Option<String>, AddressError> {
    let mut prefixed: Vec<Prefixed> = Vec::new();
    for slot in slots(cmd) {
        match slot {
            Slot::Name(name) => prefixed.extend(strip_name(name)?),
            Slot::List(list) => prefixed.extend(strip_list(list)?),
            Slot::Names(names) => {
                let mut bare = None;
                let before = prefixed.len();
                for name in names.iter_mut() {
                    match strip_name(name)? {
                        Some(p) => prefixed.push(p),
                        None => bare = bare.or(Some(name.clone())),
                    }
                }
                if let (Some(bare), Some((arg, _))) = (bare, prefixed.get(before)) {
                    return Err(AddressError::PartlyPrefixed { bare, prefixed: arg.clone() });
                }
            }
        }
    }
    // Later arguments must agree with the first prefixed one, and all with a typed --remote.
    for (arg, remote) in &prefixed {
        if let Some(flag) = typed.filter(|f| f != remote) {
            return Err(AddressError::FlagDisagrees {
                flag: flag.to_owned(),
                arg: arg.clone(),
                remote: remote.clone(),
            });
        }
        let (first, first_remote) = &prefixed[0];
        if remote != first_remote {
            return Err(AddressError::Mixed {
                first: first.clone(),
                first_remote: first_remote.clone(),
                second: arg.clone(),
                second_remote: remote.clone(),
            });
        }
    }
    let from_prefix = prefixed.into_iter().next().map(|(_, remote)| remote);
    Ok(typed.map(str::to_owned).or(from_prefix).or(ambient.map(str::to_owned)))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::Cli;

    fn target(remote: Option<&str>, name: &str) -> Result<Target, AddressError> {
        Ok(Target { remote: remote.map(str::to_owned), name: name.to_owned() })
    }

    #[test]
    fn the_grammar() {
        let invalid = |arg: &str, remote: &str| {
            Err(AddressError::InvalidRemote { arg: arg.to_owned(), remote: remote.to_owned() })
        };
        for (arg, want) in [
            ("web", target(None, "web")),
            ("prod:web", target(Some("prod"), "web")),
            ("eu-west_2:web-1", target(Some("eu-west_2"), "web-1")),
            ("prod:", target(Some("prod"), "")),
            // Split at the first colon: the rest is the name, which no resource can have.
            ("a:b:c", target(Some("a"), "b:c")),
            (":web", invalid(":web", "")),
            ("pr od:web", invalid("pr od:web", "pr od")),
            ("prod.example:web", invalid("prod.example:web", "prod.example")),
        ] {
            assert_eq!(Target::parse(arg), want, "{arg}");
        }
    }

    /// The command line parsed, its remote chosen, and the names the handler then gets.
    fn choose(line: &str, ambient: Option<&str>) -> Result<(Option<String>, Command), AddressError> {
        let mut cli = Cli::try_parse_from(line.split_whitespace()).unwrap();
        let remote = choose_remote(&mut cli.command, cli.remote.as_deref(), ambient)?;
        Ok((remote, cli.command))
    }

    fn remote_of(line: &str) -> Result<Option<String>, AddressError> {
        choose(line, None).map(|(remote, _)| remote)
    }

    #[test]
    fn commands_choose_their_remote() {
        let some = |r: &str| Ok(Some(r.to_owned()));
        let remote = |arg: &str| arg.split(':').next().unwrap().to_owned();
        let mixed = |first: &str, second: &str| {
            Err(AddressError::Mixed {
                first: first.to_owned(),
                first_remote: remote(first),
                second: second.to_owned(),
                second_remote: remote(second),
            })
        };
        let partly = |bare: &str, prefixed: &str| {
            Err(AddressError::PartlyPrefixed { bare: bare.to_owned(), prefixed: prefixed.to_owned() })
        };
        let flag = |flag: &str, arg: &str| {
            Err(AddressError::FlagDisagrees { flag: flag.to_owned(), arg: arg.to_owned(), remote: remote(arg) })
        };
        for (line, want) in [
            ("cloudctl service get web", Ok(None)),
            ("cloudctl service get prod:web", some("prod")),
            ("cloudctl instance list prod:", some("prod")),
            ("cloudctl image ls prod:", some("prod")),
            ("cloudctl tenant list prod:", some("prod")),
            ("cloudctl service list -w prod:", some("prod")),
            ("cloudctl instance list", Ok(None)),
            ("cloudctl instance delete prod:a prod:b", some("prod")),
            ("cloudctl deploy --service prod:web --name x --image hello", some("prod")),
            ("cloudctl instance logs prod:x -f", some("prod")),
            ("cloudctl instance stop prod:x", some("prod")),
            ("cloudctl service create prod:web 443:8080", some("prod")),
            ("cloudctl service create --name prod:web 443:8080", some("prod")),
            ("cloudctl service verify prod:web www.example.com.", some("prod")),
            ("cloudctl tenant update prod:acme --max-images 3", some("prod")),
            ("cloudctl image delete prod:app", some("prod")),
            ("cloudctl deploy --service prod:web --image hello", some("prod")),
            ("cloudctl deploy --name prod:x --service prod:web --image hello", some("prod")),
            ("cloudctl --remote prod service get prod:web", some("prod")),
            ("cloudctl --remote prod service get web", some("prod")),
            // Colons that are not remotes.
            ("cloudctl service create 443:8080 8443:9000/tls", Ok(None)),
            ("cloudctl service update web -p 443:8080", Ok(None)),
            ("cloudctl deploy --image 127.0.0.1:5000/web:v1 -p 443:80", Ok(None)),
            ("cloudctl deploy --image ghcr.io/org/app:1.2 --image-name app -e A=b:c", Ok(None)),
            ("cloudctl deploy ./a:b -p 443:80 -o value=instances.0.name", Ok(None)),
            ("cloudctl image pull ghcr.io/org/app:1.2", Ok(None)),
            ("cloudctl image pull ghcr.io/org/app:1.2 --name prod:app", some("prod")),
            ("cloudctl token revoke a:b", Ok(None)),
            // A copy's two ends are its own: only --remote (or CLOUD_REMOTE) is chosen here, as their default.
            ("cloudctl instance copy a:web b:web", Ok(None)),
            ("cloudctl --remote a instance copy web b:", some("a")),
            // Refusals.
            ("cloudctl service get prod:", Err(AddressError::MissingName { arg: "prod:".into() })),
            ("cloudctl instance delete prod:a prod:", Err(AddressError::MissingName { arg: "prod:".into() })),
            ("cloudctl instance list prod", Err(AddressError::NotARemote { arg: "prod".into() })),
            ("cloudctl instance list prod:web", Err(AddressError::NotARemote { arg: "prod:web".into() })),
            (
                "cloudctl image get 127.0.0.1:web",
                Err(AddressError::InvalidRemote { arg: "127.0.0.1:web".into(), remote: "127.0.0.1".into() }),
            ),
            ("cloudctl instance delete a:x b:y", mixed("a:x", "b:y")),
            ("cloudctl instance delete x prod:y", partly("x", "prod:y")),
            ("cloudctl instance delete prod:x y z", partly("y", "prod:x")),
            ("cloudctl deploy --service a:web --name b:x --image hello", mixed("a:web", "b:x")),
            ("cloudctl --remote a service get b:web", flag("a", "b:web")),
            ("cloudctl instance list b: --remote a", flag("a", "b:")),
        ] {
            assert_eq!(remote_of(line), want, "{line}");
        }
    }

    #[test]
    fn a_prefix_overrides_cloud_remote() {
        assert_eq!(choose("cloudctl service get b:web", Some("a")).unwrap().0.as_deref(), Some("b"));
        assert_eq!(choose("cloudctl service get web", Some("a")).unwrap().0.as_deref(), Some("a"));
    }

    #[test]
    fn handlers_get_plain_names_and_untouched_values() {
        let (_, cmd) = choose("cloudctl instance delete prod:a prod:b", None).unwrap();
        assert!(matches!(cmd, Command::Instance(InstanceCmd::Delete { names, .. }) if names == ["a", "b"]));
        let (_, cmd) = choose("cloudctl service create prod:web 443:8080", None).unwrap();
        assert!(matches!(cmd, Command::Service(ServiceCmd::Create { args, .. }) if args == ["web", "443:8080"]));
        let (_, cmd) = choose("cloudctl instance list prod: -w", None).unwrap();
        assert!(matches!(
            cmd,
            Command::Instance(InstanceCmd::List { remote: ListRemote { remote: None }, watch: true })
        ));
        let (_, cmd) = choose("cloudctl deploy --service prod:web --image 127.0.0.1:5000/web:v1", None).unwrap();
        let Command::Deploy(args) = cmd else { panic!("a deploy") };
        assert_eq!((args.service.as_deref(), args.image.as_deref()), (Some("web"), Some("127.0.0.1:5000/web:v1")));
    }
}
