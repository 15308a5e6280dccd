//! TensorChunk codec for the vlm.v1 wire format.
//!
//! Senders use [`TensorChunker`] (a whole tensor) or [`TensorStreamWriter`]
//! (rows produced incrementally). Receivers use [`TensorAssembler`] to verify
//! each chunk and get its rows as soon as it arrives, or
//! [`collect_chunks`]/[`collect_stream`] for the whole tensor. [`TensorValue`]
//! stores a tensor as a single checksummed byte string (feature cache).
//!
//! A row is one slice of the last dimension: for `[N, H]`, `H` values.
//! Every receiver-side check runs before the corresponding allocation, so a
//! hostile header cannot make a service allocate more than [`TensorLimits`].

mod assembler;
mod chunker;
mod dtype;
mod error;
mod meta;
mod value;

pub use assembler::{
    collect_chunks, collect_stream, ChunkRows, F32Tensor, RowsBlock, TensorAssembler,
    TensorCollector,
};
pub use chunker::{EncodedChunker, TensorChunker, TensorStreamWriter};
pub use dtype::WireDType;
pub use error::TensorError;
pub use meta::{TensorLimits, TensorMeta, DEFAULT_CHUNK_BYTES};
pub use value::{TensorValue, TensorValueBuilder};
pub use vlm_proto::{TensorChunk, TensorHeader};
