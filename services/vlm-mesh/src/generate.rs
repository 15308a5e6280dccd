//! `vlm-mesh generate`: the in-process pipeline.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use vlm_model::{Device, ImageInput, ImageLimits, Pipeline, SamplingParams, StageTimings};

/// The question `demo` asks (rendered with the model's chat template; for the demo model,
/// `USER: <image>\nDescribe the image. ASSISTANT:`).
pub const DEFAULT_DEMO_QUESTION: &str = "Describe the image.";

/// Sampling flags shared by `generate` and `ask`.
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Maximum number of tokens to generate [default: 64 for `generate`; for `ask`, the
    /// decoder's --default-max-tokens].
    #[arg(long, env = "VLM_MAX_TOKENS")]
    pub max_tokens: Option<u32>,
    /// Sampling temperature; 0 means greedy.
    #[arg(long, env = "VLM_TEMPERATURE", default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling probability mass in (0, 1].
    #[arg(long, env = "VLM_TOP_P", default_value_t = 1.0)]
    pub top_p: f32,
    /// Sample only from the k most likely tokens (0 = no limit).
    #[arg(long, env = "VLM_TOP_K", default_value_t = 0)]
    pub top_k: u32,
    /// Random seed; with a seed, sampled output is reproducible. Drawn at random when omitted.
    #[arg(long, env = "VLM_SEED")]
    pub seed: Option<u64>,
    /// Stop when the text contains this string (repeatable).
    #[arg(long = "stop", env = "VLM_STOP")]
    pub stop: Vec<String>,
    /// Lower each token's logit by this × the times it was generated so far (OpenAI's
    /// frequency_penalty, vLLM's semantics), in [-2, 2].
    #[arg(
        long,
        env = "VLM_FREQUENCY_PENALTY",
        default_value_t = 0.0,
        allow_negative_numbers = true
    )]
    pub frequency_penalty: f32,
    /// Lower the logit of every token generated so far by this (OpenAI's presence_penalty), in
    /// [-2, 2].
    #[arg(
        long,
        env = "VLM_PRESENCE_PENALTY",
        default_value_t = 0.0,
        allow_negative_numbers = true
    )]
    pub presence_penalty: f32,
}

/// `generate`'s `--max-tokens` when none is given.
pub const DEFAULT_MAX_TOKENS: u32 = 64;

impl SamplingArgs {
    /// Resolves the seed (random when not given) and builds the model's parameters (64 tokens
    /// at most unless `--max-tokens` says otherwise).
    pub fn to_params(&self) -> SamplingParams {
        SamplingParams {
            max_tokens: self.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed.unwrap_or_else(random_seed),
            stop: self.stop.clone(),
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
            ..Default::default()
        }
    }

    /// The same for a gateway request, where an unset `--max-tokens` means the decoder's
    /// `--default-max-tokens`.
    pub fn to_request_params(&self) -> vlm_proto::SamplingParams {
        let p = self.to_params();
        vlm_proto::SamplingParams {
            max_tokens: self.max_tokens,
            temperature: p.temperature,
            top_p: p.top_p,
            top_k: p.top_k,
            seed: Some(p.seed),
            stop: p.stop,
            frequency_penalty: p.frequency_penalty,
            presence_penalty: p.presence_penalty,
            ..Default::default()
        }
    }
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Checkpoint directory in the Hugging Face llava-hf layout; `bundled:shapes-llava` is the
    /// demo model compiled into this binary (unpacked once into ~/.cache/vlm-mesh, or $VLM_CACHE_DIR).
    #[arg(long, env = "VLM_MODEL", default_value = crate::bundled::BUNDLED_MODEL)]
    pub model: PathBuf,
    /// Image file (PNG, JPEG or WebP); repeat for several images, one image placeholder each in
    /// the prompt; none for a text-only prompt.
    #[arg(long, env = "VLM_IMAGE")]
    pub image: Vec<PathBuf>,
    /// The question in plain text, rendered with the checkpoint's chat template (the same
    /// rendering as the gateway's for `ask --question`): one user turn with one image
    /// placeholder per --image, then the text. Give this, --prompt or --prompt-file.
    #[arg(long, env = "VLM_QUESTION", conflicts_with_all = ["prompt", "prompt_file"])]
    pub question: Option<String>,
    /// The raw prompt, used as it is: in the model's chat format, with the checkpoint's image
    /// placeholder where each image goes, e.g. "USER: <image>\nWhat is this? ASSISTANT:"
    /// (GLM-4.1V: `<|image|>`, in its own chat format). Without the chat template's turn markers
    /// it gets a warning on stderr.
    #[arg(long, env = "VLM_PROMPT", required_unless_present_any = ["prompt_file", "question"])]
    pub prompt: Option<String>,
    /// Read the raw prompt from this UTF-8 file instead (for prompts a command line cannot carry,
    /// such as ones with a NUL character).
    #[arg(long, env = "VLM_PROMPT_FILE", conflicts_with = "prompt")]
    pub prompt_file: Option<PathBuf>,
    /// A region of interest, `[IMAGE:]x0,y0,x1,y1` in relative coordinates 0–1000 (IMAGE counts
    /// from 0, default the first). Repeatable. Each region is cropped from the image at full
    /// resolution and processed as an image of its own; its rows follow the image's rows at the
    /// image's `<image>` (README, "Regions of interest").
    #[arg(long, env = "VLM_REGION", value_parser = crate::region_arg::parse)]
    pub region: Vec<crate::region_arg::RegionArg>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Compute dtype: f32 or f16 (weights are converted on load). This build computes on the CPU
    /// only, where bf16 has no matmul; `bf16` is refused with that reason.
    #[arg(long, env = "VLM_DTYPE", default_value = "f32")]
    pub dtype: String,
    /// Weight quantization of every stage: none, q8_0 or q4_k (see `serve <stage> --quantize`).
    #[arg(long, env = "VLM_QUANTIZE", default_value = "none", value_parser = crate::serve::quantize_parser())]
    pub quantize: vlm_model::Quantization,
    /// Largest image accepted, in pixels (width × height), checked before decoding.
    #[arg(long, env = "VLM_MAX_IMAGE_PIXELS", default_value_t = ImageLimits::default().max_pixels)]
    pub max_image_pixels: u64,
    /// Largest long side : short side ratio accepted (e.g. 200 refuses a 201×1 image), checked
    /// from the header before decoding; it also bounds the resize target.
    #[arg(long, env = "VLM_MAX_IMAGE_ASPECT_RATIO", default_value_t = vlm_model::DEFAULT_MAX_ASPECT_RATIO, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_image_aspect_ratio: u32,
    /// Print one JSON object instead of streaming text.
    #[arg(long, env = "VLM_JSON")]
    pub json: bool,
}

#[derive(Serialize)]
struct JsonOutput<'a> {
    text: &'a str,
    token_ids: &'a [u32],
    prompt_tokens: usize,
    finish_reason: &'a str,
    seed: u64,
    timings: &'a StageTimings,
}

pub fn run(mut args: GenerateArgs) -> anyhow::Result<()> {
    args.model = crate::bundled::model_dir(&args.model)?;
    let dtype = vlm_model::parse_dtype(&args.dtype)?;
    let images = args
        .image
        .iter()
        .map(|p| std::fs::read(p).with_context(|| format!("cannot read image {}", p.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let limits = ImageLimits {
        max_pixels: args.max_image_pixels,
        max_aspect_ratio: args.max_image_aspect_ratio,
    };
    let pipeline =
        Pipeline::load_quantized(&args.model, dtype, &Device::Cpu, limits, args.quantize)
            .with_context(|| format!("cannot load model from {}", args.model.display()))?;
    let template = crate::chat::local_template(&args.model)?;
    let prompt = match (&args.question, &args.prompt, &args.prompt_file) {
        (Some(q), _, _) => crate::chat::render_question(&template, images.len(), q)?,
        (None, Some(p), _) => p.clone(),
        (None, None, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("cannot read the prompt file {}", f.display()))?,
        (None, None, None) => anyhow::bail!("give --question, --prompt or --prompt-file"),
    };
    if args.question.is_none() {
        crate::chat::warn_raw_prompt(&template, &prompt);
    }
    let params = args.sampling.to_params();
    let regions = crate::region_arg::per_image(&args.region, images.len())?;
    let inputs: Vec<ImageInput> = images
        .iter()
        .zip(&regions)
        .map(|(bytes, regions)| ImageInput { bytes, regions })
        .collect();
    let stream = !args.json;
    let mut stdout = std::io::stdout().lock();
    let out = pipeline.generate_inputs(&inputs, &prompt, &params, |ev| {
        if stream && !ev.text.is_empty() {
            let _ = stdout.write_all(ev.text.as_bytes());
            let _ = stdout.flush();
        }
    })?;
    if args.json {
        let json = JsonOutput {
            text: &out.text,
            token_ids: &out.token_ids,
            prompt_tokens: out.prompt_tokens,
            finish_reason: out.finish_reason.as_str(),
            seed: params.seed,
            timings: &out.timings,
        };
        writeln!(stdout, "{}", serde_json::to_string(&json)?)?;
    } else {
        writeln!(stdout)?;
        let t = &out.timings;
        eprintln!(
            "[{} prompt tokens, {} generated, finish: {}] preprocess {:.1} ms, encode {:.1} ms, project {:.1} ms, prefill {:.1} ms, decode {:.1} ms",
            out.prompt_tokens,
            out.token_ids.len(),
            out.finish_reason.as_str(),
            t.preprocess_ms,
            t.encode_ms,
            t.project_ms,
            t.prefill_ms,
            t.decode_ms
        );
    }
    Ok(())
}
