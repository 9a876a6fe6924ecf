//! Output formats: tables that fit the terminal for people; JSON, YAML (the API objects as they are) and names
//! for scripts.

use anyhow::bail;
use cloud_domain::api::{Image, Instance, Rollout, Service, Tenant, Token};
use serde::Serialize;
use serde_json::Value;
use unicode_width::{UnicodeWidthChar, UnicodeWidthStr};

/// `-o` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Columns for people.
    Table,
    /// The API objects as JSON.
    Json,
    /// The API objects as YAML.
    Yaml,
    /// One name per line.
    Name,
    /// One field per object and line, by a dotted path into the JSON form (`fqdn`, `service.name`,
    /// `ports.0.port`), for shell variables: `FQDN=$(cloudctl service get s -o value=fqdn)`. Leaked: parsed once
    /// per process, and it keeps the format `Copy`.
    Value(&'static str),
}

impl std::str::FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "table" => Ok(Self::Table),
            "json" => Ok(Self::Json),
            "yaml" => Ok(Self::Yaml),
            "name" => Ok(Self::Name),
            _ => match s.strip_prefix("value=") {
                Some(path) if !path.is_empty() && path.split('.').all(|p| !p.is_empty()) => {
                    Ok(Self::Value(Box::leak(path.to_owned().into_boxed_str())))
                }
                Some(_) => Err(format!("{s:?}: value= needs a dotted field path, e.g. value=fqdn")),
                None => Err(format!("{s:?} is not an output format: table, json, yaml, name or value=PATH")),
            },
        }
    }
}

/// The field at a dotted path of one object as a line: strings as they are, null as nothing, anything else as
/// compact JSON.
pub fn field(object: &impl Serialize, path: &str) -> anyhow::Result<String> {
    let mut at = serde_json::to_value(object)?;
    for part in path.split('.') {
        at = match at {
            Value::Object(mut map) => match map.remove(part) {
                Some(v) => v,
                None => {
                    let mut known: Vec<String> = map.into_iter().map(|(k, _)| k).collect();
                    known.sort();
                    bail!("no field {part:?} in {path:?} (fields here: {})", known.join(", "))
                }
            },
            Value::Array(mut items) => match part.parse::<usize>() {
                Ok(i) if i < items.len() => items.swap_remove(i),
                _ => bail!("{part:?} in {path:?} is not an index of a list of {}", items.len()),
            },
            _ => bail!("{path:?} goes past a plain value at {part:?}"),
        };
    }
    Ok(match at {
        Value::String(s) => s,
        Value::Null => String::new(),
        other => other.to_string(),
    })
}

/// Prints one field of each object, a line each.
pub fn values<T: Serialize>(items: &[T], path: &str) -> anyhow::Result<()> {
    for item in items {
        println!("{}", field(item, path)?);
    }
    Ok(())
}

/// A table of strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// Column titles.
    pub headers: Vec<&'static str>,
    /// Cells.
    pub rows: Vec<Vec<String>>,
}

impl Table {
    /// Renders with columns two spaces apart, shrinking the widest columns (with '…') to fit `width`. Widths are
    /// terminal columns, not characters: a CJK character takes two, a combining accent none.
    pub fn render(&self, width: usize) -> String {
        let cols = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.width()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(cols) {
                widths[i] = widths[i].max(cell.width());
            }
        }
        let total = |w: &[usize]| w.iter().sum::<usize>() + 2 * w.len().saturating_sub(1);
        while total(&widths) > width {
            let (i, w) = widths.iter().enumerate().max_by_key(|(_, w)| **w).map(|(i, w)| (i, *w)).unwrap_or((0, 0));
            if w <= 8 {
                break;
            }
            widths[i] = w - 1;
        }
        let mut out = String::new();
        let headers: Vec<String> = self.headers.iter().map(|h| h.to_string()).collect();
        for row in std::iter::once(&headers).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate().take(cols) {
                let text = fit(cell, widths[i]);
                line.push_str(&text);
                if i + 1 < cols {
                    line.extend(std::iter::repeat_n(' ', widths[i].saturating_sub(text.width()) + 2));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// A cell cut to at most `columns` terminal columns, ending in '…' when cut. A wide character that would
/// straddle the edge is left out whole, so the cell may come out a column short.
fn fit(cell: &str, columns: usize) -> String {
    if cell.width() <= columns {
        return cell.to_owned();
    }
    let mut used = 0;
    let mut text: String = cell
        .chars()
        .take_while(|c| {
            used += c.width().unwrap_or(0);
            used < columns
        })
        .collect();
    text.push('…');
    text
}

/// The terminal's width, or no limit when output is not a terminal (so scripts see full cells).
pub fn terminal_width() -> usize {
    columns(terminal_size::terminal_size())
}

/// The columns a table may take, given the terminal's size if stdout is one.
fn columns(terminal: Option<(terminal_size::Width, terminal_size::Height)>) -> usize {
    terminal.map_or(usize::MAX, |(w, _)| usize::from(w.0))
}

/// The YAML form of an API object, as `-o yaml` prints it.
pub fn yaml(value: &impl Serialize) -> anyhow::Result<String> {
    Ok(serde_norway::to_string(value)?)
}

/// Prints values in a format.
pub fn print<T: Serialize>(
    format: Format,
    items: &[T],
    table: fn(&[T]) -> Table,
    name: fn(&T) -> String,
    single: bool,
) -> anyhow::Result<()> {
    match format {
        Format::Table => print!("{}", table(items).render(terminal_width())),
        Format::Json if single => println!("{}", serde_json::to_string_pretty(&items[0]).unwrap_or_default()),
        Format::Json => println!("{}", serde_json::to_string_pretty(items).unwrap_or_default()),
        Format::Yaml if single => print!("{}", yaml(&items[0])?),
        Format::Yaml => print!("{}", yaml(&items)?),
        Format::Name => items.iter().for_each(|i| println!("{}", name(i))),
        Format::Value(path) => values(items, path)?,
    }
    Ok(())
}

/// Service rows.
pub fn services(items: &[Service]) -> Table {
    Table {
        headers: vec!["NAME", "FQDN", "PORTS", "INSTANCES", "PERSISTENT", "AGE"],
        rows: items
            .iter()
            .map(|s| {
                vec![
                    s.name.clone(),
                    s.fqdn.clone(),
                    s.ports.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(","),
                    s.instances.len().to_string(),
                    s.persistent.to_string(),
                    age(s.created_at),
                ]
            })
            .collect(),
    }
}

/// Instance rows.
pub fn instances(items: &[Instance]) -> Table {
    Table {
        headers: vec!["NAME", "STATE", "IMAGE", "SERVICE", "PRIVATE IP", "NODE", "RESTARTS", "AGE"],
        rows: items
            .iter()
            .map(|i| {
                vec![
                    i.name.clone(),
                    i.state.to_string(),
                    i.image.clone(),
                    i.service.as_ref().map_or("-".into(), |s| s.name.clone()),
                    i.private_ip.to_string(),
                    i.node.clone().unwrap_or_else(|| "-".into()),
                    i.restart_count.to_string(),
                    age(i.created_at),
                ]
            })
            .collect(),
    }
}

/// Rollout rows.
pub fn rollouts(items: &[Rollout]) -> Table {
    Table {
        headers: vec!["ID", "STATE", "IMAGE", "STRATEGY", "NEW", "OLD LEFT", "AGE", "REASON"],
        rows: items
            .iter()
            .map(|r| {
                vec![
                    r.id.to_string(),
                    r.state.to_string(),
                    r.image.clone(),
                    r.strategy.to_string(),
                    format!("{}/{}", r.new_ready, r.replicas),
                    r.old_remaining.to_string(),
                    age(r.created_at),
                    r.state_reason.clone().unwrap_or_default(),
                ]
            })
            .collect(),
    }
}

/// Image rows.
pub fn images(items: &[Image]) -> Table {
    Table {
        headers: vec!["NAME", "FORMAT", "SOURCE", "COMMAND", "PORT", "DIGEST", "SIZE"],
        rows: items
            .iter()
            .map(|i| {
                vec![
                    i.name.clone(),
                    i.format.as_str().to_owned(),
                    i.source.clone(),
                    i.command.join(" "),
                    i.port.to_string(),
                    i.digest.chars().take(19).collect(),
                    crate::progress::size(i.size_bytes),
                ]
            })
            .collect(),
    }
}

/// Tenant rows.
pub fn tenants(items: &[Tenant]) -> Table {
    Table {
        headers: vec!["NAME", "NETWORK", "SERVICES", "INSTANCES", "MEMORY MB"],
        rows: items
            .iter()
            .map(|t| {
                vec![
                    t.name.clone(),
                    t.network.clone(),
                    format!("{}/{}", t.usage.services, t.quotas.max_services),
                    format!("{}/{}", t.usage.instances, t.quotas.max_instances),
                    format!("{}/{}", t.usage.memory_mb, t.quotas.max_memory_mb),
                ]
            })
            .collect(),
    }
}

/// Token rows.
pub fn tokens(items: &[Token]) -> Table {
    Table {
        headers: vec!["ID", "SCOPES", "EXPIRES", "REVOKED", "DESCRIPTION"],
        rows: items
            .iter()
            .map(|t| {
                vec![
                    t.id.to_string(),
                    t.scopes.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(","),
                    t.expires_at.format("%Y-%m-%d %H:%M").to_string(),
                    t.revoked_at.map_or("-".into(), |r| r.format("%Y-%m-%d %H:%M").to_string()),
                    t.description.clone(),
                ]
            })
            .collect(),
    }
}

/// Secrets as a table (they have no values to show).
pub fn secrets(items: &[cloud_domain::api::Secret]) -> Table {
    Table {
        headers: vec!["NAME", "SERVICE", "AS", "VERSION", "UPDATED"],
        rows: items
            .iter()
            .map(|s| {
                vec![
                    s.name.clone(),
                    s.service.clone().unwrap_or_else(|| "-".into()),
                    if s.file { format!("/run/secrets/{}", s.name) } else { "env".into() },
                    s.version.to_string(),
                    s.updated_at.format("%Y-%m-%d %H:%M").to_string(),
                ]
            })
            .collect(),
    }
}

/// Join tokens as a table.
pub fn join_tokens(items: &[cloud_domain::api::JoinTokenInfo]) -> Table {
    let state = |s: cloud_domain::api::JoinTokenState| {
        serde_json::to_value(s).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
    };
    Table {
        headers: vec!["ID", "TENANT", "SCOPES", "STATE", "EXPIRES", "DESCRIPTION"],
        rows: items
            .iter()
            .map(|t| {
                vec![
                    t.id.to_string(),
                    t.tenant.clone(),
                    t.scopes.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(","),
                    state(t.state),
                    t.expires_at.format("%Y-%m-%d %H:%M").to_string(),
                    t.description.clone(),
                ]
            })
            .collect(),
    }
}

/// A short age like `5s`, `3m`, `2h`, `4d`.
fn age(created: chrono::DateTime<chrono::Utc>) -> String {
    let s = (chrono::Utc::now() - created).num_seconds().max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_match_their_snapshot_and_shrink_to_the_terminal() {
        let t = Table {
            headers: vec!["NAME", "FQDN", "PORTS"],
            rows: vec![
                vec![
                    "my-service".into(),
                    "my-service-x7k2p9qa.dev.cloud.localhost".into(),
                    "80:443/http+redirect,443:8080/tls+http".into(),
                ],
                vec!["db".into(), "db-00000000.dev.cloud.localhost".into(), "30001:5432/tcp".into()],
            ],
        };
        let snapshot = include_str!("../tests/snapshots/table-wide.txt");
        assert_eq!(t.render(200), snapshot);
        let narrow = t.render(60);
        assert_eq!(narrow, include_str!("../tests/snapshots/table-narrow.txt"));
        assert!(narrow.lines().all(|l| l.width() <= 60), "{narrow}");
    }

    #[test]
    fn wide_and_combining_characters_keep_the_columns_lined_up() {
        let t = Table {
            headers: vec!["NAME", "DESCRIPTION", "AGE"],
            // "日本語サービス" is 7 characters in 14 columns; "café" with a combining accent is 5 characters in 4.
            rows: vec![
                vec!["日本語サービス".into(), "cafe\u{301} au lait".into(), "5s".into()],
                vec!["web".into(), "plain".into(), "3m".into()],
            ],
        };
        let wide = t.render(200);
        assert_eq!(
            wide,
            "NAME            DESCRIPTION   AGE\n\
             日本語サービス  cafe\u{301} au lait  5s\n\
             web             plain         3m\n"
        );
        // Shrunk to 30 columns, the NAME column is cut to 12 columns: the wide character that would straddle its
        // edge is left out whole, and the next column still starts where it does on every other line.
        let narrow = t.render(30);
        assert_eq!(
            narrow,
            "NAME          DESCRIPTION  AGE\n\
             日本語サー…   cafe\u{301} au la…  5s\n\
             web           plain        3m\n"
        );
        // The AGE column starts at the same terminal column on every line.
        for table in [wide, narrow] {
            let lines: Vec<&str> = table.lines().collect();
            let age = lines[0].find("AGE").unwrap();
            for (line, cell) in lines[1..].iter().zip(["5s", "3m"]) {
                assert_eq!(line[..line.find(cell).unwrap()].width(), age, "{table}");
            }
        }
    }

    #[test]
    fn piped_tables_are_not_cut() {
        let long = format!("{}.dev.cloud.localhost", "x".repeat(300));
        let t = Table { headers: vec!["NAME", "FQDN"], rows: vec![vec!["web".into(), long.clone()]] };
        let piped = t.render(columns(None));
        assert_eq!(piped, format!("NAME  FQDN\nweb   {long}\n"));
        let terminal = Some((terminal_size::Width(80), terminal_size::Height(24)));
        assert!(t.render(columns(terminal)).lines().all(|l| l.width() <= 80));
    }

    #[test]
    fn value_paths_pick_one_field_and_name_what_is_wrong() {
        let service = serde_json::json!({
            "name": "my-service", "fqdn": "my-service-x7k2p9qa.dev.cloud.localhost", "persistent": true,
            "ports": [{"port": 443, "destination_port": 8080}], "limits": null,
        });
        assert_eq!(field(&service, "fqdn").unwrap(), "my-service-x7k2p9qa.dev.cloud.localhost");
        assert_eq!(field(&service, "ports.0.port").unwrap(), "443");
        assert_eq!(field(&service, "persistent").unwrap(), "true");
        assert_eq!(field(&service, "limits").unwrap(), "");
        assert_eq!(field(&service, "ports.0").unwrap(), r#"{"port":443,"destination_port":8080}"#);
        let err = |p| field(&service, p).unwrap_err().to_string();
        assert_eq!(err("fdqn"), r#"no field "fdqn" in "fdqn" (fields here: fqdn, limits, name, persistent, ports)"#);
        assert_eq!(err("ports.1.port"), r#""1" in "ports.1.port" is not an index of a list of 1"#);
        assert_eq!(err("name.first"), r#""name.first" goes past a plain value at "first""#);

        assert_eq!("value=service.name".parse(), Ok(Format::Value("service.name")));
        assert_eq!("json".parse(), Ok(Format::Json));
        assert!("value=".parse::<Format>().unwrap_err().contains("needs a dotted field path"));
        assert!("value=a..b".parse::<Format>().is_err());
        assert!("xml".parse::<Format>().unwrap_err().contains("table, json, yaml, name or value=PATH"));
    }

    /// `-o yaml` of every kind of object the commands print, with the strings a YAML emitter must quote or
    /// fold. The snapshot was written by `serde_yaml` 0.9 before the move to `serde_norway`: a YAML crate that
    /// prints our objects differently fails here.
    #[test]
    fn yaml_matches_its_snapshot() {
        use cloud_domain::api::{CreatedInstances, CreatedToken, WhoAmI};
        let at = "2026-01-02T03:04:05.123456Z";
        let tenant = serde_json::json!({
            "id": "00000000-0000-0000-0000-000000000001", "name": "acme", "network": "10.96.0.0/22",
            "quotas": {
                "max_services": 10, "max_instances": 20, "max_memory_mb": 4096, "max_images": 5, "max_domains": 3,
            },
            "usage": {"services": 1, "instances": 2, "memory_mb": 256, "images": 0, "domains": 1},
            "created_at": at,
        });
        let instance = serde_json::json!({
            "id": "00000000-0000-0000-0000-000000000002", "name": "web-x7k2p", "image": "hello",
            "image_digest": "sha256:0123456789abcdef", "desired_state": "running", "state": "failed",
            "state_reason": "exited: code 1\nsee logs", "private_ip": "10.96.0.5",
            "private_fqdn": "web-x7k2p.internal", "tenant_private_fqdn": "web-x7k2p.acme.internal", "node": null,
            "service": {"id": "00000000-0000-0000-0000-000000000003", "name": "web", "fqdn": "web.dev.cloud.localhost"},
            "port": 8080, "args": ["-c", "echo 'hi' && exit 1", "*", "- dash", "#hash", "key: value"],
            "env": {"EMPTY": "", "BOOL": "true", "NULLISH": "null", "TILDE": "~", "OCTAL": "0123", "FLOAT": "1e3",
                    "SPACED": " lead", "WIDE": "日本語", "LONG": "x".repeat(100), "MULTI": "a\nb\n", "YES": "yes"},
            "memory_mb": 128, "restart_policy": "on-failure", "restart_count": 3, "exit_code": -1,
            "boot_time_us": 18_446_744_073_709_551_615u64, "created_at": at, "updated_at": at,
            "started_at": at, "stopped_at": null,
        });
        let service = serde_json::json!({
            "id": "00000000-0000-0000-0000-000000000003", "name": "web", "fqdn": "web.dev.cloud.localhost",
            "ports": [{"port": 443, "destination_port": 8080, "handlers": ["tls", "http"], "proxy": false},
                      {"port": 80, "destination_port": 443, "handlers": ["http", "redirect"], "proxy": true}],
            "soft_limit": null, "hard_limit": 100, "scale_to_zero_after": 300, "persistent": false,
            "domains": [{"name": "www.example.com", "custom": true, "verified": false, "state": "pending",
                         "expires_at": at, "verification": {"txt_name": "_cloud.www.example.com",
                         "txt_value": "v=1; t=abc", "cname_target": "edge.dev.cloud.localhost"}}],
            "instances": [{"id": "00000000-0000-0000-0000-000000000002", "name": "web-x7k2p", "state": "running",
                           "private_ip": "fd00::5"}],
            "private_fqdn": "web.internal", "created_at": at, "updated_at": at,
        });
        let created: CreatedInstances =
            serde_json::from_value(serde_json::json!({"instances": [instance], "service": service})).unwrap();
        let token: CreatedToken = serde_json::from_value(serde_json::json!({
            "id": "00000000-0000-0000-0000-000000000004", "tenant": "acme", "scopes": ["read", "write"],
            "description": "", "expires_at": at, "revoked_at": null, "created_at": at, "jwt": "eyJ.eyJ.sig",
        }))
        .unwrap();
        let me: WhoAmI = serde_json::from_value(serde_json::json!({
            "tenant": tenant, "token_id": "00000000-0000-0000-0000-000000000004", "scopes": ["admin"],
            "expires_at": at,
        }))
        .unwrap();
        let remotes: std::collections::BTreeMap<String, Value> = [
            (
                "dev".to_owned(),
                serde_json::json!({"url": "https://127.0.0.1:7300", "default": true, "has_token": true}),
            ),
            (
                "prod".to_owned(),
                serde_json::json!({"url": "https://api.example.com", "default": false, "has_token": false}),
            ),
        ]
        .into();
        let rendered = [
            yaml(&created).unwrap(),
            yaml(&token).unwrap(),
            yaml(&me).unwrap(),
            yaml(&remotes).unwrap(),
            yaml(&Vec::<Value>::new()).unwrap(),
        ]
        .join("---\n");
        assert_eq!(rendered, include_str!("../tests/snapshots/objects.yaml"));
    }
}
