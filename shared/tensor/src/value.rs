//! A whole tensor as one byte string, for storage (the feature cache).
//!
//! Layout (all integers little-endian):
//! ```text
//! "VLMT" | version u8 = 1 | header_len u32 | TensorHeader (protobuf) | crc32c u32 | data
//! ```
//! The checksum covers the header bytes and the data, so a flipped dtype or
//! shape is caught as well as corrupted payload; a store that returns garbage
//! must read as a miss, never as wrong features.

use std::borrow::Borrow;

use bytes::{Bytes, BytesMut};
use prost::Message;
use vlm_proto::{TensorChunk, TensorHeader};

use crate::{
    ChunkRows, EncodedChunker, F32Tensor, TensorAssembler, TensorError, TensorLimits, TensorMeta,
    WireDType,
};

const MAGIC: &[u8; 4] = b"VLMT";
const VERSION: u8 = 1;
/// A TensorHeader of rank <= 64 is far below this; anything larger is garbage.
const MAX_HEADER_BYTES: usize = 4096;

/// A verified tensor held in its wire encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorValue {
    meta: TensorMeta,
    data: Bytes,
}

impl TensorValue {
    /// Encodes an f32 tensor in `dtype`.
    pub fn from_f32(
        values: &[f32],
        shape: &[usize],
        dtype: WireDType,
    ) -> Result<Self, TensorError> {
        let meta = TensorMeta::new(dtype, shape)?;
        if values.len() != meta.num_elements() {
            return Err(TensorError::ShapeMismatch {
                shape: shape.iter().map(|&d| d as u64).collect(),
                expected: meta.num_elements() as u64,
                actual: values.len() as u64,
            });
        }
        Ok(TensorValue {
            data: Bytes::from(dtype.encode(values)),
            meta,
        })
    }

    /// Verifies and concatenates a complete chunk sequence.
    pub fn from_chunks<I>(chunks: I, limits: &TensorLimits) -> Result<Self, TensorError>
    where
        I: IntoIterator,
        I::Item: Borrow<TensorChunk>,
    {
        let mut b = TensorValueBuilder::new(*limits);
        for c in chunks {
            b.push(c.borrow())?;
        }
        b.finish()
    }

    pub fn meta(&self) -> &TensorMeta {
        &self.meta
    }

    /// The same tensor carrying `layout` in its header (streams and stored values keep it).
    pub fn with_layout(mut self, layout: Option<vlm_proto::ImageLayout>) -> Self {
        self.meta = self.meta.with_layout(layout);
        self
    }

    /// The raw little-endian elements.
    pub fn data(&self) -> &Bytes {
        &self.data
    }

    /// Serialises to the storage layout.
    pub fn encode(&self) -> Vec<u8> {
        let header = self.meta.to_header(0).encode_to_vec();
        let crc = crc32c::crc32c_append(crc32c::crc32c(&header), &self.data);
        let mut out = Vec::with_capacity(4 + 1 + 4 + header.len() + 4 + self.data.len());
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&self.data);
        out
    }

    /// Parses and verifies the storage layout. The data is sliced out of
    /// `buf`, not copied.
    pub fn decode(buf: Bytes, limits: &TensorLimits) -> Result<Self, TensorError> {
        let corrupt = |m: &str| TensorError::CorruptValue(m.to_string());
        if buf.len() < 9 {
            return Err(corrupt("shorter than the fixed prefix"));
        }
        if &buf[..4] != MAGIC {
            return Err(corrupt("bad magic"));
        }
        if buf[4] != VERSION {
            return Err(TensorError::CorruptValue(format!(
                "unsupported version {}",
                buf[4]
            )));
        }
        let header_len = u32::from_le_bytes([buf[5], buf[6], buf[7], buf[8]]) as usize;
        if header_len > MAX_HEADER_BYTES {
            return Err(TensorError::CorruptValue(format!(
                "header length {header_len} is implausible"
            )));
        }
        let crc_at = 9 + header_len;
        let data_at = crc_at + 4;
        if buf.len() < data_at {
            return Err(corrupt("truncated before the data"));
        }
        let header_bytes = &buf[9..crc_at];
        let header = TensorHeader::decode(header_bytes)
            .map_err(|e| TensorError::CorruptValue(format!("header does not decode: {e}")))?;
        let meta = TensorMeta::from_header(&header, limits)?;
        let data = buf.slice(data_at..);
        if data.len() as u64 != meta.total_bytes() {
            return Err(TensorError::CorruptValue(format!(
                "{} data bytes, but the header announces {}",
                data.len(),
                meta.total_bytes()
            )));
        }
        let stored = u32::from_le_bytes([
            buf[crc_at],
            buf[crc_at + 1],
            buf[crc_at + 2],
            buf[crc_at + 3],
        ]);
        let actual = crc32c::crc32c_append(crc32c::crc32c(header_bytes), &data);
        if stored != actual {
            return Err(TensorError::CorruptValue(format!(
                "checksum mismatch: stored {stored:#010x}, computed {actual:#010x}"
            )));
        }
        Ok(TensorValue { meta, data })
    }

    /// Replays the tensor as a chunk stream without copying the data.
    pub fn chunks(&self, max_chunk_bytes: usize) -> EncodedChunker {
        // Every constructor has checked the data length against the meta.
        EncodedChunker::new_unchecked(self.data.clone(), self.meta.clone(), max_chunk_bytes)
    }

    /// Stacks equally shaped tensors of one dtype along a new first dimension (`[n, ...shape]`),
    /// e.g. an image's views, some cached and some just encoded.
    pub fn stack(parts: &[TensorValue]) -> Result<Self, TensorError> {
        let first = parts.first().ok_or(TensorError::EmptyShape)?;
        let mut shape = vec![parts.len()];
        shape.extend_from_slice(first.meta.shape());
        let meta = TensorMeta::new(first.meta.dtype(), &shape)?;
        let mut data = BytesMut::with_capacity(meta.total_bytes() as usize);
        for p in parts {
            if p.meta.shape() != first.meta.shape() || p.meta.dtype() != first.meta.dtype() {
                return Err(TensorError::CorruptValue(format!(
                    "cannot stack a {} {:?} tensor onto {} {:?} ones",
                    p.meta.dtype().name(),
                    p.meta.shape(),
                    first.meta.dtype().name(),
                    first.meta.shape()
                )));
            }
            data.extend_from_slice(&p.data);
        }
        Ok(TensorValue {
            meta,
            data: data.freeze(),
        })
    }

    /// Splits along the first dimension into its `shape[0]` sub-tensors (no copy).
    pub fn unstack(&self) -> Result<Vec<TensorValue>, TensorError> {
        let shape = self.meta.shape();
        if shape.len() < 2 {
            return Err(TensorError::CorruptValue(format!(
                "cannot unstack a tensor of shape {shape:?}"
            )));
        }
        let meta = TensorMeta::new(self.meta.dtype(), &shape[1..])?.with_layout(self.meta.layout());
        let step = meta.total_bytes() as usize;
        Ok((0..shape[0])
            .map(|i| TensorValue {
                meta: meta.clone(),
                data: self.data.slice(i * step..(i + 1) * step),
            })
            .collect())
    }

    /// Decodes to f32.
    pub fn to_f32(&self) -> F32Tensor {
        F32Tensor {
            shape: self.meta.shape().to_vec(),
            values: self.meta.dtype().decode(&self.data),
        }
    }
}

/// Accumulates a chunk stream into a [`TensorValue`] while it is relayed
/// elsewhere (the gateway tees encoder output into the cache this way).
#[derive(Debug, Clone)]
pub struct TensorValueBuilder {
    assembler: TensorAssembler,
    data: BytesMut,
}

impl TensorValueBuilder {
    pub fn new(limits: TensorLimits) -> Self {
        TensorValueBuilder {
            assembler: TensorAssembler::new(limits),
            data: BytesMut::new(),
        }
    }

    pub fn push(&mut self, chunk: &TensorChunk) -> Result<ChunkRows, TensorError> {
        let at = self.assembler.verify(chunk)?;
        if let (0, Some(meta)) = (at.seq, self.assembler.meta()) {
            // The header passed the limits, so this size is bounded.
            self.data.reserve(meta.total_bytes() as usize);
        }
        self.data.extend_from_slice(&chunk.data);
        Ok(at)
    }

    pub fn finish(self) -> Result<TensorValue, TensorError> {
        let meta = self.assembler.finish()?;
        Ok(TensorValue {
            meta,
            data: self.data.freeze(),
        })
    }
}
