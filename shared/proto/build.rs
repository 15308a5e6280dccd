//! Compiles proto/vlm/v1 with protox (pure Rust) so no protoc binary is needed,
//! and keeps the descriptor set for gRPC server reflection.

use std::path::PathBuf;

use prost::Message;

const PROTO_ROOT: &str = "../../proto";
const PROTOS: &[&str] = &[
    "vlm/v1/tensor.proto",
    "vlm/v1/encoder.proto",
    "vlm/v1/projector.proto",
    "vlm/v1/decoder.proto",
    "vlm/v1/gateway.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Watching the directory catches added/removed files; the per-file lines
    // catch edits (cargo only looks at the directory's own mtime otherwise).
    println!("cargo:rerun-if-changed={PROTO_ROOT}");
    for p in PROTOS {
        println!("cargo:rerun-if-changed={PROTO_ROOT}/{p}");
    }

    let fds = protox::compile(PROTOS, [PROTO_ROOT])?;

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("vlm_descriptor.bin"), fds.encode_to_vec())?;
    // Every RPC's path, so servers can tell a real method from a made-up one (metric labels),
    // and those whose request is one message (read whole before admission).
    let mut paths = String::from("&[\n");
    let mut unary = String::from("&[\n");
    for file in &fds.file {
        for service in &file.service {
            for method in &service.method {
                let line = format!(
                    "    \"/{}.{}/{}\",\n",
                    file.package(),
                    service.name(),
                    method.name()
                );
                paths.push_str(&line);
                if !method.client_streaming() {
                    unary.push_str(&line);
                }
            }
        }
    }
    paths.push_str("]\n");
    unary.push_str("]\n");
    std::fs::write(out_dir.join("method_paths.rs"), paths)?;
    std::fs::write(out_dir.join("unary_request_paths.rs"), unary)?;

    tonic_prost_build::configure()
        // Tensor data and images are relayed between hops; Bytes makes that a
        // refcount bump instead of a copy.
        .bytes(".vlm.v1")
        .compile_fds(fds)?;
    Ok(())
}
