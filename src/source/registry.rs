//! A client of the Confluent Schema Registry REST API (also served by Apicurio's and
//! Karapace's compatibility layers): schemas fetched by id (`GET /schemas/ids/{id}`), parsed
//! once and kept in a bounded cache, so a registry outage does not stop messages whose schemas
//! are cached.
//!
//! Built on the `reqwest` already in the tree rather than `schema_registry_converter`: that
//! crate would bring a second reqwest major version and its own Avro stack for the ~100 lines
//! the one call we need takes (docs/design.md).
//!
//! A Protobuf schema may import other files, which the registry names as `references`
//! (subject and version of each); they are fetched with
//! `GET /subjects/{subject}/versions/{version}` before the schema is compiled. Every request is
//! counted in `cdc_invalidator_schema_registry_requests_total{outcome}`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;

use crate::config::SchemaRegistryConfig;
use crate::source::debezium::{AvroError, AvroSchema, ProtobufSchema};
use crate::telemetry::events::source::{RegistryOutcome, SchemaRegistryRequest};
use crate::telemetry::Metrics;

/// Schemas kept; Debezium writes one key and one value schema per table and schema version, so
/// this holds thousands of tables. When full, an arbitrary entry is dropped (and refetched if
/// it is needed again).
const CACHE_CAPACITY: usize = 10_000;

/// Imports followed when fetching a Protobuf schema's references (a file importing a file...):
/// deeper than this is a schema we refuse rather than a loop we follow.
const MAX_REFERENCE_DEPTH: usize = 16;
/// Referenced files fetched for one schema, all levels together.
const MAX_REFERENCES: usize = 256;

/// A schema the registry holds, parsed.
#[derive(Debug)]
pub enum RegisteredSchema {
    Avro(AvroSchema),
    Protobuf(ProtobufSchema),
    /// JSON Schema: recognised and named, not decoded by this build.
    Other(String),
}

/// Why a schema could not be had. [`RegistryError::is_retriable`] splits the registry being
/// unreachable or failing (the message waits) from an answer that will not change (the message
/// is dead-lettered).
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    #[error("the schema registry has no schema with id {id} (404)")]
    NotFound { id: u32 },
    #[error("the schema registry refused the request for schema id {id}: HTTP {status}: {body}")]
    Refused { id: u32, status: u16, body: String },
    #[error("the schema registry is unavailable for schema id {id}: {reason}")]
    Unavailable { id: u32, reason: String },
    #[error("schema id {id} from the schema registry does not parse: {reason}")]
    BadSchema { id: u32, reason: String },
}

/// What the start-up check ([`Registry::probe`]) found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// The registry answered and accepted the credentials (`schemaTypes` it serves, when it
    /// says: an older registry or another implementation may not have that endpoint).
    Reachable { schema_types: Option<Vec<String>> },
    /// 401 or 403: the credentials are missing or wrong; waiting will not fix that.
    Rejected { status: u16, body: String },
    /// Down, timing out, or answering 5xx.
    Unreachable { reason: String },
}

impl RegistryError {
    /// Down, 5xx, 401/403 (credentials are fixed by an operator, and dead-lettering every
    /// message meanwhile would turn a typo into a flood), 429: retried while the message waits.
    pub fn is_retriable(&self) -> bool {
        match self {
            RegistryError::Unavailable { .. } => true,
            RegistryError::Refused { status, .. } => matches!(status, 401 | 403 | 408 | 429) || *status >= 500,
            RegistryError::NotFound { .. } | RegistryError::BadSchema { .. } => false,
        }
    }
}

/// The registry's answer to `GET /schemas/ids/{id}` and `GET /subjects/{s}/versions/{v}`.
#[derive(Deserialize)]
struct SchemaById {
    schema: String,
    /// Absent for Avro (the API's default).
    #[serde(rename = "schemaType")]
    schema_type: Option<String>,
    /// The files a Protobuf schema imports (or the named types an Avro one uses).
    #[serde(default)]
    references: Vec<Reference>,
}

#[derive(Deserialize)]
struct Reference {
    /// The import path in the schema (`import "confluent/type/decimal.proto";`).
    name: String,
    subject: String,
    version: i64,
}

/// A failed request, before it is tied to the schema id it was for.
enum Failure {
    NotFound,
    Refused { status: u16, body: String },
    Unavailable(String),
}

pub struct Registry {
    client: reqwest::Client,
    base: String,
    auth: Option<(String, String)>,
    cache: Mutex<HashMap<u32, Arc<RegisteredSchema>>>,
    metrics: Option<Arc<Metrics>>,
}

impl Registry {
    pub fn new(config: &SchemaRegistryConfig) -> Result<Registry, String> {
        let mut builder = reqwest::Client::builder().timeout(config.timeout).connect_timeout(config.timeout);
        if let Some(ca) = &config.ca_file {
            let pem = std::fs::read(ca).map_err(|e| format!("{}: cannot read the CA file: {e}", ca.display()))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| format!("{}: not a PEM certificate: {e}", ca.display()))?;
            builder = builder.add_root_certificate(cert);
        }
        let client = builder.build().map_err(|e| format!("cannot build the schema registry client: {e}"))?;
        let auth = config.basic_auth_user.clone().map(|user| {
            let password = config.resolved_password.as_ref().map(|s| s.expose().to_owned()).unwrap_or_default();
            (user, password)
        });
        Ok(Registry {
            client,
            base: config.url.trim_end_matches('/').to_owned(),
            auth,
            cache: Mutex::new(HashMap::new()),
            metrics: None,
        })
    }

    /// Counts requests and cached schemas in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Registry {
        self.metrics = Some(metrics);
        self
    }

    /// One GET of `segments` under the base URL (each segment percent-encoded, so a subject
    /// such as `confluent/type/decimal.proto` stays one segment), counted by outcome.
    async fn get(&self, segments: &[&str]) -> Result<Vec<u8>, Failure> {
        let outcome = self.get_uncounted(segments).await;
        if let Some(metrics) = &self.metrics {
            let outcome = match &outcome {
                Ok(_) => RegistryOutcome::Ok,
                Err(Failure::NotFound) => RegistryOutcome::NotFound,
                Err(Failure::Refused { status: 401 | 403, .. }) => RegistryOutcome::Unauthorized,
                Err(_) => RegistryOutcome::Error,
            };
            metrics.emit(SchemaRegistryRequest { outcome });
        }
        outcome
    }

    async fn get_uncounted(&self, segments: &[&str]) -> Result<Vec<u8>, Failure> {
        let mut url = reqwest::Url::parse(&self.base).map_err(|e| Failure::Unavailable(format!("bad URL: {e}")))?;
        url.path_segments_mut()
            .map_err(|()| Failure::Unavailable("the URL cannot have a path".into()))?
            .pop_if_empty()
            .extend(segments);
        let mut request = self.client.get(url).header("Accept", "application/vnd.schemaregistry.v1+json");
        if let Some((user, password)) = &self.auth {
            request = request.basic_auth(user, Some(password));
        }
        let unavailable = |e: reqwest::Error| Failure::Unavailable(e.without_url().to_string());
        let response = request.send().await.map_err(unavailable)?;
        let status = response.status().as_u16();
        let body = response.bytes().await.map_err(unavailable)?;
        if status == 404 {
            return Err(Failure::NotFound);
        }
        if !(200..300).contains(&status) {
            // The registry's error body is `{"error_code":…,"message":…}`; kept short.
            let text: String = String::from_utf8_lossy(&body).chars().take(200).collect();
            return Err(Failure::Refused { status, body: text });
        }
        Ok(body.to_vec())
    }

    /// The start-up check: `GET /schemas/types`, the smallest call that needs the credentials
    /// and no particular subject (Confluent, Karapace and Apicurio's compatibility API serve it).
    pub async fn probe(&self) -> Probe {
        match self.get(&["schemas", "types"]).await {
            Ok(body) => Probe::Reachable { schema_types: serde_json::from_slice(&body).ok() },
            // An answer that is not about the credentials still proves the registry is there.
            Err(Failure::NotFound) => Probe::Reachable { schema_types: None },
            Err(Failure::Refused { status: status @ (401 | 403), body }) => Probe::Rejected { status, body },
            Err(Failure::Refused { status, body }) if status < 500 => {
                tracing::debug!(status, body, "schema registry: /schemas/types refused; the registry is reachable");
                Probe::Reachable { schema_types: None }
            }
            Err(Failure::Refused { status, body }) => Probe::Unreachable { reason: format!("HTTP {status}: {body}") },
            Err(Failure::Unavailable(reason)) => Probe::Unreachable { reason },
        }
    }

    /// A schema already cached, without a request.
    pub fn cached(&self, id: u32) -> Option<Arc<RegisteredSchema>> {
        self.lock().get(&id).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<RegisteredSchema>>> {
        // A poisoned cache is still a valid cache: entries are inserted whole.
        self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The schema with this id, from the cache or the registry (one attempt).
    pub async fn schema(&self, id: u32) -> Result<Arc<RegisteredSchema>, RegistryError> {
        if let Some(schema) = self.cached(id) {
            return Ok(schema);
        }
        let id_text = id.to_string();
        let answer = self.get(&["schemas", "ids", &id_text]).await.map_err(|f| failure(id, f))?;
        let answer: SchemaById = serde_json::from_slice(&answer)
            .map_err(|e| RegistryError::BadSchema { id, reason: format!("the answer is not a schema: {e}") })?;
        let schema = match answer.schema_type.as_deref().unwrap_or("AVRO") {
            "AVRO" => RegisteredSchema::Avro(
                AvroSchema::parse(&answer.schema)
                    .map_err(|e: AvroError| RegistryError::BadSchema { id, reason: e.to_string() })?,
            ),
            "PROTOBUF" => {
                let imports = self.imports(id, answer.references).await?;
                RegisteredSchema::Protobuf(
                    ProtobufSchema::compile(&answer.schema, imports)
                        .map_err(|e| RegistryError::BadSchema { id, reason: e.to_string() })?,
                )
            }
            other => RegisteredSchema::Other(other.to_owned()),
        };
        let schema = Arc::new(schema);
        let mut cache = self.lock();
        if cache.len() >= CACHE_CAPACITY {
            if let Some(evict) = cache.keys().next().copied() {
                cache.remove(&evict);
            }
        }
        cache.insert(id, schema.clone());
        if let Some(metrics) = &self.metrics {
            metrics.schema_registry_cached_schemas.set(cache.len() as i64);
        }
        Ok(schema)
    }

    /// The files a Protobuf schema imports, by import path, following references of references
    /// (breadth first, each subject version once, bounded).
    async fn imports(&self, id: u32, references: Vec<Reference>) -> Result<Vec<(String, String)>, RegistryError> {
        let mut files: Vec<(String, String)> = Vec::new();
        let mut level = references;
        for _ in 0..MAX_REFERENCE_DEPTH {
            if level.is_empty() {
                return Ok(files);
            }
            let mut next = Vec::new();
            for reference in level {
                if files.iter().any(|(name, _)| *name == reference.name) {
                    continue;
                }
                if files.len() >= MAX_REFERENCES {
                    return Err(RegistryError::BadSchema {
                        id,
                        reason: format!("more than {MAX_REFERENCES} referenced files"),
                    });
                }
                let version = reference.version.to_string();
                let answer =
                    self.get(&["subjects", &reference.subject, "versions", &version]).await.map_err(|f| match f {
                        // A reference the registry does not have will not appear by waiting.
                        Failure::NotFound => RegistryError::BadSchema {
                            id,
                            reason: format!(
                                "the referenced file {} (subject {}, version {}) is not in the registry",
                                reference.name, reference.subject, reference.version
                            ),
                        },
                        other => failure(id, other),
                    })?;
                let answer: SchemaById = serde_json::from_slice(&answer).map_err(|e| RegistryError::BadSchema {
                    id,
                    reason: format!("the referenced file {} is not a schema: {e}", reference.name),
                })?;
                next.extend(answer.references);
                files.push((reference.name, answer.schema));
            }
            level = next;
        }
        Err(RegistryError::BadSchema {
            id,
            reason: format!("references nest deeper than {MAX_REFERENCE_DEPTH} levels"),
        })
    }

    /// [`Registry::schema`], retried with backoff (100 ms doubling to 10 s) while the error is
    /// retriable; `stop` ends the wait (the message then stays unacknowledged).
    pub async fn schema_retrying(
        &self,
        id: u32,
        stop: impl std::future::Future<Output = ()>,
    ) -> Option<Result<Arc<RegisteredSchema>, RegistryError>> {
        let mut delay = Duration::from_millis(100);
        tokio::pin!(stop);
        loop {
            match self.schema(id).await {
                Err(e) if e.is_retriable() => {
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "schema registry: retrying; the message waits");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = &mut stop => return None,
                    }
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
                other => return Some(other),
            }
        }
    }
}

fn failure(id: u32, failure: Failure) -> RegistryError {
    match failure {
        Failure::NotFound => RegistryError::NotFound { id },
        Failure::Refused { status, body } => RegistryError::Refused { id, status, body },
        Failure::Unavailable(reason) => RegistryError::Unavailable { id, reason },
    }
}

/// The schema id of a Confluent-framed payload (magic byte 0, 4-byte big-endian id) and the
/// bytes after the header.
pub fn framed(bytes: &[u8]) -> Option<(u32, &[u8])> {
    match bytes {
        [0, a, b, c, d, rest @ ..] => Some((u32::from_be_bytes([*a, *b, *c, *d]), rest)),
        _ => None,
    }
}
