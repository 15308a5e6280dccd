//! The whole model in one process: the reference the mesh must reproduce token for token.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::checkpoint::Checkpoint;
use crate::config::{ImageProcessorConfig, LlavaConfig};
use crate::decoder::Decoder;
use crate::error::Result;
use crate::generate::{FinishReason, Generation, TokenEvent};
use crate::preprocess::{ImageLimits, Preprocessor};
use crate::projector::Projector;
use crate::prompt::PromptBuilder;
use crate::quant::Quantization;
use crate::sampling::SamplingParams;
use crate::vision::VisionEncoder;

/// Milliseconds spent per stage.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StageTimings {
    pub preprocess_ms: f64,
    pub encode_ms: f64,
    pub project_ms: f64,
    pub prefill_ms: f64,
    pub decode_ms: f64,
}

/// Prompts at least this long get progress lines around their prefill.
const LONG_PREFILL: usize = 256;

#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOutput {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub prompt_tokens: usize,
    pub finish_reason: FinishReason,
    pub timings: StageTimings,
}

pub struct Pipeline {
    pub config: LlavaConfig,
    pub preprocessor: Preprocessor,
    pub vision: VisionEncoder,
    pub projector: Projector,
    pub decoder: Decoder,
    pub prompt: PromptBuilder,
    device: Device,
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

impl Pipeline {
    pub fn load(
        dir: impl AsRef<Path>,
        dtype: DType,
        device: &Device,
        limits: ImageLimits,
    ) -> Result<Self> {
        Self::load_quantized(dir, dtype, device, limits, Quantization::None)
    }

    /// [`Self::load`] with every stage's weights quantized to `quant`.
    pub fn load_quantized(
        dir: impl AsRef<Path>,
        dtype: DType,
        device: &Device,
        limits: ImageLimits,
        quant: Quantization,
    ) -> Result<Self> {
        let dir = dir.as_ref();
        let ckpt = Checkpoint::open(dir)?;
        let config = ckpt.config().clone();
        let preprocessor =
            Preprocessor::new(ImageProcessorConfig::from_dir(dir, &config.vision)?, limits)?;
        let prompt = PromptBuilder::from_dir(dir, &config)?;
        Ok(Pipeline {
            vision: VisionEncoder::load_quantized(&ckpt, dtype, device, quant)?,
            projector: Projector::load_quantized(&ckpt, dtype, device, quant)?,
            decoder: Decoder::load_quantized(&ckpt, dtype, device, quant)?,
            config,
            preprocessor,
            prompt,
            device: device.clone(),
        })
    }

    /// Runs images + prompt through every stage; `on_token` sees each token as it is produced.
    pub fn generate(
        &self,
        images: &[&[u8]],
        prompt: &str,
        params: &SamplingParams,
        mut on_token: impl FnMut(&TokenEvent),
    ) -> Result<GenerateOutput> {
        params.validate()?;
        let rows = vec![self.vision.num_features(); images.len()];
        let prepared = self.prompt.prepare(prompt, &rows)?;
        let mut timings = StageTimings::default();

        let t = Instant::now();
        let pixels = images
            .iter()
            .map(|b| self.preprocessor.preprocess(b, &self.device))
            .collect::<Result<Vec<_>>>()?;
        timings.preprocess_ms = ms(t);

        let mut projected = Vec::with_capacity(pixels.len());
        for pv in &pixels {
            let t = Instant::now();
            let feats = self.vision.forward(pv)?.squeeze(0)?;
            timings.encode_ms += ms(t);
            let t = Instant::now();
            projected.push(self.projector.forward(&feats)?);
            timings.project_ms += ms(t);
        }

        let t = Instant::now();
        let embeds: Tensor = prepared.embeddings(&self.decoder, &projected)?;
        let positions = prepared.ids.len();
        let long = positions >= LONG_PREFILL;
        if long {
            tracing::info!(target: crate::PROGRESS_TARGET, "prefilling {positions} positions…");
        }
        let mut gen = Generation::start(&self.decoder, &self.prompt, &embeds, params, &[])?;
        timings.prefill_ms = ms(t);
        if long {
            tracing::info!(
                target: crate::PROGRESS_TARGET,
                "prefilled {positions} positions in {:.1} s",
                timings.prefill_ms / 1000.0
            );
        }

        let t = Instant::now();
        let mut text = String::new();
        while let Some(ev) = gen.next_token()? {
            text.push_str(&ev.text);
            on_token(&ev);
        }
        timings.decode_ms = ms(t);
        Ok(GenerateOutput {
            text,
            token_ids: gen.token_ids().to_vec(),
            prompt_tokens: prepared.ids.len(),
            finish_reason: gen.finish_reason().unwrap_or(FinishReason::Length),
            timings,
        })
    }
}
