//! Entry points of the fuzz targets (`fuzz/`): the parsers of the binary that
//! read untrusted bytes, each called as the server calls it. Compiled only
//! with the `fuzzing` feature; panics are findings, errors are fine.

use std::collections::HashMap;

/// Configuration: TOML text plus `FANFARE__*` environment variables, parsed
/// and validated as at startup. An error must name what is wrong; a valid
/// result must survive being shown masked (`fanfare check-config`).
pub fn config(toml: &str, env: HashMap<String, String>) {
    if let Ok(settings) = crate::config::Settings::from_toml_with_env(toml, env) {
        let _ = settings.to_masked_toml();
        let _ = settings.node_config();
    }
}

/// An `/emulation` request body (JSON, or Protobuf when `protobuf`).
pub fn emulation_body(body: &[u8], protobuf: bool) {
    crate::transport::emulation::fuzz_request(body, protobuf)
}

/// A uni transport's connect request: the `uni_http_stream` body, the
/// `uni_sse` query and an SSE `Last-Event-ID`.
pub fn uni_connect(body: &[u8], query: &str, last_event_id: &str) -> Option<String> {
    crate::transport::uni::fuzz_connect(body, query, last_event_id)
}

/// The `cf_connect` query parameter of `/connection/sse`, percent-decoded,
/// then decoded as the JSON commands it carries.
pub fn sse_query(query: &str) {
    if let Some(commands) = crate::transport::url_param(query, "cf_connect") {
        let _ = fanfare_protocol::Codec::Json.decode(commands.as_bytes());
    }
}
