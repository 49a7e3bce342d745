//! Generates prost types for the client protocol from proto/centrifuge/client.proto
//! with protox (pure Rust: no system protoc).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "../../proto/centrifuge/client.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["../../proto"])?;
    prost_build::Config::new()
        // `bytes` fields as `Bytes`: payloads move into Command/Reply without a copy.
        .bytes(["."])
        // Maps as `BTreeMap`, like the codec-independent types (sorted, deterministic output).
        .btree_map(["."])
        .compile_fds(fds)?;
    Ok(())
}
