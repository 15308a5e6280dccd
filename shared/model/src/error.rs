//! One error type for the model core. Services map the input variants to INVALID_ARGUMENT /
//! RESOURCE_EXHAUSTED and everything else to INTERNAL, so the variants separate "the caller sent
//! something wrong" from "we are broken".

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The image bytes are empty, truncated, corrupt or in an unsupported format.
    #[error("invalid image: {0}")]
    InvalidImage(String),
    /// The image header declares more pixels than the configured limit (checked before decoding).
    #[error(
        "image too large: {width}x{height} ({pixels} pixels) exceeds the limit of {limit} pixels"
    )]
    ImageTooLarge {
        width: u32,
        height: u32,
        pixels: u64,
        limit: u64,
    },
    /// The image is too narrow for its length (checked on the header, before decoding).
    #[error(
        "image aspect ratio too extreme: {width}x{height} exceeds the limit of {limit}:1 (long side : short side)"
    )]
    ImageAspect { width: u32, height: u32, limit: u32 },
    /// Memory for an intermediate buffer could not be allocated (the process stays up).
    #[error("out of memory: cannot allocate {bytes} bytes for {what}")]
    OutOfMemory { what: &'static str, bytes: u64 },
    /// The caller went away; the work was abandoned at the next checkpoint.
    #[error("cancelled: the caller went away")]
    Cancelled,
    /// The prompt is empty or does not fit the images given with it.
    #[error("invalid prompt: {0}")]
    InvalidPrompt(String),
    /// Sampling parameters out of range (max tokens, temperature, top-p…).
    #[error("invalid parameters: {0}")]
    InvalidParams(String),
    /// A tensor handed to a stage has the wrong shape or size.
    #[error("invalid input tensor: {0}")]
    InvalidInput(String),
    /// The checkpoint directory is missing files, tensors or config keys.
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: String, msg: String },
    /// The checkpoint asks for something this build does not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// An output format (JSON schema, regex, grammar) that cannot be compiled or followed; the
    /// message starts with the request field that carries it.
    #[error("invalid format: {0}")]
    InvalidFormat(String),
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    /// True when the error is the caller's fault (bad image, prompt, parameters or tensor).
    pub fn is_invalid_input(&self) -> bool {
        matches!(
            self,
            ModelError::InvalidImage(_)
                | ModelError::ImageAspect { .. }
                | ModelError::InvalidPrompt(_)
                | ModelError::InvalidParams(_)
                | ModelError::InvalidInput(_)
                | ModelError::InvalidFormat(_)
        )
    }

    /// True when the input is well-formed but exceeds a configured size limit, or needs more
    /// memory than the process can get.
    pub fn is_too_large(&self) -> bool {
        matches!(
            self,
            ModelError::ImageTooLarge { .. } | ModelError::OutOfMemory { .. }
        )
    }

    pub(crate) fn checkpoint(path: impl AsRef<std::path::Path>, msg: impl Into<String>) -> Self {
        ModelError::Checkpoint {
            path: path.as_ref().display().to_string(),
            msg: msg.into(),
        }
    }
}
