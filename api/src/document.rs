//! Finishing the generated OpenAPI document so that it tells what the server accepts, no more and no less: a
//! client generated from it sends nothing the server refuses for its shape, and the server refuses what it rules
//! out. utoipa writes what the types say; this adds what the rules of `cloud_domain` say, from the same
//! functions and constants the server applies:
//! - every integer carries its registered format (`uint16`, `uint32`, `int64`, ...; utoipa writes `u-int32`) and
//!   the bounds of its type unless the field declares tighter ones;
//! - names, cursors, port specs (strings and objects), domains, image references and environment variable names
//!   carry their grammar as patterns and schemas.
//!
//! Port specs and domains depend on the platform's settings (raw TCP range, base domain): the served document is
//! finished with the running settings, the checked-in one with the defaults.

use cloud_domain::names::{NAME_PATTERN, RESERVED_NAMES, UUID_PATTERN};
use cloud_domain::ports;
use cloud_store::Settings;
use serde_json::{Value, json};

/// Variables the platform sets for every instance; a request may not set them.
pub(crate) const PLATFORM_ENV: [&str; 4] = ["PORT", "PRIVATE_IP", "INSTANCE", "SERVICE"];

/// One DNS label, as names and domain labels are written.
const LABEL: &str = "[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?";

/// Adds the rules to a document utoipa generated.
pub(crate) fn finish(doc: &mut Value, settings: &Settings) {
    integers(doc);
    let policy = settings.port_policy();
    let schemas = at(doc, "/components/schemas");
    for component in ["CreateTenant", "CreateService", "CreateInstance", "PullImage"] {
        merge(at(schemas, &format!("/{component}/properties/name")), name());
    }
    merge(at(schemas, "/CreateInstance/properties/image"), json!({"minLength": 1}));
    // An environment and an argument list cannot hold NUL (nor can PostgreSQL's text).
    let no_nul = json!({"pattern": "^[^\\x00]*$"});
    for component in ["CreateInstance", "CreateRollout"] {
        merge(at(schemas, &format!("/{component}/properties/env/additionalProperties")), no_nul.clone());
        merge(at(schemas, &format!("/{component}/properties/args/items")), no_nul.clone());
    }
    merge(at(schemas, "/CreateRollout/properties/image"), json!({"minLength": 1}));
    // An existing service, or ports for a new ephemeral one: not both.
    merge(
        at(schemas, "/CreateInstance"),
        json!({"not": {
            "required": ["service", "ports"],
            "properties": {"service": {"type": "string"}, "ports": {"type": "array"}},
        }}),
    );
    for component in ["CreateInstance", "CreateRollout"] {
        merge(
            at(schemas, &format!("/{component}/properties/env")),
            json!({"propertyNames": {"pattern": "^[A-Za-z_][A-Za-z0-9_]*$", "not": {"enum": PLATFORM_ENV}}}),
        );
    }
    merge(at(schemas, "/PullImage/properties/reference"), reference());
    for variant in at(schemas, "/PortInput/oneOf").as_array_mut().into_iter().flatten() {
        if variant["type"] == "string" {
            merge(variant, json!({"pattern": ports::spec_pattern(&policy)}));
        }
    }
    merge(at(schemas, "/PortSpec"), ports::spec_object_schema(&policy));
    for component in ["CreateService", "UpdateService", "CreateInstance"] {
        merge(at(schemas, &format!("/{component}/properties/ports")), redirect_needs_https());
    }
    for component in ["CreateService", "UpdateService"] {
        let domains = at(schemas, &format!("/{component}/properties/domains"));
        merge(domains, json!({"maxItems": cloud_domain::domains::MAX_DOMAINS_PER_SERVICE}));
        merge(at(domains, "/items"), domain(settings));
    }
    for (path, item) in at(doc, "/paths").as_object_mut().into_iter().flat_map(|p| p.iter_mut()) {
        for op in item.as_object_mut().into_iter().flat_map(|i| i.values_mut()) {
            if path.starts_with("/v1/")
                && let Some(responses) = op.get_mut("responses").and_then(Value::as_object_mut)
            {
                // Every operation of the API reads or writes PostgreSQL, whose silence is bounded.
                responses.entry("503").or_insert_with(database_unavailable);
            }
            let parameters = op.get_mut("parameters").and_then(Value::as_array_mut);
            for p in parameters.into_iter().flatten() {
                match p["name"].as_str() {
                    // `POST /v1/images?name=` names the uploaded image.
                    Some("name") => merge(at(p, "/schema"), name()),
                    Some("cursor") => merge(at(p, "/schema"), json!({"pattern": cloud_store::Cursor::PATTERN})),
                    _ => {}
                }
            }
        }
    }
}

/// The answer of an operation whose database did not answer in time.
fn database_unavailable() -> Value {
    json!({
        "description": "`database_unavailable`: PostgreSQL did not answer within the API's bound \
                        (`database_timeout_seconds`); nothing was changed that a retry would not find",
        "headers": {"Retry-After": {
            "description": "Seconds to wait before asking again",
            "schema": {"type": "integer", "format": "uint32", "minimum": 0, "maximum": u32::MAX},
        }},
        "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
    })
}

/// The part of the document at a JSON pointer, which the code that generates it always writes.
fn at<'a>(doc: &'a mut Value, pointer: &str) -> &'a mut Value {
    doc.pointer_mut(pointer).unwrap_or_else(|| panic!("the OpenAPI document has no {pointer}"))
}

/// Adds `extra`'s keys to `schema`, an object schema (nothing when it is absent).
fn merge(schema: &mut Value, extra: Value) {
    if let (Some(schema), Value::Object(extra)) = (schema.as_object_mut(), extra) {
        schema.extend(extra);
    }
}

/// Gives every integer schema its registered format and its type's bounds.
fn integers(v: &mut Value) {
    match v {
        Value::Object(o) => {
            let bounds: Option<(&str, Value, Value)> = match o.get("format").and_then(Value::as_str) {
                Some("int8") => Some(("int8", json!(i8::MIN), json!(i8::MAX))),
                Some("int16") => Some(("int16", json!(i16::MIN), json!(i16::MAX))),
                Some("int32") => Some(("int32", json!(i32::MIN), json!(i32::MAX))),
                Some("int64") => Some(("int64", json!(i64::MIN), json!(i64::MAX))),
                Some("u-int8") => Some(("uint8", json!(0), json!(u8::MAX))),
                Some("u-int16") => Some(("uint16", json!(0), json!(u16::MAX))),
                Some("u-int32") => Some(("uint32", json!(0), json!(u32::MAX))),
                Some("u-int64") => Some(("uint64", json!(0), json!(u64::MAX))),
                _ => None,
            };
            if let Some((format, min, max)) = bounds {
                o.insert("format".into(), format.into());
                o.entry("minimum").or_insert(min);
                o.entry("maximum").or_insert(max);
            }
            o.values_mut().for_each(integers);
        }
        Value::Array(items) => items.iter_mut().for_each(integers),
        _ => {}
    }
}

/// The rules of `cloud_domain::names::validate_name`.
fn name() -> Value {
    json!({
        "pattern": NAME_PATTERN,
        "maxLength": cloud_domain::names::MAX_LABEL,
        "not": {"anyOf": [{"enum": RESERVED_NAMES}, {"type": "string", "pattern": UUID_PATTERN}]},
    })
}

/// `text` with its dots escaped, for a pattern (platform domains are of `[a-z0-9.-]`).
fn literal(text: &str) -> String {
    text.replace('.', "\\.")
}

/// The rules of `cloud_domain::domains::resolve_domain`: a name for a platform subdomain, the same fully
/// qualified in the platform's zone, or a custom domain outside the platform's base domain.
fn domain(settings: &Settings) -> Value {
    let zone = literal(&settings.zone());
    let reserved: Vec<String> = RESERVED_NAMES.iter().map(|r| format!("{r}.{}.", settings.zone())).collect();
    let uuid_label = UUID_PATTERN.trim_start_matches('^').trim_end_matches('$');
    json!({"anyOf": [
        {"type": "string", "pattern": NAME_PATTERN, "not": name()["not"]},
        {
            "type": "string",
            "pattern": format!("^{LABEL}\\.{zone}\\.$"),
            "not": {"anyOf": [{"enum": reserved}, {"pattern": format!("^{uuid_label}\\.{zone}\\.$")}]},
        },
        {
            "type": "string",
            "maxLength": 254,
            "pattern": format!("^(?:\\*\\.)?(?:{LABEL}\\.)+{LABEL}\\.$"),
            "not": {"pattern": format!("(?:^|\\.){}\\.$", literal(&settings.base_domain))},
        },
    ]})
}

/// The rules of `cloud_oci::Reference::parse`: `[host[:port]/]repository[:tag][@sha256:<hex>]`.
fn reference() -> Value {
    let port = ports::range_pattern(1, 65535);
    let component = "[a-z0-9](?:[a-z0-9._-]*[a-z0-9])?";
    let first = "[a-z0-9](?:[a-z0-9_-]*[a-z0-9])?";
    let registry = format!(
        "(?:[A-Za-z0-9-]*\\.[A-Za-z0-9.-]*(?::{port})?|[A-Za-z0-9-]+:{port}|localhost)/(?:{component}/)*{component}"
    );
    let repository = format!("{component}|{first}(?:/{component})+");
    let tag = "(?::[A-Za-z0-9_][A-Za-z0-9._-]{0,127})?";
    json!({
        "minLength": 1,
        "maxLength": 512,
        "pattern": format!("^(?:{registry}|{repository}){tag}(?:@sha256:[0-9a-f]{{64}})?$"),
    })
}

/// A redirect (`80/http+redirect`) goes to https: the list must map 443 too.
fn redirect_needs_https() -> Value {
    let redirect = json!({"anyOf": [
        {"type": "string", "pattern": "/(?:http\\+redirect|redirect\\+http)$"},
        {
            "type": "object",
            "required": ["handlers"],
            "properties": {"handlers": {"type": "array", "contains": {"const": "redirect"}}},
        },
    ]});
    let https = json!({"anyOf": [
        {"type": "string", "pattern": "^443(?:[:/]|$)"},
        {"type": "object", "required": ["port"], "properties": {"port": {"const": 443}}},
    ]});
    json!({"anyOf": [{"not": {"contains": redirect}}, {"contains": https}]})
}
