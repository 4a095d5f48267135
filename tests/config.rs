//! Config files in, verdicts out (SPEC §3).
//!
//! - every sample config in `config/` is valid;
//! - every file in `tests/configs/valid/` validates;
//! - every file in `tests/configs/invalid/` fails, naming the key its first
//!   line expects, and the error's text names the file.
//!
//! Header lines of an invalid file:
//!
//! - `# expect: <key path>` (the first line, required), e.g. `routes[1].path`;
//!   parse errors use `serde_path_to_error`'s path (`server.listn`,
//!   `routes[1].upstream`), a missing key is reported at its parent
//!   (`routes[1]`), a TOML syntax error as `(syntax)`;
//! - `# env: clear`: start from an empty environment;
//! - `# env: NAME=value`: set `NAME` (an empty value sets it empty).
//!
//! The environment is injected into `Config::validate`, never the process's.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use portcullis::config::{
    Algorithm, AuthKind, Balance, Config, ConfigError, Loaded, Mode, StoreKind, Topology,
};

/// What `PORTCULLIS_SIGNING_KEY` holds in these tests: a 44-byte HS256 key.
const SIGNING_KEY: &str = "test-signing-key-0123456789-abcdefghijklmnop";
/// What `PORTCULLIS_PREVIOUS_KEY` holds: a 45-byte HS256 key.
const PREVIOUS_KEY: &str = "test-previous-key-0123456789-abcdefghijklmnop";
/// The argon2id hash the test configs use for their users.
const PASSWORD_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$uA22mbySPVNtj4JvxXI/Xw$QTjBAjQvkyj07QszJAq8B8/OnyazU0xHvS1dAnv8Xp0";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn default_env() -> HashMap<String, String> {
    HashMap::from([
        (
            "PORTCULLIS_SIGNING_KEY".to_string(),
            SIGNING_KEY.to_string(),
        ),
        (
            "PORTCULLIS_PREVIOUS_KEY".to_string(),
            PREVIOUS_KEY.to_string(),
        ),
    ])
}

/// A self-signed certificate and its key in a directory removed on drop.
struct CertDir(PathBuf);

impl CertDir {
    fn new() -> CertDir {
        let dir = std::env::temp_dir().join(format!(
            "portcullis-config-test-{}",
            portcullis::ids::random_id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        std::fs::write(dir.join("cert.pem"), made.cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), made.signing_key.serialize_pem()).unwrap();
        CertDir(dir)
    }
    fn cert(&self) -> PathBuf {
        self.0.join("cert.pem")
    }
    fn key(&self) -> PathBuf {
        self.0.join("key.pem")
    }
}

impl Drop for CertDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The `*.toml` files directly in `dir`, sorted; none when `dir` is absent.
fn toml_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("readable directory entry").path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    files
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Parses and validates `path` as `Config::load` would, with `env` injected.
fn load_with(path: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Loaded, ConfigError> {
    let file = path.display().to_string();
    Config::parse(&file, &read(path))?.validate(&file, env)
}

fn load(path: &Path, env: &HashMap<String, String>) -> Result<Loaded, ConfigError> {
    load_with(path, &|name| env.get(name).cloned())
}

fn valid(name: &str) -> Loaded {
    let path = root().join("tests/configs/valid").join(name);
    load(&path, &default_env()).unwrap_or_else(|e| panic!("{name} should be valid: {e}"))
}

/// `# expect:` and `# env:` header lines of an invalid config.
struct Expectation {
    key: String,
    env: HashMap<String, String>,
}

fn expectation(path: &Path, text: &str) -> Expectation {
    let mut lines = text.lines();
    let key = lines
        .next()
        .and_then(|l| l.strip_prefix("# expect: "))
        .unwrap_or_else(|| panic!("{} must start with `# expect: <key>`", path.display()))
        .trim()
        .to_string();
    let mut env = default_env();
    for line in lines.map_while(|l| l.strip_prefix("# env: ")) {
        match line.trim() {
            "clear" => env.clear(),
            assignment => {
                let (name, value) = assignment
                    .split_once('=')
                    .unwrap_or_else(|| panic!("{}: bad `# env:` line", path.display()));
                env.insert(name.to_string(), value.to_string());
            }
        }
    }
    Expectation { key, env }
}

#[test]
fn sample_configs_are_valid() {
    // Samples name their own variables; the test sets whatever they name.
    let files = toml_files(&root().join("config"));
    for path in &files {
        let file = path.display().to_string();
        let mut config = Config::parse(&file, &read(path)).unwrap_or_else(|e| panic!("{e}"));
        // A TLS sample names where a deployment mounts its certificate;
        // here it gets one made for the test.
        let _certs = config.server.tls.as_mut().map(|tls| {
            let dir = CertDir::new();
            (tls.cert_file, tls.key_file) = (dir.cert(), dir.key());
            dir
        });
        let loaded = config.validate(&file, &|_| Some(SIGNING_KEY.to_string()));
        if let Err(e) = loaded {
            panic!("sample config {} should be valid: {e}", path.display());
        }
    }
    eprintln!("{} sample config(s) in config/ validated", files.len());
}

#[test]
fn valid_configs_validate() {
    let files = toml_files(&root().join("tests/configs/valid"));
    assert!(
        files.len() >= 10,
        "expected the valid configs, found {files:?}"
    );
    let failures: Vec<String> = files
        .iter()
        .filter_map(|path| load(path, &default_env()).err().map(|e| e.to_string()))
        .collect();
    assert!(
        failures.is_empty(),
        "valid configs refused:\n{}",
        failures.join("\n")
    );
}

#[test]
fn a_per_session_limit_above_the_gateways_is_only_a_warning() {
    let loaded = valid("per_session_over_total.toml");
    assert_eq!(loaded.warnings.len(), 1, "{:?}", loaded.warnings);
    let w = &loaded.warnings[0];
    assert!(
        w.contains("server.max_connections_per_session (8)")
            && w.contains("server.max_connections (4)"),
        "{w}"
    );
    assert!(valid("full.toml").warnings.is_empty());
}

#[test]
fn invalid_configs_fail_naming_the_key() {
    let files = toml_files(&root().join("tests/configs/invalid"));
    assert!(
        files.len() >= 40,
        "expected the invalid configs, found {files:?}"
    );
    let mut failures = Vec::new();
    for path in &files {
        let file = path.display().to_string();
        let text = read(path);
        let expect = expectation(path, &text);
        match load(path, &expect.env) {
            Ok(_) => failures.push(format!(
                "{file}: accepted, expected an error at {}",
                expect.key
            )),
            Err(e) => {
                let shown = e.to_string();
                if e.key != expect.key {
                    failures.push(format!(
                        "{file}: key {:?}, expected {:?} ({shown})",
                        e.key, expect.key
                    ));
                } else if e.file != file || !shown.contains(&file) {
                    failures.push(format!("{file}: the error does not name the file: {shown}"));
                } else if !shown.starts_with(&format!("{file}: {}: ", expect.key))
                    || e.message.is_empty()
                {
                    failures.push(format!("{file}: not `file: key: message`: {shown}"));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {}:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
}

#[test]
fn unknown_keys_are_named_by_their_path() {
    let cases = [
        ("bogus = 1\n", "bogus"),
        ("[server]\nlistn = \"x\"\n", "server.listn"),
        ("[tokens]\nsigning_key = \"x\"\n", "tokens.signing_key"),
        (
            "[[tokens.previous_keys]]\nkid = \"k0\"\nkey = \"x\"\n",
            "tokens.previous_keys[0].key",
        ),
        (
            "[[routes]]\nname = \"a\"\npath = \"/a\"\nupstreams = []\n\
             [[routes]]\nname = \"b\"\npath = \"/b\"\nupstream = []\n",
            "routes[1].upstream",
        ),
    ];
    for (text, key) in cases {
        let e = Config::parse("inline.toml", text).expect_err(text);
        assert_eq!(e.key, key, "{text}");
        let field = key.rsplit(['.', ']']).next().unwrap();
        assert!(
            e.message.contains(&format!("unknown field `{field}`")),
            "{e}"
        );
        assert_eq!(e.to_string(), format!("inline.toml: {key}: {}", e.message));
    }
}

#[test]
fn minimal_config_gets_the_documented_defaults() {
    let path = root().join("tests/configs/valid/minimal.toml");
    let asked = std::cell::RefCell::new(Vec::new());
    let env = default_env();
    let loaded = load_with(&path, &|name| {
        asked.borrow_mut().push(name.to_string());
        env.get(name).cloned()
    })
    .expect("minimal.toml is valid");
    let c = &loaded.config;

    assert_eq!(c.server.listen, "127.0.0.1:8080");
    assert_eq!(
        loaded.listen,
        "127.0.0.1:8080".parse::<SocketAddr>().unwrap()
    );
    assert!(c.server.allowed_origins.is_empty());
    assert_eq!(c.server.max_connections, 50_000);
    assert_eq!(c.server.max_connections_per_session, 8);
    assert_eq!(c.server.max_connections_per_user, 0, "no per-user limit");
    assert_eq!(c.server.handshake_timeout_ms, 5_000);
    assert_eq!(c.server.shutdown_grace_ms, 10_000);

    assert_eq!(c.sessions.store, StoreKind::Memory);
    assert_eq!(c.sessions.redis_url, None, "no topology named");
    assert!(
        loaded.redis.is_none(),
        "the memory store has no Redis target"
    );
    assert_eq!(c.sessions.key_prefix, "portcullis");
    assert_eq!(c.sessions.ttl_secs, 86_400);

    // No [tokens] table at all: the key comes from PORTCULLIS_SIGNING_KEY.
    assert_eq!(c.tokens.algorithm, Algorithm::HS256);
    assert_eq!(c.tokens.signing_key_env, None);
    assert_eq!(c.tokens.signing_key_file, None);
    assert_eq!(*asked.borrow(), ["PORTCULLIS_SIGNING_KEY"]);
    assert_eq!(loaded.keys.signing.secret.expose(), SIGNING_KEY.as_bytes());
    assert_eq!(loaded.keys.signing.kid, "k1");
    assert!(loaded.keys.previous.is_empty());
    assert_eq!(c.tokens.kid, "k1");
    assert_eq!(c.tokens.issuer, "portcullis");
    assert_eq!(c.tokens.audience, "runtimes");
    assert_eq!(c.tokens.ttl_secs, 900);
    assert!(c.tokens.previous_keys.is_empty());

    assert_eq!(c.auth.kind, AuthKind::Static);
    assert_eq!(c.auth.login_attempts_per_minute, 10);
    assert_eq!(c.auth.max_sessions_per_user, 100);
    assert_eq!(c.auth.url, None);

    let [route] = c.routes.as_slice() else {
        panic!("minimal.toml has one route: {:?}", c.routes);
    };
    assert_eq!(route.balance, Balance::Session);
    assert_eq!(route.mode, Mode::Exclusive);
    assert_eq!(route.max_message_bytes, 1_048_576);
    assert_eq!(route.detach_grace_secs, 60);
    assert_eq!(route.replay_frames, 1024);
}

#[test]
fn key_files_resolve_against_the_config_directory() {
    // `keys/hs256.key` exists only next to the config, not in the working directory.
    assert!(!Path::new("keys/hs256.key").exists());
    let loaded = valid("hs256_key_file.toml");
    let expected = std::fs::read(root().join("tests/configs/valid/keys/hs256.key")).unwrap();
    assert_eq!(loaded.keys.signing.secret.expose(), expected.as_slice());

    for (name, alg, pem) in [
        ("eddsa_key_file.toml", Algorithm::EdDSA, "ed25519_a.pem"),
        ("es256_key_file.toml", Algorithm::ES256, "p256_a.pem"),
        ("rs256_key_file.toml", Algorithm::RS256, "rsa_a.pem"),
    ] {
        let loaded = valid(name);
        assert_eq!(loaded.config.tokens.algorithm, alg);
        let expected = std::fs::read(root().join("tests/fixtures/keys").join(pem)).unwrap();
        assert_eq!(
            loaded.keys.signing.secret.expose(),
            expected.as_slice(),
            "{name}"
        );
    }
}

#[test]
fn previous_keys_are_loaded_by_kid() {
    let loaded = valid("hs256_rotation.toml");
    assert_eq!(loaded.keys.signing.kid, "k2");
    assert_eq!(loaded.keys.signing.secret.expose(), SIGNING_KEY.as_bytes());
    let previous: Vec<(&str, &[u8])> = loaded
        .keys
        .previous
        .iter()
        .map(|k| (k.kid.as_str(), k.secret.expose()))
        .collect();
    let from_file =
        std::fs::read(root().join("tests/configs/valid/keys/hs256_previous.key")).unwrap();
    assert_eq!(
        previous,
        [
            ("k1", PREVIOUS_KEY.as_bytes()),
            ("k0", from_file.as_slice())
        ]
    );

    for (name, pem) in [
        ("eddsa_rotation.toml", "ed25519"),
        ("es256_rotation.toml", "p256"),
        ("rs256_rotation.toml", "rsa"),
    ] {
        let loaded = valid(name);
        let keys = root().join("tests/fixtures/keys");
        let a = std::fs::read(keys.join(format!("{pem}_a.pem"))).unwrap();
        let b = std::fs::read(keys.join(format!("{pem}_b.pem"))).unwrap();
        assert_eq!(loaded.keys.signing.kid, "k2", "{name}");
        assert_eq!(loaded.keys.signing.secret.expose(), b.as_slice(), "{name}");
        let [previous] = loaded.keys.previous.as_slice() else {
            panic!("{name}: one previous key expected");
        };
        assert_eq!(previous.kid, "k1", "{name}");
        assert_eq!(previous.secret.expose(), a.as_slice(), "{name}");
    }
}

#[test]
fn upstream_auth_and_shared_routes_keep_their_settings() {
    let loaded = valid("upstream_auth.toml");
    assert_eq!(loaded.config.auth.kind, AuthKind::Upstream);
    assert_eq!(
        loaded.config.auth.url.as_deref(),
        Some("http://auth:9000/verify")
    );
    assert!(loaded.config.auth.users.is_empty());

    let loaded = valid("shared_route.toml");
    let modes: Vec<Mode> = loaded.config.routes.iter().map(|r| r.mode).collect();
    assert_eq!(modes, [Mode::Shared, Mode::Shared, Mode::Exclusive]);
    assert_eq!(loaded.config.routes[0].detach_grace_secs, 30);
    assert_eq!(loaded.config.routes[0].replay_frames, 256);
    assert_eq!(loaded.config.routes[1].detach_grace_secs, 60);
    assert_eq!(loaded.config.routes[1].replay_frames, 1024);
}

#[test]
fn debug_output_never_shows_key_material_or_password_hashes() {
    let keys_dir = root().join("tests/fixtures/keys");
    let mut secrets: Vec<String> = vec![
        SIGNING_KEY.into(),
        PREVIOUS_KEY.into(),
        read(&root().join("tests/configs/valid/keys/hs256_previous.key")),
        read(&root().join("tests/configs/valid/keys/hs256.key")),
    ];
    for pem in [
        "ed25519_a",
        "ed25519_b",
        "p256_a",
        "p256_b",
        "rsa_a",
        "rsa_b",
    ] {
        // The base64 body, line by line: no line of a PEM may be printed.
        let text = read(&keys_dir.join(format!("{pem}.pem")));
        secrets.extend(
            text.lines()
                .filter(|l| !l.starts_with("-----"))
                .map(String::from),
        );
    }
    // full.toml's Redis URL carries a password.
    secrets.push("redis-password-not-for-logs".into());
    // redis_sentinel.toml's store password comes from a file.
    secrets.push("redis-file-password-not-for-logs".into());
    let hash_parts = [PASSWORD_HASH, "$argon2id$", "QTjBAjQvkyj07QszJAq8B8"];

    for name in [
        "hs256_rotation.toml",
        "hs256_key_file.toml",
        "eddsa_rotation.toml",
        "es256_rotation.toml",
        "rs256_rotation.toml",
        "full.toml",
        "redis_sentinel.toml",
    ] {
        let loaded = valid(name);
        for shown in [format!("{loaded:?}"), format!("{loaded:#?}")] {
            assert!(shown.contains("MASKED"), "{name}: {shown}");
            for secret in &secrets {
                assert!(
                    !shown.contains(secret.as_str()),
                    "{name}: Debug shows key material"
                );
            }
            // A byte-array rendering of the secret would leak it just as well.
            let bytes = format!("{:?}", SIGNING_KEY.as_bytes());
            assert!(
                !shown.contains(&bytes[1..bytes.len() - 1]),
                "{name}: Debug shows key bytes"
            );
            for part in hash_parts {
                assert!(!shown.contains(part), "{name}: Debug shows a password hash");
            }
        }
    }
}

#[test]
fn syntax_errors_say_where() {
    let text = "[server]\nlisten = \"127.0.0.1:8080\"\nmax_connections = \n";
    let e = Config::parse("syntax.toml", text).unwrap_err();
    assert_eq!(e.key, "(syntax)");
    assert!(e.message.starts_with("line 3, column "), "{e}");
}

/// The `[sessions]` table of a config with `store = "redis"`, over the
/// minimal sample otherwise.
fn with_sessions(sessions: &str, env: &HashMap<String, String>) -> Result<Loaded, ConfigError> {
    let text = format!(
        "[sessions]\nstore = \"redis\"\n{sessions}\n[[auth.users]]\nusername = \"alice\"\npassword_hash = '{PASSWORD_HASH}'\n"
    );
    let file = root().join("tests/configs/valid/inline.toml");
    let file = file.display().to_string();
    Config::parse(&file, &text)?.validate(&file, &|name| env.get(name).cloned())
}

#[test]
fn one_redis_is_the_default_topology() {
    let loaded = with_sessions("", &default_env()).unwrap();
    let target = loaded.redis.expect("a redis store has a target");
    assert_eq!(
        target.topology,
        Topology::Standalone("redis://127.0.0.1:6379/0".parse().unwrap())
    );
    assert!(target.password.is_none());
}

#[test]
fn each_topology_is_read_from_its_keys() {
    let loaded = with_sessions(
        "redis_cluster_urls = [\"rediss://10.0.0.1:7000\", \"rediss://10.0.0.2:7000\"]\n",
        &default_env(),
    )
    .unwrap();
    let target = loaded.redis.unwrap();
    assert!(target.tls(), "rediss:// is TLS");
    let Topology::Cluster(seeds) = &target.topology else {
        panic!("{target:?}")
    };
    assert_eq!(seeds.len(), 2);

    let loaded = with_sessions(
        "redis_sentinel_urls = [\"redis://10.0.0.1:26379\"]\nredis_sentinel_master = \"mymaster\"\n",
        &default_env(),
    )
    .unwrap();
    let target = loaded.redis.unwrap();
    assert!(!target.tls());
    let Topology::Sentinel { sentinels, master } = &target.topology else {
        panic!("{target:?}")
    };
    assert_eq!((sentinels.len(), master.as_str()), (1, "mymaster"));
}

#[test]
fn topology_errors_name_the_keys() {
    let cases = [
        (
            "redis_url = \"redis://a:6379\"\nredis_cluster_urls = [\"redis://b:7000\"]\n",
            "sessions.redis_cluster_urls",
            "sessions.redis_url",
        ),
        (
            "redis_cluster_urls = [\"redis://b:7000\"]\nredis_sentinel_urls = [\"redis://c:26379\"]\nredis_sentinel_master = \"m\"\n",
            "sessions.redis_sentinel_urls",
            "sessions.redis_cluster_urls",
        ),
        (
            "redis_sentinel_urls = [\"redis://c:26379\"]\n",
            "sessions.redis_sentinel_master",
            "sessions.redis_sentinel_urls",
        ),
        (
            "redis_sentinel_master = \"m\"\n",
            "sessions.redis_sentinel_master",
            "sessions.redis_sentinel_urls",
        ),
        (
            "redis_cluster_urls = []\n",
            "sessions.redis_cluster_urls",
            "at least one",
        ),
        (
            "redis_cluster_urls = [\"redis://b:7000\", \"rediss://c:7000\"]\n",
            "sessions.redis_cluster_urls[1]",
            "TLS",
        ),
        (
            "redis_sentinel_urls = [\"http://c:26379\"]\nredis_sentinel_master = \"m\"\n",
            "sessions.redis_sentinel_urls[0]",
            "redis://",
        ),
        (
            "redis_password_env = \"NOT_SET_ANYWHERE\"\n",
            "sessions.redis_password_env",
            "NOT_SET_ANYWHERE",
        ),
    ];
    for (sessions, key, mentions) in cases {
        let e = match with_sessions(sessions, &default_env()) {
            Ok(loaded) => panic!("accepted {sessions:?}: {:?}", loaded.redis),
            Err(e) => e,
        };
        assert_eq!(e.key, key, "{sessions:?}: {e}");
        assert!(e.message.contains(mentions), "{sessions:?}: {e}");
    }
}

#[test]
fn the_store_password_comes_from_the_environment_and_is_never_shown() {
    let mut env = default_env();
    env.insert("REDIS_PW".into(), "store-password-not-for-logs".into());
    let loaded = with_sessions(
        "redis_cluster_urls = [\"redis://10.0.0.1:7000\"]\nredis_password_env = \"REDIS_PW\"\n",
        &env,
    )
    .unwrap();
    let target = loaded.redis.clone().unwrap();
    assert_eq!(
        target.password.as_ref().map(|p| p.expose().to_vec()),
        Some(b"store-password-not-for-logs".to_vec())
    );
    for shown in [format!("{loaded:?}"), format!("{loaded:#?}")] {
        assert!(!shown.contains("store-password-not-for-logs"), "{shown}");
    }

    // A password in a URL is masked too, in every list.
    let loaded = with_sessions(
        "redis_sentinel_urls = [\"redis://:sentinel-password-not-for-logs@10.0.0.1:26379\"]\nredis_sentinel_master = \"m\"\n",
        &default_env(),
    )
    .unwrap();
    for shown in [format!("{loaded:?}"), format!("{loaded:#?}")] {
        assert!(shown.contains("MASKED"), "{shown}");
        assert!(!shown.contains("sentinel-password-not-for-logs"), "{shown}");
    }

    // Both in the URL and in the environment: ambiguous, refused.
    let e = with_sessions(
        "redis_url = \"redis://:pw@10.0.0.1:6379\"\nredis_password_env = \"REDIS_PW\"\n",
        &env,
    )
    .unwrap_err();
    assert_eq!(e.key, "sessions.redis_password_env");
}

/// Until Cluster and Sentinel are served, a config naming them must stop
/// the gateway at startup, not be served as if it were one Redis.
#[tokio::test]
async fn a_cluster_or_sentinel_target_is_refused_at_startup_not_served_as_one_redis() {
    for (name, key) in [
        ("redis_cluster.toml", "redis_cluster_urls"),
        ("redis_sentinel.toml", "redis_sentinel_urls"),
    ] {
        let built = portcullis::app::App::build(valid(name)).await;
        let Err(e) = built else {
            panic!("{name}: the gateway started on a topology it does not serve")
        };
        assert!(e.to_string().contains(key), "{name}: {e}");
        assert!(!e.to_string().contains("not-for-logs"), "{name}: {e}");
    }
}
