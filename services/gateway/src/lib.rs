//! The gateway: the mesh's public API. Per request it runs, for every image, encoder → projector
//! as a pipelined relay (chunks are forwarded as they arrive, never buffered whole), feeds the
//! projected rows to the decoder in prompt order, and streams the decoder's tokens back.
//! It loads no weights; it reads `config.json` only to describe the model.

pub mod chat_template;
mod fetch;
pub mod openai;

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::sync::{mpsc, watch, OnceCell};
use tokio::time::Instant as TokioInstant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use vlm_cache::{feature_key, FeatureCache, RateLimitedLog};
use vlm_model::LlavaConfig;
use vlm_proto::decode_event::Kind as EventKind;
use vlm_proto::decode_request::Kind as RequestKind;
use vlm_proto::decoder_client::DecoderClient;
use vlm_proto::encode_response::Kind as EncodeKind;
use vlm_proto::encoder_client::EncoderClient;
use vlm_proto::gateway_server::{Gateway, GatewayServer};
use vlm_proto::generate_response::Kind as ResponseKind;
use vlm_proto::projector_client::ProjectorClient;
use vlm_proto::{
    CacheStatus, DecodeRequest, DecodeSetup, EncodeOptions, EncodeRequest, EncoderInfo,
    EncoderInfoRequest, GenerateFinal, GenerateRequest, GenerateResponse, GetModelInfoRequest,
    ImageSlot, ModelInfo, StageTimings, TensorChunk, TextDelta, Usage,
};
use vlm_serving::params_from_proto;
use vlm_tensor::{TensorLimits, TensorValue, TensorValueBuilder, DEFAULT_CHUNK_BYTES};

#[derive(Clone)]
pub struct GatewayConfig {
    /// Checkpoint directory; only `config.json` is read.
    pub model: PathBuf,
    pub encoder: Channel,
    pub projector: Channel,
    pub decoder: Channel,
    /// Largest encoded image accepted, in bytes.
    pub max_image_bytes: usize,
    /// Most images in one request.
    pub max_images: usize,
    /// Largest prompt accepted, in bytes.
    pub max_prompt_bytes: usize,
    pub default_max_tokens: u32,
    /// Deadline for requests whose client sets none.
    pub default_timeout: Duration,
    /// Element type of feature/embedding chunks on internal hops (None = the model's compute dtype).
    pub wire_dtype: Option<vlm_proto::DType>,
    /// Feature cache (None = off) and how long entries live.
    pub cache: Option<Arc<dyn FeatureCache>>,
    pub cache_ttl: Duration,
}

pub struct GatewayService {
    cfg: GatewayConfig,
    info: ModelInfo,
    stages: Arc<Stages>,
}

impl GatewayService {
    pub fn new(cfg: GatewayConfig) -> anyhow::Result<Self> {
        let model_cfg = LlavaConfig::from_file(&cfg.model.join("config.json"))?;
        let info = ModelInfo {
            model_id: cfg
                .model
                .canonicalize()
                .unwrap_or_else(|_| cfg.model.clone())
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            vision_model_type: "clip_vision_model".into(),
            text_model_type: model_cfg.text.model_type.clone(),
            image_tokens: model_cfg.image_tokens() as u32,
            fingerprint: String::new(),
            image_size: model_cfg.vision.image_size as u32,
            vision_hidden_size: model_cfg.vision_feature_dim() as u32,
            text_hidden_size: model_cfg.text.hidden_size as u32,
            context_length: model_cfg.text.max_position_embeddings as u32,
            compute_dtype: cfg.wire_dtype.unwrap_or(vlm_proto::DType::DtypeUnspecified) as i32,
        };
        let stages = Arc::new(Stages {
            encoder: cfg.encoder.clone(),
            projector: cfg.projector.clone(),
            cache: cfg
                .cache
                .clone()
                .map(|c| Arc::new(CacheLayer::new(c, cfg.cache_ttl))),
            encoder_info: OnceCell::new(),
            limits: TensorLimits::default(),
        });
        Ok(GatewayService { cfg, info, stages })
    }

    /// Cache counters (None when the cache is off).
    pub fn cache_stats(&self) -> Option<&CacheStats> {
        self.stages.cache.as_ref().map(|c| &c.stats)
    }

    pub fn into_server(self) -> GatewayServer<Self> {
        GatewayServer::new(self)
    }

    fn validate(&self, req: &GenerateRequest) -> Result<(), Status> {
        let c = &self.cfg;
        if req.prompt.trim().is_empty() {
            return Err(Status::invalid_argument("prompt is empty"));
        }
        if req.prompt.len() > c.max_prompt_bytes {
            return Err(Status::resource_exhausted(format!(
                "prompt of {} bytes exceeds the limit of {} bytes",
                req.prompt.len(),
                c.max_prompt_bytes
            )));
        }
        if req.images.len() > c.max_images {
            return Err(Status::invalid_argument(format!(
                "{} images given; at most {} per request",
                req.images.len(),
                c.max_images
            )));
        }
        for (i, img) in req.images.iter().enumerate() {
            if img.is_empty() {
                return Err(Status::invalid_argument(format!(
                    "image {} is empty (0 bytes)",
                    i + 1
                )));
            }
            if img.len() > c.max_image_bytes {
                return Err(Status::resource_exhausted(format!(
                    "image {} is {} bytes, over the limit of {} bytes",
                    i + 1,
                    img.len(),
                    c.max_image_bytes
                )));
            }
        }
        Ok(())
    }
}

/// Per-image numbers the encoder reports and the gateway measures.
#[derive(Default, Clone, Copy)]
struct ImageTimings {
    preprocess_ms: f64,
    encode_ms: f64,
    project_ms: f64,
    cache_ms: f64,
    cache: CacheStatus,
}

/// Per-image totals of a request.
#[derive(Default)]
struct Totals {
    preprocess_ms: f64,
    encode_ms: f64,
    project_ms: f64,
    cache_ms: f64,
    cache: Vec<i32>,
}

impl Totals {
    fn add(&mut self, t: &ImageTimings) {
        self.preprocess_ms += t.preprocess_ms;
        self.encode_ms += t.encode_ms;
        self.project_ms += t.project_ms;
        self.cache_ms += t.cache_ms;
        self.cache.push(t.cache as i32);
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// The remaining budget as a per-call timeout (what `grpc-timeout` carries to the next hop).
fn with_deadline<T>(msg: T, deadline: TokioInstant) -> Request<T> {
    let mut req = Request::new(msg);
    req.set_timeout(deadline.saturating_duration_since(TokioInstant::now()));
    req
}

/// The feature cache as the gateway uses it: lookups, single flight, background stores.
pub struct CacheLayer {
    cache: Arc<dyn FeatureCache>,
    ttl: Duration,
    /// Keys being encoded right now → the value once the leader has it.
    inflight: Mutex<HashMap<String, watch::Receiver<Option<Bytes>>>>,
    errors_log: RateLimitedLog,
    pub stats: CacheStats,
}

#[derive(Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub errors: AtomicU64,
    /// Values that failed to decode or checksum (deleted and recomputed).
    pub corrupt: AtomicU64,
    /// Requests that waited for an identical in-flight encode instead of calling the encoder.
    pub coalesced: AtomicU64,
}

impl CacheLayer {
    pub fn new(cache: Arc<dyn FeatureCache>, ttl: Duration) -> Self {
        CacheLayer {
            cache,
            ttl,
            inflight: Mutex::new(HashMap::new()),
            errors_log: RateLimitedLog::new(Duration::from_secs(10)),
            stats: CacheStats::default(),
        }
    }

    fn error(&self, what: &str, e: &dyn std::fmt::Display) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = self.errors_log.should_log() {
            tracing::warn!(
                backend = self.cache.kind(),
                suppressed,
                "feature cache {what} failed, continuing without it: {e}"
            );
        }
    }

    /// A cached value, if present and intact. Corrupt values are deleted.
    async fn lookup(&self, key: &str, limits: &TensorLimits) -> (CacheStatus, Option<TensorValue>) {
        match self.cache.get(key).await {
            Ok(Some(bytes)) => match TensorValue::decode(bytes, limits) {
                Ok(v) => (CacheStatus::Hit, Some(v)),
                Err(e) => {
                    self.stats.corrupt.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        key,
                        "corrupt cached features ({e}); deleting and recomputing"
                    );
                    if let Err(e) = self.cache.delete(key).await {
                        self.error("delete", &e);
                    }
                    (CacheStatus::Miss, None)
                }
            },
            Ok(None) => (CacheStatus::Miss, None),
            Err(e) => {
                self.error("lookup", &e);
                (CacheStatus::Error, None)
            }
        }
    }

    /// Writes off the request path (the request never waits for it). The in-flight entry stays
    /// until the write is done, so a request arriving in between shares the value instead of
    /// encoding again.
    fn store(self: &Arc<Self>, key: String, value: Bytes, inflight: InflightGuard) {
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(e) = this.cache.put(&key, value, this.ttl).await {
                this.error("store", &e);
            }
            drop(inflight);
        });
    }
}

/// Removes an in-flight entry when its leader finishes or gives up, so followers stop waiting.
struct InflightGuard {
    layer: Arc<CacheLayer>,
    key: String,
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.layer
            .inflight
            .lock()
            .expect("inflight lock")
            .remove(&self.key);
    }
}

/// Everything an image pipeline needs; shared by all requests.
struct Stages {
    encoder: Channel,
    projector: Channel,
    cache: Option<Arc<CacheLayer>>,
    encoder_info: OnceCell<EncoderInfo>,
    limits: TensorLimits,
}

impl Stages {
    async fn encoder_info(&self, deadline: TokioInstant) -> Result<&EncoderInfo, Status> {
        self.encoder_info
            .get_or_try_init(|| async {
                let mut client = EncoderClient::new(self.encoder.clone());
                let info = client
                    .info(with_deadline(EncoderInfoRequest {}, deadline))
                    .await
                    .map_err(|s| stage_status("encoder", s))?;
                Ok::<_, Status>(info.into_inner())
            })
            .await
    }
}

/// Features for one image from the cache, an identical in-flight request, or the encoder; then the
/// projector. Projected chunks go to `out` as they arrive.
async fn image_pipeline(
    stages: Arc<Stages>,
    image: Bytes,
    wire_dtype: i32,
    deadline: TokioInstant,
    out: mpsc::Sender<Result<TensorChunk, Status>>,
) -> Result<ImageTimings, Status> {
    let mut timings = ImageTimings {
        cache: CacheStatus::Off,
        ..Default::default()
    };
    let mut cached: Option<TensorValue> = None;
    let mut leader: Option<(String, watch::Sender<Option<Bytes>>, InflightGuard)> = None;
    if let Some(layer) = &stages.cache {
        let info = stages.encoder_info(deadline).await?;
        let key = feature_key(
            &image,
            &info.model_fingerprint,
            &info.preprocessing,
            &format!("wire={wire_dtype}"),
        );
        let t = Instant::now();
        let (status, value) = layer.lookup(&key, &stages.limits).await;
        timings.cache_ms = ms(t);
        timings.cache = status;
        cached = value;
        if cached.is_none() {
            let existing = {
                let mut inflight = layer.inflight.lock().expect("inflight lock");
                match inflight.get(&key) {
                    Some(rx) => Some(rx.clone()),
                    None => {
                        let (tx, rx) = watch::channel(None);
                        inflight.insert(key.clone(), rx);
                        let guard = InflightGuard {
                            layer: layer.clone(),
                            key: key.clone(),
                        };
                        leader = Some((key.clone(), tx, guard));
                        None
                    }
                }
            };
            if existing.is_none() {
                // Double-check after taking the lead: an earlier leader that finished between our
                // lookup and our insert has already stored its value (it leaves the in-flight map
                // only after the store), so this lookup sees it and nobody encodes twice.
                if let (_, Some(v)) = layer.lookup(&key, &stages.limits).await {
                    if let Some((_, tx, _guard)) = leader.take() {
                        let _ = tx.send(Some(Bytes::from(v.encode()))); // hand it to any followers
                    }
                    timings.cache = CacheStatus::Hit;
                    cached = Some(v);
                }
            }
            if let Some(mut rx) = existing {
                // Identical image already being encoded: wait for its features. If that request
                // fails or is cancelled, encode ourselves.
                let shared = rx
                    .wait_for(Option::is_some)
                    .await
                    .ok()
                    .and_then(|v| v.clone());
                if let Some(v) = shared.and_then(|b| TensorValue::decode(b, &stages.limits).ok()) {
                    layer.stats.coalesced.fetch_add(1, Ordering::Relaxed);
                    timings.cache = CacheStatus::Hit;
                    cached = Some(v);
                }
            }
        }
        match timings.cache {
            CacheStatus::Hit => layer.stats.hits.fetch_add(1, Ordering::Relaxed),
            CacheStatus::Miss => layer.stats.misses.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
    }

    let (to_projector, projector_in) = mpsc::channel::<TensorChunk>(4);
    let started = Instant::now();
    let mut projected = ProjectorClient::new(stages.projector.clone())
        .project(with_deadline(ReceiverStream::new(projector_in), deadline))
        .await
        .map_err(|s| stage_status("projector", s))?
        .into_inner();
    let feed_stages = stages.clone();
    let feed = async move {
        let stages = feed_stages;
        let mut stats = None;
        if let Some(value) = cached {
            for chunk in value.chunks(DEFAULT_CHUNK_BYTES) {
                if to_projector.send(chunk).await.is_err() {
                    break;
                }
            }
            return Ok::<_, Status>(stats);
        }
        let req = EncodeRequest {
            image,
            options: Some(EncodeOptions {
                wire_dtype,
                chunk_bytes: 0,
            }),
        };
        let mut features = EncoderClient::new(stages.encoder.clone())
            .encode(with_deadline(req, deadline))
            .await
            .map_err(|s| stage_status("encoder", s))?
            .into_inner();
        // The leader tees the stream into a cache value while relaying it.
        let mut builder = leader
            .as_ref()
            .map(|_| TensorValueBuilder::new(stages.limits));
        while let Some(msg) = features
            .message()
            .await
            .map_err(|s| stage_status("encoder", s))?
        {
            match msg.kind {
                Some(EncodeKind::Chunk(c)) => {
                    if let Some(b) = &mut builder {
                        if b.push(&c).is_err() {
                            builder = None; // not cacheable; the request itself is unaffected
                        }
                    }
                    if to_projector.send(c).await.is_err() {
                        break; // the projector call ended; its status is reported below
                    }
                }
                Some(EncodeKind::Stats(s)) => stats = Some(s),
                None => return Err(Status::internal("encoder sent an empty message")),
            }
        }
        if let (Some((key, tx, guard)), Some(builder), Some(layer)) =
            (leader.take(), builder, &stages.cache)
        {
            if let Ok(value) = builder.finish() {
                let bytes = Bytes::from(value.encode());
                let _ = tx.send(Some(bytes.clone()));
                layer.store(key, bytes, guard);
            }
        }
        // Dropping `to_projector` here ends the projector's input stream.
        Ok(stats)
    };
    let forward = async {
        while let Some(chunk) = projected
            .message()
            .await
            .map_err(|s| stage_status("projector", s))?
        {
            if out.send(Ok(chunk)).await.is_err() {
                return Err(Status::cancelled("request cancelled"));
            }
        }
        Ok::<_, Status>(())
    };
    let (stats, ()) = tokio::try_join!(feed, forward)?;
    if let Some(s) = stats {
        timings.preprocess_ms = s.preprocess_ms;
        timings.encode_ms = s.encode_ms;
    }
    timings.project_ms = ms(started);
    Ok(timings)
}

/// Marks which stage failed; keeps the code (UNAVAILABLE, DEADLINE_EXCEEDED, INVALID_ARGUMENT…).
fn stage_status(stage: &str, s: Status) -> Status {
    Status::new(s.code(), format!("{stage}: {}", s.message()))
}

type GenerateStream = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Gateway for GatewayService {
    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        req: Request<GenerateRequest>,
    ) -> Result<Response<GenerateStream>, Status> {
        let started = Instant::now();
        let client_timeout = req
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(vlm_net::parse_grpc_timeout);
        let budget = client_timeout.map_or(self.cfg.default_timeout, |t| {
            t.min(self.cfg.default_timeout)
        });
        let deadline = TokioInstant::now() + budget;
        let req = req.into_inner();
        self.validate(&req)?;
        let mut params = req.params.clone().unwrap_or_default();
        // Fix the seed here so a resumed or retried decode reproduces the same stream.
        let resolved = params_from_proto(Some(&params), self.cfg.default_max_tokens)?;
        params.seed = Some(resolved.seed);
        params.max_tokens = Some(resolved.max_tokens);

        let (decoder_tx, decoder_rx) = mpsc::channel::<DecodeRequest>(8);
        let setup = DecodeSetup {
            prompt: req.prompt.clone(),
            params: Some(params),
            images: vec![ImageSlot { rows: 0 }; req.images.len()],
            resume_token_ids: vec![],
        };
        decoder_tx
            .send(DecodeRequest {
                kind: Some(RequestKind::Setup(setup)),
            })
            .await
            .map_err(|_| Status::internal("decoder request channel closed"))?;

        // Start every image pipeline at once; their outputs are fed to the decoder in prompt order.
        let wire = self.cfg.wire_dtype.map_or(0, |d| d as i32);
        let mut per_image = Vec::with_capacity(req.images.len());
        for image in req.images {
            let (tx, rx) = mpsc::channel(4);
            let task = tokio::spawn(image_pipeline(
                self.stages.clone(),
                image,
                wire,
                deadline,
                tx,
            ));
            per_image.push((task, rx));
        }
        let mut decoder = DecoderClient::new(self.cfg.decoder.clone());
        let decode_call =
            decoder.generate(with_deadline(ReceiverStream::new(decoder_rx), deadline));

        let (image_err_tx, mut image_err_rx) = mpsc::channel::<Status>(1);
        let sequencer = tokio::spawn(async move {
            let mut totals = Totals::default();
            for (task, mut rx) in per_image {
                while let Some(chunk) = rx.recv().await {
                    match chunk {
                        Ok(c) => {
                            if decoder_tx
                                .send(DecodeRequest {
                                    kind: Some(RequestKind::Embeddings(c)),
                                })
                                .await
                                .is_err()
                            {
                                return totals;
                            }
                        }
                        Err(s) => {
                            let _ = image_err_tx.send(s).await;
                            return totals;
                        }
                    }
                }
                match task.await {
                    Ok(Ok(t)) => totals.add(&t),
                    Ok(Err(s)) => {
                        let _ = image_err_tx.send(s).await;
                        return totals;
                    }
                    Err(e) => {
                        let _ = image_err_tx
                            .send(Status::internal(format!("image task failed: {e}")))
                            .await;
                        return totals;
                    }
                }
            }
            totals
        });
        let sequencer_abort = sequencer.abort_handle();

        let mut decoded = match tokio::time::timeout_at(deadline, decode_call).await {
            Err(_) => {
                sequencer_abort.abort();
                return Err(Status::deadline_exceeded(
                    "deadline exceeded before the decoder answered",
                ));
            }
            Ok(Err(s)) => {
                sequencer_abort.abort();
                return Err(stage_status("decoder", s));
            }
            Ok(Ok(r)) => r.into_inner(),
        };

        let trace_id = vlm_net::new_request_id();
        let (tx, rx) = mpsc::channel(32);
        tokio::spawn(async move {
            // Dropping `decoded` (on any exit) cancels the decoder call, which stops decoding.
            let relay = async {
                let mut sequencer = Some(sequencer);
                let mut totals = Totals::default();
                loop {
                    tokio::select! {
                        Some(status) = image_err_rx.recv() => return Err(status),
                        event = decoded.message() => {
                            let event = event.map_err(|s| stage_status("decoder", s))?;
                            let Some(event) = event else {
                                return Err(Status::internal("decoder stream ended without `done`"));
                            };
                            match event.kind {
                                Some(EventKind::Token(t)) => {
                                    let delta = TextDelta { text: t.text_delta, token_ids: vec![t.id] };
                                    let msg = GenerateResponse { kind: Some(ResponseKind::Delta(delta)) };
                                    if tx.send(Ok(msg)).await.is_err() {
                                        return Ok(()); // the client went away
                                    }
                                }
                                Some(EventKind::Done(d)) => {
                                    if let Some(s) = sequencer.take() {
                                        totals = s.await.unwrap_or_default();
                                    }
                                    let fin = GenerateFinal {
                                        usage: Some(Usage { prompt_tokens: d.prompt_tokens, completion_tokens: d.completion_tokens }),
                                        timings: Some(StageTimings {
                                            preprocess_ms: totals.preprocess_ms,
                                            encode_ms: totals.encode_ms,
                                            project_ms: totals.project_ms,
                                            prefill_ms: d.prefill_ms,
                                            decode_ms: d.decode_ms,
                                            total_ms: ms(started),
                                            cache: std::mem::take(&mut totals.cache),
                                            cache_ms: totals.cache_ms,
                                        }),
                                        trace_id: trace_id.clone(),
                                        finish_reason: d.finish_reason,
                                    };
                                    let _ = tx.send(Ok(GenerateResponse { kind: Some(ResponseKind::Final(fin)) })).await;
                                    return Ok(());
                                }
                                None => return Err(Status::internal("decoder sent an empty event")),
                            }
                        }
                    }
                }
            };
            let result = match tokio::time::timeout_at(deadline, relay).await {
                Ok(r) => r,
                Err(_) => Err(Status::deadline_exceeded(
                    "request deadline exceeded while generating",
                )),
            };
            sequencer_abort.abort();
            if let Err(status) = result {
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx).fuse())))
    }

    async fn get_model_info(
        &self,
        _req: Request<GetModelInfoRequest>,
    ) -> Result<Response<ModelInfo>, Status> {
        Ok(Response::new(self.info.clone()))
    }
}
