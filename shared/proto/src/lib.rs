//! Generated protobuf messages and gRPC clients/servers for the `vlm.v1` API.
//!
//! The sources are `proto/vlm/v1/*.proto` at the workspace root; this crate holds
//! no hand-written logic. `bytes` fields are generated as [`prost::bytes::Bytes`]
//! so that relaying a chunk between services does not copy its payload.

pub mod vlm {
    pub mod v1 {
        tonic::include_proto!("vlm.v1");
    }
}

pub use vlm::v1::*;

/// Encoded `google.protobuf.FileDescriptorSet` of every `vlm.v1` file (with
/// imports and source comments), for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/vlm_descriptor.bin"));

/// The path of every `vlm.v1` RPC (`/vlm.v1.Gateway/Generate`, …), from the same descriptors.
pub const METHOD_PATHS: &[&str] = include!(concat!(env!("OUT_DIR"), "/method_paths.rs"));

/// The paths of the RPCs whose request is a single message (not a client stream).
pub const UNARY_REQUEST_PATHS: &[&str] =
    include!(concat!(env!("OUT_DIR"), "/unary_request_paths.rs"));
