//! The decoder service: prompt + image embeddings in, tokens out. Owns the tokenizer and the
//! `<image>` expansion; loads only `language_model.*` from the checkpoint.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use futures::Stream;
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use vlm_model::{
    Checkpoint, DType, Decoder as DecoderModel, Device, FinishReason, Generation, PromptBuilder,
    Tensor,
};
use vlm_proto::decode_event::Kind as EventKind;
use vlm_proto::decode_request::Kind as RequestKind;
use vlm_proto::decoder_server::{Decoder, DecoderServer};
use vlm_proto::{DecodeDone, DecodeEvent, DecodeRequest, DecodeStarted, TokenEvent};
use vlm_serving::{model_status, params_from_proto, to_model_tensor};
use vlm_tensor::{TensorCollector, TensorLimits};

#[derive(Debug, Clone)]
pub struct DecoderConfig {
    pub model: PathBuf,
    pub dtype: DType,
    pub limits: TensorLimits,
    /// Sequences decoded at the same time; further requests wait for a slot.
    pub max_concurrent: usize,
    /// `max_tokens` when a request does not set it.
    pub default_max_tokens: u32,
    /// Test-only fault hook: sleep this long after every token, so tests can act "mid-stream" on a
    /// model that is otherwise faster than any client. Set from `VLM_FAULT_DECODE_DELAY_MS`.
    pub fault_decode_delay: Option<std::time::Duration>,
}

/// Counters other code (tests, metrics) can read.
#[derive(Debug, Default)]
pub struct DecoderStats {
    pub started: AtomicU64,
    pub completed: AtomicU64,
    /// Generations stopped because the caller went away.
    pub cancelled: AtomicU64,
    /// Generations stopped because the caller's deadline (`grpc-timeout`) passed.
    pub deadline_exceeded: AtomicU64,
    pub tokens: AtomicU64,
}

struct Model {
    decoder: DecoderModel,
    prompt: PromptBuilder,
    image_tokens: usize,
}

pub struct DecoderService {
    model: Arc<Model>,
    permits: Arc<Semaphore>,
    limits: TensorLimits,
    default_max_tokens: u32,
    fault_decode_delay: Option<std::time::Duration>,
    stats: Arc<DecoderStats>,
    /// The checkpoint directory's name, for `gen_ai.request.model` on the stage spans.
    model_name: Arc<str>,
}

impl DecoderService {
    pub fn load(cfg: &DecoderConfig) -> anyhow::Result<Self> {
        if let Some(d) = cfg.fault_decode_delay {
            tracing::warn!(
                delay_ms = d.as_millis() as u64,
                "FAULT HOOK ACTIVE: every token is delayed (test use only)"
            );
        }
        let ckpt = Checkpoint::open(&cfg.model)?;
        let decoder = DecoderModel::load(&ckpt, cfg.dtype, &Device::Cpu)?;
        let prompt = PromptBuilder::from_dir(&cfg.model, ckpt.config())?;
        Ok(DecoderService {
            model: Arc::new(Model {
                decoder,
                prompt,
                image_tokens: ckpt.config().image_tokens(),
            }),
            permits: Arc::new(Semaphore::new(cfg.max_concurrent.max(1))),
            limits: cfg.limits,
            default_max_tokens: cfg.default_max_tokens,
            fault_decode_delay: cfg.fault_decode_delay,
            stats: Arc::new(DecoderStats::default()),
            model_name: cfg
                .model
                .file_name()
                .map_or_else(
                    || cfg.model.display().to_string(),
                    |n| n.to_string_lossy().into_owned(),
                )
                .into(),
        })
    }

    pub fn stats(&self) -> Arc<DecoderStats> {
        self.stats.clone()
    }

    pub fn into_server(self) -> DecoderServer<Self> {
        DecoderServer::new(self)
    }
}

type GenerateStream = Pin<Box<dyn Stream<Item = Result<DecodeEvent, Status>> + Send>>;

fn finish_reason(r: FinishReason) -> vlm_proto::FinishReason {
    match r {
        FinishReason::Eos => vlm_proto::FinishReason::Stop,
        FinishReason::Length => vlm_proto::FinishReason::Length,
        FinishReason::StopString => vlm_proto::FinishReason::StopString,
    }
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
                    "request stream ended during image {} of {}",
                    i + 1,
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
                i + 1,
                t.shape
            )));
        }
        images.push(to_model_tensor(t, &Device::Cpu)?);
    }
    Ok(images)
}

#[tonic::async_trait]
impl Decoder for DecoderService {
    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        req: Request<Streaming<DecodeRequest>>,
    ) -> Result<Response<GenerateStream>, Status> {
        // The caller's remaining budget: decoding stops when it is spent, whether or not the caller
        // is still there to say so.
        let deadline = req
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(vlm_net::parse_grpc_timeout)
            .map(|t| Instant::now() + t);
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
        let rows: Vec<usize> = setup
            .images
            .iter()
            .map(|s| {
                if s.rows == 0 {
                    model.image_tokens
                } else {
                    s.rows as usize
                }
            })
            .collect();
        // Prompt and context errors surface now, before any embedding is sent.
        let prepared = model
            .prompt
            .prepare(&setup.prompt, &rows)
            .map_err(model_status)?;
        let needed = prepared.ids.len() + params.max_tokens as usize;
        if needed > model.decoder.max_positions() {
            return Err(Status::invalid_argument(format!(
                "prompt ({} tokens incl. image rows) + max_tokens ({}) exceeds the model's context of {} tokens",
                prepared.ids.len(),
                params.max_tokens,
                model.decoder.max_positions()
            )));
        }

        let (tx, rx) = mpsc::channel(32);
        let (permits, limits, stats) = (self.permits.clone(), self.limits, self.stats.clone());
        let resume = setup.resume_token_ids;
        let monitor_layers = setup.monitor_layers;
        let fault_delay = self.fault_decode_delay;
        let call_span = tracing::Span::current();
        let model_name = self.model_name.clone();
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
                    let _ = tx.send(Err(status)).await;
                    return;
                }
            };
            let acquire = permits.acquire_owned();
            let permit = match deadline {
                Some(d) => match tokio::time::timeout_at(d.into(), acquire).await {
                    Ok(p) => p,
                    Err(_) => {
                        stats.deadline_exceeded.fetch_add(1, Ordering::Relaxed);
                        tracing::info!("deadline exceeded while queued; not decoding");
                        let _ = tx
                            .send(Err(Status::deadline_exceeded(
                                "decoder: deadline exceeded while queued",
                            )))
                            .await;
                        return;
                    }
                },
                None => acquire.await,
            };
            let Ok(permit) = permit else {
                return;
            };
            stats.started.fetch_add(1, Ordering::Relaxed);
            let join = tokio::task::spawn_blocking(move || {
                let _permit = permit;
                let fail = |tx: &mpsc::Sender<_>, e| {
                    let _ = tx.blocking_send(Err(model_status(e)));
                };
                let started = DecodeStarted {
                    prefill_tokens: (prepared.ids.len() + resume.len()) as u32,
                };
                if tx
                    .blocking_send(Ok(DecodeEvent {
                        kind: Some(EventKind::Started(started)),
                    }))
                    .is_err()
                {
                    stats.cancelled.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                let t = Instant::now();
                let prefill_span = tracing::info_span!(
                    parent: &call_span,
                    "prefill",
                    gen_ai.operation.name = "chat",
                    gen_ai.request.model = %model_name,
                    gen_ai.request.temperature = params.temperature as f64,
                    gen_ai.request.top_p = params.top_p as f64,
                    gen_ai.request.max_tokens = params.max_tokens as i64,
                    gen_ai.usage.input_tokens = (prepared.ids.len() + resume.len()) as i64,
                    vlm.resume_tokens = resume.len() as i64,
                );
                let mut monitored = Vec::new();
                let started = prefill_span.in_scope(|| {
                    let embeds = prepared.embeddings(&model.decoder, &images)?;
                    let gen = Generation::start_monitored(
                        &model.decoder,
                        &model.prompt,
                        &embeds,
                        &params,
                        &resume,
                        monitor_layers.then_some(&mut monitored),
                    )?;
                    Ok((gen, vlm_serving::layer_stats_rows("decoder", &monitored)))
                });
                let (mut gen, layers) = match started {
                    Ok(g) => g,
                    Err(e) => return fail(&tx, e),
                };
                drop(prefill_span);
                vlm_telemetry::metrics::observe_stage("prefill", t.elapsed());
                let prefill_ms = ms(t);
                let t = Instant::now();
                let decode_span = tracing::info_span!(
                    parent: &call_span,
                    "decode",
                    gen_ai.operation.name = "chat",
                    gen_ai.request.model = %model_name,
                    gen_ai.request.temperature = params.temperature as f64,
                    gen_ai.request.max_tokens = params.max_tokens as i64,
                    gen_ai.usage.input_tokens = gen.prompt_tokens() as i64,
                    gen_ai.usage.output_tokens = tracing::field::Empty,
                    gen_ai.response.finish_reasons = tracing::field::Empty,
                );
                let _decode_entered = decode_span.enter();
                loop {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        stats.deadline_exceeded.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(
                            tokens = gen.token_ids().len(),
                            "deadline exceeded; decoding stopped"
                        );
                        let _ = tx.blocking_send(Err(Status::deadline_exceeded(
                            "decoder: deadline exceeded while decoding",
                        )));
                        return;
                    }
                    let ev = match gen.next_token() {
                        Ok(Some(ev)) => ev,
                        Ok(None) => break,
                        Err(e) => return fail(&tx, e),
                    };
                    stats.tokens.fetch_add(1, Ordering::Relaxed);
                    if let Some(d) = fault_delay {
                        std::thread::sleep(d);
                    }
                    let event = TokenEvent {
                        id: ev.id,
                        text_delta: ev.text,
                        index: ev.index as u32,
                    };
                    if tx
                        .blocking_send(Ok(DecodeEvent {
                            kind: Some(EventKind::Token(event)),
                        }))
                        .is_err()
                    {
                        stats.cancelled.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(
                            tokens = gen.token_ids().len(),
                            "generation cancelled by the client; decoding stopped"
                        );
                        return;
                    }
                }
                let reason = gen.finish_reason().unwrap_or(FinishReason::Length);
                decode_span.record("gen_ai.usage.output_tokens", gen.token_ids().len() as i64);
                decode_span.record(
                    "gen_ai.response.finish_reasons",
                    tracing::field::debug(&reason),
                );
                vlm_telemetry::metrics::observe_stage("decode", t.elapsed());
                let done = DecodeDone {
                    finish_reason: finish_reason(reason) as i32,
                    prompt_tokens: gen.prompt_tokens() as u32,
                    completion_tokens: gen.token_ids().len() as u32,
                    prefill_ms,
                    decode_ms: ms(t),
                    layers,
                };
                if tx
                    .blocking_send(Ok(DecodeEvent {
                        kind: Some(EventKind::Done(done)),
                    }))
                    .is_ok()
                {
                    stats.completed.fetch_add(1, Ordering::Relaxed);
                }
            });
            if let Err(e) = join.await {
                tracing::error!(error = %e, "decode task failed");
            }
        }));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}
