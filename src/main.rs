//! The `portcullis` binary: choose the allocator, parse the CLI, set up
//! logging, load config, bind, and hand over to the library. Nothing else
//! lives here.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use portcullis::app::{App, Running};
use portcullis::config::{Config, Secrets};

/// jemalloc instead of glibc's malloc. In a `churn` profile glibc's
/// allocator took 8 % of the gateway's samples, a quarter of them in
/// `_int_memalign` (Tokio's tasks are cache-line-aligned allocations). With
/// jemalloc the gateway spent 11 µs less CPU per upgrade (108 instead of 119
/// µs with its Redis, which the allocator does not touch), and an idle
/// proxied connection costs 2.1–2.2 instead of 2.6–2.7 KiB; mimalloc, tried
/// earlier, gave no CPU gain and more memory (BENCHMARKS.md, "What each
/// change bought"). Only this binary: the library's users and the bench
/// tool keep their own allocator. tikv-jemallocator does not build for
/// MSVC, which keeps the system allocator.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "portcullis",
    version,
    about = "Validates sessions before a WebSocket upgrade"
)]
struct Cli {
    /// Config file to serve with.
    #[arg(long, global = false)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a config file, print its routes, exit 0 (valid) or 1.
    Check {
        #[arg(long)]
        config: PathBuf,
        /// Validate everything except secrets that cannot be read here (an
        /// unset key variable, an unreadable key file), and list those as
        /// not checked. For CI on a config repository without the secrets;
        /// `serve` and reload always require every secret.
        #[arg(long)]
        skip_secrets: bool,
    },
    /// Gateway + built-in echo runtime + a demo user; no Redis, no config.
    Demo {
        /// Address to serve on; default 127.0.0.1:8080, or a free port if busy.
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Read one password line on stdin and print its argon2id hash.
    HashPassword,
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("PORTCULLIS_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if std::env::var("PORTCULLIS_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check {
            config,
            skip_secrets,
        }) => check(&config, skip_secrets),
        Some(Command::HashPassword) => match hash_password() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("portcullis: {e:#}");
                ExitCode::FAILURE
            }
        },
        Some(Command::Demo { listen }) => run_async(demo(listen)),
        None => match cli.config {
            Some(path) => run_async(serve(path)),
            None => {
                eprintln!(
                    "portcullis: pass --config FILE to serve, or try `portcullis demo` (see --help)"
                );
                ExitCode::from(2)
            }
        },
    }
}

fn run_async(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    init_logging();
    // The control runtime: signals, store background work, sweeps. Sockets
    // are served by per-core shard runtimes (see server::run_until_signal).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building the Tokio runtime");
    match rt.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portcullis: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: &std::path::Path, skip_secrets: bool) -> ExitCode {
    let secrets = if skip_secrets {
        Secrets::SkipUnreadable
    } else {
        Secrets::Required
    };
    match Config::check(path, secrets) {
        Ok(checked) => {
            let unchecked = checked.unchecked_secrets.len();
            if unchecked == 0 {
                println!("{}: ok, listen {}", path.display(), checked.listen);
            } else {
                println!(
                    "{}: ok except {unchecked} secret(s) not checked, listen {}",
                    path.display(),
                    checked.listen
                );
            }
            for r in &checked.config.routes {
                println!(
                    "route {} {} -> {} ({:?}, balance {:?})",
                    r.name,
                    r.path,
                    r.upstreams.join(", "),
                    r.mode,
                    r.balance
                );
            }
            for w in &checked.warnings {
                eprintln!("portcullis: warning: {w}");
            }
            for e in &checked.unchecked_secrets {
                println!("secret not checked (--skip-secrets): {e}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("portcullis: config error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn hash_password() -> anyhow::Result<()> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading the password from stdin")?;
    let password = line.strip_suffix('\n').unwrap_or(&line);
    let password = password.strip_suffix('\r').unwrap_or(password);
    anyhow::ensure!(!password.is_empty(), "empty password on stdin");
    println!(
        "{}",
        portcullis::auth::password::hash_password(password.as_bytes())
    );
    Ok(())
}

async fn serve(path: PathBuf) -> anyhow::Result<()> {
    // Config errors exit non-zero before any port is bound.
    let loaded = Config::load(&path).map_err(|e| anyhow::anyhow!("config error: {e}"))?;
    for w in &loaded.warnings {
        tracing::warn!("{w}");
    }
    let listen = loaded.listen;
    let app = App::build(loaded).await.context("starting")?;
    let shards = portcullis::server::shard_count(app.config().server.worker_threads);
    let listeners = portcullis::server::bind_shards(listen, shards)
        .with_context(|| format!("binding {listen}"))?;
    let running = Running::new(app, Some(path));
    portcullis::server::run_until_signal(running, listeners).await
}

async fn demo(listen: Option<SocketAddr>) -> anyhow::Result<()> {
    let (app, listener, creds) = portcullis::demo::prepare(listen).await?;
    println!("username: {}", creds.username);
    println!("password: {}", creds.password);
    portcullis::server::run_until_signal(app, vec![listener.into_std()?]).await
}
