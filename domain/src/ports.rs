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

use crate::api::PortInput;

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
    #[schema(maximum = 65535)]
    pub port: u16,
    /// Port on the instance; for a redirect, the https port redirected to.
    #[schema(minimum = 1, maximum = 65535)]
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
    #[serde(deserialize_with = "crate::int::exact::<_, _, 0, 65_535>")]
    #[schema(maximum = 65535)]
    pub port: u16,
    /// Port on the instance; defaults to the public port (443 for a redirect).
    #[serde(default, deserialize_with = "crate::int::optional::<_, _, 1, 65_535>")]
    #[schema(minimum = 1, maximum = 65535)]
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
            if text.len() > 1 && text.starts_with('0') {
                return Err(syntax(format!("{what} port \"{text}\" has a leading zero")));
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

/// Parses and expands the ports of a request, spec strings and objects alike.
pub fn expand_inputs(inputs: &[PortInput], policy: &PortPolicy) -> Result<Vec<PortMapping>, PortSpecError> {
    let specs = inputs
        .iter()
        .map(|p| match p {
            PortInput::Spec(s) => s.parse::<PortSpec>(),
            PortInput::Object(o) => Ok(o.clone()),
        })
        .collect::<Result<Vec<_>, _>>()?;
    expand(&specs, policy)
}

/// The lowest port of `range` not in `used`.
pub fn allocate_tcp_port(range: &RangeInclusive<u16>, used: &BTreeSet<u16>) -> Option<u16> {
    range.clone().find(|p| !used.contains(p))
}

/// A regular expression (without anchors) matching exactly the decimal numbers `lo..=hi`, without leading
/// zeros: what the OpenAPI document says a number in a string looks like.
pub fn range_pattern(lo: u32, hi: u32) -> String {
    fn same_length(lo: &[u8], hi: &[u8], out: &mut Vec<String>, prefix: &str) {
        if lo.is_empty() {
            out.push(prefix.to_owned());
            return;
        }
        let (a, b) = (lo[0], hi[0]);
        let digit =
            |x: u8, y: u8| if x == y { (x as char).to_string() } else { format!("[{}-{}]", x as char, y as char) };
        let rest = lo.len() - 1;
        if a == b {
            return same_length(&lo[1..], &hi[1..], out, &format!("{prefix}{}", a as char));
        }
        let lo_full = lo[1..].iter().all(|&d| d == b'0');
        let hi_full = hi[1..].iter().all(|&d| d == b'9');
        let any = |n: usize| if n == 0 { String::new() } else { format!("[0-9]{{{n}}}") };
        let (first, last) = (if lo_full { a } else { a + 1 }, if hi_full { b } else { b - 1 });
        if !lo_full {
            same_length(&lo[1..], &vec![b'9'; rest], out, &format!("{prefix}{}", a as char));
        }
        if first <= last {
            out.push(format!("{prefix}{}{}", digit(first, last), any(rest)));
        }
        if !hi_full {
            same_length(&vec![b'0'; rest], &hi[1..], out, &format!("{prefix}{}", b as char));
        }
    }
    let mut out = Vec::new();
    let mut start = lo;
    while start <= hi {
        let digits = start.to_string().len() as u32;
        let end = hi.min(10u32.pow(digits) - 1);
        same_length(start.to_string().as_bytes(), end.to_string().as_bytes(), &mut out, "");
        start = end + 1;
    }
    format!("(?:{})", out.join("|"))
}

/// The public ports that take tls (and are not 0, 80, 443 or in the raw TCP range), as ranges.
fn tls_ports(policy: &PortPolicy) -> Vec<(u32, u32)> {
    let (tcp_lo, tcp_hi) = (u32::from(*policy.tcp_ports.start()), u32::from(*policy.tcp_ports.end()));
    let mut out = Vec::new();
    let mut start = 1;
    for p in 1..=65536u32 {
        let taken = p == 65536 || p == 80 || p == 443 || (tcp_lo..=tcp_hi).contains(&p);
        if taken {
            if start < p {
                out.push((start, p - 1));
            }
            start = p + 1;
        }
    }
    out
}

/// A regular expression matching exactly the port spec strings that [`PortSpec::from_str`] and [`expand`] accept
/// on their own, or with a spec for 443 beside a redirect (two specs may still claim one public port), for the
/// OpenAPI document.
pub fn spec_pattern(policy: &PortPolicy) -> String {
    let dest = range_pattern(1, 65535);
    let tcp = range_pattern(u32::from(*policy.tcp_ports.start()), u32::from(*policy.tcp_ports.end()));
    let tls: Vec<String> = tls_ports(policy).into_iter().map(|(lo, hi)| range_pattern(lo, hi)).collect();
    let tls = format!("(?:{})", tls.join("|"));
    let raw = r"(?:/(?:tcp|tcp\+proxy|proxy\+tcp|proxy))?";
    [
        format!(r"443(?::{dest})?(?:/(?:tls\+http|http\+tls))?"),
        format!(r"80(?::{dest})?(?:/http)?"),
        r"80(?::443)?/(?:http\+redirect|redirect\+http)".to_owned(),
        format!("0:{dest}{raw}"),
        format!("{tcp}(?::{dest})?{raw}"),
        format!(r"{tls}(?::{dest})?(?:/(?:tls|tls\+proxy|proxy\+tls|proxy|tls\+http|http\+tls))?"),
    ]
    .iter()
    .map(|alternative| format!("^{alternative}$"))
    .collect::<Vec<_>>()
    .join("|")
}

/// A JSON Schema matching exactly the port spec objects that [`expand`] accepts (as [`spec_pattern`] the
/// strings), for the OpenAPI document: which handlers, destination and proxy each kind of public port takes.
pub fn spec_object_schema(policy: &PortPolicy) -> serde_json::Value {
    use serde_json::json;
    let (tcp_lo, tcp_hi) = (*policy.tcp_ports.start(), *policy.tcp_ports.end());
    let set = |handlers: &[&str]| {
        json!({"type": "array", "items": {"enum": handlers}, "minItems": handlers.len(), "maxItems": handlers.len(),
               "uniqueItems": true})
    };
    let default_or = |sets: Vec<serde_json::Value>| {
        let mut any = vec![json!({"type": "null"})];
        any.extend(sets);
        json!({"anyOf": any})
    };
    let no_proxy = json!({"const": false});
    let tls_ports: Vec<_> =
        tls_ports(policy).into_iter().map(|(lo, hi)| json!({"minimum": lo, "maximum": hi})).collect();
    let shape = |port: serde_json::Value, handlers: serde_json::Value, proxy: serde_json::Value| json!({"properties": {"port": port, "handlers": handlers, "proxy": proxy}});
    json!({
        "anyOf": [
            shape(json!({"const": 443}), default_or(vec![set(&["tls", "http"])]), no_proxy.clone()),
            shape(json!({"const": 80}), default_or(vec![set(&["http"])]), no_proxy.clone()),
            {
                "properties": {
                    "port": {"const": 80},
                    "handlers": set(&["http", "redirect"]),
                    "destination_port": {"anyOf": [{"type": "null"}, {"const": 443}]},
                    "proxy": no_proxy,
                },
                "required": ["handlers"],
            },
            {
                "properties": {
                    "port": {"const": 0},
                    "handlers": default_or(vec![set(&["tcp"])]),
                    "destination_port": {"type": "integer"},
                },
                "required": ["destination_port"],
            },
            shape(json!({"minimum": tcp_lo, "maximum": tcp_hi}), default_or(vec![set(&["tcp"])]), json!({})),
            shape(json!({"anyOf": tls_ports.clone()}), default_or(vec![set(&["tls"])]), json!({})),
            shape(json!({"anyOf": tls_ports}), set(&["tls", "http"]), no_proxy),
        ]
    })
}

#[cfg(test)]
mod tests {

    #[test]
    fn range_patterns_match_exactly_their_numbers() {
        let check = |lo: u32, hi: u32| {
            let re = regex::Regex::new(&format!("^{}$", range_pattern(lo, hi))).unwrap();
            for n in 0..=70000u32 {
                assert_eq!(re.is_match(&n.to_string()), (lo..=hi).contains(&n), "{n} against {lo}..={hi}");
            }
            assert!(!re.is_match(&format!("0{lo}")), "a leading zero");
        };
        for (lo, hi) in [(1, 65535), (0, 9), (30000, 32767), (444, 29999), (81, 442), (7, 7), (32768, 65535)] {
            check(lo, hi);
        }
    }

    #[test]
    fn the_spec_pattern_matches_exactly_the_specs_that_expand() {
        let policy = PortPolicy::default();
        let re = regex::Regex::new(&spec_pattern(&policy)).unwrap();
        let suffixes = [
            "",
            "/tls",
            "/http",
            "/tcp",
            "/redirect",
            "/proxy",
            "/tls+http",
            "/http+tls",
            "/tls+proxy",
            "/proxy+tls",
            "/tcp+proxy",
            "/proxy+tcp",
            "/http+redirect",
            "/redirect+http",
            "/tls+http+proxy",
            "/http+proxy",
            "/tls+tcp",
            "/redirect",
            "/tls+redirect",
            "/",
            "/tls+tls",
        ];
        let ports = [0, 1, 22, 79, 80, 81, 442, 443, 444, 8080, 8443, 29999, 30000, 31000, 32767, 32768, 65535];
        let dests = ["", ":1", ":443", ":8080", ":65535", ":0", ":65536", ":08080"];
        for port in ports {
            for dest in dests {
                for suffix in suffixes {
                    let spec = format!("{port}{dest}{suffix}");
                    // A redirect also needs a spec for 443 in its list: the document says so of the list.
                    let https: PortSpec = "443".parse().unwrap();
                    let accepted = spec.parse::<PortSpec>().is_ok_and(|s| {
                        expand(std::slice::from_ref(&s), &policy).is_ok() || expand(&[s, https], &policy).is_ok()
                    });
                    assert_eq!(re.is_match(&spec), accepted, "{spec}");
                }
            }
        }
        for bad in ["", "0443", "443:", ":443", "443:8080:1", "65536", "x", "443/TLS", " 443"] {
            assert!(!re.is_match(bad), "{bad}");
        }
    }
    use super::*;

    fn expand_str(specs: &[&str]) -> Result<Vec<String>, String> {
        parse_specs(specs, &PortPolicy::default())
            .map(|m| m.iter().map(|m| m.to_string()).collect())
            .map_err(|e| e.to_string())
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
        let cases: &[(&[&str], &str)] = &[
            (&[""], "port spec \"\": is empty; write PUBLIC[:DEST][/HANDLER[+HANDLER]], e.g. 443:8080"),
            (&["abc"], "port spec \"abc\": public port \"abc\" is not a number"),
            (&["-1"], "port spec \"-1\": public port \"-1\" is not a number"),
            (&[" 443"], "port spec \" 443\": public port \" 443\" is not a number"),
            (&["70000:80"], "port spec \"70000:80\": public port 70000 is out of range (1-65535)"),
            (&["443:"], "port spec \"443:\": destination port \"\" is not a number"),
            (&["443:99999"], "port spec \"443:99999\": destination port 99999 is out of range (1-65535)"),
            (&["1:2:3"], "port spec \"1:2:3\": has more than one ':'; write PUBLIC[:DEST]"),
            (&["443/"], "port spec \"443/\": has '/' but no handler after it"),
            (
                &["443:8080/bogus"],
                "port spec \"443:8080/bogus\": unknown handler \"bogus\" (valid: tls, http, redirect, tcp, proxy)",
            ),
            (&["443:8080/tls+tls"], "port spec \"443:8080/tls+tls\": names tls twice"),
            (&["8443/tls+proxy+proxy"], "port spec \"8443/tls+proxy+proxy\": names proxy twice"),
            (&["443:0"], "port spec \"443:0\": destination port must be 1-65535"),
            (
                &["443:8080/http"],
                "port spec \"443:8080/http\": port 443 serves https: its handlers are exactly tls+http",
            ),
            (&["443:8080/tls"], "port spec \"443:8080/tls\": port 443 serves https: its handlers are exactly tls+http"),
            (&["80:8080/tls"], "port spec \"80:8080/tls\": port 80 serves plain http and never tls"),
            (&["80:8080/tls+http"], "port spec \"80:8080/tls+http\": port 80 serves plain http and never tls"),
            (&["80:8080/tcp"], "port spec \"80:8080/tcp\": port 80 serves plain http: it needs the http handler"),
            (
                &["8080/http"],
                "port spec \"8080/http\": plain http is only for port 80; port 8080 takes tls, tls+http or tcp",
            ),
            (
                &["8443:8080/http+redirect"],
                "port spec \"8443:8080/http+redirect\": redirect is only for port 80, not 8443",
            ),
            (
                &["80:8443/http+redirect", "443"],
                "port spec \"80:8443/http+redirect\": redirect goes to https on 443, not 8443",
            ),
            (
                &["80/http+redirect"],
                "port spec \"80/http+redirect\": redirect goes to https on 443, but no spec maps port 443",
            ),
            (
                &["30001:5432/tcp+tls"],
                "port spec \"30001:5432/tcp+tls\": tcp forwards raw bytes and cannot combine with tls, http or redirect",
            ),
            (
                &["5432/tcp"],
                "port spec \"5432/tcp\": a tcp public port is 0 (allocate) or within 30000-32767, not 5432",
            ),
            (
                &["30001:80/tls"],
                "port spec \"30001:80/tls\": port 30001 is in the tcp range 30000-32767, reserved for tcp",
            ),
            (&["0:80/tls"], "port spec \"0:80/tls\": public port 0 allocates a raw tcp port; it needs the tcp handler"),
            (&["0/tcp"], "port spec \"0/tcp\": public port 0 (allocate) needs a destination port"),
            (
                &["443:8080/tls+http+proxy"],
                "port spec \"443:8080/tls+http+proxy\": proxy needs a raw stream: tcp, or tls without http",
            ),
            (
                &["8443:8080/tls+http+proxy"],
                "port spec \"8443:8080/tls+http+proxy\": proxy needs a raw stream: tcp, or tls without http",
            ),
            (&["443:8080", "443:9090"], "port spec \"443:9090\": public port 443 is already mapped by \"443:8080\""),
            (
                &["8443/tls", "8443:1/tls"],
                "port spec \"8443:1/tls\": public port 8443 is already mapped by \"8443/tls\"",
            ),
        ];
        for (specs, msg) in cases {
            assert_eq!(expand_str(specs).unwrap_err(), *msg, "{specs:?}");
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
