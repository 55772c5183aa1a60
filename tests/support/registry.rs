//! A test double of the Confluent Schema Registry REST API, the calls a serializer and a
//! consumer make: register (`POST /subjects/{subject}/versions` → `{"id":…}`), get by id
//! (`GET /schemas/ids/{id}` → `{"schema":…}`, plus `schemaType` when not Avro), latest version
//! (`GET /subjects/{subject}/versions/latest`), HTTP basic auth, and the documented error bodies
//! `{"error_code":…,"message":…}`: 40403 schema not found, 40401 subject not found, 50001 backend
//! data store failure (https://docs.confluent.io/cloud/current/ccloud/get-schema-only/,
//! https://docs.confluent.io/cloud/current/ccloud/register/).

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
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (req.method.as_str(), parts.as_slice()) {
        ("GET", ["schemas", "ids", id]) => {
            let found = id.parse::<u32>().ok().and_then(|id| state.schemas.iter().find(|s| s.0 == id));
            match found {
                Some((_, _, kind, text)) => {
                    let mut body = json!({ "schema": text });
                    if kind != "AVRO" {
                        body["schemaType"] = Value::from(kind.clone());
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
        ("GET", ["subjects", subject, "versions", "latest"]) => {
            let versions: Vec<_> = state.schemas.iter().filter(|s| s.1 == *subject).collect();
            match versions.last() {
                Some((id, _, _, text)) => {
                    Reply::json(200, json!({ "subject": subject, "version": versions.len(), "id": id, "schema": text }))
                }
                None => error(404, 40401, &format!("Subject '{subject}' not found.")),
            }
        }
        _ => error(404, 404, "HTTP 404 Not Found"),
    }
}
