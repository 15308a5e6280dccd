use thiserror::Error;

/// Everything that can be wrong with a tensor stream or a stored tensor value.
///
/// Variants split into two classes: the peer sent something malformed
/// ([`TensorError::is_limit`] is false, maps to `INVALID_ARGUMENT`), or the
/// tensor is well-formed but larger than this receiver accepts (maps to
/// `RESOURCE_EXHAUSTED`, so a caller knows a retry elsewhere will not help
/// unless limits differ).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum TensorError {
    #[error("tensor stream is empty: no chunk with a header arrived")]
    Empty,
    #[error("chunk seq {seq} carries no header, but the first chunk of a tensor must")]
    MissingHeader { seq: u64 },
    #[error("chunk seq {seq} carries a header; only the first chunk (seq 0) may")]
    UnexpectedHeader { seq: u64 },
    #[error("chunk out of order: expected seq {expected}, got {got}")]
    OutOfOrder { expected: u64, got: u64 },
    #[error("chunk seq {seq} checksum mismatch: header says crc32c {expected:#010x}, data has {actual:#010x}")]
    ChecksumMismatch {
        seq: u64,
        expected: u32,
        actual: u32,
    },
    #[error("tensor dtype is DTYPE_UNSPECIFIED; the sender must name f32, f16 or bf16")]
    UnspecifiedDType,
    #[error("unknown tensor dtype value {0}")]
    UnknownDType(i32),
    #[error("unknown wire dtype {0:?}; expected f32, f16 or bf16")]
    UnknownDTypeName(String),
    #[error("tensor shape is empty; a tensor needs at least one dimension")]
    EmptyShape,
    #[error("tensor shape {shape:?} has {expected} elements but {actual} values were given")]
    ShapeMismatch {
        shape: Vec<u64>,
        expected: u64,
        actual: u64,
    },
    #[error("header total_bytes {claimed} does not match shape {shape:?} in {dtype}, which is {expected} bytes")]
    TotalBytesMismatch {
        shape: Vec<u64>,
        dtype: &'static str,
        claimed: u64,
        expected: u64,
    },
    #[error("chunk seq {seq} is empty; every chunk must carry at least one row")]
    EmptyChunk { seq: u64 },
    #[error(
        "chunk seq {seq} has {len} bytes, which is not a whole number of {row_bytes}-byte rows"
    )]
    PartialRow { seq: u64, len: u64, row_bytes: u64 },
    #[error("chunk seq {seq} brings the tensor to {received} bytes, beyond the {total} bytes the header announced")]
    TooManyBytes { seq: u64, received: u64, total: u64 },
    #[error("tensor stream ended after {received} of {total} bytes")]
    Incomplete { received: u64, total: u64 },
    #[error("{rows} rows of {row_len} values do not fit the {remaining} rows left in the tensor")]
    TooManyRows {
        rows: u64,
        row_len: u64,
        remaining: u64,
    },
    #[error("{len} values are not a whole number of {row_len}-value rows")]
    PartialRowValues { len: u64, row_len: u64 },
    #[error("stored tensor value is corrupt: {0}")]
    CorruptValue(String),

    #[error("tensor rank {rank} exceeds the limit of {max} dimensions")]
    RankTooLarge { rank: usize, max: usize },
    #[error("tensor shape {shape:?} overflows a 64-bit byte count")]
    ShapeOverflow { shape: Vec<u64> },
    #[error("tensor of {total_bytes} bytes exceeds the limit of {max} bytes")]
    TensorTooLarge { total_bytes: u64, max: u64 },
    #[error("chunk seq {seq} has {len} bytes, exceeding the per-chunk limit of {max} bytes")]
    ChunkTooLarge { seq: u64, len: u64, max: u64 },
}

impl TensorError {
    /// True when the data was well-formed but exceeded a configured limit.
    pub fn is_limit(&self) -> bool {
        matches!(
            self,
            TensorError::RankTooLarge { .. }
                | TensorError::ShapeOverflow { .. }
                | TensorError::TensorTooLarge { .. }
                | TensorError::ChunkTooLarge { .. }
        )
    }

    /// The gRPC code this error should be reported with.
    pub fn code(&self) -> tonic::Code {
        if self.is_limit() {
            tonic::Code::ResourceExhausted
        } else {
            tonic::Code::InvalidArgument
        }
    }
}

impl From<TensorError> for tonic::Status {
    fn from(e: TensorError) -> Self {
        tonic::Status::new(e.code(), e.to_string())
    }
}
