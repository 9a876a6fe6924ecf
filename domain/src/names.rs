//! Resource names are DNS labels: they appear in FQDNs (`<name>-<8>.<region>.<base>`, `<name>.internal`).

use std::fmt;

/// What a name names, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    /// A service.
    Service,
    /// An instance.
    Instance,
    /// An image.
    Image,
    /// A tenant.
    Tenant,
}

impl fmt::Display for NameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Service => "service",
            Self::Instance => "instance",
            Self::Image => "image",
            Self::Tenant => "tenant",
        })
    }
}

/// Labels the platform uses itself, or that would read as its own names.
pub const RESERVED_NAMES: &[&str] = &[
    "internal",
    "localhost",
    "local",
    "api",
    "admin",
    "edge",
    "dns",
    "ns",
    "ns1",
    "ns2",
    "www",
    "platform",
    "acme",
    "metrics",
    "healthz",
    "readyz",
    "docs",
    "events",
    "system",
];

/// The longest DNS label.
pub const MAX_LABEL: usize = 63;

/// A name's characters and length as a regular expression (ECMA 262, for the OpenAPI document); names shaped
/// like a UUID ([`UUID_PATTERN`]) and [`RESERVED_NAMES`] are refused too.
pub const NAME_PATTERN: &str = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$";

/// What a name must not look like: resources are addressed by name or UUID.
pub const UUID_PATTERN: &str = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$";

/// Why a name or domain was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// The name is empty.
    #[error("{kind} name must not be empty")]
    Empty {
        /// What was being named.
        kind: NameKind,
    },
    /// Longer than a DNS label.
    #[error("{kind} name \"{name}\" must be at most 63 characters (got {len})")]
    TooLong {
        /// What was being named.
        kind: NameKind,
        /// The name.
        name: String,
        /// Its length.
        len: usize,
    },
    /// A character outside `[a-z0-9-]`.
    #[error("{kind} name \"{name}\": invalid character {ch:?} (names use lowercase letters, digits and '-')")]
    InvalidChar {
        /// What was being named.
        kind: NameKind,
        /// The name.
        name: String,
        /// The first offending character.
        ch: char,
    },
    /// Starts or ends with '-'.
    #[error("{kind} name \"{name}\" must not start or end with '-'")]
    Hyphen {
        /// What was being named.
        kind: NameKind,
        /// The name.
        name: String,
    },
    /// Looks like a UUID, which would be ambiguous where resources are addressed by name or id.
    #[error("{kind} name \"{name}\" looks like a UUID; resources are addressed by name or UUID, so pick another name")]
    LooksLikeUuid {
        /// What was being named.
        kind: NameKind,
        /// The name.
        name: String,
    },
    /// One of [`RESERVED_NAMES`].
    #[error("{kind} name \"{name}\" is reserved by the platform")]
    Reserved {
        /// What was being named.
        kind: NameKind,
        /// The name.
        name: String,
    },
    /// Not a valid domain name.
    #[error("domain \"{name}\": {reason}")]
    Domain {
        /// The domain as given.
        name: String,
        /// What is wrong.
        reason: String,
    },
}

/// Checks the label rules shared by names and domain labels; `None` when valid.
fn label_problem(label: &str) -> Option<Result<char, &'static str>> {
    if label.is_empty() {
        return Some(Err("empty"));
    }
    if label.len() > MAX_LABEL {
        return Some(Err("long"));
    }
    if let Some(ch) = label.chars().find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')) {
        return Some(Ok(ch));
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Some(Err("hyphen"));
    }
    None
}

fn looks_like_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups.iter().zip([8, 4, 4, 4, 12]).all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Validates a resource name: a DNS label of `[a-z0-9-]`, 1 to 63 characters, no leading or trailing '-', not
/// reserved and not shaped like a UUID.
pub fn validate_name(kind: NameKind, name: &str) -> Result<(), NameError> {
    match label_problem(name) {
        Some(Err("empty")) => return Err(NameError::Empty { kind }),
        Some(Err("long")) => {
            return Err(NameError::TooLong { kind, name: name.into(), len: name.chars().count() });
        }
        Some(Ok(ch)) => {
            return Err(NameError::InvalidChar { kind, name: name.into(), ch });
        }
        Some(Err(_)) => {
            return Err(NameError::Hyphen { kind, name: name.into() });
        }
        None => {}
    }
    if looks_like_uuid(name) {
        return Err(NameError::LooksLikeUuid { kind, name: name.into() });
    }
    if RESERVED_NAMES.contains(&name) {
        return Err(NameError::Reserved { kind, name: name.into() });
    }
    Ok(())
}

/// Validates a fully qualified domain name without its trailing dot: lowercase labels as for names (reserved
/// words allowed), at least two labels, at most 253 characters, optionally `*.` in front for a wildcard.
pub fn validate_domain_name(name: &str) -> Result<(), NameError> {
    let err = |reason: String| NameError::Domain { name: name.into(), reason };
    let bare = name.strip_prefix("*.").unwrap_or(name);
    if name.len() > 253 {
        return Err(err(format!("must be at most 253 characters (got {})", name.len())));
    }
    let labels: Vec<&str> = bare.split('.').collect();
    if labels.len() < 2 {
        return Err(err("needs at least two labels, e.g. example.com".into()));
    }
    for label in labels {
        match label_problem(label) {
            Some(Err("empty")) => return Err(err("has an empty label".into())),
            Some(Err("long")) => {
                return Err(err(format!("label \"{label}\" is longer than 63 characters")));
            }
            Some(Ok(ch)) => {
                return Err(err(format!("invalid character {ch:?} (use lowercase letters, digits, '-' and '.')")));
            }
            Some(Err(_)) => {
                return Err(err(format!("label \"{label}\" must not start or end with '-'")));
            }
            None => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_names() {
        for name in ["a", "my-service", "x1", "0abc", &"a".repeat(63), "a-b-c"] {
            assert_eq!(validate_name(NameKind::Service, name), Ok(()), "{name}");
        }
    }

    #[test]
    fn every_rejection_names_the_problem() {
        let cases = [
            ("", false, "service name must not be empty"),
            (
                "My-App",
                false,
                "service name \"My-App\": invalid character 'M' (names use lowercase letters, digits and '-')",
            ),
            ("a_b", false, "service name \"a_b\": invalid character '_' (names use lowercase letters, digits and '-')"),
            ("a.b", false, "service name \"a.b\": invalid character '.' (names use lowercase letters, digits and '-')"),
            ("-a", false, "service name \"-a\" must not start or end with '-'"),
            ("a-", false, "service name \"a-\" must not start or end with '-'"),
            ("internal", true, "service name \"internal\" is reserved by the platform"),
            ("localhost", true, "service name \"localhost\" is reserved by the platform"),
            (
                "123e4567-e89b-12d3-a456-426614174000",
                false,
                "service name \"123e4567-e89b-12d3-a456-426614174000\" looks like a UUID; resources are addressed by name or UUID, so pick another name",
            ),
        ];
        // The API answers reserved names with their own code.
        for (name, reserved, msg) in cases {
            let e = validate_name(NameKind::Service, name).unwrap_err();
            assert_eq!((matches!(e, NameError::Reserved { .. }), e.to_string().as_str()), (reserved, msg), "{name}");
        }
        let long = "a".repeat(64);
        let e = validate_name(NameKind::Instance, &long).unwrap_err();
        assert_eq!(e.to_string(), format!("instance name \"{long}\" must be at most 63 characters (got 64)"));
    }

    #[test]
    fn domains() {
        for ok in ["example.com", "www.example.com", "*.example.com", "internal.example.com", "a-b.c0.io"] {
            assert_eq!(validate_domain_name(ok), Ok(()), "{ok}");
        }
        let cases = [
            ("com", "needs at least two labels"),
            ("a..b", "empty label"),
            ("Example.com", "invalid character 'E'"),
            ("-a.com", "must not start or end with '-'"),
            ("a.*.com", "invalid character '*'"),
        ];
        for (name, needle) in cases {
            let e = validate_domain_name(name).unwrap_err();
            assert!(matches!(e, NameError::Domain { .. }), "{name}: {e:?}");
            assert!(e.to_string().contains(needle), "{name}: {e}");
        }
        let long = format!("{}.com", vec!["a".repeat(63); 4].join("."));
        assert!(validate_domain_name(&long).unwrap_err().to_string().contains("at most 253"));
    }
}
