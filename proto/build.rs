//! Compiles `dtrain.proto` with protox (pure Rust, no `protoc` needed) and writes the file
//! descriptor set used by gRPC server reflection.

use prost::Message;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=dtrain.proto");
    let fds = protox::compile(["dtrain.proto"], ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("dtrain_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .bytes(".dtrain.v1")
        .compile_fds(fds)?;
    Ok(())
}
