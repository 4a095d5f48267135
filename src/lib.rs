//! Portcullis: an edge gateway that validates sessions before a WebSocket
//! upgrade, then proxies frames to the runtime its TOML routes pick.
//!
//! # Layout
//!
//! Modules are layers, listed from the top. A module imports only from
//! layers below its own, never from one above, and modules of one layer do
//! not import each other (`tests/layers.rs` checks both):
//!
//! 1. `main.rs` (the binary) and [`demo`]: parse the CLI, load config, wire,
//!    serve.
//! 2. [`server`]: the accept loop, shard runtimes, signals and drain;
//!    [`maintenance`]: the background tasks that keep open sockets honest
//!    (revocation listener, expiry sweep, lease renewal).
//! 3. [`http`]: dispatch by path, the session API of SPEC §4, the one place
//!    a refusal is logged and counted.
//! 4. [`app`]: the composition root, every part built once from config.
//! 5. [`gate`]: the ordered upgrade checks of SPEC §6 and the hand-over.
//! 6. [`hub`]: shared sessions (SPEC §7, §8): one runtime connection per
//!    (session, route) in the whole deployment, owner/reader viewports, the
//!    replay ring; on the Redis store, mirrors of hubs held elsewhere.
//! 7. [`proxy`]: dialling a runtime and relaying bytes (exclusive mode).
//! 8. [`sockets`]: the life of an open socket: registry, leases, the task
//!    epilogue, every close code.
//! 9. [`error`]: the one refusal type and its HTTP response.
//! 10. [`session`] (stores, and the Redis fabric instances coordinate
//!     shared sessions on), [`token`] (JWTs, where a token comes from),
//!     [`auth`] (login backends, rate limit), [`routing`] (route table,
//!     balancing), [`hooks`] (signed session hooks to the runtime),
//!     [`tls`] (rustls configs for the listener and for `wss://` runtimes).
//! 11. [`config`]: the TOML tree, defaults, `validate()`.
//! 12. [`formats`]: the syntax of what config names (route paths, argon2id
//!     hashes, private-key PEMs, TLS certificates), read once for config's checks and for the
//!     layers that use them.
//! 13. [`ids`], [`time`], [`telemetry`], [`shutdown`], [`outbound`] (one
//!     JSON POST to a service the config names): leaves.
//!
//! Why this order: data flows down it. A request enters at the server, is
//! dispatched by `http`, admitted by the `gate`, and its socket then lives
//! in `hub` or `proxy`, which hold it through `sockets`. `proxy` sits above
//! `sockets` because the relay sends the close codes `sockets::close`
//! defines; `sockets` knows nothing of how bytes move, only what a socket
//! holds and how it ends.

pub mod app;
pub mod auth;
pub mod config;
pub mod demo;
pub mod error;
pub mod formats;
pub mod gate;
pub mod hooks;
pub mod http;
pub mod hub;
pub mod ids;
pub mod maintenance;
pub mod outbound;
pub mod proxy;
pub mod routing;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod sockets;
pub mod telemetry;
pub mod time;
pub mod tls;
pub mod token;
