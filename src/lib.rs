//! Portcullis: an edge gateway that validates sessions before a WebSocket
//! upgrade, then proxies frames to the runtime its TOML routes pick.
//!
//! # Layout
//!
//! - [`config`]: the TOML tree, defaults, and `validate()`.
//! - [`routing`]: route patterns and the route table.
//! - [`session`]: the `SessionStore` trait; memory and Redis stores.
//! - [`token`]: JWT signing/verification, key rotation by `kid`, JWKS.
//! - [`auth`]: login backends (static argon2id users, upstream verifier) and
//!   the login rate limiter.
//! - [`gate`]: the ordered upgrade checks of SPEC §6, the registry of open
//!   sockets, and the revocation / expiry / lease maintenance tasks.
//! - [`proxy`]: upstream dial, frame-boundary tracking, the byte relay.
//! - [`hub`]: shared sessions: one runtime connection per (session, route),
//!   owner/reader viewports, the numbered replay ring, detach grace.
//! - [`http`]: the HTTP API of SPEC §4 and the one error → response mapping.
//! - [`server`]: the accept loop, connection limits, hyper per connection.
//! - [`telemetry`]: Prometheus metrics and log redaction.
//! - [`demo`]: the self-contained `portcullis demo`.

pub mod app;
pub mod auth;
pub mod config;
pub mod demo;
pub mod error;
pub mod formats;
pub mod gate;
pub mod http;
pub mod hub;
pub mod ids;
pub mod proxy;
pub mod routing;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod telemetry;
pub mod time;
pub mod token;
