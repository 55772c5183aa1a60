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
use std::path::Path;
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
        let mut ids: Vec<(u32, &Value)> =
            schemas.as_object().unwrap().iter().map(|(id, s)| (id.parse().unwrap(), s)).collect();
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
                    Reply::json(200, schema_body(&state, *id, kind, json!({ "schema": text })))
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
                    let body = json!({ "subject": subject, "version": n, "id": id, "schema": text });
                    Reply::json(200, schema_body(&state, *id, kind, body))
                }
                None => error(404, 40402, &format!("Version {version} not found.")),
            }
        }
        _ => error(404, 404, "HTTP 404 Not Found"),
    }
}

/// `body` with `schemaType` (absent for Avro, the API's default) and the schema's references.
fn schema_body(state: &RegistryState, id: u32, kind: &str, mut body: Value) -> Value {
    if kind != "AVRO" {
        body["schemaType"] = Value::from(kind);
    }
    if let Some(refs) = state.references.get(&id) {
        body["references"] = refs.clone();
    }
    body
}

/// `%2F` and the like in a path segment (subjects of references are file paths).
fn percent_decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (
            bytes[i],
            bytes.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()),
        ) {
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

/// A daemon config written by `support::daemon::write_config`, given `source.kafka.format` and
/// a schema registry at `url` with basic auth (user `connect`, `password` from a file).
pub fn use_registry(config: &Path, format: &str, url: &str, password: &str) {
    let text = std::fs::read_to_string(config).unwrap().replacen(
        "    commit_interval: 100ms\n",
        &format!(
            "    commit_interval: 100ms\n    format: {format}\n    schema_registry:\n      url: \"{url}\"\n      \
             basic_auth_user: connect\n      basic_auth_password_file: registry-password\n"
        ),
        1,
    );
    std::fs::write(config, text).unwrap();
    std::fs::write(config.parent().unwrap().join("registry-password"), format!("{password}\n")).unwrap();
}

/// A Redis holding what the contract rules invalidate for product 42's update (its key, and
/// the listing of category 5 and 7 through their tags).
pub fn cached_products(redis: &super::redis::RedisServer) -> redis::Connection {
    use redis::Commands;
    let mut c = redis::Client::open(redis.url().as_str()).unwrap().get_connection().unwrap();
    for k in ["product:42", "listing:5", "listing:7"] {
        let _: () = c.set(k, "cached").unwrap();
    }
    let _: () = c.sadd("tag:category:5", "listing:5").unwrap();
    let _: () = c.sadd("tag:category:7", "listing:7").unwrap();
    c
}

/// `cdc-invalidator explain` with the contract rules on the fixtures' topic.
pub struct Explain {
    pub dir: tempfile::TempDir,
    rules: std::path::PathBuf,
    topic: &'static str,
}

impl Explain {
    pub fn new(topic: &'static str) -> Explain {
        let dir = tempfile::tempdir().unwrap();
        let rules = dir.path().join("rules.yaml");
        std::fs::write(&rules, include_str!("../fixtures/rules/contract.yaml")).unwrap();
        Explain { dir, rules, topic }
    }

    /// `explain --rules … --event EVENT --topic … EXTRA…`: the exit code, standard output and
    /// standard error.
    pub fn run(&self, event: &str, extra: &[&str]) -> (Option<i32>, String, String) {
        let out = std::process::Command::new(super::daemon::binary())
            .args(["explain", "--rules"])
            .arg(&self.rules)
            .args(["--event", event, "--topic", self.topic])
            .args(extra)
            .output()
            .unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    }

    /// The fixture `binary` (under tests/fixtures/), explained with `extra`, prints exactly what
    /// the JSON form of product 42's update prints (which moves it to category 7).
    pub fn assert_as_json(&self, binary: &str, extra: &[&str]) {
        let root = env!("CARGO_MANIFEST_DIR");
        let (code, json_out, err) =
            self.run(&format!("{root}/tests/fixtures/debezium/pg-update-with-schema.json"), &[]);
        assert_eq!(code, Some(0), "{err}");
        let (code, out, err) = self.run(&format!("{root}/tests/fixtures/{binary}"), extra);
        assert_eq!(code, Some(0), "{err}");
        assert_eq!(out, json_out);
        assert!(out.contains("category:7"), "{out}");
    }
}

/// The released binary against Tansu (the Kafka protocol out of process) and a real Redis, with
/// `format: auto` and `registry` (basic auth): product 42's update as `key` and `value` in the
/// Confluent wire format invalidates what it should, and the daemon stops cleanly.
pub async fn invalidates_through_tansu(registry: &RegistryDouble, group: &str, key: &[u8], value: &[u8]) {
    use std::time::Duration;

    use rdkafka::config::ClientConfig;
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use redis::Commands;

    use super::daemon::{http_get, wait_until, write_config, DaemonProcess, Setup};
    use super::tansu::TansuBroker;

    const TOPIC: &str = "shop.public.products";
    let broker = TansuBroker::start();
    broker.create_topic(TOPIC, 1);
    let redis = super::redis::RedisServer::start();
    let mut c = cached_products(&redis);
    registry.state.lock().unwrap().auth = Some(("connect".into(), "s3cret".into()));
    let dir = tempfile::tempdir().unwrap();
    let bootstrap = broker.bootstrap();
    let url = redis.url();
    let setup = Setup { bootstrap: &bootstrap, topics: &[TOPIC], group, redis_url: &url, extra: "", librdkafka: &[] };
    let (path, port) = write_config(dir.path(), &setup);
    use_registry(&path, "auto", &registry.url(), "s3cret");
    let mut daemon = DaemonProcess::start(&path, dir.path());
    let ready = wait_until(Duration::from_secs(30), || http_get(port, "/readyz").is_some_and(|(s, _)| s == 200)).await;
    assert!(ready, "the daemon becomes ready; log:\n{}", daemon.log_text());

    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &bootstrap).create().unwrap();
    let record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(TOPIC).key(key).payload(value);
    producer.send(record, Duration::from_secs(10)).await.expect("produce to tansu");

    let gone = || ["product:42", "listing:5", "listing:7"].iter().all(|k| !c.exists::<_, bool>(*k).unwrap_or(true));
    assert!(wait_until(Duration::from_secs(30), gone).await, "invalidated; log:\n{}", daemon.log_text());
    daemon.signal("TERM");
    let (code, log) =
        tokio::task::spawn_blocking(move || (daemon.wait(Duration::from_secs(30)), daemon.log_text())).await.unwrap();
    assert_eq!(code, Some(0), "{log}");
}
