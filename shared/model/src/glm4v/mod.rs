//! GLM-4.1V (transformers' `Glm4vForConditionalGeneration`, the architecture of AutoGLM-Phone-9B),
//! cut at the same seams as LLaVA:
//! - the **encoder** runs [`vision::Glm4vVision`]: patch embedding, RMSNorm, the position table
//!   resampled bicubically to the image's own patch grid, 2-D rotary attention blocks, RMSNorm and
//!   the 2×2 downsample, giving one row per merged 2×2 window of patches;
//! - the **projector** runs [`merger::Glm4vMerger`] (Linear → LayerNorm → GELU → SwiGLU), row by row;
//! - the **decoder** runs the GLM-4 text model with 3-D rotary positions ([`crate::mrope`]), which
//!   it builds from each image's token grid.
//!
//! Images keep their own resolution ([`crate::smart_resize`]), so an image's token count and grid
//! travel with it ([`crate::ImageLayout::tokens`]).

pub mod merger;
pub mod vision;

pub use merger::Glm4vMerger;
pub use vision::Glm4vVision;
