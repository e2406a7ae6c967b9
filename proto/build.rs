//! Compiles the .proto files with protox, so no system `protoc` is needed.

use std::{env, path::PathBuf};

const PROTOS: [&str; 3] = [
    "veo/sync/v1/sync.proto",
    "veo/usage/v1/usage.proto",
    "veo/admin/v1/admin.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }

    let descriptors = protox::compile(PROTOS, ["."])?;
    let grpc = env::var_os("CARGO_FEATURE_GRPC").is_some();
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);

    // Server reflection serves this set; compile_fds does not write it.
    std::fs::write(
        out_dir.join("veo_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;

    tonic_prost_build::configure()
        .build_server(grpc)
        .build_client(grpc)
        .compile_fds(descriptors)?;
    Ok(())
}
