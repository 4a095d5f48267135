//! Every close the gateway itself sends on an open socket (SPEC §6, §7,
//! §9), in one table: a code and a reason never appear as literals
//! anywhere else.

use crate::session::EndReason;

/// A close the gateway decided on (revocation, expiry, shutdown, limits, a
/// broken peer). The reason is always one of the fixed strings below.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Close {
    pub code: u16,
    pub reason: &'static str,
}

/// Logged out or deleted (SPEC §6).
pub const SESSION_REVOKED: Close = Close {
    code: 1008,
    reason: "session_revoked",
};
/// The session's TTL ran out (SPEC §5, §6).
pub const SESSION_EXPIRED: Close = Close {
    code: 1008,
    reason: "session_expired",
};
/// The runtime vanished without a close frame.
pub const UPSTREAM_GONE: Close = Close {
    code: 1014,
    reason: "upstream_unavailable",
};
/// A message over the route's `max_message_bytes`, either direction.
pub const TOO_BIG: Close = Close {
    code: 1009,
    reason: "message_too_big",
};
/// The gateway is shutting down; also what the runtime side of a hub is
/// told when its detach grace runs out.
pub const GOING_AWAY: Close = Close {
    code: 1001,
    reason: "going_away",
};
/// Overloaded, or a shared viewport fell too far behind (SPEC §7).
pub const TRY_AGAIN_LATER: Close = Close {
    code: 1013,
    reason: "try_again_later",
};
/// The instance holding a shared session's runtime connection died; the
/// viewports it served elsewhere reconnect at once (SPEC §8).
pub const SERVICE_RESTART: Close = Close {
    code: 1012,
    reason: "service_restart",
};
/// A client frame that breaks RFC 6455 framing rules (SPEC §6).
pub const PROTOCOL_ERROR: Close = Close {
    code: 1002,
    reason: "protocol_error",
};
/// Invalid UTF-8 in a text message or a close reason (SPEC §6).
pub const INVALID_PAYLOAD: Close = Close {
    code: 1007,
    reason: "invalid_payload",
};
/// A runtime's close frame that carried no code: passed on as a plain
/// normal closure, the code RFC 6455 §7.4.1 gives "no status".
pub const NORMAL: Close = Close {
    code: 1000,
    reason: "",
};

/// The close for a session that ended.
pub fn session_ended(reason: EndReason) -> Close {
    match reason {
        EndReason::Revoked => SESSION_REVOKED,
        EndReason::Expired => SESSION_EXPIRED,
    }
}

/// SPEC §9: a refusal told to a browser client (`portcullis=v1`) as a
/// close code, `4000 +` the HTTP status it stands for.
pub const fn refusal(status: u16) -> u16 {
    4000 + status
}

/// SPEC §9: the close reason of a refusal told in band, the compact JSON
/// `{"error":"<code>"}`, with `"retry_after"` where the HTTP refusal would
/// carry `Retry-After`. Codes are fixed identifiers, so no escaping is
/// needed and the reason stays far below the 123 bytes a close allows.
pub fn refusal_reason(code: &str, retry_after: Option<u64>) -> String {
    match retry_after {
        Some(secs) => format!(r#"{{"error":"{code}","retry_after":{secs}}}"#),
        None => format!(r#"{{"error":"{code}"}}"#),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_band_refusal_reasons_are_compact_json() {
        assert_eq!(
            refusal_reason("missing_token", None),
            r#"{"error":"missing_token"}"#
        );
        assert_eq!(
            refusal_reason("too_many_connections", Some(1)),
            r#"{"error":"too_many_connections","retry_after":1}"#
        );
    }

    #[test]
    fn session_ends_close_with_policy_violation_and_their_reason() {
        assert_eq!(session_ended(EndReason::Revoked), SESSION_REVOKED);
        assert_eq!(session_ended(EndReason::Expired).reason, "session_expired");
        assert_eq!(session_ended(EndReason::Expired).code, 1008);
    }

    #[test]
    fn refusals_map_status_to_the_4xxx_range() {
        assert_eq!(refusal(403), 4403);
        assert_eq!(refusal(502), 4502);
        assert_eq!(refusal(503), 4503);
    }
}
