//! Our pub/sub message and history entry format as read back from Redis
//! (fanfare-redis wire.rs): anything on the channel must decode or be
//! skipped, never crash the node.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|msg: &[u8]| {
    fanfare_redis::fuzz_decode(msg);
});
