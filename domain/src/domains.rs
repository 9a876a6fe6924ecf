//! A service's extra names: platform subdomains (`shop` for `shop.<region>.<base_domain>`) and custom domains
//! (`www.example.com.`), resolved from what a tenant wrote, with the rules that keep custom domains out of the
//! platform's own names and bound how many one service may claim.

use std::collections::HashSet;

use crate::names::{self, NameError, NameKind};

/// The most extra names (platform subdomains and custom domains together) one service may have. A site rarely
/// needs more than a handful (apex, `www`, a few aliases, a wildcard); the bound keeps one request from claiming
/// thousands of names, and the tenant's `max_domains` quota bounds the sum over its services.
pub const MAX_DOMAINS_PER_SERVICE: usize = 50;

/// Why a service's domains were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DomainError {
    /// A fully qualified name that is not a valid domain name, or a platform subdomain that is not a valid name.
    #[error(transparent)]
    Name(#[from] NameError),
    /// A name without the trailing dot (a platform subdomain) that is not one valid label.
    #[error("domain \"{input}\": {reason}; a custom domain needs a trailing dot (www.example.com.)")]
    NotALabel {
        /// The name as written.
        input: String,
        /// Why it is not a valid label.
        reason: String,
    },
    /// A custom domain inside the platform's base domain, which only the platform names (service FQDNs,
    /// one-label platform subdomains, other regions).
    #[error(
        "domain \"{input}\" is inside the platform's own domain {base_domain}: a custom domain must be outside it, and a platform subdomain is one label written without the trailing dot (\"shop\" for shop.{zone})"
    )]
    PlatformDomain {
        /// The name as written.
        input: String,
        /// The platform's base domain.
        base_domain: String,
        /// The zone platform subdomains live in, `<region>.<base_domain>`.
        zone: String,
    },
    /// More distinct names than one service may have.
    #[error("a service may have at most {max} domains; this request lists {count}")]
    TooMany {
        /// Distinct names in the request.
        count: usize,
        /// [`MAX_DOMAINS_PER_SERVICE`].
        max: usize,
    },
}

/// True when `fqdn` (no trailing dot) is `base_domain` itself or inside it (wildcards included).
pub fn is_platform_domain(fqdn: &str, base_domain: &str) -> bool {
    fqdn == base_domain || fqdn.strip_suffix(base_domain).is_some_and(|rest| rest.ends_with('.'))
}

/// Resolves one domain input: `name` is the platform subdomain `name.<zone>`, a fully qualified name with a
/// trailing dot is a custom domain unless it is a one-label platform subdomain written in full. Returns (fully
/// qualified name without the dot, custom).
pub fn resolve_domain(input: &str, zone: &str, base_domain: &str) -> Result<(String, bool), DomainError> {
    let Some(fqdn) = input.strip_suffix('.') else {
        names::validate_name(NameKind::Service, input)
            .map_err(|e| DomainError::NotALabel { input: input.to_owned(), reason: e.to_string() })?;
        return Ok((format!("{input}.{zone}"), false));
    };
    names::validate_domain_name(fqdn)?;
    if let Some(label) = fqdn.strip_suffix(zone).and_then(|l| l.strip_suffix('.'))
        && !label.contains('.')
        && label != "*"
    {
        names::validate_name(NameKind::Service, label)?;
        return Ok((fqdn.to_owned(), false));
    }
    if is_platform_domain(fqdn, base_domain) {
        return Err(DomainError::PlatformDomain {
            input: input.to_owned(),
            base_domain: base_domain.to_owned(),
            zone: zone.to_owned(),
        });
    }
    Ok((fqdn.to_owned(), true))
}

/// Resolves a service's domain inputs (see [`resolve_domain`]), without repeats, in the order given; more than
/// [`MAX_DOMAINS_PER_SERVICE`] distinct names are refused.
pub fn resolve_domains(inputs: &[String], zone: &str, base_domain: &str) -> Result<Vec<(String, bool)>, DomainError> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for input in inputs {
        let resolved = resolve_domain(input, zone, base_domain)?;
        if seen.insert(resolved.0.clone()) {
            out.push(resolved);
        }
    }
    if out.len() > MAX_DOMAINS_PER_SERVICE {
        return Err(DomainError::TooMany { count: out.len(), max: MAX_DOMAINS_PER_SERVICE });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ZONE: &str = "dev.cloud.localhost";
    const BASE: &str = "cloud.localhost";

    fn resolve(input: &str) -> Result<(String, bool), DomainError> {
        resolve_domain(input, ZONE, BASE)
    }

    #[test]
    fn platform_subdomains_and_custom_domains_resolve() {
        let cases = [
            ("shop", "shop.dev.cloud.localhost", false),
            ("api2.dev.cloud.localhost.", "api2.dev.cloud.localhost", false),
            ("www.example.com.", "www.example.com", true),
            ("*.example.com.", "*.example.com", true),
            ("example.com.", "example.com", true),
            // Only the base domain's own subtree is the platform's: look-alikes are ordinary custom domains.
            ("notcloud.localhost.", "notcloud.localhost", true),
            ("cloud.localhost.example.", "cloud.localhost.example", true),
        ];
        for (input, name, custom) in cases {
            assert_eq!(resolve(input), Ok((name.to_owned(), custom)), "{input}");
        }
    }

    #[test]
    fn names_inside_the_platforms_domain_are_not_custom_domains() {
        for input in [
            "cloud.localhost.",
            "prod.cloud.localhost.",
            "*.cloud.localhost.",
            "dev.cloud.localhost.",
            "*.dev.cloud.localhost.",
            "a.b.dev.cloud.localhost.",
            "x.eu.cloud.localhost.",
            "*.eu.cloud.localhost.",
        ] {
            let e = resolve(input).unwrap_err();
            assert!(matches!(e, DomainError::PlatformDomain { .. }), "{input}");
            assert_eq!(
                e.to_string(),
                format!(
                    "domain \"{input}\" is inside the platform's own domain cloud.localhost: a custom domain must be outside it, and a platform subdomain is one label written without the trailing dot (\"shop\" for shop.dev.cloud.localhost)"
                )
            );
        }
    }

    #[test]
    fn bad_inputs_name_the_problem() {
        let not_a_label: fn(&DomainError) -> bool = |e| matches!(e, DomainError::NotALabel { .. });
        let not_a_domain: fn(&DomainError) -> bool = |e| matches!(e, DomainError::Name(NameError::Domain { .. }));
        let reserved: fn(&DomainError) -> bool = |e| matches!(e, DomainError::Name(NameError::Reserved { .. }));
        let cases = [
            ("www.example.com", not_a_label, "a custom domain needs a trailing dot"),
            ("Shop", not_a_label, "invalid character 'S'"),
            ("-x.", not_a_domain, "needs at least two labels"),
            ("a..b.", not_a_domain, "empty label"),
            ("www.dev.cloud.localhost.", reserved, "reserved"),
        ];
        for (input, kind, needle) in cases {
            let e = resolve(input).unwrap_err();
            assert!(kind(&e), "{input}: {e:?}");
            assert!(e.to_string().contains(needle), "{input}: {e}");
        }
    }

    #[test]
    fn a_service_has_at_most_the_limit_of_distinct_domains() {
        let at_limit: Vec<String> = (0..MAX_DOMAINS_PER_SERVICE).map(|i| format!("d{i}.example.com.")).collect();
        let mut repeated = at_limit.clone();
        repeated.extend(at_limit.iter().cloned());
        let got = resolve_domains(&repeated, ZONE, BASE).unwrap();
        assert_eq!(got.len(), MAX_DOMAINS_PER_SERVICE, "repeats count once");
        assert_eq!(got[0], ("d0.example.com".to_owned(), true), "in the order given");

        let over: Vec<String> = (0..3000).map(|i| format!("d{i}.example.com.")).collect();
        let e = resolve_domains(&over, ZONE, BASE).unwrap_err();
        assert_eq!(e, DomainError::TooMany { count: 3000, max: MAX_DOMAINS_PER_SERVICE });
        assert_eq!(e.to_string(), "a service may have at most 50 domains; this request lists 3000");
    }
}
