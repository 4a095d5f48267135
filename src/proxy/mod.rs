//! Moving frames: dialling a runtime, relaying bytes between a client
//! socket and a runtime socket, and the message-level socket settings of
//! shared sessions.

pub mod dial;
pub mod frames;
pub mod relay;
pub mod tls_io;

use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Settings for a message-level WebSocket (shared-session viewports and
/// hubs, the demo's echo runtime); exclusive sockets are relayed as bytes
/// and use none of this.
///
/// tungstenite's defaults are set for a client, not a proxy holding
/// thousands of sockets (a 128 KiB read buffer up front, an unlimited write
/// buffer, 64 MiB messages), so every one is set here, once:
/// - `read_buffer`: allocated per socket up front, the memory an idle
///   viewport holds (`server.io_buffer_bytes`);
/// - no write buffering beyond one frame (`write_buffer_size(0)`): frames go
///   out as they are fed, and the owner's backpressure reaches the runtime;
/// - the write buffer may hold one whole largest message plus framing
///   before a send waits (tungstenite panics unless this exceeds
///   `write_buffer_size`);
/// - messages and frames are capped at the route's `max_message_bytes`.
pub fn ws_config(max_message: usize, read_buffer: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(read_buffer)
        .write_buffer_size(0)
        .max_write_buffer_size(max_message + 64 * 1024)
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message))
}
