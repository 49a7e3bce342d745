//! The control API client (`fanfare.v1.ControlService`) for `--publish-mode
//! grpc`, compiled from the project's proto/ with protox (no system protoc).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "../proto/fanfare/v1/control.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["../proto"])?;
    tonic_prost_build::configure().build_client(true).build_server(false).compile_fds(fds)?;
    Ok(())
}
