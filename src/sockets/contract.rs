//! What the gateway itself says to a client that asked for the browser
//! contract (SPEC §9, `portcullis=v1`), besides closes ([`super::close`]):
//! the `portcullis.hello` that opens every accepted socket and the
//! `portcullis.role` a shared viewport hears when the owner changes.
//!
//! Serialised from structs so `type` comes first, as SPEC §9 writes them
//! (a `json!` map would sort the keys).

use serde::Serialize;

/// Where a shared viewport starts, as its `101` headers say it.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct SharedStart {
    pub role: &'static str,
    pub seq: u64,
    /// `"ok"`, `"gap"`, or `null` without `resume_from`.
    pub resume: Option<&'static str>,
}

#[derive(Serialize)]
struct Hello<'a> {
    r#type: &'static str,
    mode: &'static str,
    session_id: &'a str,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    shared: Option<SharedStart>,
}

/// The first frame of an accepted socket: `shared` is `None` on exclusive
/// routes.
pub fn hello(session_id: &str, shared: Option<SharedStart>) -> String {
    let h = Hello {
        r#type: "portcullis.hello",
        mode: if shared.is_some() {
            "shared"
        } else {
            "exclusive"
        },
        session_id,
        shared,
    };
    serde_json::to_string(&h).expect("a hello always serialises")
}

#[derive(Serialize)]
struct Role {
    r#type: &'static str,
    role: &'static str,
    owner_present: bool,
}

/// A shared viewport's role after the owner changed.
pub fn role(owner: bool, owner_present: bool) -> String {
    let r = Role {
        r#type: "portcullis.role",
        role: if owner { "owner" } else { "reader" },
        owner_present,
    };
    serde_json::to_string(&r).expect("a role always serialises")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_read_as_spec_9_writes_them() {
        assert_eq!(
            hello("s1", None),
            r#"{"type":"portcullis.hello","mode":"exclusive","session_id":"s1"}"#
        );
        let start = SharedStart {
            role: "reader",
            seq: 7,
            resume: None,
        };
        assert_eq!(
            hello("s1", Some(start)),
            r#"{"type":"portcullis.hello","mode":"shared","session_id":"s1","role":"reader","seq":7,"resume":null}"#
        );
        assert_eq!(
            role(true, true),
            r#"{"type":"portcullis.role","role":"owner","owner_present":true}"#
        );
    }
}
