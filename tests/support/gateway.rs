//! The real `portcullis` binary, started on a free port with a config
//! written for the test, its log captured to a file.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const SIGNING_KEY: &str = "test-signing-key-0123456789abcdef-0123456789";
pub const PASSWORD: &str = "correct horse battery staple";

/// argon2id hash of [`PASSWORD`], computed once per test binary.
pub fn password_hash() -> &'static str {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| portcullis::auth::password::hash_password(PASSWORD.as_bytes()))
}

pub struct Gateway {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub log_path: PathBuf,
    /// The config file it serves (and re-reads on SIGHUP).
    pub config_path: PathBuf,
    _dir: TempDir,
}

/// The whole config file [`Gateway::start`] writes.
fn full_config(server_extra: &str, toml: &str) -> String {
    format!("[server]\nlisten = \"127.0.0.1:0\"\n{server_extra}\n{toml}")
}

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        let dir =
            std::env::temp_dir().join(format!("portcullis-test-{}", portcullis::ids::random_id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `[sessions]` table: `store` is `memory` (None) or a Redis URL (keys
/// under prefix `pt`); `keys` (e.g. `ttl_secs = 2`) are added to it.
pub fn sessions(store: Option<&str>, keys: &str) -> String {
    let table = match store {
        Some(url) => {
            format!("[sessions]\nstore = \"redis\"\nredis_url = \"{url}\"\nkey_prefix = \"pt\"\n")
        }
        None => "[sessions]\nstore = \"memory\"\n".to_string(),
    };
    format!("{table}{keys}\n")
}

/// A static `[auth]` with users alice and bob (password [`PASSWORD`]) and
/// `keys` (e.g. `login_attempts_per_minute = 3`) in the `[auth]` table.
pub fn static_auth(keys: &str) -> String {
    let hash = password_hash();
    format!(
        "[auth]\nkind = \"static\"\n{keys}\n\
         [[auth.users]]\nusername = \"alice\"\npassword_hash = \"{hash}\"\n\
         [[auth.users]]\nusername = \"bob\"\npassword_hash = \"{hash}\"\n"
    )
}

/// A config of [`sessions`]`(store, session_keys)`, then `auth` (a whole
/// `[auth]` table), then `extra` (`[tokens]`, routes).
pub fn config_with(store: Option<&str>, session_keys: &str, auth: &str, extra: &str) -> String {
    format!("{}\n{auth}\n{extra}\n", sessions(store, session_keys))
}

/// A config with users alice and bob (password [`PASSWORD`]) and `extra`
/// appended (routes, overrides). `store` is `memory` or a Redis URL.
pub fn config(store: Option<&str>, extra: &str) -> String {
    config_with(store, "", &static_auth(""), extra)
}

/// A `[[routes]]` table `name` on `path` to `upstreams`, with `keys` (e.g.
/// `max_message_bytes = 4096`) added to it.
pub fn route(name: &str, path: &str, upstreams: &[&str], keys: &str) -> String {
    let upstreams = upstreams
        .iter()
        .map(|u| format!("\"{u}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!("[[routes]]\nname = \"{name}\"\npath = \"{path}\"\nupstreams = [{upstreams}]\n{keys}\n")
}

/// The route `echo` on `/ws/echo` to the one `upstream`, with `keys`.
pub fn echo_route(upstream: &str, keys: &str) -> String {
    route("echo", "/ws/echo", &[upstream], keys)
}

impl Gateway {
    /// Starts the binary with `toml` (which must not set `server.listen`;
    /// `[server]` keys go in `server_extra`).
    pub fn start(server_extra: &str, toml: &str) -> Gateway {
        Self::start_with_env(server_extra, toml, &[])
    }

    pub fn start_with_env(server_extra: &str, toml: &str, env: &[(&str, &str)]) -> Gateway {
        let dir = TempDir::new();
        let cfg = dir.0.join("portcullis.toml");
        std::fs::write(&cfg, full_config(server_extra, toml)).unwrap();
        let log_path = dir.0.join("gateway.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .arg("--config")
            .arg(&cfg)
            .env("PORTCULLIS_SIGNING_KEY", SIGNING_KEY)
            .env("PORTCULLIS_LOG", "debug,hyper=info,redis=info")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("starting portcullis");
        let stdout = child.stdout.take().unwrap();
        // Read the address line on a thread so a gateway that never prints
        // fails the test after a bound instead of hanging it.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            while let Some(Ok(line)) = lines.next() {
                let addr = line
                    .strip_prefix("portcullis listening on http://")
                    .or_else(|| line.strip_prefix("portcullis listening on https://"));
                if let Some(addr) = addr {
                    let _ = tx.send(addr.parse::<SocketAddr>().unwrap());
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "gateway did not report its address; log:\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
        };
        Gateway {
            child: Some(child),
            addr,
            log_path,
            config_path: cfg,
            _dir: dir,
        }
    }

    /// Replaces the config file as [`Gateway::start`] wrote it (the same
    /// `listen`), for a SIGHUP to pick up; returns the text written.
    pub fn rewrite_config(&self, server_extra: &str, toml: &str) -> String {
        let text = full_config(server_extra, toml);
        // Written whole to a temporary file, then renamed: a reload never
        // reads half a file.
        let tmp = self.config_path.with_extension("toml.new");
        std::fs::write(&tmp, &text).unwrap();
        std::fs::rename(&tmp, &self.config_path).unwrap();
        text
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits (bounded) for the process to exit and returns its status;
    /// panics if it is still running after `within`.
    pub async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let child = self.child.as_mut().unwrap();
        super::wait::eventually("the gateway process exiting", within, || {
            let exited = child.try_wait().unwrap();
            async move { exited.ok_or("still running") }
        })
        .await
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
