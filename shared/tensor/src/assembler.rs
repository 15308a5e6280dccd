use std::borrow::Borrow;

use vlm_proto::TensorChunk;

use crate::{TensorError, TensorLimits, TensorMeta};

/// Where a verified chunk's rows sit in the tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRows {
    pub seq: u64,
    /// Index of the chunk's first row in the whole tensor.
    pub first_row: usize,
    /// Rows in this chunk.
    pub rows: usize,
}

/// Rows of one chunk, decoded to f32.
#[derive(Debug, Clone, PartialEq)]
pub struct RowsBlock {
    pub seq: u64,
    pub first_row: usize,
    pub rows: usize,
    pub row_len: usize,
    /// `rows * row_len` values, row-major.
    pub values: Vec<f32>,
}

/// Verifies a chunk stream as it arrives and hands out each chunk's rows, so
/// a receiver can start work on the first rows while later ones are in flight.
///
/// Checks, per chunk: header on seq 0 only (validated against
/// [`TensorLimits`] before anything is allocated), seq strictly consecutive,
/// chunk size limit, whole rows only, never more bytes than announced, and the
/// crc32c. A failed check leaves the state untouched; callers abort the stream
/// on the first error anyway. [`TensorAssembler::finish`] then checks that no
/// bytes are missing.
#[derive(Debug, Clone)]
pub struct TensorAssembler {
    limits: TensorLimits,
    meta: Option<TensorMeta>,
    next_seq: u64,
    received: u64,
}

impl TensorAssembler {
    pub fn new(limits: TensorLimits) -> Self {
        TensorAssembler {
            limits,
            meta: None,
            next_seq: 0,
            received: 0,
        }
    }

    /// The tensor's description, once the header chunk has been accepted.
    pub fn meta(&self) -> Option<&TensorMeta> {
        self.meta.as_ref()
    }

    pub fn bytes_received(&self) -> u64 {
        self.received
    }

    /// Chunks accepted so far.
    pub fn chunks_received(&self) -> u64 {
        self.next_seq
    }

    /// True once every announced byte has arrived.
    pub fn is_complete(&self) -> bool {
        self.meta
            .as_ref()
            .is_some_and(|m| self.received == m.total_bytes())
    }

    /// Checks `chunk` and accounts for it without decoding its data (for a
    /// relay that forwards bytes as they are).
    pub fn verify(&mut self, chunk: &TensorChunk) -> Result<ChunkRows, TensorError> {
        let seq = chunk.seq;
        let new_meta = match &self.meta {
            None => {
                if seq != 0 {
                    return Err(TensorError::OutOfOrder {
                        expected: 0,
                        got: seq,
                    });
                }
                let header = chunk
                    .header
                    .as_ref()
                    .ok_or(TensorError::MissingHeader { seq })?;
                Some(TensorMeta::from_header(header, &self.limits)?)
            }
            Some(meta) => {
                if self.received == meta.total_bytes() {
                    return Err(TensorError::TooManyBytes {
                        seq,
                        received: self.received.saturating_add(chunk.data.len() as u64),
                        total: meta.total_bytes(),
                    });
                }
                if seq != self.next_seq {
                    return Err(TensorError::OutOfOrder {
                        expected: self.next_seq,
                        got: seq,
                    });
                }
                if chunk.header.is_some() {
                    return Err(TensorError::UnexpectedHeader { seq });
                }
                None
            }
        };
        let Some(meta) = new_meta.as_ref().or(self.meta.as_ref()) else {
            return Err(TensorError::MissingHeader { seq });
        };

        let len = chunk.data.len() as u64;
        if len > self.limits.max_chunk_bytes {
            return Err(TensorError::ChunkTooLarge {
                seq,
                len,
                max: self.limits.max_chunk_bytes,
            });
        }
        let total = meta.total_bytes();
        let received = self.received.saturating_add(len);
        if received > total {
            return Err(TensorError::TooManyBytes {
                seq,
                received,
                total,
            });
        }
        if len == 0 && total != 0 {
            return Err(TensorError::EmptyChunk { seq });
        }
        let row_bytes = meta.row_bytes() as u64;
        if row_bytes != 0 && len % row_bytes != 0 {
            return Err(TensorError::PartialRow {
                seq,
                len,
                row_bytes,
            });
        }
        let actual = crc32c::crc32c(&chunk.data);
        if actual != chunk.crc32c {
            return Err(TensorError::ChecksumMismatch {
                seq,
                expected: chunk.crc32c,
                actual,
            });
        }

        let (first_row, rows) = if total == 0 {
            (0, meta.rows())
        } else {
            (
                (self.received / row_bytes) as usize,
                (len / row_bytes) as usize,
            )
        };
        if new_meta.is_some() {
            self.meta = new_meta;
        }
        self.next_seq += 1;
        self.received = received;
        Ok(ChunkRows {
            seq,
            first_row,
            rows,
        })
    }

    /// Checks `chunk` and returns its rows as f32.
    pub fn push(&mut self, chunk: &TensorChunk) -> Result<RowsBlock, TensorError> {
        let at = self.verify(chunk)?;
        // verify() has stored the meta by now.
        let meta = self.meta.as_ref().ok_or(TensorError::Empty)?;
        Ok(RowsBlock {
            seq: at.seq,
            first_row: at.first_row,
            rows: at.rows,
            row_len: meta.row_len(),
            values: meta.dtype().decode(&chunk.data),
        })
    }

    /// Confirms the stream is whole: a header arrived and every announced
    /// byte with it.
    pub fn finish(&self) -> Result<TensorMeta, TensorError> {
        let meta = self.meta.as_ref().ok_or(TensorError::Empty)?;
        if self.received != meta.total_bytes() {
            return Err(TensorError::Incomplete {
                received: self.received,
                total: meta.total_bytes(),
            });
        }
        Ok(meta.clone())
    }
}

/// A whole tensor in host memory, row-major f32.
#[derive(Debug, Clone, PartialEq)]
pub struct F32Tensor {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

impl F32Tensor {
    pub fn new(shape: Vec<usize>, values: Vec<f32>) -> Result<Self, TensorError> {
        let meta = TensorMeta::new(crate::WireDType::F32, &shape)?;
        if meta.num_elements() != values.len() {
            return Err(TensorError::ShapeMismatch {
                shape: shape.iter().map(|&d| d as u64).collect(),
                expected: meta.num_elements() as u64,
                actual: values.len() as u64,
            });
        }
        Ok(F32Tensor { shape, values })
    }

    /// Values per row (the last dimension).
    pub fn row_len(&self) -> usize {
        self.shape.last().copied().unwrap_or(0)
    }

    pub fn rows(&self) -> usize {
        self.shape
            .split_last()
            .map_or(0, |(_, lead)| lead.iter().product())
    }
}

/// Reassembles a whole tensor from chunks pushed one at a time.
#[derive(Debug, Clone)]
pub struct TensorCollector {
    assembler: TensorAssembler,
    values: Vec<f32>,
}

impl TensorCollector {
    pub fn new(limits: TensorLimits) -> Self {
        TensorCollector {
            assembler: TensorAssembler::new(limits),
            values: Vec::new(),
        }
    }

    pub fn push(&mut self, chunk: &TensorChunk) -> Result<ChunkRows, TensorError> {
        let at = self.assembler.verify(chunk)?;
        if let (0, Some(meta)) = (at.seq, self.assembler.meta()) {
            // Safe to size up front: the header already passed the limits.
            self.values.reserve_exact(meta.num_elements());
        }
        if let Some(meta) = self.assembler.meta() {
            meta.dtype().decode_into(&chunk.data, &mut self.values);
        }
        Ok(at)
    }

    pub fn meta(&self) -> Option<&TensorMeta> {
        self.assembler.meta()
    }

    /// True once every announced byte has arrived (a receiver of several tensors on one stream
    /// uses it to know where the next tensor starts).
    pub fn is_complete(&self) -> bool {
        self.assembler.is_complete()
    }

    pub fn finish(self) -> Result<F32Tensor, TensorError> {
        let meta = self.assembler.finish()?;
        Ok(F32Tensor {
            shape: meta.shape().to_vec(),
            values: self.values,
        })
    }
}

/// Verifies and reassembles a complete chunk sequence.
pub fn collect_chunks<I>(chunks: I, limits: &TensorLimits) -> Result<F32Tensor, TensorError>
where
    I: IntoIterator,
    I::Item: Borrow<TensorChunk>,
{
    let mut collector = TensorCollector::new(*limits);
    for chunk in chunks {
        collector.push(chunk.borrow())?;
    }
    collector.finish()
}

/// Verifies and reassembles a chunk stream such as a `tonic::Streaming<TensorChunk>`.
/// Stream errors pass through unchanged; tensor errors become INVALID_ARGUMENT
/// or RESOURCE_EXHAUSTED.
pub async fn collect_stream<S>(stream: S, limits: &TensorLimits) -> Result<F32Tensor, tonic::Status>
where
    S: futures::Stream<Item = Result<TensorChunk, tonic::Status>>,
{
    let mut stream = std::pin::pin!(stream);
    let mut collector = TensorCollector::new(*limits);
    while let Some(chunk) = std::future::poll_fn(|cx| stream.as_mut().poll_next(cx)).await {
        collector.push(&chunk?)?;
    }
    Ok(collector.finish()?)
}
