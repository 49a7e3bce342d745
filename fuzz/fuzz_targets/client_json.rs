//! JSON client commands: a WebSocket text frame (or HTTP transport body) as
//! the session decodes it. Any error is a 3501; a panic is a finding.
#![no_main]

use fanfare_protocol::Codec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|frame: &[u8]| {
    let _ = Codec::Json.decode(frame);
});
