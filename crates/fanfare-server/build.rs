//! Compiles the server APIs from proto/ with protox (pure Rust: no system
//! protoc): fanfare's own control API and the Centrifugo-compatible one.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["../../proto/fanfare/v1/control.proto", "../../proto/centrifugo/api.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["../../proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("control_descriptor.bin"), prost::Message::encode_to_vec(&fds))?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}
