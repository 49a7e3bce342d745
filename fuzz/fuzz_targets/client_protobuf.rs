//! Protobuf client commands: a WebSocket binary frame (varint-delimited
//! `Command`s) as the session decodes it.
#![no_main]

use fanfare_protocol::Codec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|frame: &[u8]| {
    let _ = Codec::Protobuf.decode(frame);
});
