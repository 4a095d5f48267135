//! The deployment files are real inputs, so they are tested like code:
//! `deploy/docker-compose.yml` against the Compose Specification schema, the
//! Dockerfile's shape, and the shipped configs through the real binary.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use portcullis::config::Config;
use serde_json::{Value, json};

const COMPOSE: &str = "deploy/docker-compose.yml";
/// The TLS variant, layered over [`COMPOSE`] with a second `-f`.
const COMPOSE_TLS: &str = "deploy/docker-compose.tls.yml";
const TLS_CONFIG: &str = "config/compose-tls.toml";
const DASHBOARD: &str = "deploy/grafana/portcullis-dashboard.json";
const DOCKERFILE: &str = "deploy/Dockerfile";
/// Where the image's CMD reads its config and where compose mounts one.
const CONFIG_IN_IMAGE: &str = "/etc/portcullis/portcullis.toml";
/// Configs the repository ships; each must pass `portcullis check`.
const SHIPPED_CONFIGS: &[&str] = &["config/portcullis.toml", "config/compose.toml"];
/// A 32+ byte HS256 test key; never used outside tests.
const TEST_SIGNING_KEY: &str = "deploy-test-signing-key-0123456789abcdef";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let path = root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn compose_doc() -> Value {
    yaml_doc(COMPOSE)
}

fn yaml_doc(rel: &str) -> Value {
    serde_yaml::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel} is not YAML: {e}"))
}

/// The Compose schema lives in the shared checkout beside the crate, not in
/// the repository; `None` (with a note on stderr) when it is absent.
fn compose_validator() -> Option<jsonschema::Validator> {
    let path: PathBuf = root().join("../shared/schemas/compose-spec.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        eprintln!("skipped: compose schema not found at {}", path.display());
        return None;
    };
    let mut schema: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    // The file names draft-07 as `https://json-schema.org/draft-07/schema`;
    // the validator knows draft-07's meta-schema only by its canonical
    // `http://` id and would try to download the https one. Same draft, so
    // name it canonically; any other draft fails here instead of validating
    // under the wrong rules.
    let declared = schema["$schema"].as_str().unwrap_or_default();
    assert!(
        declared
            .trim_end_matches('#')
            .ends_with("://json-schema.org/draft-07/schema"),
        "{} declares $schema {declared:?}, expected draft-07",
        path.display()
    );
    schema["$schema"] = json!("http://json-schema.org/draft-07/schema#");
    let validator = jsonschema::draft7::options()
        .build(&schema)
        .unwrap_or_else(|e| panic!("{} is not a usable draft-07 schema: {e}", path.display()));
    Some(validator)
}

/// Every schema error as `<instance path>: <message>`.
fn schema_errors(validator: &jsonschema::Validator, doc: &Value) -> Vec<String> {
    validator
        .iter_errors(doc)
        .map(|e| {
            let at = e.instance_path.to_string();
            let at = if at.is_empty() {
                "(root)".to_string()
            } else {
                at
            };
            format!("{at}: {e}")
        })
        .collect()
}

#[test]
fn compose_file_matches_the_compose_schema() {
    let Some(validator) = compose_validator() else {
        return;
    };
    let errors = schema_errors(&validator, &compose_doc());
    assert!(
        errors.is_empty(),
        "{COMPOSE} does not match the Compose schema:\n  {}",
        errors.join("\n  ")
    );
}

#[test]
fn compose_tls_variant_matches_the_schema_and_mounts_its_config_and_certificates_read_only() {
    let doc = yaml_doc(COMPOSE_TLS);
    if let Some(validator) = compose_validator() {
        let errors = schema_errors(&validator, &doc);
        assert!(
            errors.is_empty(),
            "{COMPOSE_TLS} does not match the Compose schema:\n  {}",
            errors.join("\n  ")
        );
    }
    let svc = &doc["services"]["portcullis"];
    assert_eq!(svc["ports"], json!(["8443:8443"]), "{COMPOSE_TLS}: ports");
    let mounts: Vec<(&str, &str, bool)> = svc["volumes"]
        .as_array()
        .unwrap_or_else(|| panic!("{COMPOSE_TLS}: no volumes"))
        .iter()
        .map(|v| {
            (
                v["source"].as_str().unwrap_or_default(),
                v["target"].as_str().unwrap_or_default(),
                v["read_only"] == json!(true),
            )
        })
        .collect();
    assert!(
        mounts.contains(&("../config/compose-tls.toml", CONFIG_IN_IMAGE, true)),
        "{COMPOSE_TLS} must mount {TLS_CONFIG} read-only at {CONFIG_IN_IMAGE}: {mounts:?}"
    );
    assert!(
        mounts.contains(&("./certs", "/etc/portcullis/tls", true)),
        "{COMPOSE_TLS} must mount deploy/certs read-only at /etc/portcullis/tls: {mounts:?}"
    );
    // The config it mounts serves TLS from where the certificates go.
    let config = Config::parse(TLS_CONFIG, &read(TLS_CONFIG)).unwrap_or_else(|e| panic!("{e}"));
    let tls = config
        .server
        .tls
        .as_ref()
        .unwrap_or_else(|| panic!("{TLS_CONFIG} has no [server.tls]"));
    assert!(tls.cert_file.starts_with("/etc/portcullis/tls/"));
    assert!(tls.key_file.starts_with("/etc/portcullis/tls/"));
    assert_eq!(config.server.listen, "0.0.0.0:8443");
}

/// The TLS variant's config validates whole once certificates are where it
/// says (made here with the test CA; a deployment mounts its own).
#[test]
fn compose_tls_config_validates_with_a_certificate() {
    let dir = support::gateway::TempDir::new();
    let ca = support::tls::TestCa::new("deploy test CA");
    let leaf = ca.leaf(&["localhost"]);
    std::fs::write(dir.0.join("cert.pem"), &leaf.cert_pem).unwrap();
    std::fs::write(dir.0.join("key.pem"), &leaf.key_pem).unwrap();
    let mut config = Config::parse(TLS_CONFIG, &read(TLS_CONFIG)).unwrap_or_else(|e| panic!("{e}"));
    let tls = config.server.tls.as_mut().unwrap();
    (tls.cert_file, tls.key_file) = (dir.0.join("cert.pem"), dir.0.join("key.pem"));
    let loaded = config
        .validate(TLS_CONFIG, &|_| Some(TEST_SIGNING_KEY.to_string()))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(loaded.tls.is_some());
}

/// Every metric the Grafana dashboard queries is one the real binary's
/// `/metrics` exports (by its `# TYPE` line, so a family with no samples
/// yet counts), and the dashboard covers what an operator watches first.
#[tokio::test]
async fn grafana_dashboard_queries_only_metrics_the_binary_exports() {
    let dash: Value = serde_json::from_str(&read(DASHBOARD))
        .unwrap_or_else(|e| panic!("{DASHBOARD} is not JSON: {e}"));
    assert!(dash["title"].is_string() && dash["uid"].is_string());
    assert!(dash["schemaVersion"].as_u64().is_some_and(|v| v >= 30));
    let panels = dash["panels"].as_array().expect("panels");
    let mut names = std::collections::BTreeSet::new();
    for p in panels {
        let title = p["title"]
            .as_str()
            .unwrap_or_else(|| panic!("a panel without title: {p}"));
        assert!(p["gridPos"].is_object(), "{title}: no gridPos");
        let targets = p["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("{title}: no targets"));
        assert!(!targets.is_empty(), "{title}: no queries");
        for t in targets {
            let expr = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("{title}: a target without expr"));
            names.extend(metric_names(expr));
        }
    }
    for wanted in [
        "portcullis_open_sockets",
        "portcullis_upgrades_total",
        "portcullis_socket_closes_total",
        "portcullis_sessions_revoked_total",
        "portcullis_store_request_duration_seconds",
        "portcullis_config_reloads_total",
    ] {
        assert!(
            names.contains(wanted),
            "{DASHBOARD} has no panel on {wanted}"
        );
    }

    let gw = support::gateway::Gateway::start("", &support::gateway::config(None, ""));
    let text = support::http::metrics(gw.addr).await;
    let exported: std::collections::BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| !exported.contains(n.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{DASHBOARD} queries metrics the binary does not export: {missing:?}\nexported: {exported:?}"
    );
}

/// `portcullis_*` names in a PromQL expression, histogram series folded
/// into their family (`_bucket`, `_sum`, `_count`).
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("portcullis_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name)
            .to_string();
        out.push(family);
    }
    out
}

#[test]
fn compose_schema_rejects_invalid_documents() {
    let Some(validator) = compose_validator() else {
        return;
    };
    let valid = compose_doc();

    let mut bad_ports = valid.clone();
    bad_ports["services"]["portcullis"]["ports"] = json!("not-a-list");
    let errors = schema_errors(&validator, &bad_ports);
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("/services/portcullis/ports")),
        "ports = \"not-a-list\" was not reported at its path: {errors:?}"
    );

    let mut unknown_key = valid;
    unknown_key["not_a_compose_key"] = json!(true);
    assert!(
        !schema_errors(&validator, &unknown_key).is_empty(),
        "an unknown top-level key was accepted"
    );
}

#[test]
fn compose_mounts_a_shipped_config_read_only() {
    let doc = compose_doc();
    let volumes = doc["services"]["portcullis"]["volumes"]
        .as_array()
        .unwrap_or_else(|| panic!("{COMPOSE}: services.portcullis.volumes is not a list"));
    // Long syntax {source, target, read_only} or short "source:target[:ro]".
    let (source, read_only) = volumes
        .iter()
        .find_map(|v| match v {
            Value::Object(m) if m.get("target") == Some(&json!(CONFIG_IN_IMAGE)) => Some((
                m["source"].as_str().expect("a bind source").to_string(),
                m.get("read_only") == Some(&json!(true)),
            )),
            Value::String(s) => {
                let mut parts = s.split(':');
                let (src, dst, opts) = (parts.next()?, parts.next()?, parts.next());
                (dst == CONFIG_IN_IMAGE).then(|| (src.to_string(), opts == Some("ro")))
            }
            _ => None,
        })
        .unwrap_or_else(|| panic!("{COMPOSE}: portcullis mounts nothing at {CONFIG_IN_IMAGE}"));
    assert!(read_only, "{COMPOSE}: the config mount must be read-only");

    let host = root().join("deploy").join(&source);
    let host = host
        .canonicalize()
        .unwrap_or_else(|e| panic!("{COMPOSE} mounts {source}, which is missing ({e})"));
    let config_dir = root().join("config").canonicalize().unwrap();
    assert!(
        host.starts_with(&config_dir) && host.is_file(),
        "{COMPOSE} mounts {}, which is not a file in config/",
        host.display()
    );
}

/// The Dockerfile's instructions, with `\` continuations joined and comments dropped.
fn dockerfile_instructions() -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in read(DOCKERFILE).lines() {
        let line = line.trim();
        if current.is_empty() && (line.is_empty() || line.starts_with('#')) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(line);
                out.push(std::mem::take(&mut current));
            }
        }
    }
    out
}

fn keyword(instruction: &str) -> String {
    instruction
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_ascii_uppercase()
}

#[test]
fn dockerfile_is_multi_stage_and_runs_as_non_root() {
    let instructions = dockerfile_instructions();
    let froms: Vec<&String> = instructions
        .iter()
        .filter(|i| keyword(i) == "FROM")
        .collect();
    assert!(
        froms.len() >= 2,
        "{DOCKERFILE} is not multi-stage: {froms:?}"
    );
    assert!(
        froms.iter().any(|f| {
            let words: Vec<&str> = f.split_whitespace().collect();
            words.len() == 4 && words[2].eq_ignore_ascii_case("AS") && words[3] == "builder"
        }),
        "{DOCKERFILE} has no `FROM <image> AS builder` stage: {froms:?}"
    );

    // The stage that ships is the last one: its last USER must not be root.
    let last_from = instructions
        .iter()
        .rposition(|i| keyword(i) == "FROM")
        .unwrap();
    let user = instructions[last_from..]
        .iter()
        .rfind(|i| keyword(i) == "USER")
        .unwrap_or_else(|| {
            panic!("{DOCKERFILE}: the final stage sets no USER, so it runs as root")
        });
    let name = user.split_whitespace().nth(1).unwrap_or("");
    let uid = name.split(':').next().unwrap_or("");
    assert!(
        !uid.is_empty() && uid != "root" && uid != "0",
        "{DOCKERFILE}: final stage runs as {name:?}"
    );

    let has = |prefix: &str| instructions.iter().any(|i| i == prefix);
    assert!(
        has(r#"ENTRYPOINT ["portcullis"]"#),
        "{DOCKERFILE}: ENTRYPOINT is not [\"portcullis\"]"
    );
    assert!(
        has(&format!(r#"CMD ["--config", "{CONFIG_IN_IMAGE}"]"#)),
        "{DOCKERFILE}: CMD does not read {CONFIG_IN_IMAGE}, where compose mounts the config"
    );
}

/// The shipped configs parse and validate in-process with a test key.
#[test]
fn shipped_configs_validate() {
    for rel in SHIPPED_CONFIGS {
        let loaded = Config::parse(rel, &read(rel))
            .and_then(|c| c.validate(rel, &|_| Some(TEST_SIGNING_KEY.to_string())))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(!loaded.config.routes.is_empty(), "{rel} has no routes");
    }
}

fn portcullis_check(rel: &str, signing_key: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_portcullis"));
    cmd.current_dir(root()).args(["check", "--config", rel]);
    match signing_key {
        Some(key) => cmd.env("PORTCULLIS_SIGNING_KEY", key),
        None => cmd.env_remove("PORTCULLIS_SIGNING_KEY"),
    };
    cmd.output().expect("cannot run the portcullis binary")
}

#[test]
fn check_subcommand_accepts_shipped_configs_and_lists_routes() {
    for rel in SHIPPED_CONFIGS {
        let out = portcullis_check(rel, Some(TEST_SIGNING_KEY));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "portcullis check --config {rel} failed ({}):\n{stderr}",
            out.status
        );
        let config = Config::parse(rel, &read(rel)).unwrap_or_else(|e| panic!("{e}"));
        for route in &config.routes {
            assert!(
                stdout
                    .lines()
                    .any(|l| l.contains(&route.name) && l.contains(&route.path)),
                "check --config {rel} has no line with route {:?} and its path {:?}:\n{stdout}",
                route.name,
                route.path
            );
        }
    }
}

#[test]
fn check_subcommand_names_file_and_key_when_the_signing_key_is_missing() {
    let rel = "config/compose.toml";
    let out = portcullis_check(rel, None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected exit 1; stderr:\n{stderr}"
    );
    assert!(
        stderr.contains(rel) && stderr.contains("tokens.signing_key_env"),
        "the error should name {rel} and tokens.signing_key_env:\n{stderr}"
    );
}
