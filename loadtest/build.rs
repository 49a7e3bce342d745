//! Generated code from the project's proto/ with protox (no system protoc):
//! the control API client (`fanfare.v1.ControlService`) for `--publish-mode
//! grpc`, and the client protocol's messages (`fanfare.client.v2`) for
//! `--protocol protobuf`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["../proto/fanfare/v1/control.proto", "../proto/centrifuge/client.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(protos, ["../proto"])?;
    tonic_prost_build::configure().build_client(true).build_server(false).compile_fds(fds)?;
    Ok(())
}
