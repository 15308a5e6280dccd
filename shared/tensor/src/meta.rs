use vlm_proto::TensorHeader;

use crate::{TensorError, WireDType};

/// Default upper bound on one chunk's data: small enough that a receiver sees
/// rows early and gRPC's default 4 MiB message limit is never near, large
/// enough that per-message overhead is negligible.
pub const DEFAULT_CHUNK_BYTES: usize = 256 * 1024;

/// What a receiver is willing to accept. Checked against the header before
/// anything is allocated, and against each chunk before its checksum is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorLimits {
    /// Largest accepted `total_bytes` (wire bytes; a decoded f16/bf16 tensor
    /// occupies twice this as f32).
    pub max_total_bytes: u64,
    /// Largest accepted `data` of a single chunk.
    pub max_chunk_bytes: u64,
    /// Largest accepted number of dimensions.
    pub max_rank: usize,
}

impl Default for TensorLimits {
    /// 256 MiB total (an order of magnitude above multi-crop LLaVA-NeXT
    /// features), 4 MiB per chunk (gRPC's default message limit), rank 8.
    fn default() -> Self {
        TensorLimits {
            max_total_bytes: 256 * 1024 * 1024,
            max_chunk_bytes: 4 * 1024 * 1024,
            max_rank: 8,
        }
    }
}

/// A validated tensor description: dtype known, sizes consistent and free of
/// overflow. Rows are slices of the last dimension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorMeta {
    dtype: WireDType,
    shape: Vec<usize>,
    rows: usize,
    row_len: usize,
    total_bytes: u64,
    /// The image layout the header carries, if any: it travels with the tensor through streams
    /// and cache values.
    layout: Option<vlm_proto::ImageLayout>,
}

impl TensorMeta {
    /// Describes a tensor of `shape` in `dtype`, without size limits (for senders).
    pub fn new(dtype: WireDType, shape: &[usize]) -> Result<Self, TensorError> {
        let shape64: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
        Self::build(dtype, &shape64, None)
    }

    /// Validates a received header against `limits`. Only arithmetic happens
    /// here, so a header announcing an absurd size costs nothing.
    pub fn from_header(header: &TensorHeader, limits: &TensorLimits) -> Result<Self, TensorError> {
        let dtype = WireDType::from_proto(header.dtype)?;
        let meta = Self::build(dtype, &header.shape, Some(limits))?;
        if header.total_bytes != meta.total_bytes {
            return Err(TensorError::TotalBytesMismatch {
                shape: header.shape.clone(),
                dtype: dtype.name(),
                claimed: header.total_bytes,
                expected: meta.total_bytes,
            });
        }
        Ok(meta.with_layout(header.layout))
    }

    fn build(
        dtype: WireDType,
        shape: &[u64],
        limits: Option<&TensorLimits>,
    ) -> Result<Self, TensorError> {
        if let Some(l) = limits {
            if shape.len() > l.max_rank {
                return Err(TensorError::RankTooLarge {
                    rank: shape.len(),
                    max: l.max_rank,
                });
            }
        }
        let (&row_len, leading) = shape.split_last().ok_or(TensorError::EmptyShape)?;
        let overflow = || TensorError::ShapeOverflow {
            shape: shape.to_vec(),
        };
        // Every product is checked on its own: with a zero dimension the total
        // is 0 even when the other dimensions would overflow, and such a shape
        // must still not yield a bogus row count.
        let rows = leading
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(overflow)?;
        let total_bytes = rows
            .checked_mul(row_len)
            .and_then(|n| n.checked_mul(dtype.size_bytes() as u64))
            .ok_or_else(overflow)?;
        if let Some(l) = limits {
            if total_bytes > l.max_total_bytes {
                return Err(TensorError::TensorTooLarge {
                    total_bytes,
                    max: l.max_total_bytes,
                });
            }
        }
        let to_usize = |v: u64| usize::try_from(v).map_err(|_| overflow());
        let shape_usize = shape
            .iter()
            .map(|&d| to_usize(d))
            .collect::<Result<Vec<_>, _>>()?;
        to_usize(total_bytes)?;
        Ok(TensorMeta {
            dtype,
            shape: shape_usize,
            rows: to_usize(rows)?,
            row_len: to_usize(row_len)?,
            total_bytes,
            layout: None,
        })
    }

    /// The same tensor described with `layout` (`None`: no image layout).
    pub fn with_layout(mut self, layout: Option<vlm_proto::ImageLayout>) -> Self {
        self.layout = layout;
        self
    }

    /// The image layout the tensor carries, if any.
    pub fn layout(&self) -> Option<vlm_proto::ImageLayout> {
        self.layout
    }

    pub fn dtype(&self) -> WireDType {
        self.dtype
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of rows: the product of all dimensions but the last.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Values per row: the last dimension.
    pub fn row_len(&self) -> usize {
        self.row_len
    }

    /// Wire bytes per row.
    pub fn row_bytes(&self) -> usize {
        self.row_len * self.dtype.size_bytes()
    }

    pub fn num_elements(&self) -> usize {
        self.rows * self.row_len
    }

    /// Wire bytes of the whole tensor.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// The proto header announcing this tensor.
    pub fn to_header(&self, chunk_rows: u32) -> TensorHeader {
        TensorHeader {
            layout: self.layout(),
            dtype: self.dtype.to_proto() as i32,
            shape: self.shape.iter().map(|&d| d as u64).collect(),
            total_bytes: self.total_bytes,
            chunk_rows,
        }
    }

    /// Rows per chunk so that a chunk stays within `max_chunk_bytes` (0 means
    /// [`DEFAULT_CHUNK_BYTES`]) — but never fewer than one row, since rows are
    /// the unit receivers process.
    pub fn rows_per_chunk(&self, max_chunk_bytes: usize) -> usize {
        let budget = if max_chunk_bytes == 0 {
            DEFAULT_CHUNK_BYTES
        } else {
            max_chunk_bytes
        };
        match self.row_bytes() {
            0 => self.rows.max(1),
            rb => (budget / rb).max(1),
        }
    }

    /// The `chunk_rows` hint for the header.
    pub(crate) fn chunk_rows_hint(&self, rows_per_chunk: usize) -> u32 {
        u32::try_from(rows_per_chunk.min(self.rows)).unwrap_or(u32::MAX)
    }
}
