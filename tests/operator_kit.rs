//! The operator kit without a Docker engine or a Kubernetes cluster: docker-compose.yml, the
//! Dockerfile, the connectors, the example configs, the systemd unit and the Kubernetes
//! manifests are checked for what can go wrong without running them: valid YAML/JSON, pinned
//! images, every mounted or copied file present, and hosts, ports, env and topics that agree
//! with each other and with the daemon's own config loader.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use yaml_rust2::{Yaml, YamlLoader};

use cdc_invalidator::config::{self, Config};
use cdc_invalidator::rules::Rules;
use cdc_invalidator::sink::cdn::CdnSinkConfig;

use crate::operator_metrics::repo_file;
use crate::support::cdn_doubles::{Reply, Server};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn yaml(path: &str) -> Vec<Yaml> {
    YamlLoader::load_from_str(&repo_file(path)).unwrap_or_else(|e| panic!("{path} is YAML: {e}"))
}

fn str_of(y: &Yaml) -> String {
    match y {
        Yaml::String(s) => s.clone(),
        Yaml::Integer(i) => i.to_string(),
        Yaml::Boolean(b) => b.to_string(),
        other => panic!("not a scalar: {other:?}"),
    }
}

fn compose() -> Yaml {
    yaml("docker-compose.yml").into_iter().next().expect("one document")
}

fn services(c: &Yaml) -> BTreeMap<String, Yaml> {
    c["services"].as_hash().expect("services").iter().map(|(k, v)| (str_of(k), v.clone())).collect()
}

/// The daemon's config in compose, loaded as the daemon loads it, with the service's env.
fn compose_daemon_config(c: &Yaml) -> Config {
    let svc = &c["services"]["cdc-invalidator"];
    let env: Vec<(String, String)> = svc["environment"]
        .as_hash()
        .map(|h| h.iter().map(|(k, v)| (str_of(k), str_of(v))).collect())
        .unwrap_or_default();
    // `url_env` reads the process environment (nextest runs each test in its own process).
    for (k, v) in &env {
        std::env::set_var(k, v);
    }
    config::load(&root().join("deploy/compose/cdc-invalidator/config.yaml"))
        .unwrap_or_else(|e| panic!("the compose daemon config passes `check`:\n{e}"))
}

#[test]
fn compose_is_valid_and_every_image_is_pinned() {
    let c = compose();
    let services = services(&c);
    for wanted in
        ["postgres", "kafka", "connect", "redis", "varnish", "origin", "cdc-invalidator", "prometheus", "grafana"]
    {
        assert!(services.contains_key(wanted), "service {wanted}");
    }
    for (name, svc) in &services {
        let image = svc["image"].as_str().unwrap_or_else(|| panic!("{name} names an image"));
        let (_, tag) = image.rsplit_once(':').unwrap_or_else(|| panic!("{name}: {image} has a tag"));
        assert!(
            tag.chars().next().is_some_and(|c| c.is_ascii_digit() || c == 'v'),
            "{name}: {image} pinned by version"
        );
        assert!(!tag.contains("latest"), "{name}: {image}");
        // depends_on names real services.
        let deps: Vec<String> = match &svc["depends_on"] {
            Yaml::Array(a) => a.iter().map(str_of).collect(),
            Yaml::Hash(h) => h.keys().map(str_of).collect(),
            _ => vec![],
        };
        for d in deps {
            assert!(services.contains_key(&d), "{name} depends on unknown {d}");
        }
    }
    // PostgreSQL with logical decoding, as Debezium's pgoutput needs.
    let pg: Vec<String> = c["services"]["postgres"]["command"].as_vec().expect("command").iter().map(str_of).collect();
    assert!(pg.contains(&"wal_level=logical".to_string()), "{pg:?}");
    // Kafka in KRaft mode (no ZooKeeper service).
    assert!(str_of(&c["services"]["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]).contains("controller"));
    assert!(!services.contains_key("zookeeper"));
}

#[test]
fn every_mounted_file_exists() {
    let c = compose();
    let mut checked = 0;
    for (name, svc) in services(&c) {
        for v in svc["volumes"].as_vec().into_iter().flatten() {
            let spec = str_of(v);
            let source = spec.split(':').next().unwrap_or_default();
            assert!(source.starts_with("./"), "{name}: bind mounts from the repository only: {spec}");
            assert!(root().join(source).exists(), "{name}: {source} exists");
            checked += 1;
        }
        if let Yaml::Hash(_) = svc["build"] {
            let dockerfile = str_of(&svc["build"]["dockerfile"]);
            assert!(root().join(&dockerfile).is_file(), "{name}: {dockerfile}");
        }
    }
    assert!(checked >= 9, "{checked} mounts");
}

#[test]
fn daemon_config_agrees_with_compose_connectors_and_prometheus() {
    let c = compose();
    let config = compose_daemon_config(&c);
    let rules = Rules::from_file(&config.rules).expect("compose rules pass `check`");
    assert!(rules.len() >= 2);
    let svc = &c["services"]["cdc-invalidator"];

    // The config is mounted where the command reads it.
    let command: Vec<String> = svc["command"].as_vec().expect("command").iter().map(str_of).collect();
    assert_eq!(command, ["run", "-c", "/etc/cdc-invalidator/config.yaml"]);
    let mounts: Vec<String> = svc["volumes"].as_vec().expect("volumes").iter().map(str_of).collect();
    assert!(mounts.contains(&"./deploy/compose/cdc-invalidator:/etc/cdc-invalidator:ro".to_string()), "{mounts:?}");

    // Metrics port: published by compose, scraped by Prometheus.
    let port = config.metrics.listen.port();
    let ports: Vec<String> = svc["ports"].as_vec().expect("ports").iter().map(str_of).collect();
    assert!(ports.contains(&format!("{port}:{port}")), "{ports:?}");
    assert!(config.metrics.listen.ip().is_unspecified(), "listens beyond the container's loopback");
    let prom = yaml("deploy/prometheus/prometheus.yml").remove(0);
    let targets: Vec<String> = prom["scrape_configs"][0]["static_configs"][0]["targets"]
        .as_vec()
        .expect("targets")
        .iter()
        .map(str_of)
        .collect();
    assert_eq!(targets, [format!("cdc-invalidator:{port}")]);
    assert_eq!(str_of(&prom["scrape_configs"][0]["job_name"]), "cdc-invalidator", "the alerts' job label");

    // Kafka: the advertised listener is what the daemon dials.
    let kafka = config.source.kafka.as_ref().expect("kafka source");
    let advertised = str_of(&c["services"]["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]);
    assert!(advertised.contains(&format!("PLAINTEXT://{}", kafka.brokers)), "{advertised} vs {}", kafka.brokers);

    // Redis: the env the config names is set, to the redis service.
    let redis = config.sinks.redis.as_ref().expect("redis sink");
    let var = redis.url_env.as_deref().expect("url_env");
    assert_eq!(str_of(&svc["environment"][var]), "redis://redis:6379");
    assert_eq!(redis.url().map(|u| u.expose()), Some("redis://redis:6379"));

    // Varnish: the sink's node is the varnish service on the port its image listens on.
    let nodes: Vec<&String> = config
        .sinks
        .cdn
        .iter()
        .filter_map(|s| match s {
            CdnSinkConfig::Varnish(v) => Some(&v.nodes),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(nodes, [&"http://varnish:80".to_string()]);
    let vports: Vec<String> = c["services"]["varnish"]["ports"].as_vec().expect("ports").iter().map(str_of).collect();
    assert!(vports.iter().any(|p| p.ends_with(":80")), "{vports:?}");

    // Topics: the connector's prefix and heartbeat topic match the daemon's subscription.
    let connector: serde_json::Value = serde_json::from_str(&repo_file("connectors/postgres.json")).unwrap();
    let prefix = connector["config"]["topic.prefix"].as_str().unwrap();
    let pattern = kafka.topic_pattern.as_deref().expect("topic_pattern");
    assert!(pattern.contains(&format!("^{prefix}\\.public\\.")), "{pattern}");
    assert!(pattern.contains(&format!("__debezium-heartbeat\\.{prefix}")), "{pattern}");
    assert_eq!(connector["config"]["database.hostname"], "postgres", "the compose service");
    assert_eq!(
        connector["config"]["database.dbname"],
        str_of(&c["services"]["postgres"]["environment"]["POSTGRES_DB"])
    );
    // Every table the connector captures has a rule, and the schema creates it.
    let schema = repo_file("deploy/compose/postgres/schema.sql");
    for table in connector["config"]["table.include.list"].as_str().unwrap().split(',') {
        assert!(schema.contains(&format!("CREATE TABLE {table} ")), "{table} in schema.sql");
        assert!(schema.contains(&format!("ALTER TABLE {table} REPLICA IDENTITY FULL")), "{table}");
        assert!(repo_file("deploy/compose/cdc-invalidator/rules.yaml").contains(&format!("table: {table}")), "{table}");
    }
    // The connector's database user exists with its password in the secrets file Connect reads.
    let user = connector["config"]["database.user"].as_str().unwrap();
    assert!(schema.contains(&format!("CREATE ROLE {user} LOGIN REPLICATION PASSWORD 'debezium'")));
    assert_eq!(repo_file("deploy/compose/connect/secrets/postgres.properties").trim(), "password=debezium");
}

#[test]
fn connectors_have_the_settings_the_daemon_needs() {
    for file in ["connectors/postgres.json", "connectors/mysql.json"] {
        let c: serde_json::Value = serde_json::from_str(&repo_file(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        let cfg = &c["config"];
        assert!(c["name"].as_str().is_some_and(|n| !n.is_empty()), "{file}");
        for k in ["key.converter", "value.converter"] {
            assert_eq!(cfg[k], "org.apache.kafka.connect.json.JsonConverter", "{file}: {k}");
        }
        assert!(
            cfg["heartbeat.interval.ms"].as_str().and_then(|v| v.parse::<u64>().ok()).is_some_and(|ms| ms <= 60_000),
            "{file}: heartbeats on, under the alert's window"
        );
        assert!(cfg["topic.prefix"].as_str().is_some(), "{file}");
        assert!(cfg["decimal.handling.mode"] == "string" || cfg["decimal.handling.mode"] == "precise", "{file}");
        assert!(cfg.get("transforms").is_none(), "{file}: no ExtractNewRecordState: both row images are kept");
        // Issue 11: the value schema tells a date from a number; without it `19797`, not `2024-03-15`.
        assert_eq!(cfg["value.converter.schemas.enable"], "true", "{file}: temporal values need the schema");
        let password = cfg["database.password"].as_str().unwrap_or_default();
        assert!(password.starts_with("${file:/kafka/secrets/"), "{file}: the password comes from a file");
    }
    let pg: serde_json::Value = serde_json::from_str(&repo_file("connectors/postgres.json")).unwrap();
    assert_eq!(pg["config"]["plugin.name"], "pgoutput");
    assert!(pg["config"]["slot.name"].as_str().is_some() && pg["config"]["publication.name"].as_str().is_some());
    // The MySQL connector's events name `db.table`; its topic prefix is distinct.
    let my: serde_json::Value = serde_json::from_str(&repo_file("connectors/mysql.json")).unwrap();
    assert_ne!(my["config"]["topic.prefix"], pg["config"]["topic.prefix"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_script_applies_connectors_through_the_rest_api() {
    use std::sync::{Arc, Mutex};
    type Requests = Vec<(String, String, Option<serde_json::Value>)>;
    let seen: Arc<Mutex<Requests>> = Arc::default();
    let s = seen.clone();
    let connect = Server::start(move |req| {
        s.lock().unwrap().push((req.method.clone(), req.path.clone(), req.json()));
        match (req.method.as_str(), req.path.as_str()) {
            ("GET", "/connectors") => Reply::json(200, serde_json::json!([])),
            ("PUT", _) | ("POST", _) => Reply::json(201, serde_json::json!({})),
            ("GET", p) if p.ends_with("/status") => Reply::json(
                200,
                serde_json::json!({"connector": {"state": "RUNNING"}, "tasks": [{"id": 0, "state": "RUNNING"}]}),
            ),
            _ => Reply::text(404, "no"),
        }
    });
    let url = connect.url();
    // With jq (create or update in place) and without it (create only, as inside the Debezium
    // image): a PATH holding every other tool the script uses.
    let no_jq = tempfile::tempdir().unwrap();
    for tool in ["bash", "curl", "grep", "sed", "head", "cut", "seq", "sleep", "mktemp", "cat", "rm", "dirname"] {
        let found = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().unwrap();
        let path = String::from_utf8_lossy(&found.stdout).trim().to_string();
        assert!(!path.is_empty(), "{tool} is installed");
        std::os::unix::fs::symlink(&path, no_jq.path().join(tool)).unwrap();
    }
    let paths = [std::env::var("PATH").unwrap_or_default(), no_jq.path().display().to_string()];
    for path in paths {
        seen.lock().unwrap().clear();
        let url = url.clone();
        let with_jq = path != no_jq.path().display().to_string();
        let out = tokio::task::spawn_blocking(move || {
            Command::new("bash").arg(root().join("connectors/register.sh")).arg(url).env("PATH", path).output().unwrap()
        })
        .await
        .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "jq: {with_jq}: {stderr}");
        assert!(stderr.contains("shop-postgres: RUNNING") && stderr.contains("shop-mysql: RUNNING"), "{stderr}");
        let seen = seen.lock().unwrap();
        let config = if with_jq {
            let put = seen.iter().find(|(m, p, _)| m == "PUT" && p == "/connectors/shop-postgres/config");
            put.and_then(|r| r.2.clone()).expect("PUT of the config object")
        } else {
            let post = seen.iter().find(|(m, p, b)| {
                m == "POST" && p == "/connectors" && b.as_ref().is_some_and(|b| b["name"] == "shop-postgres")
            });
            post.and_then(|r| r.2.clone()).map(|b| b["config"].clone()).expect("POST of the whole file")
        };
        assert_eq!(config["slot.name"], "debezium_shop", "jq: {with_jq}: {config}");
    }
}

/// Each `COPY <src>... <dest>` of the build stage; `--from` copies excluded.
fn dockerfile_copies(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("COPY "))
        .filter(|l| !l.starts_with("--from"))
        .flat_map(|l| {
            let parts: Vec<&str> = l.split_whitespace().collect();
            parts[..parts.len().saturating_sub(1)].iter().map(|s| s.to_string()).collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn dockerfile_build_context_is_enough_for_its_cargo_command() {
    let text = repo_file("deploy/Dockerfile");
    assert!(text.matches("\nFROM ").count() + usize::from(text.starts_with("FROM ")) >= 2, "multi-stage");
    assert!(text.contains("USER 10001") && text.contains("useradd --system --uid 10001"), "non-root");
    let cargo = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("RUN ").filter(|r| r.starts_with("cargo ")))
        .expect("a RUN cargo line");
    let cargo = cargo.split("&&").next().unwrap().trim_end_matches(['\\', ' ']).trim();
    assert_eq!(cargo, "cargo build --release --locked --bin cdc-invalidator");

    // Copy exactly what the Dockerfile copies into a scratch context and let cargo read it with
    // the same --locked: a missing target directory or a stale Cargo.lock fails here as in
    // `docker build` (resolution only: no second release build).
    let copies = dockerfile_copies(&text);
    let ctx = tempfile::tempdir().unwrap();
    for src in &copies {
        let from = root().join(src);
        assert!(from.exists(), "COPY {src}: exists in the repository");
        copy_tree(&from, &ctx.path().join(src));
    }
    // --filter-platform: offline resolution needs every package of the graph in the local
    // registry, and a fresh machine has only downloaded what this platform builds (not the
    // Windows-only crates the lockfile also lists).
    let host = String::from_utf8(Command::new("rustc").arg("-vV").output().expect("rustc -vV").stdout).unwrap();
    let host = host.lines().find_map(|l| l.strip_prefix("host: ")).expect("rustc host triple").trim().to_string();
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--locked", "--offline", "--format-version", "1", "--filter-platform", &host])
        .current_dir(ctx.path())
        .output()
        .expect("cargo");
    assert!(
        out.status.success(),
        "cargo metadata in the Docker build context: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let bins: Vec<&str> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["name"] == "cdc-invalidator")
        .flat_map(|p| p["targets"].as_array().unwrap())
        .filter(|t| t["kind"][0] == "bin")
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert_eq!(bins, ["cdc-invalidator"], "the --bin the Dockerfile builds");
    // This very test binary was built from the same sources with the same lockfile; the
    // debug build of that bin (what `cargo build --locked --bin cdc-invalidator` makes) is the
    // one the signal tests run.
    assert!(crate::support::daemon::binary().is_file());
}

fn copy_tree(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            copy_tree(&entry.path(), &to.join(entry.file_name()));
        }
    } else {
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::copy(from, to).unwrap();
    }
}

#[test]
fn compose_varnish_vcl_compiles_with_xkey() {
    // varnishd resolves backend hosts while compiling; outside compose, "origin" is loopback.
    let vcl = repo_file("deploy/compose/varnish/default.vcl").replace("\"origin\"", "\"127.0.0.1\"");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("default.vcl");
    std::fs::write(&path, vcl).unwrap();
    let out = Command::new("varnishd")
        .args(["-C", "-n"])
        .arg(dir.path().join("n"))
        .arg("-f")
        .arg(&path)
        .output()
        .expect("varnishd is installed by scripts/install-deps.sh");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn example_configs_pass_check() {
    let vars = [
        ("REDIS_URL".to_string(), "redis://redis:6379".to_string()),
        ("CDC_PG_URL".to_string(), "postgresql://cdc:pw@db.example.com:5432/shop?sslmode=verify-full".to_string()),
        // config.postgres.yaml lists a read replica (freshness.replicas).
        (
            "REPLICA1_URL".to_string(),
            "postgresql://cdc:pw@replica1.example.com:5432/shop?sslmode=verify-full".to_string(),
        ),
    ];
    // `url_env` reads the process environment (nextest runs each test in its own process).
    for (k, v) in &vars {
        std::env::set_var(k, v);
    }
    for file in ["deploy/config.kafka.yaml", "deploy/config.postgres.yaml"] {
        let path = root().join(file);
        let out = Command::new(crate::support::daemon::binary())
            .args(["check", "-c"])
            .arg(&path)
            .envs(vars.iter().cloned())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{file}: {}", String::from_utf8_lossy(&out.stderr));
        let config = config::load(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(config.shutdown.grace.as_secs() <= 20, "{file}: the grace the deploy files allow for");
    }
}

#[test]
fn kubernetes_manifests_fit_the_daemon() {
    let docs: Vec<Yaml> =
        ["deployment.yaml", "configmap.yaml", "service.yaml", "servicemonitor.yaml", "kustomization.yaml"]
            .iter()
            .flat_map(|f| yaml(&format!("deploy/k8s/{f}")))
            .collect();
    let kustomize = docs.iter().find(|d| d["kind"].as_str() == Some("Kustomization")).expect("kustomization");
    for r in kustomize["resources"].as_vec().unwrap() {
        assert!(root().join("deploy/k8s").join(str_of(r)).is_file(), "{r:?}");
    }
    let deployment = docs.iter().find(|d| d["kind"].as_str() == Some("Deployment")).expect("Deployment");
    let spec = &deployment["spec"]["template"]["spec"];
    let container = &spec["containers"][0];
    assert_eq!(str_of(&container["livenessProbe"]["httpGet"]["path"]), "/healthz");
    assert_eq!(str_of(&container["readinessProbe"]["httpGet"]["path"]), "/readyz");
    assert!(spec["securityContext"]["runAsNonRoot"].as_bool() == Some(true));

    // The ConfigMap's config and rules pass `check`, and the pod waits longer than the drain.
    let cm = docs.iter().find(|d| d["kind"].as_str() == Some("ConfigMap")).expect("ConfigMap");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.yaml"), cm["data"]["config.yaml"].as_str().unwrap()).unwrap();
    std::fs::write(dir.path().join("rules.yaml"), cm["data"]["rules.yaml"].as_str().unwrap()).unwrap();
    // The same value as the compose test sets: `cargo test` runs tests as threads of one process.
    std::env::set_var("REDIS_URL", "redis://redis:6379");
    let config = config::load(&dir.path().join("config.yaml")).expect("ConfigMap config passes check");
    Rules::from_file(&config.rules).expect("ConfigMap rules pass check");
    let grace = spec["terminationGracePeriodSeconds"].as_i64().expect("terminationGracePeriodSeconds");
    assert!(grace as u64 > config.shutdown.grace.as_secs() + 10, "{grace} s vs drain {:?}", config.shutdown.grace);
    // The mounted config path is what the container runs.
    let args: Vec<String> = container["args"].as_vec().unwrap().iter().map(str_of).collect();
    assert_eq!(args[2], format!("{}/config.yaml", str_of(&container["volumeMounts"][0]["mountPath"])));
    let port = config.metrics.listen.port() as i64;
    assert_eq!(container["ports"][0]["containerPort"].as_i64(), Some(port));
    // The ServiceMonitor scrapes the Service's named port.
    let sm = docs.iter().find(|d| d["kind"].as_str() == Some("ServiceMonitor")).expect("ServiceMonitor");
    let svc = docs.iter().find(|d| d["kind"].as_str() == Some("Service")).expect("Service");
    assert_eq!(str_of(&sm["spec"]["endpoints"][0]["port"]), str_of(&svc["spec"]["ports"][0]["name"]));
    assert_eq!(str_of(&sm["spec"]["endpoints"][0]["path"]), "/metrics");
}

#[test]
fn systemd_unit_reloads_with_sighup_and_outlasts_the_drain() {
    let unit = repo_file("deploy/systemd/cdc-invalidator.service");
    let value = |key: &str| unit.lines().find_map(|l| l.strip_prefix(&format!("{key}="))).map(str::to_string);
    assert_eq!(value("ExecReload").as_deref(), Some("/bin/kill -HUP $MAINPID"));
    assert_eq!(value("RestartPreventExitStatus").as_deref(), Some("2"), "an invalid config is not retried");
    let stop: u64 = value("TimeoutStopSec").and_then(|v| v.trim_end_matches('s').parse().ok()).expect("TimeoutStopSec");
    assert!(stop > 20 + 10, "longer than shutdown.grace");
    for hardening in ["NoNewPrivileges=yes", "ProtectSystem=strict", "DynamicUser=yes", "CapabilityBoundingSet="] {
        assert!(unit.lines().any(|l| l == hardening), "{hardening}");
    }
    // systemd's own parser, when available, finds nothing but the absent binary.
    if let Ok(out) = Command::new("systemd-analyze")
        .arg("verify")
        .arg(root().join("deploy/systemd/cdc-invalidator.service"))
        .output()
    {
        let text = String::from_utf8_lossy(&out.stderr);
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            assert!(line.contains("is not executable") || line.contains("No such file"), "systemd-analyze: {line}");
        }
    }
}
