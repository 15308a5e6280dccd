//! The decoder service: prompt + image embeddings in, tokens out. Owns the tokenizer and the
//! `<image>` expansion; loads only `language_model.*` from the checkpoint.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use vlm_model::{
    Checkpoint, DType, Decoder as DecoderModel, Device, EngineConfig, FinishReason, PromptBuilder,
    Quantization, RopePositions, SeqRequest, Tensor,
};
use vlm_net::DeadlineSource;
use vlm_proto::decode_request::Kind as RequestKind;
use vlm_proto::decoder_server::{Decoder, DecoderServer};
use vlm_proto::{DecodeEvent, DecodeRequest, DecoderInfo, DecoderInfoRequest};
use vlm_serving::{model_status, params_from_proto, to_model_tensor};
use vlm_tensor::{TensorCollector, TensorLimits};

mod budget;
mod metrics;
mod scheduler;

use scheduler::{Job, Scheduler};

#[derive(Debug, Clone)]
pub struct DecoderConfig {
    pub model: PathBuf,
    pub dtype: DType,
    /// How the language model's weights are stored (`--quantize`).
    pub quantization: Quantization,
    pub limits: TensorLimits,
    /// Most sequences in one batch step; further requests wait in the queue.
    pub max_concurrent: usize,
    /// KV-cache budget in bytes; `None`: derived from the model and the machine's memory
    /// ([`budget::default_kv_bytes`]).
    pub kv_cache_bytes: Option<usize>,
    /// Prompt positions per prefill chunk (interleaved with decode steps).
    pub prefill_chunk: usize,
    /// Longest a request waits for KV memory when its deadline allows more (or it has none).
    pub max_queue_wait: Duration,
    /// `max_tokens` when a request does not set it.
    pub default_max_tokens: u32,
    /// Test-only fault hook: sleep this long after every decode step, so tests can act
    /// "mid-stream" on a model that is otherwise faster than any client. Set from
    /// `VLM_FAULT_DECODE_DELAY_MS`.
    pub fault_decode_delay: Option<std::time::Duration>,
    /// Request data held at once (`--max-bytes-in-flight`, shared with the admission layer):
    /// a request's embeddings are reserved from it, from before the first chunk is read until
    /// the request ends.
    pub memory: vlm_net::ByteBudget,
}

pub(crate) struct Model {
    pub decoder: DecoderModel,
    pub prompt: PromptBuilder,
    pub image_tokens: usize,
    pub info: DecoderInfo,
    /// The checkpoint directory's name, for `gen_ai.request.model` on the stage spans.
    pub name: Arc<str>,
}

pub struct DecoderService {
    model: Arc<Model>,
    scheduler: Scheduler,
    engine: EngineConfig,
    block_bytes: usize,
    limits: TensorLimits,
    default_max_tokens: u32,
    memory: vlm_net::ByteBudget,
}

impl DecoderService {
    pub fn load(cfg: &DecoderConfig) -> anyhow::Result<Self> {
        if let Some(d) = cfg.fault_decode_delay {
            tracing::warn!(
                delay_ms = d.as_millis() as u64,
                "FAULT HOOK ACTIVE: every decode step is delayed (test use only)"
            );
        }
        let ckpt = Checkpoint::open(&cfg.model)?;
        let decoder =
            DecoderModel::load_quantized(&ckpt, cfg.dtype, &Device::Cpu, cfg.quantization)?;
        let prompt = PromptBuilder::from_dir(&cfg.model, ckpt.config())?;
        // Tiled (LLaVA-NeXT) and native-resolution (GLM-4.1V) images vary in rows.
        let tiles = ckpt.config().image_grid_pinpoints.is_some() || ckpt.config().glm4v.is_some();
        let max_batch = cfg.max_concurrent.max(1);
        let kv_bytes = match cfg.kv_cache_bytes {
            Some(b) => budget::check_explicit(b)?,
            None => budget::default_kv_bytes(&decoder, max_batch),
        };
        let engine = EngineConfig::with_budget(&decoder, kv_bytes, max_batch, cfg.prefill_chunk);
        let shape = decoder.kv_shape(engine.block_size);
        if engine.blocks == 0 {
            anyhow::bail!(
                "--kv-cache-bytes {kv_bytes} is less than one KV block ({} bytes) of this model",
                shape.block_bytes()
            );
        }
        tracing::info!(
            kv_cache_bytes = engine.blocks * shape.block_bytes(),
            kv_cache_mib = (engine.blocks * shape.block_bytes()) >> 20,
            kv_cache_tokens = engine.blocks * engine.block_size,
            kv_blocks = engine.blocks,
            block_tokens = engine.block_size,
            bytes_per_token = shape.bytes_per_token(),
            max_batch,
            prefill_chunk = engine.prefill_chunk,
            context = decoder.max_positions(),
            "decoder KV cache budget"
        );
        let name: Arc<str> = cfg
            .model
            .file_name()
            .map_or_else(
                || cfg.model.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            )
            .into();
        let info = DecoderInfo {
            model_fingerprint: decoder.fingerprint().to_string(),
            quantization: decoder.quantization().to_string(),
            text_model_type: decoder.config().model_type.clone(),
            // A tiling model's images vary in rows (the gateway asks the encoder's Plan).
            image_tokens: if tiles {
                0
            } else {
                ckpt.config().image_tokens() as u32
            },
            text_hidden_size: decoder.hidden_size() as u32,
            context_length: decoder.max_positions() as u32,
            default_max_tokens: cfg.default_max_tokens,
            compute_dtype: vlm_serving::wire_dtype_for(cfg.dtype).to_proto() as i32,
            chat_template: Some(chat_template(&cfg.model)?),
        };
        let model = Arc::new(Model {
            decoder,
            prompt,
            image_tokens: if tiles {
                0
            } else {
                ckpt.config().image_tokens()
            },
            info,
            name,
        });
        let scheduler = Scheduler::start(
            model.clone(),
            engine,
            cfg.max_queue_wait,
            cfg.fault_decode_delay,
        )?;
        Ok(DecoderService {
            model,
            scheduler,
            engine,
            block_bytes: shape.block_bytes(),
            limits: cfg.limits,
            default_max_tokens: cfg.default_max_tokens,
            memory: cfg.memory.clone(),
        })
    }

    pub fn into_server(self) -> DecoderServer<Self> {
        DecoderServer::new(self)
    }

    /// Refuses at once a request whose KV could never fit the budget.
    fn check_budget(&self, positions: usize) -> Result<(), Status> {
        let need = positions.div_ceil(self.engine.block_size);
        if need > self.engine.blocks {
            return Err(Status::invalid_argument(format!(
                "prompt + max_tokens ({positions} positions) need {} bytes of KV cache, more than this decoder's whole budget of {} bytes ({} tokens; --kv-cache-bytes)",
                need * self.block_bytes,
                self.engine.blocks * self.block_bytes,
                self.engine.blocks * self.engine.block_size
            )));
        }
        Ok(())
    }
}

type GenerateStream = Pin<Box<dyn Stream<Item = Result<DecodeEvent, Status>> + Send>>;

pub(crate) fn finish_reason(r: FinishReason) -> vlm_proto::FinishReason {
    match r {
        FinishReason::Eos => vlm_proto::FinishReason::Stop,
        FinishReason::Length => vlm_proto::FinishReason::Length,
        FinishReason::StopString => vlm_proto::FinishReason::StopString,
        FinishReason::FormatComplete => vlm_proto::FinishReason::Stop,
    }
}

/// The checkpoint's chat template, for `DecoderInfo` (the gateway renders it).
fn chat_template(dir: &std::path::Path) -> anyhow::Result<vlm_proto::ChatTemplate> {
    let t = vlm_model::ChatTemplateSource::from_dir(dir)?;
    tracing::info!(source = %t.source, image_token = %t.image_token, "chat template");
    Ok(vlm_proto::ChatTemplate {
        template: t.template,
        source: t.source,
        image_token: t.image_token,
        bos_token: t.bos_token,
        eos_token: t.eos_token,
    })
}

/// The slots each placeholder covers: an image's slot and the region slots right after it.
fn slot_groups(slots: &[vlm_proto::ImageSlot]) -> Result<Vec<std::ops::Range<usize>>, Status> {
    let mut groups: Vec<std::ops::Range<usize>> = Vec::new();
    for (i, s) in slots.iter().enumerate() {
        match (s.region, groups.last_mut()) {
            (false, _) => groups.push(i..i + 1),
            (true, Some(g)) => g.end = i + 1,
            (true, None) => {
                return Err(Status::invalid_argument(
                    "image slot 0 is a region, but a region must follow the slot of its image",
                ))
            }
        }
    }
    Ok(groups)
}

/// Receives one embedding tensor per image slot, checking each against its expected shape.
async fn receive_images(
    input: &mut Streaming<DecodeRequest>,
    rows: &[usize],
    hidden: usize,
    limits: TensorLimits,
) -> Result<Vec<Tensor>, Status> {
    let mut images = Vec::with_capacity(rows.len());
    for (i, &want_rows) in rows.iter().enumerate() {
        let mut collector = TensorCollector::new(limits);
        while !collector.is_complete() {
            let msg = input.message().await?.ok_or_else(|| {
                Status::invalid_argument(format!(
                    "request stream ended during image {i} (of {}, counting from 0)",
                    rows.len()
                ))
            })?;
            match msg.kind {
                Some(RequestKind::Embeddings(chunk)) => {
                    collector.push(&chunk)?;
                }
                _ => {
                    return Err(Status::invalid_argument(
                        "only embedding chunks may follow setup",
                    ))
                }
            }
        }
        let t = collector.finish()?;
        if t.shape != [want_rows, hidden] {
            return Err(Status::invalid_argument(format!(
                "image {} embeddings are {:?}, expected [{want_rows}, {hidden}]",
                i, t.shape
            )));
        }
        images.push(to_model_tensor(t, &Device::Cpu)?);
    }
    Ok(images)
}

/// An M-RoPE model's (GLM-4.1V) token grid of every slot, each covering the slot's rows;
/// `None` for other models, which ignore the grids.
fn token_grids(
    slots: &[vlm_proto::ImageSlot],
    rows: &[usize],
    mrope: bool,
) -> Result<Option<Vec<vlm_model::TileGrid>>, Status> {
    if !mrope {
        return Ok(None);
    }
    let grids = slots
        .iter()
        .zip(rows)
        .enumerate()
        .map(|(i, (s, &rows))| {
            let g = vlm_serving::token_grid_from_proto(s.token_rows, s.token_cols)
                .map_err(|e| Status::invalid_argument(format!("image slot {i}: {}", e.message())))?
                .ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "image slot {}: this model gives image rows 3-D positions, so the slot must give its token grid (token_rows x token_cols)",
                        i
                    ))
                })?;
            if (g.rows * g.cols) as usize != rows {
                return Err(Status::invalid_argument(format!(
                    "image slot {}: a {}x{} token grid is not its {rows} rows",
                    i,
                    g.rows,
                    g.cols
                )));
            }
            Ok(g)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(grids))
}

#[tonic::async_trait]
impl Decoder for DecoderService {
    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        req: Request<Streaming<DecodeRequest>>,
    ) -> Result<Response<GenerateStream>, Status> {
        // The caller's deadline: decoding stops when it passes, whether or not the caller is still
        // there to say so.
        let deadline = req.call_deadline().map(|d| d.into_std());
        let mut input = req.into_inner();
        let setup = match input.message().await?.and_then(|m| m.kind) {
            Some(RequestKind::Setup(s)) => s,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message must be `setup`",
                ))
            }
        };
        let params = params_from_proto(setup.params.as_ref(), self.default_max_tokens)?;
        let model = self.model.clone();
        let context = model.decoder.max_positions();
        // Every count a peer sends is checked against the model before anything is sized by it.
        if setup.images.len() > context {
            return Err(Status::invalid_argument(format!(
                "{} image slots cannot fit the context of {context} positions",
                setup.images.len()
            )));
        }
        let rows: Vec<usize> = setup
            .images
            .iter()
            .enumerate()
            .map(|(i, s)| match (s.rows, model.image_tokens) {
                (0, 0) => Err(Status::invalid_argument(format!(
                    "image slot {}: this model's image rows depend on the image's size, so the slot must give them",
                    i
                ))),
                (0, fixed) => Ok(fixed),
                (r, _) => Ok(r as usize),
            })
            .collect::<Result<_, _>>()?;
        let grids = token_grids(
            &setup.images,
            &rows,
            model.decoder.config().mrope_section.is_some(),
        )?;
        let groups = slot_groups(&setup.images)?;
        // One placeholder per group: the image's rows, then its regions' rows.
        let placeholder_rows: Vec<usize> = groups
            .iter()
            .map(|g| g.clone().map(|i| rows[i]).sum())
            .collect();
        // Prompt and context errors surface now, before any embedding is sent. Tokenising is
        // CPU work: off the async threads, and only for prompts that can fit the context.
        // The output format is compiled there too (or taken from the cache of compiled ones), so
        // a format that cannot be followed is refused before any embedding is sent.
        let (prepared, constraint) = {
            let (model, prompt, rows) = (model.clone(), setup.prompt, placeholder_rows);
            let format = params.format.clone();
            tokio::task::spawn_blocking(move || {
                let prepared = model.prompt.prepare_within(&prompt, &rows, context)?;
                let constraint = format
                    .map(|f| model.prompt.grammars()?.compile(&f))
                    .transpose()?;
                Ok::<_, vlm_model::ModelError>((prepared, constraint))
            })
            .await
            .map_err(|e| Status::internal(format!("tokenizer task failed: {e}")))?
            .map_err(model_status)?
        };
        let needed = prepared.ids.len() + params.max_tokens as usize;
        if needed > model.decoder.max_positions() {
            return Err(Status::invalid_argument(format!(
                "prompt ({} tokens incl. image rows) + max_tokens ({}) exceeds the model's context of {} tokens",
                prepared.ids.len(),
                params.max_tokens,
                model.decoder.max_positions()
            )));
        }

        self.check_budget(needed)?;
        // What this request will hold until it ends: its images' embeddings as received and
        // in model form, and the prompt's embedding matrix (f32 at most). Reserved before the
        // first chunk is read, waiting (until the deadline) while other requests hold it.
        let image_rows: usize = rows.iter().sum();
        let row_bytes = model.decoder.hidden_size() as u64 * 4;
        let memory = self
            .memory
            .reserve(
                (2 * image_rows + prepared.ids.len()) as u64 * row_bytes,
                "the request's embeddings",
                deadline.map(tokio::time::Instant::from_std),
            )
            .await?;

        let (tx, rx) = mpsc::unbounded_channel();
        let limits = self.limits;
        let resume = setup.resume_token_ids;
        let monitor = setup.monitor_layers;
        let span = tracing::Span::current();
        let jobs = self.scheduler.clone();
        tokio::spawn(tracing::Instrument::in_current_span(async move {
            let images = match receive_images(
                &mut input,
                &rows,
                model.decoder.hidden_size(),
                limits,
            )
            .await
            {
                Ok(images) => images,
                Err(status) => {
                    let _ = tx.send(Err(status));
                    return;
                }
            };
            let prepared_len = prepared.ids.len();
            let req = tokio::task::spawn_blocking(move || {
                let images = groups
                    .into_iter()
                    .map(|g| Tensor::cat(&images[g].iter().collect::<Vec<_>>(), 0))
                    .collect::<Result<Vec<_>, _>>()?;
                let embeds = prepared.embeddings(&model.decoder, &images)?;
                let keys = prepared.position_keys(&images, grids.as_deref())?;
                let rope = grids
                    .map(|g| RopePositions::for_prompt(&prepared, &g))
                    .transpose()?;
                Ok::<_, vlm_model::ModelError>(SeqRequest {
                    embeds,
                    keys,
                    params,
                    resume,
                    monitor,
                    rope,
                    constraint,
                })
            })
            .await;
            let req = match req {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    let _ = tx.send(Err(model_status(e)));
                    return;
                }
                Err(e) => {
                    let _ = tx.send(Err(Status::internal(format!("decoder: {e}"))));
                    return;
                }
            };
            let job = Job {
                req,
                prompt_tokens: prepared_len,
                tx: tx.clone(),
                deadline,
                span,
                queued: Instant::now(),
                memory,
            };
            if let Err(status) = jobs.submit(job) {
                let _ = tx.send(Err(status));
            }
        }));
        Ok(vlm_net::with_fingerprint(
            Response::new(Box::pin(UnboundedReceiverStream::new(rx))),
            &self.model.info.model_fingerprint,
        ))
    }

    async fn info(
        &self,
        _req: Request<DecoderInfoRequest>,
    ) -> Result<Response<DecoderInfo>, Status> {
        Ok(Response::new(self.model.info.clone()))
    }
}
