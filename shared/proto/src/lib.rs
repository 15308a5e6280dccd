//! Generated protobuf messages and gRPC clients/servers for the `vlm.v1` API.
//!
//! The sources are `proto/vlm/v1/*.proto` at the workspace root; this crate holds
//! no hand-written logic beyond the public spelling of [`FinishReason`]. `bytes` fields are generated as [`prost::bytes::Bytes`]
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

/// Long-lived calls that do not hold an admission slot for their whole life: the service admits
/// their units of work itself (each question of a `Gateway/Watch` stream takes a slot while it is
/// answered; the number of open streams has its own limit).
pub const SELF_ADMITTED_PATHS: &[&str] = &["/vlm.v1.Gateway/Watch"];

impl FinishReason {
    /// How every client surface spells it (`ask --json`, `generate --json`, the OpenAI endpoint,
    /// the example clients): OpenAI's vocabulary. `stop`: the model ended its answer (an
    /// end-of-sequence token or a stop string); `length`: it was cut off (`max_tokens` reached or
    /// the context full); `unspecified` only for a value this build does not know.
    pub fn public_name(self) -> &'static str {
        match self {
            FinishReason::Stop | FinishReason::StopString => "stop",
            FinishReason::Length | FinishReason::ContextLength => "length",
            FinishReason::Unspecified => "unspecified",
        }
    }

    /// [`FinishReason::public_name`] of a wire value.
    pub fn public_name_of(value: i32) -> &'static str {
        FinishReason::try_from(value)
            .unwrap_or(FinishReason::Unspecified)
            .public_name()
    }
}

#[cfg(test)]
mod tests {
    use super::FinishReason;

    #[test]
    fn every_finish_reason_has_its_openai_spelling() {
        let cases = [
            (FinishReason::Stop, "stop"),
            (FinishReason::StopString, "stop"),
            (FinishReason::Length, "length"),
            (FinishReason::ContextLength, "length"),
            (FinishReason::Unspecified, "unspecified"),
        ];
        for (reason, name) in cases {
            assert_eq!(reason.public_name(), name, "{reason:?}");
            assert_eq!(FinishReason::public_name_of(reason as i32), name);
        }
        assert_eq!(FinishReason::public_name_of(99), "unspecified");
    }
}
