//! Reply error codes and WebSocket close codes, as the Centrifugo protocol defines them.

use std::fmt;

/// A reply error code (`Reply.error.code`). The connection stays open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorCode(pub u32);

impl ErrorCode {
    pub const INTERNAL: Self = Self(100);
    pub const UNAUTHORIZED: Self = Self(101);
    pub const UNKNOWN_CHANNEL: Self = Self(102);
    pub const PERMISSION_DENIED: Self = Self(103);
    pub const METHOD_NOT_FOUND: Self = Self(104);
    pub const ALREADY_SUBSCRIBED: Self = Self(105);
    pub const LIMIT_EXCEEDED: Self = Self(106);
    pub const BAD_REQUEST: Self = Self(107);
    pub const NOT_AVAILABLE: Self = Self(108);
    pub const TOKEN_EXPIRED: Self = Self(109);
    pub const EXPIRED: Self = Self(110);
    pub const TOO_MANY_REQUESTS: Self = Self(111);
    pub const UNRECOVERABLE_POSITION: Self = Self(112);

    /// The message the protocol pairs with this code.
    pub fn message(self) -> &'static str {
        match self.0 {
            100 => "internal server error",
            101 => "unauthorized",
            102 => "unknown channel",
            103 => "permission denied",
            104 => "method not found",
            105 => "already subscribed",
            106 => "limit exceeded",
            107 => "bad request",
            108 => "not available",
            109 => "token expired",
            110 => "expired",
            111 => "too many requests",
            112 => "unrecoverable position",
            _ => "error",
        }
    }

    /// Temporary errors tell SDKs to retry the command later.
    pub fn temporary(self) -> bool {
        matches!(self.0, 100 | 111)
    }
}

/// A close code with its reason, sent in the WebSocket close frame (and, for
/// transports without close frames, as a `disconnect` push).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DisconnectCode(pub u16);

impl DisconnectCode {
    pub const CONNECTION_CLOSED: Self = Self(3000);
    pub const SHUTDOWN: Self = Self(3001);
    pub const INTERNAL: Self = Self(3004);
    pub const EXPIRED: Self = Self(3005);
    pub const SUBSCRIPTION_EXPIRED: Self = Self(3006);
    pub const SLOW: Self = Self(3008);
    pub const WRITE_ERROR: Self = Self(3009);
    pub const INSUFFICIENT_STATE: Self = Self(3010);
    pub const FORCE_RECONNECT: Self = Self(3011);
    pub const NO_PONG: Self = Self(3012);
    pub const TOO_MANY_REQUESTS: Self = Self(3013);
    pub const STATE_INVALIDATED: Self = Self(3014);
    pub const INVALID_TOKEN: Self = Self(3500);
    pub const BAD_REQUEST: Self = Self(3501);
    pub const STALE: Self = Self(3502);
    pub const FORCE_DISCONNECT: Self = Self(3503);
    pub const CONNECTION_LIMIT: Self = Self(3504);
    pub const CHANNEL_LIMIT: Self = Self(3505);
    pub const INAPPROPRIATE_PROTOCOL: Self = Self(3506);
    pub const PERMISSION_DENIED: Self = Self(3507);
    pub const NOT_AVAILABLE: Self = Self(3508);
    pub const TOO_MANY_ERRORS: Self = Self(3509);
    /// WebSocket standard: message too big.
    pub const MESSAGE_TOO_BIG: Self = Self(1009);

    /// The short reason sent with this code (fits a close frame).
    pub fn reason(self) -> &'static str {
        match self.0 {
            3000 => "connection closed",
            3001 => "shutdown",
            3004 => "internal server error",
            3005 => "connection expired",
            3006 => "subscription expired",
            3008 => "slow",
            3009 => "write error",
            3010 => "insufficient state",
            3011 => "force reconnect",
            3012 => "no pong",
            3013 => "too many requests",
            3014 => "state invalidated",
            3500 => "invalid token",
            3501 => "bad request",
            3502 => "stale",
            3503 => "force disconnect",
            3504 => "connection limit",
            3505 => "channel limit",
            3506 => "inappropriate protocol",
            3507 => "permission denied",
            3508 => "not available",
            3509 => "too many errors",
            1009 => "message too big",
            _ => "disconnect",
        }
    }

    /// Whether SDKs reconnect after this code (3000–3499, 4000–4499).
    pub fn reconnect(self) -> bool {
        matches!(self.0, 3000..=3499 | 4000..=4499)
    }

    /// A label for metrics.
    pub fn label(self) -> &'static str {
        match self.0 {
            3000 => "connection_closed",
            3001 => "shutdown",
            3004 => "internal",
            3005 => "expired",
            3006 => "subscription_expired",
            3008 => "slow",
            3009 => "write_error",
            3010 => "insufficient_state",
            3011 => "force_reconnect",
            3012 => "no_pong",
            3013 => "too_many_requests",
            3014 => "state_invalidated",
            3500 => "invalid_token",
            3501 => "bad_request",
            3502 => "stale",
            3503 => "force_disconnect",
            3504 => "connection_limit",
            3505 => "channel_limit",
            3506 => "inappropriate_protocol",
            3507 => "permission_denied",
            3508 => "not_available",
            3509 => "too_many_errors",
            1009 => "message_too_big",
            _ => "other",
        }
    }
}

impl fmt::Display for DisconnectCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.0, self.reason())
    }
}
