//! The gateway: the mesh's public API. Per request it runs, for every image, encoder → projector
//! as a pipelined relay (chunks are forwarded as they arrive, never buffered whole), feeds the
//! projected rows to the decoder in prompt order, and streams the decoder's tokens back.
//! It loads no weights; it reads `config.json` only to describe the model.
//!
//! Resilience (mechanisms from `vlm-net`, wired here per stage): every stage is a replica set
//! balanced by p2c over peak EWMA; encoder+projector work for an image is retried on other
//! replicas (re-sending the image or the cached features the gateway holds, skipping projected
//! chunks already forwarded); a decoder that fails before its first token is replaced, and one that
//! fails mid-stream is resumed elsewhere from prompt + tokens already streamed; replicas slower than
//! their stage's adaptive timeout are abandoned; every hop carries the remaining deadline.

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
use tokio::sync::{mpsc, watch, Notify, OnceCell};
use tokio::time::Instant as TokioInstant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::{Request, Response, Status};
use tracing::Instrument;
use vlm_cache::{feature_key, FeatureCache, RateLimitedLog};
use vlm_model::LlavaConfig;
use vlm_net::{
    is_retryable, with_deadline, AdaptiveTimeout, AdaptiveTimeoutOptions, Lease, ReplicaSet,
    RetryOptions, RetryPolicy,
};
use vlm_proto::decode_event::Kind as EventKind;
use vlm_proto::decode_request::Kind as RequestKind;
use vlm_proto::decoder_client::DecoderClient;
use vlm_proto::encode_response::Kind as EncodeKind;
use vlm_proto::encoder_client::EncoderClient;
use vlm_proto::gateway_server::{Gateway, GatewayServer};
use vlm_proto::generate_response::Kind as ResponseKind;
use vlm_proto::projector_client::ProjectorClient;
use vlm_proto::{
    CacheStatus, DecodeEvent, DecodeRequest, DecodeSetup, EncodeOptions, EncodeRequest,
    EncoderInfo, EncoderInfoRequest, GenerateFinal, GenerateRequest, GenerateResponse,
    GetModelInfoRequest, ImageSlot, ModelInfo, StageTimings, TensorChunk, TextDelta, Usage,
};
use vlm_serving::params_from_proto;
use vlm_tensor::{TensorLimits, TensorValue, TensorValueBuilder, DEFAULT_CHUNK_BYTES};

#[derive(Clone)]
pub struct GatewayConfig {
    /// Checkpoint directory; only `config.json` is read.
    pub model: PathBuf,
    pub encoder: Arc<ReplicaSet>,
    pub projector: Arc<ReplicaSet>,
    pub decoder: Arc<ReplicaSet>,
    /// Retries of a stage call on another replica (attempts, backoff, budget per stage).
    pub retry: RetryOptions,
    /// Adaptive per-unit timeouts (encoder per image, projector per row block, decoder per step).
    pub timeouts: AdaptiveTimeoutOptions,
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
        let stage = |name, replicas: &Arc<ReplicaSet>, unit| StageClient {
            name,
            replicas: replicas.clone(),
            retry: RetryPolicy::new(cfg.retry.clone()),
            timeout: AdaptiveTimeout::new(unit, cfg.timeouts.clone()),
        };
        let stages = Arc::new(Stages {
            encoder: stage("encoder", &cfg.encoder, "image"),
            projector: stage("projector", &cfg.projector, "row block"),
            decoder: stage("decoder", &cfg.decoder, "decode step"),
            prefill: AdaptiveTimeout::new("prefill token", cfg.timeouts.clone()),
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
#[derive(Default, Clone)]
struct ImageTimings {
    preprocess_ms: f64,
    encode_ms: f64,
    project_ms: f64,
    cache_ms: f64,
    cache: CacheStatus,
    /// Vision layer statistics, when the request asked for them and the encoder ran.
    layers: Vec<vlm_proto::LayerStats>,
}

/// Per-image totals of a request.
#[derive(Default)]
struct Totals {
    preprocess_ms: f64,
    encode_ms: f64,
    project_ms: f64,
    cache_ms: f64,
    cache: Vec<i32>,
    layers: Vec<vlm_proto::LayerStats>,
}

impl Totals {
    fn add(&mut self, t: &ImageTimings) {
        self.preprocess_ms += t.preprocess_ms;
        self.encode_ms += t.encode_ms;
        self.project_ms += t.project_ms;
        self.cache_ms += t.cache_ms;
        self.cache.push(t.cache as i32);
        self.layers.extend(t.layers.iter().cloned());
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
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
        let span = tracing::info_span!(
            "cache.lookup",
            cache.backend = self.cache.kind(),
            cache.result = tracing::field::Empty,
        );
        let t = Instant::now();
        let out = self
            .lookup_uncounted(key, limits)
            .instrument(span.clone())
            .await;
        let result = match out.0 {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
            CacheStatus::Error => "error",
            _ => "off",
        };
        span.record("cache.result", result);
        vlm_telemetry::Metrics::global().inc(
            "vlm_cache_lookups_total",
            "Feature-cache lookups, by result (hit, miss, error).",
            &[("result", result)],
        );
        vlm_telemetry::metrics::observe_stage("cache.lookup", t.elapsed());
        out
    }

    async fn lookup_uncounted(
        &self,
        key: &str,
        limits: &TensorLimits,
    ) -> (CacheStatus, Option<TensorValue>) {
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
        let span = tracing::info_span!(
            "cache.store",
            cache.backend = self.cache.kind(),
            cache.bytes = value.len(),
            cache.result = tracing::field::Empty,
        );
        let task = async move {
            let result = match this.cache.put(&key, value, this.ttl).await {
                Ok(()) => "ok",
                Err(e) => {
                    this.error("store", &e);
                    "error"
                }
            };
            tracing::Span::current().record("cache.result", result);
            vlm_telemetry::Metrics::global().inc(
                "vlm_cache_stores_total",
                "Feature-cache writes, by result (ok, error).",
                &[("result", result)],
            );
            drop(inflight);
        };
        tokio::spawn(task.instrument(span));
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

/// One stage as the gateway calls it: its replicas, its retry policy and its adaptive timeout.
struct StageClient {
    /// "encoder", "projector" or "decoder": prefixes this stage's errors.
    name: &'static str,
    replicas: Arc<ReplicaSet>,
    retry: RetryPolicy,
    timeout: AdaptiveTimeout,
}

impl StageClient {
    /// A healthy replica not in `tried`, or this stage's reason why there is none.
    fn pick(&self, tried: &[u64]) -> Result<Lease, StageFailure> {
        self.replicas.pick(tried).map_err(|status| StageFailure {
            stage: self.name,
            status,
        })
    }
}

/// Everything a request needs; shared by all requests.
struct Stages {
    encoder: StageClient,
    projector: StageClient,
    decoder: StageClient,
    /// The decoder's prefill, per position (the per-step timeout is `decoder.timeout`).
    prefill: AdaptiveTimeout,
    cache: Option<Arc<CacheLayer>>,
    encoder_info: OnceCell<EncoderInfo>,
    limits: TensorLimits,
}

/// A failed attempt at one stage; `status` says whether another replica may do better.
struct StageFailure {
    stage: &'static str,
    status: Status,
}

impl StageFailure {
    fn into_status(self) -> Status {
        stage_status(self.stage, self.status)
    }

    /// The status to give up with after `attempts`: once the deadline has passed, whatever a
    /// hop said (tonic's own client timer reports CANCELLED), the answer is DEADLINE_EXCEEDED.
    fn final_status(self, deadline: TokioInstant, attempts: u32) -> Status {
        if TokioInstant::now() >= deadline {
            return Status::deadline_exceeded(format!(
                "request deadline exceeded ({}: {})",
                self.stage,
                self.status.message()
            ));
        }
        if attempts > 1 && is_retryable(&self.status) {
            let msg = format!(
                "{} (gave up after {attempts} attempts)",
                self.status.message()
            );
            return stage_status(self.stage, Status::new(self.status.code(), msg));
        }
        self.into_status()
    }
}

/// Books a failed call against its replica: a retryable failure excludes the replica from this
/// request's further attempts and ejects it from the set until a health check passes.
fn failed(stage: &'static str, lease: Lease, tried: &mut Vec<u64>, status: Status) -> StageFailure {
    if is_retryable(&status) {
        tried.push(lease.id());
        lease.unreachable(&format!("{:?}: {}", status.code(), status.message()));
    }
    StageFailure { stage, status }
}

/// Books a call given up on as too slow (the replica answers, but past its stage's adaptive
/// timeout), or the request's deadline passing.
fn timed_out(
    stage: &'static str,
    lease: Lease,
    tried: &mut Vec<u64>,
    limit: Duration,
    deadline: TokioInstant,
) -> StageFailure {
    if TokioInstant::now() >= deadline {
        return StageFailure {
            stage,
            status: Status::deadline_exceeded("request deadline exceeded"),
        };
    }
    tracing::warn!(
        stage,
        replica = lease.url(),
        limit_ms = limit.as_millis() as u64,
        "replica slower than the adaptive timeout; call abandoned"
    );
    let status = Status::unavailable(format!(
        "replica {} did not answer within the adaptive timeout of {} ms",
        lease.url(),
        limit.as_millis()
    ));
    tried.push(lease.id());
    lease.abandoned();
    StageFailure { stage, status }
}

impl Stages {
    async fn encoder_info(&self, deadline: TokioInstant) -> Result<&EncoderInfo, Status> {
        self.encoder_info
            .get_or_try_init(|| async {
                let mut tried = Vec::new();
                let mut attempt = 1;
                loop {
                    let lease = self
                        .encoder
                        .pick(&tried)
                        .map_err(StageFailure::into_status)?;
                    let mut client = EncoderClient::new(lease.channel());
                    let call = client.info(with_deadline(EncoderInfoRequest {}, deadline));
                    let status = match tokio::time::timeout_at(deadline, call).await {
                        Ok(Ok(info)) => return Ok::<_, Status>(info.into_inner()),
                        Ok(Err(s)) => s,
                        Err(_) => Status::deadline_exceeded("request deadline exceeded"),
                    };
                    let f = failed("encoder", lease, &mut tried, status);
                    match self.encoder.retry.next_retry(attempt, &f.status, deadline) {
                        Some(pause) => tokio::time::sleep(pause).await,
                        None => return Err(f.final_status(deadline, attempt)),
                    }
                    attempt += 1;
                }
            })
            .await
    }
}

/// The single-flight leader's state: the key it encodes, the channel its followers wait on.
type Leader = (String, watch::Sender<Option<Bytes>>, InflightGuard);

/// Features for one image from the cache, an identical in-flight request, or the encoder; then the
/// projector. Projected chunks go to `out` as they arrive. A retryable failure of either stage is
/// retried on other replicas; chunks already forwarded are not sent again (both stages are
/// deterministic, so a new attempt produces the same chunks).
async fn image_pipeline(
    stages: Arc<Stages>,
    image: Bytes,
    wire_dtype: i32,
    monitor_layers: bool,
    deadline: TokioInstant,
    out: mpsc::Sender<Result<TensorChunk, Status>>,
) -> Result<ImageTimings, Status> {
    let mut timings = ImageTimings {
        cache: CacheStatus::Off,
        ..Default::default()
    };
    let mut cached: Option<TensorValue> = None;
    let mut leader: Option<Leader> = None;
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

    let started = Instant::now();
    if cached.is_none() {
        stages.encoder.retry.record_call();
    }
    stages.projector.retry.record_call();
    let mut tried = Tried::default();
    let mut forwarded = 0usize;
    let mut attempt = 1;
    loop {
        let result = image_attempt(
            &stages,
            &image,
            cached.as_ref(),
            &mut leader,
            wire_dtype,
            monitor_layers,
            deadline,
            &out,
            &mut forwarded,
            &mut tried,
        )
        .await;
        match result {
            Ok(stats) => {
                if let Some(s) = stats {
                    timings.preprocess_ms = s.preprocess_ms;
                    timings.encode_ms = s.encode_ms;
                    timings.layers = s.layers;
                }
                timings.project_ms = ms(started);
                return Ok(timings);
            }
            Err(f) if f.stage == "gateway" => return Err(f.status),
            Err(f) => {
                let stage = if f.stage == "encoder" {
                    &stages.encoder
                } else {
                    &stages.projector
                };
                match stage.retry.next_retry(attempt, &f.status, deadline) {
                    Some(pause) => {
                        tracing::info!(
                            stage = f.stage,
                            attempt,
                            forwarded,
                            "retrying on another replica: {}",
                            f.status.message()
                        );
                        retry_event("retry", f.stage, attempt, &f.status);
                        tokio::time::sleep(pause).await;
                        attempt += 1;
                    }
                    None => return Err(f.final_status(deadline, attempt)),
                }
            }
        }
    }
}

/// Replicas that failed this request, per stage.
#[derive(Default)]
struct Tried {
    encoder: Vec<u64>,
    projector: Vec<u64>,
}

/// One encoder → projector attempt for an image.
#[allow(clippy::too_many_arguments)]
async fn image_attempt(
    stages: &Stages,
    image: &Bytes,
    cached: Option<&TensorValue>,
    leader: &mut Option<Leader>,
    wire_dtype: i32,
    monitor_layers: bool,
    deadline: TokioInstant,
    out: &mpsc::Sender<Result<TensorChunk, Status>>,
    forwarded: &mut usize,
    tried: &mut Tried,
) -> Result<Option<vlm_proto::EncodeStats>, StageFailure> {
    let Tried {
        encoder: tried_encoders,
        projector: tried_projectors,
    } = tried;
    let proj = stages.projector.pick(tried_projectors)?;
    let (to_projector, projector_in) = mpsc::channel::<TensorChunk>(4);
    let mut client = ProjectorClient::new(proj.channel());
    let call = client.project(with_deadline(ReceiverStream::new(projector_in), deadline));
    let mut projected = match tokio::time::timeout_at(deadline, call).await {
        Ok(Ok(r)) => r.into_inner(),
        Ok(Err(s)) => return Err(failed("projector", proj, tried_projectors, s)),
        Err(_) => {
            return Err(StageFailure {
                stage: "projector",
                status: Status::deadline_exceeded("request deadline exceeded"),
            })
        }
    };
    // When each feature chunk went to the projector: its projected rows are due within the
    // projector's adaptive timeout per row block from then (one output chunk per input chunk).
    let sent: Mutex<Vec<TokioInstant>> = Mutex::new(Vec::new());
    let sent_signal = Notify::new();
    let (sent_ref, signal) = (&sent, &sent_signal);
    // Owns `to_projector`: when it completes, the projector's input stream ends.
    let feed = async move {
        let send = |c: TensorChunk| send_block(sent_ref, signal, &to_projector, c);
        let mut stats = None;
        if let Some(value) = cached {
            for chunk in value.chunks(DEFAULT_CHUNK_BYTES) {
                if !send(chunk).await {
                    break;
                }
            }
            return Ok::<_, StageFailure>(stats);
        }
        let enc = stages.encoder.pick(tried_encoders)?;
        let req = EncodeRequest {
            image: image.clone(),
            options: Some(EncodeOptions {
                wire_dtype,
                chunk_bytes: 0,
                monitor_layers,
            }),
        };
        // The encoder computes the whole image before streaming, so the first message is what the
        // per-image adaptive timeout bounds.
        let limit = adaptive_limit(
            &stages.encoder,
            tried_encoders,
            enc.id(),
            &stages.encoder.timeout,
            1.0,
            deadline,
        );
        let started = TokioInstant::now();
        let first_due = started + limit;
        let mut client = EncoderClient::new(enc.channel());
        let call = client.encode(with_deadline(req, deadline));
        let mut features = match tokio::time::timeout_at(first_due, call).await {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(s)) => return Err(failed("encoder", enc, tried_encoders, s)),
            Err(_) => {
                return Err(timed_out("encoder", enc, tried_encoders, limit, deadline));
            }
        };
        // The leader tees the stream into a cache value while relaying it.
        let mut builder = leader
            .as_ref()
            .map(|_| TensorValueBuilder::new(stages.limits));
        let mut first = true;
        loop {
            let due = if first { first_due } else { deadline };
            let msg = match tokio::time::timeout_at(due, features.message()).await {
                Ok(Ok(m)) => m,
                Ok(Err(s)) => return Err(failed("encoder", enc, tried_encoders, s)),
                Err(_) => return Err(timed_out("encoder", enc, tried_encoders, limit, deadline)),
            };
            if first {
                stages
                    .encoder
                    .timeout
                    .observe(enc.id(), started.elapsed(), 1.0);
                first = false;
            }
            let Some(msg) = msg else { break };
            match msg.kind {
                Some(EncodeKind::Chunk(c)) => {
                    if let Some(b) = &mut builder {
                        if b.push(&c).is_err() {
                            builder = None; // not cacheable; the request itself is unaffected
                        }
                    }
                    if !send(c).await {
                        break; // the projector call ended; its status is reported below
                    }
                }
                Some(EncodeKind::Stats(s)) => stats = Some(s),
                None => {
                    return Err(StageFailure {
                        stage: "encoder",
                        status: Status::internal("encoder sent an empty message"),
                    })
                }
            }
        }
        enc.success();
        if let (Some((key, tx, guard)), Some(builder), Some(layer)) =
            (leader.take(), builder, &stages.cache)
        {
            if let Ok(value) = builder.finish() {
                let bytes = Bytes::from(value.encode());
                let _ = tx.send(Some(bytes.clone()));
                layer.store(key, bytes, guard);
            }
        }
        Ok(stats)
    };
    let forward = async {
        let mut index = 0usize;
        loop {
            let msg = {
                let next = projected.message();
                tokio::pin!(next);
                loop {
                    let sent_at = sent.lock().expect("sent lock").get(index).copied();
                    match sent_at {
                        Some(t0) => {
                            let limit = adaptive_limit(
                                &stages.projector,
                                tried_projectors,
                                proj.id(),
                                &stages.projector.timeout,
                                1.0,
                                deadline,
                            );
                            tokio::select! {
                                r = &mut next => break r.map(|m| m.map(|c| (c, Some(t0)))),
                                _ = tokio::time::sleep_until(t0 + limit) => {
                                    return Err(timed_out("projector", proj, tried_projectors, limit, deadline));
                                }
                            }
                        }
                        // Nothing sent yet for this block: the encoder is still working (and has
                        // its own timeout); wait for the projector or for the next send.
                        None => tokio::select! {
                            r = &mut next => break r.map(|m| m.map(|c| (c, None))),
                            _ = sent_signal.notified() => continue,
                            _ = tokio::time::sleep_until(deadline) => {
                                return Err(timed_out("projector", proj, tried_projectors, Duration::ZERO, deadline));
                            }
                        },
                    }
                }
            };
            let msg = match msg {
                Ok(m) => m,
                Err(s) => return Err(failed("projector", proj, tried_projectors, s)),
            };
            let Some((chunk, t0)) = msg else { break };
            if let Some(t0) = t0 {
                stages
                    .projector
                    .timeout
                    .observe(proj.id(), t0.elapsed(), 1.0);
            }
            if index >= *forwarded {
                if out.send(Ok(chunk)).await.is_err() {
                    return Err(StageFailure {
                        stage: "gateway",
                        status: Status::cancelled("request cancelled"),
                    });
                }
                *forwarded += 1;
            }
            index += 1;
        }
        proj.success();
        Ok::<_, StageFailure>(())
    };
    let (stats, ()) = tokio::try_join!(feed, forward)?;
    Ok(stats)
}

/// The adaptive timeout for `units` of work on replica `current`, if another healthy replica is
/// left to retry on; otherwise only the deadline bounds the wait (abandoning a slow call to queue
/// again on the same replica would only make it slower).
fn adaptive_limit(
    stage: &StageClient,
    tried: &[u64],
    current: u64,
    timeout: &AdaptiveTimeout,
    units: f64,
    deadline: TokioInstant,
) -> Duration {
    let mut exclude = tried.to_vec();
    exclude.push(current);
    if stage.replicas.has_alternative(&exclude) {
        timeout.limit(units, deadline)
    } else {
        deadline.saturating_duration_since(TokioInstant::now())
    }
}

/// Sends one feature block to the projector, noting when (its projected rows are due from then).
async fn send_block(
    sent: &Mutex<Vec<TokioInstant>>,
    signal: &Notify,
    to_projector: &mpsc::Sender<TensorChunk>,
    c: TensorChunk,
) -> bool {
    sent.lock().expect("sent lock").push(TokioInstant::now());
    signal.notify_one();
    to_projector.send(c).await.is_ok()
}

/// Marks which stage failed; keeps the code (UNAVAILABLE, DEADLINE_EXCEEDED, INVALID_ARGUMENT…).
fn stage_status(stage: &str, s: Status) -> Status {
    if s.message().starts_with(stage) {
        return s;
    }
    Status::new(s.code(), format!("{stage}: {}", s.message()))
}

/// The request's projected image embeddings, in prompt order, as they arrive. The gateway keeps
/// them for the whole request so that a replacement decoder can be sent the same inputs.
struct EmbeddingLog {
    chunks: Mutex<Vec<TensorChunk>>,
    state: watch::Sender<LogState>,
}

#[derive(Clone, Default)]
struct LogState {
    len: usize,
    done: bool,
    error: Option<Status>,
}

impl EmbeddingLog {
    fn new() -> Arc<Self> {
        Arc::new(EmbeddingLog {
            chunks: Mutex::new(Vec::new()),
            state: watch::channel(LogState::default()).0,
        })
    }

    fn push(&self, c: TensorChunk) {
        let mut chunks = self.chunks.lock().expect("log lock");
        chunks.push(c);
        let len = chunks.len();
        self.state.send_modify(|s| s.len = len);
    }

    fn finish(&self) {
        self.state.send_modify(|s| s.done = true);
    }

    fn fail(&self, status: Status) {
        self.state.send_modify(|s| s.error = Some(status));
    }

    /// Resolves when an image pipeline has failed for good (never, if none does).
    async fn failed(&self) -> Status {
        let mut rx = self.state.subscribe();
        let error = rx
            .wait_for(|s| s.error.is_some())
            .await
            .map(|s| s.error.clone());
        match error {
            Ok(Some(e)) => e,
            _ => std::future::pending().await,
        }
    }

    /// Sends every chunk, current and future, to one decoder attempt's request stream.
    async fn feed(self: Arc<Self>, tx: mpsc::Sender<DecodeRequest>) {
        let mut rx = self.state.subscribe();
        let mut next = 0;
        loop {
            let state = rx.borrow_and_update().clone();
            while next < state.len {
                let chunk = self.chunks.lock().expect("log lock")[next].clone();
                let msg = DecodeRequest {
                    kind: Some(RequestKind::Embeddings(chunk)),
                };
                if tx.send(msg).await.is_err() {
                    return;
                }
                next += 1;
            }
            if state.error.is_some() {
                // Keep the stream open; the relay reports the image's error and ends the call.
                return std::future::pending().await;
            }
            if state.done {
                return; // dropping `tx` ends the decoder's request stream
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}

/// Aborts a background task when the attempt that owns it ends.
struct AbortOnDrop(Option<tokio::task::AbortHandle>);
impl AbortOnDrop {
    fn new<T>(task: &tokio::task::JoinHandle<T>) -> Self {
        AbortOnDrop(Some(task.abort_handle()))
    }
    /// Someone else owns the task from now on.
    fn disarm(mut self) {
        self.0 = None;
    }
}
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
        }
    }
}

/// A decoder call in progress on one replica.
struct DecoderAttempt {
    lease: Lease,
    /// Replicas this request has given up on (so adaptive timeouts know if one is left).
    tried: Vec<u64>,
    events: Streaming<DecodeEvent>,
    _feeder: AbortOnDrop,
}

/// Opens a decoder call on a replica not in `tried`: setup (with the tokens already streamed, when
/// resuming), then every embedding chunk the request has, as they come.
async fn open_decoder(
    stages: &Stages,
    setup: &DecodeSetup,
    resume: &[u32],
    log: &Arc<EmbeddingLog>,
    tried: &mut Vec<u64>,
    deadline: TokioInstant,
) -> Result<DecoderAttempt, StageFailure> {
    let lease = stages.decoder.pick(tried)?;
    let (tx, rx) = mpsc::channel::<DecodeRequest>(8);
    let mut setup = setup.clone();
    setup.resume_token_ids = resume.to_vec();
    let _ = tx
        .send(DecodeRequest {
            kind: Some(RequestKind::Setup(setup)),
        })
        .await;
    let feeder = AbortOnDrop::new(&tokio::spawn(log.clone().feed(tx)));
    let mut client = DecoderClient::new(lease.channel());
    let call = client.generate(with_deadline(ReceiverStream::new(rx), deadline));
    match tokio::time::timeout_at(deadline, call).await {
        Ok(Ok(r)) => Ok(DecoderAttempt {
            lease,
            tried: tried.clone(),
            events: r.into_inner(),
            _feeder: feeder,
        }),
        Ok(Err(s)) => Err(failed("decoder", lease, tried, s)),
        Err(_) => Err(StageFailure {
            stage: "decoder",
            status: Status::deadline_exceeded("deadline exceeded before the decoder answered"),
        }),
    }
}

/// Opens a decoder call, retrying on other replicas while the failures are retryable.
async fn open_decoder_with_retry(
    stages: &Stages,
    setup: &DecodeSetup,
    resume: &[u32],
    log: &Arc<EmbeddingLog>,
    tried: &mut Vec<u64>,
    attempt: &mut u32,
    deadline: TokioInstant,
) -> Result<DecoderAttempt, Status> {
    loop {
        match open_decoder(stages, setup, resume, log, tried, deadline).await {
            Ok(a) => return Ok(a),
            Err(f) => match stages
                .decoder
                .retry
                .next_retry(*attempt, &f.status, deadline)
            {
                Some(pause) => {
                    tracing::info!(
                        attempt = *attempt,
                        "decoder call failed, trying another replica: {}",
                        f.status.message()
                    );
                    retry_event("retry", "decoder", *attempt, &f.status);
                    tokio::time::sleep(pause).await;
                    *attempt += 1;
                }
                None => return Err(f.final_status(deadline, *attempt)),
            },
        }
    }
}

/// How one decoder attempt ended.
enum AttemptEnd {
    /// `done` was relayed, or the client went away: the request is over.
    Over,
    /// The request failed for a reason another decoder cannot fix (an image failed for good).
    Fatal(Status),
    /// The replica failed, or was `abandoned` as too slow; the request may continue elsewhere.
    Failed { status: Status, abandoned: bool },
}

/// Everything the token relay needs to build the client's stream and final message.
struct Relay {
    stages: Arc<Stages>,
    setup: DecodeSetup,
    log: Arc<EmbeddingLog>,
    deadline: TokioInstant,
    started: Instant,
    trace_id: String,
    max_tokens: u32,
    tx: mpsc::Sender<Result<GenerateResponse, Status>>,
    sequencer: Option<tokio::task::JoinHandle<Totals>>,
    /// Tokens streamed to the client so far (what a replacement decoder resumes from).
    produced: Vec<u32>,
}

/// How long the gateway waits for a decoder's trailers after its `done` event.
const DRAIN_AFTER_DONE: Duration = Duration::from_secs(1);

impl Relay {
    async fn run(mut self, mut current: DecoderAttempt, mut tried: Vec<u64>, mut attempt: u32) {
        let deadline = self.deadline;
        let result = tokio::time::timeout_at(deadline, async {
            loop {
                match self.relay(&mut current).await {
                    AttemptEnd::Over => return Ok(()),
                    AttemptEnd::Fatal(status) => return Err(status),
                    AttemptEnd::Failed { status, abandoned } => {
                        let DecoderAttempt { lease, events, .. } = current;
                        drop(events); // cancels the call on the failed replica
                        if abandoned {
                            tried.push(lease.id());
                            lease.abandoned();
                        } else {
                            failed("decoder", lease, &mut tried, status.clone());
                        }
                        if !is_retryable(&status) {
                            return Err(stage_status("decoder", status));
                        }
                        if self.produced.len() >= self.max_tokens as usize {
                            // It died after the last token but before `done`: nothing is left to
                            // generate, so finish here.
                            self.finish(vlm_proto::DecodeDone {
                                finish_reason: vlm_proto::FinishReason::Length as i32,
                                completion_tokens: self.produced.len() as u32,
                                ..Default::default()
                            })
                            .await;
                            return Ok(());
                        }
                        let Some(pause) = self
                            .stages
                            .decoder
                            .retry
                            .next_retry(attempt, &status, deadline)
                        else {
                            return Err(stage_status("decoder", status));
                        };
                        tracing::warn!(
                            attempt,
                            tokens = self.produced.len(),
                            "decoder failed mid-stream; resuming on another replica: {}",
                            status.message()
                        );
                        retry_event("failover", "decoder", attempt, &status);
                        tokio::time::sleep(pause).await;
                        attempt += 1;
                        current = open_decoder_with_retry(
                            &self.stages,
                            &self.setup,
                            &self.produced,
                            &self.log,
                            &mut tried,
                            &mut attempt,
                            deadline,
                        )
                        .await?;
                    }
                }
            }
        })
        .await;
        let result = result.unwrap_or_else(|_| {
            Err(Status::deadline_exceeded(
                "request deadline exceeded while generating",
            ))
        });
        if let Some(s) = self.sequencer.take() {
            s.abort();
        }
        if let Err(status) = result {
            let _ = self.tx.send(Err(status)).await;
        }
    }

    /// Relays one attempt's tokens until `done`, the client leaving, or a failure.
    async fn relay(&mut self, a: &mut DecoderAttempt) -> AttemptEnd {
        let log = self.log.clone();
        let image_failure = log.failed();
        tokio::pin!(image_failure);
        let started = TokioInstant::now();
        // When prefill began on the replica, and how many positions it prefills.
        let mut prefill: Option<(TokioInstant, f64)> = None;
        let mut last_token: Option<TokioInstant> = None;
        loop {
            // Queueing for a decoding slot says little about the replica, so it is bounded only by
            // the clamp's maximum (and the deadline); then the prefill by the adaptive
            // per-position timeout, and every later token by the adaptive per-step timeout. All
            // of them only while another replica is left to go to.
            let (due, limit) = match (last_token, prefill) {
                (Some(t), _) => {
                    let l = adaptive_limit(
                        &self.stages.decoder,
                        &a.tried,
                        a.lease.id(),
                        &self.stages.decoder.timeout,
                        1.0,
                        self.deadline,
                    );
                    (t + l, Some(l))
                }
                (None, Some((t, units))) => {
                    let l = adaptive_limit(
                        &self.stages.decoder,
                        &a.tried,
                        a.lease.id(),
                        &self.stages.prefill,
                        units,
                        self.deadline,
                    );
                    (t + l, Some(l))
                }
                (None, None) => {
                    let mut exclude = a.tried.clone();
                    exclude.push(a.lease.id());
                    let l = if self.stages.decoder.replicas.has_alternative(&exclude) {
                        self.stages.prefill.max_limit(self.deadline)
                    } else {
                        self.deadline.saturating_duration_since(TokioInstant::now())
                    };
                    (started + l, Some(l))
                }
            };
            let event = tokio::select! {
                status = &mut image_failure => return AttemptEnd::Fatal(status),
                // The client hung up: ending here drops the decoder call (which stops decoding)
                // and, through the sequencer, the image pipelines.
                _ = self.tx.closed() => return AttemptEnd::Over,
                r = tokio::time::timeout_at(due, a.events.message()) => r,
            };
            let event = match event {
                Err(_) if TokioInstant::now() >= self.deadline => {
                    return AttemptEnd::Fatal(Status::deadline_exceeded(
                        "request deadline exceeded while generating",
                    ))
                }
                Err(_) => {
                    let l = limit.unwrap_or_default();
                    tracing::warn!(
                        replica = a.lease.url(),
                        limit_ms = l.as_millis() as u64,
                        "decoder slower than its adaptive timeout; abandoning it"
                    );
                    let status = Status::unavailable(format!(
                        "replica {} produced no token within the adaptive timeout of {} ms",
                        a.lease.url(),
                        l.as_millis()
                    ));
                    return AttemptEnd::Failed {
                        status,
                        abandoned: true,
                    };
                }
                Ok(Err(status)) => {
                    return AttemptEnd::Failed {
                        status,
                        abandoned: false,
                    }
                }
                Ok(Ok(None)) => {
                    return AttemptEnd::Failed {
                        status: Status::unavailable("decoder stream ended without `done`"),
                        abandoned: false,
                    }
                }
                Ok(Ok(Some(e))) => e,
            };
            match event.kind {
                Some(EventKind::Started(s)) => {
                    prefill = Some((TokioInstant::now(), f64::from(s.prefill_tokens.max(1))));
                }
                Some(EventKind::Token(t)) => {
                    let now = TokioInstant::now();
                    token_metrics(self.produced.is_empty(), self.started, last_token, now);
                    match (last_token, prefill) {
                        (Some(prev), _) => {
                            self.stages
                                .decoder
                                .timeout
                                .observe(a.lease.id(), now - prev, 1.0)
                        }
                        (None, p) => {
                            // Time to first token is this replica's latency sample for balancing.
                            a.lease.observe(now - started);
                            if let Some((t, units)) = p {
                                self.stages.prefill.observe(a.lease.id(), now - t, units);
                            }
                        }
                    }
                    last_token = Some(now);
                    self.produced.push(t.id);
                    let delta = TextDelta {
                        text: t.text_delta,
                        token_ids: vec![t.id],
                    };
                    let msg = GenerateResponse {
                        kind: Some(ResponseKind::Delta(delta)),
                    };
                    if self.tx.send(Ok(msg)).await.is_err() {
                        return AttemptEnd::Over; // the client went away; dropping the call cancels it
                    }
                }
                Some(EventKind::Done(d)) => {
                    self.finish(d).await;
                    // Read the call to its end (the decoder's OK trailers follow `done` at once):
                    // dropping it first would cancel it, and both sides would record CANCELLED.
                    let _ = tokio::time::timeout(DRAIN_AFTER_DONE, a.events.message()).await;
                    return AttemptEnd::Over;
                }
                None => return AttemptEnd::Fatal(Status::internal("decoder sent an empty event")),
            }
        }
    }

    async fn finish(&mut self, d: vlm_proto::DecodeDone) {
        let mut totals = match self.sequencer.take() {
            Some(s) => s.await.unwrap_or_default(),
            None => Totals::default(),
        };
        let fin = GenerateFinal {
            usage: Some(Usage {
                prompt_tokens: d.prompt_tokens,
                completion_tokens: d.completion_tokens,
                cached_prompt_tokens: d.cached_prompt_tokens,
            }),
            timings: Some(StageTimings {
                preprocess_ms: totals.preprocess_ms,
                encode_ms: totals.encode_ms,
                project_ms: totals.project_ms,
                prefill_ms: d.prefill_ms,
                decode_ms: d.decode_ms,
                total_ms: ms(self.started),
                cache: std::mem::take(&mut totals.cache),
                cache_ms: totals.cache_ms,
            }),
            trace_id: self.trace_id.clone(),
            finish_reason: d.finish_reason,
            // Vision rows per image in request order, then the prefill's decoder rows.
            layer_stats: std::mem::take(&mut totals.layers)
                .into_iter()
                .chain(d.layers)
                .collect(),
        };
        let _ = self
            .tx
            .send(Ok(GenerateResponse {
                kind: Some(ResponseKind::Final(fin)),
            }))
            .await;
    }
}

/// A retry or failover as an event on the request's span, with the reason, so the trace says
/// why a stage was called twice.
fn retry_event(name: &'static str, stage: &str, attempt: u32, status: &Status) {
    vlm_telemetry::span_event(
        name,
        &[
            ("vlm.stage", stage.to_string()),
            ("vlm.attempt", attempt.to_string()),
            ("rpc.grpc.status_code", (status.code() as i32).to_string()),
            ("reason", status.message().to_string()),
        ],
    );
    vlm_telemetry::Metrics::global().inc(
        "vlm_gateway_retries_total",
        "Stage calls repeated on another replica, by stage and kind (retry, failover).",
        &[("stage", stage), ("kind", name)],
    );
}

/// Tokens streamed to clients, time to first token and inter-token latency.
fn token_metrics(
    first: bool,
    request_started: Instant,
    last: Option<TokioInstant>,
    now: TokioInstant,
) {
    let m = vlm_telemetry::Metrics::global();
    m.inc(
        "vlm_tokens_generated_total",
        "Tokens generated and streamed to clients.",
        &[],
    );
    if first {
        m.observe(
            "vlm_time_to_first_token_seconds",
            "From receiving a request to streaming its first token.",
            &[],
            request_started.elapsed(),
        );
    } else if let Some(prev) = last {
        m.observe(
            "vlm_inter_token_latency_seconds",
            "Time between consecutive tokens of one stream.",
            &[],
            now - prev,
        );
    }
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
        let deadline = vlm_net::request_deadline(req.metadata(), self.cfg.default_timeout);
        let req = req.into_inner();
        self.validate(&req)?;
        let mut params = req.params.clone().unwrap_or_default();
        // Fix the seed here so a resumed or retried decode reproduces the same stream.
        let resolved = params_from_proto(Some(&params), self.cfg.default_max_tokens)?;
        params.seed = Some(resolved.seed);
        params.max_tokens = Some(resolved.max_tokens);
        let setup = DecodeSetup {
            prompt: req.prompt.clone(),
            params: Some(params),
            images: vec![ImageSlot { rows: 0 }; req.images.len()],
            resume_token_ids: vec![],
            monitor_layers: req.monitor_layers,
        };

        // Start every image pipeline at once; their outputs are logged in prompt order, and every
        // decoder attempt is fed from the log.
        let wire = self.cfg.wire_dtype.map_or(0, |d| d as i32);
        let mut per_image = Vec::with_capacity(req.images.len());
        for image in req.images.clone() {
            let (tx, rx) = mpsc::channel(4);
            let task = tokio::spawn(
                image_pipeline(
                    self.stages.clone(),
                    image,
                    wire,
                    req.monitor_layers,
                    deadline,
                    tx,
                )
                .in_current_span(),
            );
            per_image.push((task, rx));
        }
        let log = EmbeddingLog::new();
        let seq_log = log.clone();
        // Image pipelines live as long as the sequencer: a request that ends early stops them.
        let pipelines: Vec<AbortOnDrop> =
            per_image.iter().map(|(t, _)| AbortOnDrop::new(t)).collect();
        let sequencer = tokio::spawn(
            async move {
                let _pipelines = pipelines;
                let mut totals = Totals::default();
                for (task, mut rx) in per_image {
                    while let Some(chunk) = rx.recv().await {
                        match chunk {
                            Ok(c) => seq_log.push(c),
                            Err(s) => {
                                seq_log.fail(s);
                                return totals;
                            }
                        }
                    }
                    match task.await {
                        Ok(Ok(t)) => totals.add(&t),
                        Ok(Err(s)) => {
                            seq_log.fail(s);
                            return totals;
                        }
                        Err(e) => {
                            seq_log.fail(Status::internal(format!("image task failed: {e}")));
                            return totals;
                        }
                    }
                }
                seq_log.finish();
                totals
            }
            .in_current_span(),
        );
        let sequencer_abort = AbortOnDrop::new(&sequencer);

        // The first decoder call is made here, so prompt errors reach the client as the call's
        // status; once it streams, failures are handled by the relay.
        self.stages.decoder.retry.record_call();
        let mut tried = Vec::new();
        let mut attempt = 1;
        let first = open_decoder_with_retry(
            &self.stages,
            &setup,
            &[],
            &log,
            &mut tried,
            &mut attempt,
            deadline,
        )
        .await?;
        sequencer_abort.disarm(); // the relay owns the sequencer from here

        let (tx, rx) = mpsc::channel(32);
        let relay = Relay {
            stages: self.stages.clone(),
            max_tokens: resolved.max_tokens,
            setup,
            log,
            deadline,
            started,
            // The trace this request belongs to (the caller's, if it sent a traceparent).
            trace_id: vlm_telemetry::current_trace_id().unwrap_or_else(vlm_net::new_request_id),
            tx,
            sequencer: Some(sequencer),
            produced: Vec::new(),
        };
        tokio::spawn(relay.run(first, tried, attempt).in_current_span());
        Ok(Response::new(Box::pin(ReceiverStream::new(rx).fuse())))
    }

    async fn get_model_info(
        &self,
        _req: Request<GetModelInfoRequest>,
    ) -> Result<Response<ModelInfo>, Status> {
        Ok(Response::new(self.info.clone()))
    }
}
