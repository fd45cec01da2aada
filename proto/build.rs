//! Compiles the vendored CSI spec and kubelet's plugin registration service
//! into tonic client and server code.
//!
//! protox parses the .proto in-process, so building needs no system protoc.

use std::error::Error;

const PROTOS: [&str; 2] = ["proto/csi.proto", "proto/pluginregistration.proto"];

fn main() -> Result<(), Box<dyn Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
