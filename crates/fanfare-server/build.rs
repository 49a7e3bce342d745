//! Compiles the protos from proto/ with protox (pure Rust: no system protoc):
//! the server APIs (fanfare's own control API and the Centrifugo-compatible
//! one: server, client, reflection descriptors) and the proxy protocol
//! fanfare speaks to backends (client; the server side for tests).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let apis = ["../../proto/fanfare/v1/control.proto", "../../proto/centrifugo/api.proto"];
    let proxy = "../../proto/centrifugo/proxy.proto";
    for p in apis.iter().chain([&proxy]) {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(apis, ["../../proto"])?;
    std::fs::write(out.join("control_descriptor.bin"), prost::Message::encode_to_vec(&fds))?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    let fds = protox::compile([proxy], ["../../proto"])?;
    // No `connect` constructor on the client: it would clash with the
    // `Connect` call (clients are made from a channel instead). Bytes
    // fields as `Bytes`: data passes through without copies.
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(false)
        .bytes(".")
        .compile_fds(fds)?;
    Ok(())
}
