//! Port specs: `PUBLIC[:DEST][/HANDLER[+HANDLER]...]`, as tenants write them, and their expansion into the
//! mappings the edge serves.
//!
//! `443:8080` expands to 443->8080 [tls+http] plus 80->443 [http+redirect]. Handlers: `tls` (terminate TLS,
//! SNI-routed), `http` (HTTP-aware balancing), `redirect` (80 to https), `tcp` (a raw port of its own), and the
//! option `proxy` (PROXY protocol v2 to the instance). Every refusal names the spec and the rule it breaks.

use std::collections::BTreeSet;
use std::fmt;
use std::ops::RangeInclusive;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What the edge does with a port's traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Handler {
    /// Terminate TLS (certificate chosen by SNI).
    Tls,
    /// Balance per HTTP request.
    Http,
    /// Answer with a redirect to https (port 80 only).
    Redirect,
    /// Forward raw TCP on a dedicated public port.
    Tcp,
}

impl Handler {
    /// The spelling in specs and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tls => "tls",
            Self::Http => "http",
            Self::Redirect => "redirect",
            Self::Tcp => "tcp",
        }
    }
}

impl fmt::Display for Handler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A fully expanded, validated port mapping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PortMapping {
    /// Public port (0 only before a raw TCP port is allocated).
    pub port: u16,
    /// Port on the instance; for a redirect, the https port redirected to.
    pub destination_port: u16,
    /// Handlers in canonical order (tls, http, redirect, tcp).
    pub handlers: Vec<Handler>,
    /// Send a PROXY protocol v2 header to the instance.
    #[serde(default)]
    pub proxy: bool,
}

impl fmt::Display for PortMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/", self.port, self.destination_port)?;
        let mut parts: Vec<&str> = self.handlers.iter().map(|h| h.as_str()).collect();
        if self.proxy {
            parts.push("proxy");
        }
        f.write_str(&parts.join("+"))
    }
}

/// One port as a tenant wrote it, before defaults; also the structured JSON form of a port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    /// Public port; 0 allocates a raw TCP port.
    pub port: u16,
    /// Port on the instance; defaults to the public port (443 for a redirect).
    #[serde(default)]
    pub destination_port: Option<u16>,
    /// Handlers; defaults depend on the port (443: tls+http and a redirect from 80; 80: http; tcp range: tcp;
    /// others: tls).
    #[serde(default)]
    pub handlers: Option<Vec<Handler>>,
    /// Send a PROXY protocol v2 header to the instance.
    #[serde(default)]
    pub proxy: bool,
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.port)?;
        if let Some(d) = self.destination_port {
            write!(f, ":{d}")?;
        }
        let mut parts: Vec<&str> = self.handlers.iter().flatten().map(|h| h.as_str()).collect();
        if self.proxy {
            parts.push("proxy");
        }
        if !parts.is_empty() {
            write!(f, "/{}", parts.join("+"))?;
        }
        Ok(())
    }
}

/// Why a port spec was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PortSpecError {
    /// The text does not follow the grammar.
    #[error("port spec \"{spec}\": {reason}")]
    Syntax {
        /// The spec as written.
        spec: String,
        /// What is wrong.
        reason: String,
    },
    /// The spec parses but breaks a port rule.
    #[error("port spec \"{spec}\": {rule}")]
    Rule {
        /// The spec as written.
        spec: String,
        /// The rule broken.
        rule: String,
    },
    /// Two specs of one request claim the same public port (bad input, like any other rule).
    #[error("port spec \"{spec}\": public port {port} is already mapped by \"{other}\"")]
    Conflict {
        /// The later spec.
        spec: String,
        /// The earlier spec with the same port.
        other: String,
        /// The port.
        port: u16,
    },
}

impl PortSpecError {
    /// The stable API error code. (`port_conflict` is kept for a port taken by another service.)
    pub fn code(&self) -> &'static str {
        "invalid_port_spec"
    }
}

/// Platform settings the rules depend on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortPolicy {
    /// Public ports reserved for raw TCP services.
    pub tcp_ports: RangeInclusive<u16>,
}

impl Default for PortPolicy {
    fn default() -> Self {
        Self { tcp_ports: 30000..=32767 }
    }
}

const HANDLER_NAMES: &str = "tls, http, redirect, tcp, proxy";

impl FromStr for PortSpec {
    type Err = PortSpecError;

    fn from_str(spec: &str) -> Result<Self, PortSpecError> {
        let syntax = |reason: String| PortSpecError::Syntax { spec: spec.to_owned(), reason };
        if spec.is_empty() {
            return Err(syntax("is empty; write PUBLIC[:DEST][/HANDLER[+HANDLER]], e.g. 443:8080".into()));
        }
        let (ports, handlers) = match spec.split_once('/') {
            Some((p, h)) => (p, Some(h)),
            None => (spec, None),
        };
        let mut parts = ports.split(':');
        let number = |what: &str, text: Option<&str>| -> Result<u16, PortSpecError> {
            let text = text.unwrap_or("");
            if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
                return Err(syntax(format!("{what} port \"{text}\" is not a number")));
            }
            text.parse::<u16>().map_err(|_| syntax(format!("{what} port {text} is out of range (1-65535)")))
        };
        let port = number("public", parts.next())?;
        let destination_port = match parts.next() {
            Some(d) => Some(number("destination", Some(d))?),
            None => None,
        };
        if parts.next().is_some() {
            return Err(syntax("has more than one ':'; write PUBLIC[:DEST]".into()));
        }
        let (mut list, mut proxy) = (Vec::new(), false);
        if let Some(h) = handlers {
            if h.is_empty() {
                return Err(syntax("has '/' but no handler after it".into()));
            }
            for name in h.split('+') {
                let handler = match name {
                    "tls" => Handler::Tls,
                    "http" => Handler::Http,
                    "redirect" => Handler::Redirect,
                    "tcp" => Handler::Tcp,
                    "proxy" if !proxy => {
                        proxy = true;
                        continue;
                    }
                    "proxy" => return Err(syntax("names proxy twice".into())),
                    other => {
                        return Err(syntax(format!("unknown handler \"{other}\" (valid: {HANDLER_NAMES})")));
                    }
                };
                if list.contains(&handler) {
                    return Err(syntax(format!("names {handler} twice")));
                }
                list.push(handler);
            }
        }
        let handlers = (!list.is_empty()).then_some(list);
        Ok(PortSpec { port, destination_port, handlers, proxy })
    }
}

/// A mapping with where it came from, for messages and the implicit redirect.
struct Expanded {
    mapping: PortMapping,
    spec: String,
    implicit: bool,
}

/// Applies defaults and every rule to a set of specs; returns the mappings sorted by public port.
pub fn expand(specs: &[PortSpec], policy: &PortPolicy) -> Result<Vec<PortMapping>, PortSpecError> {
    let mut out: Vec<Expanded> = Vec::new();
    for spec in specs {
        let text = spec.to_string();
        let rule = |rule: String| PortSpecError::Rule { spec: text.clone(), rule };
        let in_tcp_range = policy.tcp_ports.contains(&spec.port);
        let mut handlers = match &spec.handlers {
            Some(h) => {
                let set: BTreeSet<Handler> = h.iter().copied().collect();
                if set.len() != h.len() {
                    return Err(rule("names a handler twice".into()));
                }
                if set.is_empty() {
                    return Err(rule(format!("needs at least one handler ({HANDLER_NAMES})")));
                }
                set.into_iter().collect::<Vec<_>>()
            }
            None => match spec.port {
                443 => vec![Handler::Tls, Handler::Http],
                80 => vec![Handler::Http],
                0 => vec![Handler::Tcp],
                _ if in_tcp_range => vec![Handler::Tcp],
                _ => vec![Handler::Tls],
            },
        };
        handlers.sort();
        let has = |h: Handler| handlers.contains(&h);
        let destination_port = match spec.destination_port {
            Some(d) => d,
            None if has(Handler::Redirect) => 443,
            None if spec.port == 0 => {
                return Err(rule("public port 0 (allocate) needs a destination port".into()));
            }
            None => spec.port,
        };
        if destination_port == 0 {
            return Err(rule("destination port must be 1-65535".into()));
        }
        if has(Handler::Tcp) && handlers.len() > 1 {
            return Err(rule("tcp forwards raw bytes and cannot combine with tls, http or redirect".into()));
        }
        match spec.port {
            0 if !has(Handler::Tcp) => {
                return Err(rule("public port 0 allocates a raw tcp port; it needs the tcp handler".into()));
            }
            443 if handlers != [Handler::Tls, Handler::Http] => {
                return Err(rule("port 443 serves https: its handlers are exactly tls+http".into()));
            }
            80 if has(Handler::Tls) => {
                return Err(rule("port 80 serves plain http and never tls".into()));
            }
            80 if !has(Handler::Http) => {
                return Err(rule("port 80 serves plain http: it needs the http handler".into()));
            }
            _ => {}
        }
        if has(Handler::Redirect) {
            if spec.port != 80 {
                return Err(rule(format!("redirect is only for port 80, not {}", spec.port)));
            }
            if destination_port != 443 {
                return Err(rule(format!("redirect goes to https on 443, not {destination_port}")));
            }
        }
        if ![0, 80, 443].contains(&spec.port) {
            if has(Handler::Tcp) {
                if !in_tcp_range {
                    return Err(rule(format!(
                        "a tcp public port is 0 (allocate) or within {}-{}, not {}",
                        policy.tcp_ports.start(),
                        policy.tcp_ports.end(),
                        spec.port
                    )));
                }
            } else if !has(Handler::Tls) {
                return Err(rule(format!(
                    "plain http is only for port 80; port {} takes tls, tls+http or tcp",
                    spec.port
                )));
            } else if in_tcp_range {
                return Err(rule(format!(
                    "port {} is in the tcp range {}-{}, reserved for tcp",
                    spec.port,
                    policy.tcp_ports.start(),
                    policy.tcp_ports.end()
                )));
            }
        }
        if spec.proxy && !(has(Handler::Tcp) || handlers == [Handler::Tls]) {
            return Err(rule("proxy needs a raw stream: tcp, or tls without http".into()));
        }
        let implicit_redirect = spec.handlers.is_none() && spec.port == 443;
        out.push(Expanded {
            mapping: PortMapping { port: spec.port, destination_port, handlers, proxy: spec.proxy },
            spec: text.clone(),
            implicit: false,
        });
        if implicit_redirect {
            out.push(Expanded {
                mapping: PortMapping {
                    port: 80,
                    destination_port: 443,
                    handlers: vec![Handler::Http, Handler::Redirect],
                    proxy: false,
                },
                spec: text,
                implicit: true,
            });
        }
    }
    // An explicit port-80 mapping replaces the implicit redirect.
    if out.iter().any(|e| e.mapping.port == 80 && !e.implicit) {
        out.retain(|e| !(e.implicit && e.mapping.port == 80));
    }
    for (i, e) in out.iter().enumerate() {
        if e.mapping.port != 0
            && let Some(first) = out[..i].iter().find(|o| o.mapping.port == e.mapping.port)
        {
            return Err(PortSpecError::Conflict {
                spec: e.spec.clone(),
                other: first.spec.clone(),
                port: e.mapping.port,
            });
        }
        if e.mapping.handlers.contains(&Handler::Redirect) && !out.iter().any(|o| o.mapping.port == 443) {
            return Err(PortSpecError::Rule {
                spec: e.spec.clone(),
                rule: "redirect goes to https on 443, but no spec maps port 443".into(),
            });
        }
    }
    let mut mappings: Vec<PortMapping> = out.into_iter().map(|e| e.mapping).collect();
    mappings.sort_by_key(|m| (m.port, m.destination_port));
    Ok(mappings)
}

/// Parses spec strings and expands them.
pub fn parse_specs<S: AsRef<str>>(specs: &[S], policy: &PortPolicy) -> Result<Vec<PortMapping>, PortSpecError> {
    let parsed = specs.iter().map(|s| s.as_ref().parse()).collect::<Result<Vec<PortSpec>, _>>()?;
    expand(&parsed, policy)
}

/// The lowest port of `range` not in `used`.
pub fn allocate_tcp_port(range: &RangeInclusive<u16>, used: &BTreeSet<u16>) -> Option<u16> {
    range.clone().find(|p| !used.contains(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expand_str(specs: &[&str]) -> Result<Vec<String>, (String, &'static str)> {
        parse_specs(specs, &PortPolicy::default())
            .map(|m| m.iter().map(|m| m.to_string()).collect())
            .map_err(|e| (e.to_string(), e.code()))
    }

    #[test]
    fn accepted_specs_and_their_expansion() {
        let cases: &[(&[&str], &[&str])] = &[
            (&["443:8080"], &["80:443/http+redirect", "443:8080/tls+http"]),
            (&["443"], &["80:443/http+redirect", "443:443/tls+http"]),
            (&["443:8080/tls+http"], &["443:8080/tls+http"]),
            (&["443:8080/http+tls"], &["443:8080/tls+http"]),
            (&["443:8080", "80:8080"], &["80:8080/http", "443:8080/tls+http"]),
            (&["80:8080", "443:8080"], &["80:8080/http", "443:8080/tls+http"]),
            (&["443:8080/tls+http", "80/http+redirect"], &["80:443/http+redirect", "443:8080/tls+http"]),
            (&["80:8080"], &["80:8080/http"]),
            (&["80"], &["80:80/http"]),
            (&["8443:8080"], &["8443:8080/tls"]),
            (&["8443:8080/tls+http"], &["8443:8080/tls+http"]),
            (&["8443:8080/tls+proxy"], &["8443:8080/tls+proxy"]),
            (&["5432/tls"], &["5432:5432/tls"]),
            (&["30001:5432/tcp"], &["30001:5432/tcp"]),
            (&["30001:5432"], &["30001:5432/tcp"]),
            (&["30001:5432/tcp+proxy"], &["30001:5432/tcp+proxy"]),
            (&["0:5432/tcp"], &["0:5432/tcp"]),
            (&["0:5432", "0:6379"], &["0:5432/tcp", "0:6379/tcp"]),
            (&[], &[]),
        ];
        for (specs, want) in cases {
            assert_eq!(expand_str(specs), Ok(want.iter().map(|s| s.to_string()).collect()), "{specs:?}");
        }
    }

    #[test]
    fn every_rule_refuses_with_a_message_naming_spec_and_rule() {
        let syntax = "invalid_port_spec";
        let cases: &[(&[&str], &str, &str)] = &[
            (&[""], syntax, "port spec \"\": is empty; write PUBLIC[:DEST][/HANDLER[+HANDLER]], e.g. 443:8080"),
            (&["abc"], syntax, "port spec \"abc\": public port \"abc\" is not a number"),
            (&["-1"], syntax, "port spec \"-1\": public port \"-1\" is not a number"),
            (&[" 443"], syntax, "port spec \" 443\": public port \" 443\" is not a number"),
            (&["70000:80"], syntax, "port spec \"70000:80\": public port 70000 is out of range (1-65535)"),
            (&["443:"], syntax, "port spec \"443:\": destination port \"\" is not a number"),
            (&["443:99999"], syntax, "port spec \"443:99999\": destination port 99999 is out of range (1-65535)"),
            (&["1:2:3"], syntax, "port spec \"1:2:3\": has more than one ':'; write PUBLIC[:DEST]"),
            (&["443/"], syntax, "port spec \"443/\": has '/' but no handler after it"),
            (
                &["443:8080/bogus"],
                syntax,
                "port spec \"443:8080/bogus\": unknown handler \"bogus\" (valid: tls, http, redirect, tcp, proxy)",
            ),
            (&["443:8080/tls+tls"], syntax, "port spec \"443:8080/tls+tls\": names tls twice"),
            (&["8443/tls+proxy+proxy"], syntax, "port spec \"8443/tls+proxy+proxy\": names proxy twice"),
            (&["443:0"], syntax, "port spec \"443:0\": destination port must be 1-65535"),
            (
                &["443:8080/http"],
                syntax,
                "port spec \"443:8080/http\": port 443 serves https: its handlers are exactly tls+http",
            ),
            (
                &["443:8080/tls"],
                syntax,
                "port spec \"443:8080/tls\": port 443 serves https: its handlers are exactly tls+http",
            ),
            (&["80:8080/tls"], syntax, "port spec \"80:8080/tls\": port 80 serves plain http and never tls"),
            (&["80:8080/tls+http"], syntax, "port spec \"80:8080/tls+http\": port 80 serves plain http and never tls"),
            (
                &["80:8080/tcp"],
                syntax,
                "port spec \"80:8080/tcp\": port 80 serves plain http: it needs the http handler",
            ),
            (
                &["8080/http"],
                syntax,
                "port spec \"8080/http\": plain http is only for port 80; port 8080 takes tls, tls+http or tcp",
            ),
            (
                &["8443:8080/http+redirect"],
                syntax,
                "port spec \"8443:8080/http+redirect\": redirect is only for port 80, not 8443",
            ),
            (
                &["80:8443/http+redirect", "443"],
                syntax,
                "port spec \"80:8443/http+redirect\": redirect goes to https on 443, not 8443",
            ),
            (
                &["80/http+redirect"],
                syntax,
                "port spec \"80/http+redirect\": redirect goes to https on 443, but no spec maps port 443",
            ),
            (
                &["30001:5432/tcp+tls"],
                syntax,
                "port spec \"30001:5432/tcp+tls\": tcp forwards raw bytes and cannot combine with tls, http or redirect",
            ),
            (
                &["5432/tcp"],
                syntax,
                "port spec \"5432/tcp\": a tcp public port is 0 (allocate) or within 30000-32767, not 5432",
            ),
            (
                &["30001:80/tls"],
                syntax,
                "port spec \"30001:80/tls\": port 30001 is in the tcp range 30000-32767, reserved for tcp",
            ),
            (
                &["0:80/tls"],
                syntax,
                "port spec \"0:80/tls\": public port 0 allocates a raw tcp port; it needs the tcp handler",
            ),
            (&["0/tcp"], syntax, "port spec \"0/tcp\": public port 0 (allocate) needs a destination port"),
            (
                &["443:8080/tls+http+proxy"],
                syntax,
                "port spec \"443:8080/tls+http+proxy\": proxy needs a raw stream: tcp, or tls without http",
            ),
            (
                &["8443:8080/tls+http+proxy"],
                syntax,
                "port spec \"8443:8080/tls+http+proxy\": proxy needs a raw stream: tcp, or tls without http",
            ),
            (
                &["443:8080", "443:9090"],
                syntax,
                "port spec \"443:9090\": public port 443 is already mapped by \"443:8080\"",
            ),
            (
                &["8443/tls", "8443:1/tls"],
                syntax,
                "port spec \"8443:1/tls\": public port 8443 is already mapped by \"8443/tls\"",
            ),
        ];
        for (specs, code, msg) in cases {
            let err = expand_str(specs).unwrap_err();
            assert_eq!((err.0.as_str(), err.1), (*msg, *code), "{specs:?}");
        }
    }

    #[test]
    fn structured_specs_follow_the_same_rules() {
        let p = PortPolicy::default();
        let spec = PortSpec { port: 443, destination_port: Some(8080), handlers: None, proxy: false };
        assert_eq!(expand(std::slice::from_ref(&spec), &p).unwrap().len(), 2);
        let dup = PortSpec { handlers: Some(vec![Handler::Tls, Handler::Tls]), ..spec.clone() };
        assert!(expand(&[dup], &p).unwrap_err().to_string().contains("twice"));
        let none = PortSpec { handlers: Some(vec![]), ..spec };
        assert!(expand(&[none], &p).unwrap_err().to_string().contains("at least one handler"));
        let json: PortSpec = serde_json::from_str(r#"{"port": 8443, "handlers": ["tls"], "proxy": true}"#).unwrap();
        assert_eq!(json.to_string(), "8443/tls+proxy");
        assert!(serde_json::from_str::<PortSpec>(r#"{"port": 1, "extra": 2}"#).is_err());
    }

    #[test]
    fn custom_tcp_range() {
        let p = PortPolicy { tcp_ports: 40000..=40001 };
        assert_eq!(parse_specs(&["40000:22/tcp"], &p).unwrap()[0].port, 40000);
        assert!(parse_specs(&["30001:22/tcp"], &p).is_err());
        assert!(parse_specs(&["30001:22/tls"], &p).is_ok());
    }

    #[test]
    fn tcp_ports_are_allocated_lowest_first() {
        let range = 30000..=30002;
        assert_eq!(allocate_tcp_port(&range, &BTreeSet::new()), Some(30000));
        assert_eq!(allocate_tcp_port(&range, &BTreeSet::from([30000, 30002])), Some(30001));
        assert_eq!(allocate_tcp_port(&range, &BTreeSet::from([30000, 30001, 30002])), None);
    }
}
