use bytes::Bytes;
use vlm_proto::{TensorChunk, TensorHeader};

use crate::{TensorError, TensorMeta, WireDType};

fn make_chunk(seq: u64, data: Bytes, crc32c: u32, header: Option<TensorHeader>) -> TensorChunk {
    TensorChunk {
        seq,
        data,
        crc32c,
        header,
    }
}

/// Splits a row-major f32 tensor into row-aligned [`TensorChunk`]s, converting
/// to the wire dtype one chunk at a time (never the whole tensor at once).
///
/// `D` may be borrowed (`&[f32]`) or owned (`Vec<f32>`, `Arc<[f32]>`); an owned
/// chunker is `'static` and can back a response stream directly.
///
/// A tensor with no elements is sent as a single empty chunk, because the
/// header still has to reach the receiver.
#[derive(Debug, Clone)]
pub struct TensorChunker<D> {
    data: D,
    meta: TensorMeta,
    rows_per_chunk: usize,
    next_row: usize,
    seq: u64,
    done: bool,
}

impl<D: AsRef<[f32]>> TensorChunker<D> {
    /// `max_chunk_bytes` bounds each chunk's data (0 = [`crate::DEFAULT_CHUNK_BYTES`]);
    /// a row larger than that still goes out, alone in its chunk.
    pub fn new(
        data: D,
        shape: &[usize],
        dtype: WireDType,
        max_chunk_bytes: usize,
    ) -> Result<Self, TensorError> {
        let meta = TensorMeta::new(dtype, shape)?;
        let actual = data.as_ref().len();
        if actual != meta.num_elements() {
            return Err(TensorError::ShapeMismatch {
                shape: shape.iter().map(|&d| d as u64).collect(),
                expected: meta.num_elements() as u64,
                actual: actual as u64,
            });
        }
        let rows_per_chunk = meta.rows_per_chunk(max_chunk_bytes);
        Ok(TensorChunker {
            data,
            meta,
            rows_per_chunk,
            next_row: 0,
            seq: 0,
            done: false,
        })
    }

    pub fn meta(&self) -> &TensorMeta {
        &self.meta
    }

    pub fn rows_per_chunk(&self) -> usize {
        self.rows_per_chunk
    }

    /// The header that the first chunk carries.
    pub fn header(&self) -> TensorHeader {
        self.meta
            .to_header(self.meta.chunk_rows_hint(self.rows_per_chunk))
    }

    /// Number of chunks this chunker yields in total.
    pub fn num_chunks(&self) -> usize {
        if self.meta.total_bytes() == 0 {
            1
        } else {
            self.meta.rows().div_ceil(self.rows_per_chunk)
        }
    }
}

impl<D: AsRef<[f32]>> Iterator for TensorChunker<D> {
    type Item = TensorChunk;

    fn next(&mut self) -> Option<TensorChunk> {
        if self.done {
            return None;
        }
        let header = (self.seq == 0).then(|| self.header());
        let end = self
            .next_row
            .saturating_add(self.rows_per_chunk)
            .min(self.meta.rows());
        let data = if self.meta.total_bytes() == 0 {
            Bytes::new()
        } else {
            let row_len = self.meta.row_len();
            let values = &self.data.as_ref()[self.next_row * row_len..end * row_len];
            Bytes::from(self.meta.dtype().encode(values))
        };
        let chunk = make_chunk(self.seq, data.clone(), crc32c::crc32c(&data), header);
        self.seq += 1;
        self.next_row = end;
        self.done = self.meta.total_bytes() == 0 || self.next_row >= self.meta.rows();
        Some(chunk)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = if self.done {
            0
        } else {
            self.num_chunks() - self.seq as usize
        };
        (left, Some(left))
    }
}

impl<D: AsRef<[f32]>> ExactSizeIterator for TensorChunker<D> {}

/// Splits already-encoded tensor bytes into row-aligned chunks without copying
/// (each chunk's data is a slice of the same buffer). Used to replay a cached
/// tensor value.
#[derive(Debug, Clone)]
pub struct EncodedChunker {
    data: Bytes,
    meta: TensorMeta,
    rows_per_chunk: usize,
    offset: usize,
    seq: u64,
    done: bool,
}

impl EncodedChunker {
    /// `data` must be exactly `meta.total_bytes()` long.
    pub fn new(data: Bytes, meta: TensorMeta, max_chunk_bytes: usize) -> Result<Self, TensorError> {
        if data.len() as u64 != meta.total_bytes() {
            return Err(TensorError::Incomplete {
                received: data.len() as u64,
                total: meta.total_bytes(),
            });
        }
        Ok(Self::new_unchecked(data, meta, max_chunk_bytes))
    }

    pub(crate) fn new_unchecked(data: Bytes, meta: TensorMeta, max_chunk_bytes: usize) -> Self {
        let rows_per_chunk = meta.rows_per_chunk(max_chunk_bytes);
        EncodedChunker {
            data,
            meta,
            rows_per_chunk,
            offset: 0,
            seq: 0,
            done: false,
        }
    }

    pub fn header(&self) -> TensorHeader {
        self.meta
            .to_header(self.meta.chunk_rows_hint(self.rows_per_chunk))
    }
}

impl Iterator for EncodedChunker {
    type Item = TensorChunk;

    fn next(&mut self) -> Option<TensorChunk> {
        if self.done {
            return None;
        }
        let header = (self.seq == 0).then(|| self.header());
        let step = self.rows_per_chunk.saturating_mul(self.meta.row_bytes());
        let end = self.offset.saturating_add(step).min(self.data.len());
        let data = self.data.slice(self.offset..end);
        let chunk = make_chunk(self.seq, data.clone(), crc32c::crc32c(&data), header);
        self.seq += 1;
        self.offset = end;
        self.done = self.offset >= self.data.len();
        Some(chunk)
    }
}

/// Emits a tensor whose rows are produced incrementally — e.g. a projector
/// that turns each input chunk into output rows before the next one arrives,
/// or a gateway concatenating several images' embeddings into one stream.
#[derive(Debug, Clone)]
pub struct TensorStreamWriter {
    meta: TensorMeta,
    chunk_rows: u32,
    bytes_written: u64,
    seq: u64,
}

impl TensorStreamWriter {
    /// `chunk_rows` is only the header's hint; each write becomes one chunk
    /// of whatever size it has.
    pub fn new(shape: &[usize], dtype: WireDType, chunk_rows: u32) -> Result<Self, TensorError> {
        let meta = TensorMeta::new(dtype, shape)?;
        Ok(TensorStreamWriter {
            meta,
            chunk_rows,
            bytes_written: 0,
            seq: 0,
        })
    }

    pub fn meta(&self) -> &TensorMeta {
        &self.meta
    }

    pub fn rows_written(&self) -> usize {
        match self.meta.row_bytes() {
            0 => 0,
            rb => (self.bytes_written / rb as u64) as usize,
        }
    }

    pub fn rows_remaining(&self) -> usize {
        self.meta.rows() - self.rows_written()
    }

    /// True once every byte of the tensor (and at least the header chunk) went out.
    pub fn is_complete(&self) -> bool {
        self.seq > 0 && self.bytes_written == self.meta.total_bytes()
    }

    /// Converts whole rows of f32 values to the wire dtype and wraps them in
    /// the next chunk. For a tensor with no elements, call it once with an
    /// empty slice to emit the header chunk.
    pub fn write_rows(&mut self, values: &[f32]) -> Result<TensorChunk, TensorError> {
        let row_len = self.meta.row_len();
        if row_len != 0 && values.len() % row_len != 0 {
            return Err(TensorError::PartialRowValues {
                len: values.len() as u64,
                row_len: row_len as u64,
            });
        }
        let len = (values.len() * self.meta.dtype().size_bytes()) as u64;
        self.check_room(len, values.len() / row_len.max(1))?;
        let data = Bytes::from(self.meta.dtype().encode(values));
        let crc = crc32c::crc32c(&data);
        Ok(self.emit(data, crc))
    }

    /// Wraps rows that are already in the wire dtype — typically the data of
    /// a verified incoming chunk, whose checksum is reused so relaying costs
    /// no conversion and no CRC pass. `data` must be in this writer's dtype.
    pub fn write_encoded(&mut self, data: Bytes, crc32c: u32) -> Result<TensorChunk, TensorError> {
        let row_bytes = self.meta.row_bytes();
        if row_bytes != 0 && data.len() % row_bytes != 0 {
            return Err(TensorError::PartialRow {
                seq: self.seq,
                len: data.len() as u64,
                row_bytes: row_bytes as u64,
            });
        }
        self.check_room(data.len() as u64, data.len() / row_bytes.max(1))?;
        Ok(self.emit(data, crc32c))
    }

    /// Fails if rows are still missing; call after the last write.
    pub fn finish(&self) -> Result<(), TensorError> {
        if self.is_complete() {
            Ok(())
        } else {
            Err(TensorError::Incomplete {
                received: self.bytes_written,
                total: self.meta.total_bytes(),
            })
        }
    }

    fn check_room(&self, len: u64, rows: usize) -> Result<(), TensorError> {
        let total = self.meta.total_bytes();
        let after_end = self.is_complete() && (len > 0 || total == 0);
        if after_end || self.bytes_written + len > total {
            return Err(TensorError::TooManyRows {
                rows: rows as u64,
                row_len: self.meta.row_len() as u64,
                remaining: self.rows_remaining() as u64,
            });
        }
        if len == 0 && total != 0 {
            return Err(TensorError::EmptyChunk { seq: self.seq });
        }
        Ok(())
    }

    fn emit(&mut self, data: Bytes, crc32c: u32) -> TensorChunk {
        let header = (self.seq == 0).then(|| self.meta.to_header(self.chunk_rows));
        self.bytes_written += data.len() as u64;
        let chunk = make_chunk(self.seq, data, crc32c, header);
        self.seq += 1;
        chunk
    }
}
