//! Compiles the vendored CSI spec into tonic client and server code.
//!
//! protox parses the .proto in-process, so building needs no system protoc.

use std::error::Error;

const CSI_PROTO: &str = "proto/csi.proto";

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed={CSI_PROTO}");
    let descriptors = protox::compile([CSI_PROTO], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
