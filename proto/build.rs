//! Generates the tonic/prost code from `delta/registry/v1/registry.proto` and
//! `delta/inference/v1/inference.proto` with protox (pure
//! Rust: no system `protoc`), and writes the file descriptor set that server reflection
//! serves.

use std::path::PathBuf;

use protox::prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=delta");
    let fds = protox::compile(["delta/registry/v1/registry.proto"], ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("delta_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .bytes(".delta.registry.v1.UploadChunk.data")
        .bytes(".delta.registry.v1.BlobChunk.data")
        .compile_fds(fds)?;
    // The worker's inference service, with a descriptor set of its own for its reflection.
    let fds = protox::compile(["delta/inference/v1/inference.proto"], ["."])?;
    std::fs::write(out.join("inference_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
