//! Test support: real processes and servers on free ports, stopped when
//! dropped. Nothing here is a fake: a gateway test talks to the real binary
//! over real sockets.
#![allow(dead_code)]

pub mod gateway;
pub mod http;
pub mod redis;
pub mod upstream;
pub mod ws;
