//! The HTTP transports' request inputs: `/emulation` bodies (JSON and
//! Protobuf), the `uni_http_stream` connect body, the `uni_sse` query and
//! `Last-Event-ID`, and `/connection/sse`'s `cf_connect` query.
//! First byte selects the input; for the uni transports the rest is split
//! at the first 0xFF byte into body and `Last-Event-ID`.
#![no_main]

use fanfare_server::fuzzing;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode % 4 {
        0 => fuzzing::emulation_body(rest, false),
        1 => fuzzing::emulation_body(rest, true),
        2 => {
            let (body, id) = match rest.iter().position(|&b| b == 0xFF) {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (rest, &[][..]),
            };
            let id = String::from_utf8_lossy(id);
            let query = String::from_utf8_lossy(body);
            let _ = fuzzing::uni_connect(body, &query, &id);
        }
        _ => fuzzing::sse_query(&String::from_utf8_lossy(rest)),
    }
});
