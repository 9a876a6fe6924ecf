//! The access log, off the request path: each core appends its lines to a buffer of its own (no lock, no system
//! call per request) and hands full buffers, or whatever it holds every 200 ms, to one writer thread. When the
//! writer falls behind, whole buffers are dropped and counted (`edge_access_log_dropped_lines_total`) rather than
//! making requests wait for a disk or a pipe. The lines look like the rest of `cloudd`'s log (the `tracing` text or
//! JSON format, target `cloud_edge::access`), so one log stream reads as one.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::mpsc::{SyncSender, TrySendError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Where access log lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogTarget {
    /// Nowhere.
    Off,
    /// The process's standard error, beside its other logs.
    Stderr,
    /// Appended to a file.
    File(PathBuf),
}

/// How the edge writes its access log. In a configuration file it is its target: `"stderr"`, `"off"` or a file
/// path; the format follows the rest of the log.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct AccessLog {
    /// Where the lines go. Lines are written only when `tracing` would also let an `info` event of the target
    /// `cloud_edge::access` through (so `CLOUD_LOG=warn` silences it as before).
    pub target: LogTarget,
    /// JSON lines (as `CLOUD_LOG_FORMAT=json` gives the rest of the log) instead of text.
    pub json: bool,
}

impl Default for AccessLog {
    fn default() -> Self {
        Self { target: LogTarget::Stderr, json: false }
    }
}

impl TryFrom<String> for AccessLog {
    type Error = String;

    fn try_from(target: String) -> Result<Self, String> {
        let target = match target.as_str() {
            "stderr" => LogTarget::Stderr,
            "off" => LogTarget::Off,
            "" => return Err("the access log target is empty: say stderr, off or a file path".into()),
            _ => LogTarget::File(target.into()),
        };
        Ok(Self { target, json: false })
    }
}

impl From<AccessLog> for String {
    fn from(log: AccessLog) -> Self {
        match log.target {
            LogTarget::Stderr => "stderr".into(),
            LogTarget::Off => "off".into(),
            LogTarget::File(path) => path.display().to_string(),
        }
    }
}

/// A core hands its buffer over once it holds this much.
const HAND_OVER_AT: usize = 32 * 1024;
/// Buffers waiting for the writer; beyond this the newest are dropped.
const QUEUED: usize = 64;
/// How often a core hands over what it holds even when the buffer is not full.
pub(crate) const TICK: Duration = Duration::from_millis(200);

thread_local! {
    /// This core's lines not yet handed to the writer.
    static LINES: RefCell<String> = const { RefCell::new(String::new()) };
}

/// One request's line, as the HTTP layer knows it at the end.
pub(crate) struct Line<'a> {
    pub(crate) request_id: &'a str,
    pub(crate) client: Option<std::net::SocketAddr>,
    pub(crate) port: u16,
    pub(crate) host: &'a str,
    pub(crate) method: &'a str,
    pub(crate) path: &'a str,
    pub(crate) status: u16,
    pub(crate) service: &'a str,
    pub(crate) instance: &'a str,
    pub(crate) duration: Duration,
    pub(crate) error: Option<&'a dyn std::fmt::Display>,
}

/// The edge's access log: formats lines into the calling core's buffer and passes full buffers on.
pub(crate) struct AccessWriter {
    to: Option<SyncSender<Vec<u8>>>,
    json: bool,
    dropped: prometheus::IntCounter,
}

impl AccessWriter {
    /// Starts the writer thread for `config` (none when the log is off or filtered out).
    pub(crate) fn start(config: &AccessLog, dropped: prometheus::IntCounter) -> std::io::Result<Self> {
        let enabled = tracing::enabled!(target: "cloud_edge::access", tracing::Level::INFO);
        use std::io::Write as _;
        let mut out: Box<dyn std::io::Write + Send> = match &config.target {
            LogTarget::Off => return Ok(Self { to: None, json: config.json, dropped }),
            _ if !enabled => return Ok(Self { to: None, json: config.json, dropped }),
            LogTarget::Stderr => Box::new(std::io::stderr()),
            LogTarget::File(path) => Box::new(std::fs::OpenOptions::new().create(true).append(true).open(path)?),
        };
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(QUEUED);
        std::thread::Builder::new().name("edge-access-log".into()).spawn(move || {
            for chunk in rx {
                if let Err(e) = out.write_all(&chunk) {
                    tracing::warn!(error = %e, "cannot write the access log");
                }
            }
            let _ = out.flush();
        })?;
        Ok(Self { to: Some(tx), json: config.json, dropped })
    }

    /// Appends a request's line to this core's buffer.
    pub(crate) fn log(&self, line: &Line<'_>) {
        if self.to.is_none() {
            return;
        }
        let full = LINES.with_borrow_mut(|buf| {
            if self.json {
                json_line(buf, line);
            } else {
                text_line(buf, line);
            }
            buf.len() >= HAND_OVER_AT
        });
        if full {
            self.hand_over();
        }
    }

    /// Passes this core's buffered lines to the writer (on the tick, when full, and when the core ends).
    pub(crate) fn hand_over(&self) {
        let Some(to) = &self.to else { return };
        let chunk = LINES.with_borrow_mut(|buf| {
            (!buf.is_empty()).then(|| std::mem::replace(buf, String::with_capacity(HAND_OVER_AT + 1024)).into_bytes())
        });
        let Some(chunk) = chunk else { return };
        match to.try_send(chunk) {
            Ok(()) => {}
            Err(TrySendError::Full(chunk) | TrySendError::Disconnected(chunk)) => {
                self.dropped.inc_by(chunk.iter().filter(|b| **b == b'\n').count() as u64);
            }
        }
    }
}

/// `tracing`'s text format: `<time>  INFO cloud_edge::access: request key=value ...`.
fn text_line(out: &mut String, l: &Line<'_>) {
    timestamp(out);
    let _ = write!(out, "  INFO cloud_edge::access: request request_id={} client=", l.request_id);
    if let Some(c) = l.client {
        let _ = write!(out, "{c}");
    }
    let _ = write!(
        out,
        " port={} host={} method={} path={} status={} service={} instance={} duration_ms={:.3} error=",
        l.port,
        l.host,
        l.method,
        l.path,
        l.status,
        l.service,
        l.instance,
        l.duration.as_secs_f64() * 1000.0
    );
    if let Some(e) = l.error {
        let start = out.len();
        let _ = write!(out, "{e}");
        // One line per request, whatever an error's text holds.
        if out[start..].contains(['\n', '\r']) {
            let cleaned = out[start..].replace(['\n', '\r'], " ");
            out.truncate(start);
            out.push_str(&cleaned);
        }
    }
    out.push('\n');
}

/// `tracing`'s JSON format: `{"timestamp":..,"level":"INFO","fields":{"message":"request",..},"target":..}`.
fn json_line(out: &mut String, l: &Line<'_>) {
    out.push_str("{\"timestamp\":\"");
    timestamp(out);
    out.push_str("\",\"level\":\"INFO\",\"fields\":{\"message\":\"request\",\"request_id\":");
    json_str(out, l.request_id);
    out.push_str(",\"client\":");
    json_str(out, &l.client.map(|c| c.to_string()).unwrap_or_default());
    let _ = write!(out, ",\"port\":{},\"host\":", l.port);
    json_str(out, l.host);
    out.push_str(",\"method\":");
    json_str(out, l.method);
    out.push_str(",\"path\":");
    json_str(out, l.path);
    let _ = write!(out, ",\"status\":{},\"service\":", l.status);
    json_str(out, l.service);
    out.push_str(",\"instance\":");
    json_str(out, l.instance);
    let _ = write!(out, ",\"duration_ms\":{},\"error\":", l.duration.as_secs_f64() * 1000.0);
    json_str(out, &l.error.map(|e| e.to_string()).unwrap_or_default());
    out.push_str("},\"target\":\"cloud_edge::access\"}\n");
}

fn json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// RFC 3339 UTC with microseconds, as `tracing` prints it.
fn timestamp(out: &mut String) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = now.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    let _ = write!(
        out,
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_micros()
    );
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (H. Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(error: Option<&dyn std::fmt::Display>) -> Line<'_> {
        Line {
            request_id: "r1",
            client: Some("10.0.0.1:5000".parse().unwrap()),
            port: 443,
            host: "a.example",
            method: "GET",
            path: "/x\"y",
            status: 200,
            service: "a.example",
            instance: "i-1",
            duration: Duration::from_micros(1500),
            error,
        }
    }

    #[test]
    fn lines_reach_the_file_once_handed_over_and_a_filtered_target_writes_nothing() {
        let path = std::env::temp_dir().join(format!("edge-access-{}.log", uuid::Uuid::new_v4()));
        let config = AccessLog { target: LogTarget::File(path.clone()), json: false };
        let dropped = prometheus::IntCounter::new("d", "d").unwrap();
        let info = tracing_subscriber::fmt().with_max_level(tracing::Level::INFO).finish();
        let writer = tracing::subscriber::with_default(info, || AccessWriter::start(&config, dropped.clone())).unwrap();
        writer.log(&line(None));
        writer.log(&line(None));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "", "nothing is written per request");
        writer.hand_over();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(&path).unwrap().lines().count() < 2 {
            assert!(std::time::Instant::now() < deadline, "the lines never reached the file");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(dropped.get(), 0);

        let warn = tracing_subscriber::fmt().with_max_level(tracing::Level::WARN).finish();
        let off = tracing::subscriber::with_default(warn, || AccessWriter::start(&config, dropped)).unwrap();
        assert!(off.to.is_none(), "CLOUD_LOG=warn silences the access log");
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn dates_are_gregorian() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_788), (2026, 12, 1));
    }

    #[test]
    fn a_text_line_has_every_field_and_stays_one_line() {
        let mut out = String::new();
        text_line(&mut out, &line(Some(&"bad\nthing")));
        let (_, rest) = out.split_once("  INFO cloud_edge::access: request ").unwrap();
        assert_eq!(
            rest,
            "request_id=r1 client=10.0.0.1:5000 port=443 host=a.example method=GET path=/x\"y status=200 \
             service=a.example instance=i-1 duration_ms=1.500 error=bad thing\n"
        );
    }

    #[test]
    fn a_json_line_parses_and_escapes() {
        let mut out = String::new();
        json_line(&mut out, &line(None));
        assert!(out.ends_with('\n') && out.matches('\n').count() == 1);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["target"], "cloud_edge::access");
        assert_eq!(v["fields"]["path"], "/x\"y");
        assert_eq!(v["fields"]["status"], 200);
        assert_eq!(v["fields"]["error"], "");
    }
}
