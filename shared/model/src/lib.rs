//! vlm-model: the numerical core of vlm-mesh.
//!
//! A LLaVA-style pipeline (CLIP ViT → MLP projector → LLaMA decoder) loaded from Hugging Face llava-hf
//! checkpoints and cut at the seams where the services sit: [`VisionEncoder`], [`Projector`] and
//! [`Decoder`] each load only their own tensors, so the encoder, projector and decoder services can run
//! on different machines. [`Pipeline`] composes them in one process (the reference the mesh must equal).
//!
//! Nothing here knows about networking.

pub mod anyres;
#[doc(hidden)]
pub mod bench;
pub mod cancel;
pub mod chat_template;
pub mod checkpoint;
pub mod config;
pub mod constraint;
pub mod decoder;
pub mod engine;
pub mod error;
pub mod generate;
pub mod glm4v;
pub mod grid_sample;
mod kernels;
pub mod kv;
mod linear;
pub mod monitor;
pub mod mrope;
mod norm;
pub mod pipeline;
pub mod preprocess;
pub mod projector;
pub mod prompt;
pub mod quant;
mod qweight;
pub mod region;
pub mod resize;
pub mod sampling;
pub mod smart_resize;
pub mod views;
pub mod vision;

/// `tracing` target of progress lines (weights loaded, long prefills): `vlm-mesh` shows them by
/// default on a terminal, as llama.cpp does, while other info-level logs stay quiet.
pub const PROGRESS_TARGET: &str = "vlm_progress";

pub use anyres::{ImageLayout, TileGrid};
pub use cancel::{Cancel, CancelOnDrop};
pub use candle_core::{DType, Device, Tensor};
pub use chat_template::ChatTemplateSource;
pub use checkpoint::{Checkpoint, CheckpointPart};
pub use config::{
    Activation, Glm4vConfig, ImageProcessorConfig, LlavaConfig, SelectStrategy, TextConfig,
    VisionConfig,
};
pub use constraint::{Grammars, OutputFormat};
pub use decoder::{BatchSeq, Decoder, KvCache};
pub use engine::{Admission, Engine, EngineConfig, EngineUsage, SeqId, SeqRequest, StepEvent};
pub use error::{ModelError, Result};
pub use generate::{Completion, FinishReason, Generation, TokenEvent};
pub use kv::{KvShape, PosKey};
pub use monitor::LayerStats;
pub use mrope::RopePositions;
pub use pipeline::{GenerateOutput, ImageInput, Pipeline, StageTimings};
pub use preprocess::{ImageLimits, Preprocessor, DEFAULT_MAX_ASPECT_RATIO};
pub use projector::Projector;
pub use prompt::{PreparedPrompt, PromptBuilder, TextStreamer};
pub use quant::{QuantPlan, Quantization};
pub use region::Region;
pub use sampling::{Sampler, SamplingParams};
pub use views::ImageViews;
pub use vision::VisionEncoder;

/// Parses `f32`, `f16` or `bf16` into a candle dtype (the `--dtype` flag).
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s.to_ascii_lowercase().as_str() {
        "f32" | "float32" => Ok(DType::F32),
        "f16" | "float16" | "half" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        other => Err(ModelError::Unsupported(format!(
            "dtype '{other}' (supported: f32, f16, bf16)"
        ))),
    }
}
