//! Configuration as `fanfare` reads it at startup: TOML plus `FANFARE__*`
//! environment variables, deserialized and validated. Lines of the input
//! that look like `FANFARE__KEY=value` are the environment, the rest is the
//! TOML file. Bad configuration must be an error naming the key, not a panic.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut toml = String::new();
    let mut env = HashMap::new();
    for line in text.lines() {
        match line.split_once('=') {
            Some((k, v)) if k.starts_with("FANFARE__") => {
                env.insert(k.to_string(), v.to_string());
            }
            _ => {
                toml.push_str(line);
                toml.push('\n');
            }
        }
    }
    fanfare_server::fuzzing::config(&toml, env);
});
