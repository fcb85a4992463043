//! ringfence as vhost-user management software discovers it: the capabilities the binary
//! prints (`--print-capabilities`) and the backend descriptor it ships
//! (`contrib/vhost-user/50-ringfence.json`), each checked against QEMU's
//! `docs/interop/vhost-user.json` schema, written out below as the rules a QAPI parser applies
//! (required members, no unknown members, enum values).

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use serde_json::{Map, Value};

/// `VHostUserBackendType`.
const BACKEND_TYPES: &[&str] = &[
    "9p",
    "balloon",
    "block",
    "caif",
    "console",
    "crypto",
    "gpu",
    "input",
    "net",
    "rng",
    "rpmsg",
    "rproc-serial",
    "scsi",
    "vsock",
    "fs",
];

/// `VHostUserBackendBlockFeature`.
const BLOCK_FEATURES: &[&str] = &["read-only", "blk-file"];

fn object<'a>(v: &'a Value, what: &str) -> Result<&'a Map<String, Value>, String> {
    v.as_object()
        .ok_or_else(|| format!("{what}: not a JSON object: {v}"))
}

fn string<'a>(o: &'a Map<String, Value>, key: &str) -> Result<&'a str, String> {
    match o.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(format!("'{key}' is not a string: {other}")),
        None => Err(format!("'{key}' is missing")),
    }
}

fn only_members(o: &Map<String, Value>, allowed: &[&str]) -> Result<(), String> {
    match o.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(format!("unknown member '{k}' (the schema has {allowed:?})")),
        None => Ok(()),
    }
}

/// `VHostUserBackendCapabilities` with the `block` branch (`VHostUserBackendCapabilitiesBlock`).
fn check_block_capabilities(v: &Value) -> Result<(), String> {
    let o = object(v, "capabilities")?;
    let ty = string(o, "type")?;
    if !BACKEND_TYPES.contains(&ty) {
        return Err(format!("type '{ty}' is no VHostUserBackendType"));
    }
    if ty != "block" {
        return Err(format!(
            "type '{ty}': a vhost-user-blk backend is of type 'block'"
        ));
    }
    only_members(o, &["type", "features"])?;
    let features = o
        .get("features")
        .ok_or("'features' is missing (required for type 'block')")?
        .as_array()
        .ok_or("'features' is not a list")?;
    let mut seen = BTreeSet::new();
    for f in features {
        let f = f
            .as_str()
            .ok_or_else(|| format!("feature {f} is not a string"))?;
        if !BLOCK_FEATURES.contains(&f) {
            return Err(format!("'{f}' is no VHostUserBackendBlockFeature"));
        }
        if !seen.insert(f) {
            return Err(format!("feature '{f}' is listed twice"));
        }
    }
    Ok(())
}

/// `VhostUserBackend`.
fn check_backend_descriptor(v: &Value) -> Result<(), String> {
    let o = object(v, "descriptor")?;
    only_members(o, &["description", "type", "binary", "tags"])?;
    string(o, "description")?;
    let ty = string(o, "type")?;
    if !BACKEND_TYPES.contains(&ty) {
        return Err(format!("type '{ty}' is no VHostUserBackendType"));
    }
    let binary = string(o, "binary")?;
    if !Path::new(binary).is_absolute() {
        return Err(format!("binary '{binary}' is not an absolute path"));
    }
    if let Some(tags) = o.get("tags") {
        let tags = tags.as_array().ok_or("'tags' is not a list")?;
        if let Some(t) = tags.iter().find(|t| !t.is_string()) {
            return Err(format!("tag {t} is not a string"));
        }
    }
    Ok(())
}

fn print_capabilities() -> Value {
    let f = common::run_to_exit(Command::new(common::ringfence_bin()).arg("--print-capabilities"));
    assert_eq!(f.status.code(), Some(0), "stderr:\n{}", f.stderr);
    serde_json::from_str(&f.stdout)
        .unwrap_or_else(|e| panic!("--print-capabilities is not JSON ({e}):\n{}", f.stdout))
}

#[test]
fn printed_capabilities_follow_the_schema() {
    let caps = print_capabilities();
    check_block_capabilities(&caps).unwrap_or_else(|e| panic!("{e}: {caps}"));
    // ringfence has both options the features name.
    assert_eq!(
        caps["features"],
        serde_json::json!(["read-only", "blk-file"]),
        "{caps}"
    );
}

#[test]
fn the_backend_descriptor_follows_the_schema() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/vhost-user/50-ringfence.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let d: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON ({e}):\n{text}", path.display()));
    check_backend_descriptor(&d).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // It describes this binary: the type it prints, the name it is installed under, and a
    // file name management software sorts (a two-digit prefix).
    assert_eq!(d["type"], print_capabilities()["type"], "{text}");
    assert_eq!(
        Path::new(d["binary"].as_str().unwrap_or_default()).file_name(),
        Some(std::ffi::OsStr::new("ringfence")),
        "{text}"
    );
    let name = path.file_name().unwrap().to_string_lossy();
    assert!(
        name.len() > 3 && name.as_bytes()[..2].iter().all(u8::is_ascii_digit) && &name[2..3] == "-",
        "{name}"
    );
}

/// The checks above reject what the schema rejects (so that their passing means something).
#[test]
fn the_schema_checks_reject_what_the_schema_rejects() {
    use serde_json::json;
    for bad in [
        json!({"type": "block-device", "features": []}),
        json!({"type": "block"}),
        json!({"type": "block", "features": ["read-only", "discard"]}),
        json!({"type": "block", "features": ["read-only", "read-only"]}),
        json!({"type": "block", "features": [], "extra": 1}),
        json!({"type": "gpu", "features": []}),
        json!(["block"]),
    ] {
        assert!(check_block_capabilities(&bad).is_err(), "accepted {bad}");
    }
    assert!(check_block_capabilities(&json!({"type": "block", "features": []})).is_ok());
    let good = json!({"description": "d", "type": "block", "binary": "/usr/libexec/x"});
    assert!(check_backend_descriptor(&good).is_ok());
    for bad in [
        json!({"type": "block", "binary": "/usr/libexec/x"}),
        json!({"description": "d", "binary": "/usr/libexec/x"}),
        json!({"description": "d", "type": "block"}),
        json!({"description": "d", "type": "disk", "binary": "/usr/libexec/x"}),
        json!({"description": "d", "type": "block", "binary": "ringfence"}),
        json!({"description": "d", "type": "block", "binary": "/x", "tags": [1]}),
        json!({"description": "d", "type": "block", "binary": "/x", "features": []}),
    ] {
        assert!(check_backend_descriptor(&bad).is_err(), "accepted {bad}");
    }
}
