//! The whole model in one process: the reference the mesh must reproduce token for token.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::checkpoint::Checkpoint;
use crate::config::{ImageProcessorConfig, LlavaConfig};
use crate::decoder::Decoder;
use crate::error::{ModelError, Result};
use crate::generate::{FinishReason, Generation, TokenEvent};
use crate::mrope::RopePositions;
use crate::preprocess::{ImageLimits, Preprocessor};
use crate::projector::Projector;
use crate::prompt::{PreparedPrompt, PromptBuilder};
use crate::quant::Quantization;
use crate::region::Region;
use crate::sampling::SamplingParams;
use crate::views::ImageViews;
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

/// One image of a request, and the regions of it to look at closer.
#[derive(Debug, Clone, Copy)]
pub struct ImageInput<'a> {
    pub bytes: &'a [u8],
    pub regions: &'a [Region],
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
            Preprocessor::new(ImageProcessorConfig::for_model(dir, &config)?, limits)?;
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
        on_token: impl FnMut(&TokenEvent),
    ) -> Result<GenerateOutput> {
        let inputs: Vec<ImageInput> = images
            .iter()
            .map(|b| ImageInput {
                bytes: b,
                regions: &[],
            })
            .collect();
        self.generate_inputs(&inputs, prompt, params, on_token)
    }

    /// The views of one image (or of a region of it), ready for [`Self::embed_views`].
    pub fn image_views(&self, bytes: &[u8], region: Option<Region>) -> Result<ImageViews> {
        self.preprocessor.image_views(bytes, region)
    }

    /// Encodes, projects and packs one image's views into its prompt rows `[rows, hidden]`.
    pub fn embed_views(&self, views: &ImageViews, timings: &mut StageTimings) -> Result<Tensor> {
        let t = Instant::now();
        let pv = self.preprocessor.pixel_values(&views.views, &self.device)?;
        timings.preprocess_ms += ms(t);
        let t = Instant::now();
        let feats = self.vision.forward(&pv)?;
        timings.encode_ms += ms(t);
        let t = Instant::now();
        let packed = self
            .projector
            .pack(&self.projector.forward(&feats)?, &views.layout)?;
        timings.project_ms += ms(t);
        Ok(packed)
    }

    /// M-RoPE models (GLM-4.1V): the prompt's 3-D positions from each image's (and region's)
    /// token grid; `None` for other models.
    pub fn rope_positions(
        &self,
        prepared: &PreparedPrompt,
        groups: &[Vec<ImageViews>],
    ) -> Result<Option<RopePositions>> {
        if self.decoder.config().mrope_section.is_none() {
            return Ok(None);
        }
        let grids = groups
            .iter()
            .flatten()
            .map(|v| {
                v.layout.tokens.ok_or_else(|| {
                    ModelError::InvalidInput("an M-RoPE model needs each image's token grid".into())
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(RopePositions::for_prompt(prepared, &grids)?))
    }

    /// [`Self::generate`] with regions: each image's placeholder is followed by one more slot per
    /// region of it (the region cropped at full resolution and processed as an image), so
    /// `<image>` expands to the image's rows and then each region's rows.
    pub fn generate_inputs(
        &self,
        images: &[ImageInput],
        prompt: &str,
        params: &SamplingParams,
        mut on_token: impl FnMut(&TokenEvent),
    ) -> Result<GenerateOutput> {
        params.validate()?;
        let mut timings = StageTimings::default();
        let t = Instant::now();
        let mut groups = Vec::with_capacity(images.len());
        for input in images {
            let mut views = vec![self.preprocessor.image_views(input.bytes, None)?];
            for &r in input.regions {
                views.push(self.preprocessor.image_views(input.bytes, Some(r))?);
            }
            groups.push(views);
        }
        timings.preprocess_ms = ms(t);
        let rows: Vec<usize> = groups
            .iter()
            .map(|g| {
                g.iter()
                    .map(|v| self.projector.packed_rows(&v.layout))
                    .sum()
            })
            .collect();
        let prepared = self.prompt.prepare(prompt, &rows)?;

        let mut projected = Vec::with_capacity(groups.len());
        for group in &groups {
            let parts = group
                .iter()
                .map(|v| self.embed_views(v, &mut timings))
                .collect::<Result<Vec<_>>>()?;
            projected.push(Tensor::cat(&parts, 0)?);
        }

        let t = Instant::now();
        let embeds: Tensor = prepared.embeddings(&self.decoder, &projected)?;
        let positions = prepared.ids.len();
        let long = positions >= LONG_PREFILL;
        if long {
            tracing::info!(target: crate::PROGRESS_TARGET, "prefilling {positions} positions…");
        }
        let rope = self.rope_positions(&prepared, &groups)?;
        let mut gen = Generation::start_monitored(
            &self.decoder,
            &self.prompt,
            &embeds,
            rope,
            params,
            &[],
            None,
        )?;
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
