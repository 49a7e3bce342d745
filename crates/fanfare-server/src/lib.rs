//! The library part of fanfare-server: the generated protobuf types, servers
//! and clients of the control APIs (`fanfare.v1`, `centrifugal.centrifugo.api`)
//! and of the proxy protocol (`centrifugal.centrifugo.proxy`), shared by the
//! `fanfare` binary, the integration tests and the API benchmark
//! (`examples/api_bench.rs`).

/// `fanfare.v1` from proto/fanfare/v1/control.proto (prost + tonic).
pub mod pb {
    tonic::include_proto!("fanfare.v1");
}

/// `centrifugal.centrifugo.proxy` from proto/centrifugo/proxy.proto: the
/// proxy protocol's client (the node) and server (backends in tests).
pub mod proxy_pb {
    tonic::include_proto!("centrifugal.centrifugo.proxy");
}

/// `centrifugal.centrifugo.api` from proto/centrifugo/api.proto: Centrifugo's
/// server API as fanfare serves it (our own file, Centrifugo's public names
/// and field numbers).
pub mod centrifugo_pb {
    tonic::include_proto!("centrifugal.centrifugo.api");
}

/// Encoded descriptors of `fanfare.v1` and `centrifugal.centrifugo.api`, for
/// server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/control_descriptor.bin"));

/// The WebSocket frame codec (RFC 6455), in the library so the echo server
/// example and the tests use the same code; the rest of `transport/` is the
/// binary's.
#[path = "transport/frame.rs"]
pub mod ws;

// The binary's modules, compiled into the library only for the fuzz targets
// (`fuzz/`), which need parsers that live there: configuration and the HTTP
// transports' request bodies. Off by default: the library stays small.
#[cfg(feature = "fuzzing")]
extern crate self as fanfare_server;
/// Declares the binary's modules, each only under the `fuzzing` feature.
macro_rules! binary_modules {
    ($($name:ident),* $(,)?) => {
        $(
            #[cfg(feature = "fuzzing")]
            #[allow(dead_code, unused_imports)]
            mod $name;
        )*
    };
}
binary_modules!(
    admin,
    api,
    api_http,
    centrifugo,
    config,
    grpc,
    grpc_transport,
    heap,
    http,
    jwks,
    limits,
    methods,
    outbound,
    proxy,
    tls,
    transport,
    webhooks,
);
/// Entry points of the fuzz targets (`fuzz/fuzz_targets/`).
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
