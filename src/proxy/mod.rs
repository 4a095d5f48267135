//! Moving frames: dialling a runtime and relaying bytes between a client
//! socket and a runtime socket.

pub mod dial;
pub mod frames;
pub mod relay;
