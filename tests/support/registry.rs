//! A test double of the Confluent Schema Registry REST API, the calls a serializer and a
//! consumer make: register (`POST /subjects/{subject}/versions` → `{"id":…}`), get by id
//! (`GET /schemas/ids/{id}` → `{"schema":…}`, plus `schemaType` when not Avro and `references`
//! when the schema has any), a subject's version (`GET /subjects/{subject}/versions/{n|latest}`,
//! the subject percent-encoded: Protobuf references are subjects such as
//! `confluent%2Fmeta.proto`), the schema types served (`GET /schemas/types`), HTTP basic auth,
//! and the documented error bodies
//! `{"error_code":…,"message":…}`: 40403 schema not found, 40401 subject not found, 50001 backend
//! data store failure (https://docs.confluent.io/cloud/current/ccloud/get-schema-only/,
//! https://docs.confluent.io/cloud/current/ccloud/register/).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use super::cdn_doubles::{Recorded, Reply, Server};

#[derive(Default)]
pub struct RegistryState {
    /// (id, subject, schema type, schema text); ids from 1.
    pub schemas: Vec<(u32, String, String, String)>,
    /// `Some((user, password))`: requests without these credentials get 401.
    pub auth: Option<(String, String)>,
    /// While set, every request gets 500 with error code 50001 (the registry's store is down).
    pub outage: bool,
    /// `GET /schemas/ids/…` requests answered, failed or not.
    pub lookups: usize,
    /// The `references` array of a schema id, when it has one (Protobuf imports).
    pub references: HashMap<u32, Value>,
}

pub struct RegistryDouble {
    pub state: Arc<Mutex<RegistryState>>,
    server: Server,
}

impl RegistryDouble {
    pub fn start() -> RegistryDouble {
        let state: Arc<Mutex<RegistryState>> = Arc::default();
        let shared = state.clone();
        let server = Server::start(move |req| handle(&shared, req));
        RegistryDouble { state, server }
    }

    pub fn url(&self) -> String {
        self.server.url()
    }

    /// Registers `schema` under `subject` with a given id (as the committed fixtures name them).
    pub fn insert(&self, id: u32, subject: &str, schema_type: &str, schema: &str) {
        self.state.lock().unwrap().schemas.push((id, subject.into(), schema_type.into(), schema.into()));
    }

    /// The committed Avro fixtures' schemas (tests/fixtures/avro/schemas.json) under their ids.
    pub fn with_avro_fixtures() -> RegistryDouble {
        let registry = RegistryDouble::start();
        let path = format!("{}/tests/fixtures/avro/schemas.json", env!("CARGO_MANIFEST_DIR"));
        let schemas: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        for (id, text) in schemas.as_object().unwrap() {
            registry.insert(id.parse().unwrap(), "fixture", "AVRO", text.as_str().unwrap());
        }
        registry
    }

    /// The committed Protobuf fixtures' schemas (tests/fixtures/protobuf/schemas.json) under
    /// their ids, subjects, versions and references, as the generator's registry held them.
    pub fn with_protobuf_fixtures() -> RegistryDouble {
        let registry = RegistryDouble::start();
        let path = format!("{}/tests/fixtures/protobuf/schemas.json", env!("CARGO_MANIFEST_DIR"));
        let schemas: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        let mut ids: Vec<(u32, &Value)> = schemas.as_object().unwrap().iter().map(|(id, s)| (id.parse().unwrap(), s)).collect();
        // Versions are counted per subject in insertion order: insert by id.
        ids.sort_by_key(|(id, _)| *id);
        for (id, schema) in ids {
            registry.insert(id, schema["subject"].as_str().unwrap(), "PROTOBUF", schema["schema"].as_str().unwrap());
            let refs = &schema["references"];
            if refs.as_array().is_some_and(|r| !r.is_empty()) {
                registry.state.lock().unwrap().references.insert(id, refs.clone());
            }
        }
        registry
    }

    pub fn set_outage(&self, outage: bool) {
        self.state.lock().unwrap().outage = outage;
    }

    pub fn lookups(&self) -> usize {
        self.state.lock().unwrap().lookups
    }
}

fn error(status: u16, code: u32, message: &str) -> Reply {
    Reply::json(status, json!({"error_code": code, "message": message}))
        .with_header("content-type", "application/vnd.schemaregistry.v1+json")
}

fn handle(state: &Mutex<RegistryState>, req: Recorded) -> Reply {
    let mut state = state.lock().unwrap();
    let path = req.path.split('?').next().unwrap_or_default().to_string();
    if path.starts_with("/schemas/ids/") {
        state.lookups += 1;
    }
    if state.outage {
        return error(500, 50001, "Error in the backend data store");
    }
    if let Some((user, password)) = &state.auth {
        use base64::Engine;
        let expected =
            format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")));
        if req.header("authorization") != Some(expected.as_str()) {
            return error(401, 40101, "Unauthorized");
        }
    }
    let parts: Vec<String> = path.trim_matches('/').split('/').map(percent_decode).collect();
    let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
    match (req.method.as_str(), parts.as_slice()) {
        ("GET", ["schemas", "types"]) => Reply::json(200, json!(["JSON", "PROTOBUF", "AVRO"])),
        ("GET", ["schemas", "ids", id]) => {
            let found = id.parse::<u32>().ok().and_then(|id| state.schemas.iter().find(|s| s.0 == id));
            match found {
                Some((id, _, kind, text)) => {
                    let mut body = json!({ "schema": text });
                    if kind != "AVRO" {
                        body["schemaType"] = Value::from(kind.clone());
                    }
                    if let Some(refs) = state.references.get(id) {
                        body["references"] = refs.clone();
                    }
                    Reply::json(200, body)
                }
                None => error(404, 40403, &format!("Schema {id} not found")),
            }
        }
        ("POST", ["subjects", subject, "versions"]) => {
            let body = req.json().unwrap_or_default();
            let text = body["schema"].as_str().unwrap_or_default().to_string();
            let kind = body["schemaType"].as_str().unwrap_or("AVRO").to_string();
            if let Some(existing) = state.schemas.iter().find(|s| s.3 == text && s.2 == kind) {
                return Reply::json(200, json!({ "id": existing.0 }));
            }
            let id = state.schemas.iter().map(|s| s.0).max().unwrap_or(0) + 1;
            state.schemas.push((id, subject.to_string(), kind, text));
            Reply::json(200, json!({ "id": id }))
        }
        ("GET", ["subjects", subject, "versions", version]) => {
            let versions: Vec<_> = state.schemas.iter().filter(|s| s.1 == *subject).collect();
            if versions.is_empty() {
                return error(404, 40401, &format!("Subject '{subject}' not found."));
            }
            let n = match *version {
                "latest" => versions.len(),
                v => v.parse().unwrap_or(0),
            };
            match n.checked_sub(1).and_then(|i| versions.get(i)) {
                Some((id, _, kind, text)) => {
                    let mut body = json!({ "subject": subject, "version": n, "id": id, "schema": text });
                    if kind != "AVRO" {
                        body["schemaType"] = Value::from(kind.clone());
                    }
                    if let Some(refs) = state.references.get(id) {
                        body["references"] = refs.clone();
                    }
                    Reply::json(200, body)
                }
                None => error(404, 40402, &format!("Version {version} not found.")),
            }
        }
        _ => error(404, 404, "HTTP 404 Not Found"),
    }
}

/// `%2F` and the like in a path segment (subjects of references are file paths).
fn percent_decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], bytes.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok())) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
