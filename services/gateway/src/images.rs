//! One image's way to the decoder: feature-cache lookup (keyed by the weights of the encoder
//! that would encode it now), then encoder → projector as a pipelined relay; projected chunks go
//! out as they arrive. A retryable failure of either stage is retried on other replicas; chunks
//! already forwarded are not sent again (both stages are deterministic, so a new attempt produces
//! the same chunks).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};
use vlm_cache::{feature_key, Fill, Outcome};
use vlm_net::{fingerprint_of, with_deadline, Lease};
use vlm_proto::encode_response::Kind as EncodeKind;
use vlm_proto::encoder_client::EncoderClient;
use vlm_proto::projector_client::ProjectorClient;
use vlm_proto::{CacheStatus, EncodeOptions, EncodeRequest, EncodeStats, TensorChunk};
use vlm_tensor::{TensorValue, DEFAULT_CHUNK_BYTES};

use crate::identity::encoder_info;
use crate::stage::{Failure, StageCall};

/// Why encoder and projector calls are abandoned.
const SLOW: vlm_telemetry::metrics::labels::AbandonReason =
    vlm_telemetry::metrics::labels::AbandonReason::slow;
use crate::Stages;

/// Per-image numbers the encoder reports and the gateway measures.
#[derive(Default, Clone)]
pub(crate) struct ImageTimings {
    pub preprocess_ms: f64,
    pub encode_ms: f64,
    pub project_ms: f64,
    pub cache_ms: f64,
    pub cache: CacheStatus,
    /// Vision layer statistics, when the request asked for them and the encoder ran.
    pub layers: Vec<vlm_proto::LayerStats>,
    /// Views the image has (1 unless tiled), and how many the encoder ran for this request.
    pub views: u32,
    pub encoded_views: Vec<u32>,
    /// The tile grid (0 x 0: one view).
    pub grid: (u32, u32),
}

/// One image of a request.
pub(crate) struct ImageJob {
    pub image: Bytes,
    /// Only this region of the image.
    pub region: Option<vlm_proto::Region>,
    pub monitor_layers: bool,
    pub deadline: Instant,
}

pub(crate) type ChunkTx = mpsc::Sender<Result<TensorChunk, Status>>;

/// Where this image's features come from.
#[derive(Default)]
struct Source {
    /// Features from the cache (the encoder is not called).
    cached: Option<TensorValue>,
    /// This request encodes the image for the cache.
    fill: Option<Fill>,
    /// The encoder weights the cache key was made for.
    fingerprint: Option<String>,
}

/// Runs one image through cache, encoder and projector; its projected chunks go to `out`.
pub(crate) async fn image_pipeline(
    stages: Arc<Stages>,
    job: ImageJob,
    out: ChunkTx,
) -> Result<ImageTimings, Status> {
    let mut timings = ImageTimings {
        cache: CacheStatus::Off,
        views: 1,
        ..Default::default()
    };
    let mut source = lookup(&stages, &job, &mut timings).await?;
    let started = std::time::Instant::now();
    let mut encoder = stages.encoder.call(job.deadline);
    let mut projector = stages.projector.call(job.deadline);
    let mut forwarded = 0usize;
    loop {
        let attempt = Attempt {
            stages: &stages,
            job: &job,
            source: &mut source,
            encoder: &mut encoder,
            projector: &mut projector,
            out: &out,
            forwarded: &mut forwarded,
        };
        match attempt.run().await {
            Ok(stats) => {
                if let Some(s) = stats {
                    timings.encoded_views = vec![0];
                    timings.preprocess_ms = s.preprocess_ms;
                    timings.encode_ms = s.encode_ms;
                    timings.layers = s.layers;
                }
                timings.project_ms = started.elapsed().as_secs_f64() * 1e3;
                return Ok(timings);
            }
            Err(f) if f.stage == "encoder" => encoder.again(f, "retry").await?,
            Err(f) => projector.again(f, "retry").await?,
        }
    }
}

/// The cache's answer for this image, keyed by what an encoder replica serves right now.
async fn lookup(
    stages: &Stages,
    job: &ImageJob,
    timings: &mut ImageTimings,
) -> Result<Source, Status> {
    let Some(cache) = &stages.cache else {
        return Ok(Source::default());
    };
    let info = encoder_info(stages, job.deadline).await?;
    stages
        .identity
        .observe("encoder", Some(&info.model_fingerprint));
    let key = feature_key(
        &job.image,
        &info.model_fingerprint,
        &info.preprocessing,
        &match job.region {
            None => format!("wire={}", stages.wire_dtype),
            Some(r) => format!(
                "wire={};region={},{},{},{}",
                stages.wire_dtype, r.x0, r.y0, r.x1, r.y1
            ),
        },
    );
    let t = std::time::Instant::now();
    let found = cache.lookup(&key).await;
    timings.cache_ms = t.elapsed().as_secs_f64() * 1e3;
    timings.cache = match found.outcome {
        Outcome::Hit => CacheStatus::Hit,
        Outcome::Miss => CacheStatus::Miss,
        Outcome::Error => CacheStatus::Error,
    };
    Ok(Source {
        cached: found.features,
        fill: found.fill,
        fingerprint: Some(info.model_fingerprint),
    })
}

/// When each feature chunk went to the projector: its projected rows are due within the
/// projector's adaptive timeout per row block from then (one output chunk per input chunk).
#[derive(Default)]
struct SentLog {
    at: Mutex<Vec<Instant>>,
    signal: Notify,
}

impl SentLog {
    async fn send(&self, to: &mpsc::Sender<TensorChunk>, c: TensorChunk) -> bool {
        self.at.lock().expect("sent lock").push(Instant::now());
        self.signal.notify_one();
        to.send(c).await.is_ok()
    }

    fn sent_at(&self, index: usize) -> Option<Instant> {
        self.at.lock().expect("sent lock").get(index).copied()
    }
}

/// One encoder → projector attempt for an image.
struct Attempt<'a> {
    stages: &'a Stages,
    job: &'a ImageJob,
    source: &'a mut Source,
    encoder: &'a mut StageCall,
    projector: &'a mut StageCall,
    out: &'a ChunkTx,
    /// Projected chunks already sent to `out` by earlier attempts.
    forwarded: &'a mut usize,
}

impl Attempt<'_> {
    async fn run(self) -> Result<Option<EncodeStats>, Failure> {
        let proj = self.projector.pick()?;
        let (to_projector, projector_in) = mpsc::channel::<TensorChunk>(4);
        let mut client = ProjectorClient::new(proj.channel());
        let deadline = self.job.deadline;
        let call = client.project(with_deadline(ReceiverStream::new(projector_in), deadline));
        let projected = match tokio::time::timeout_at(deadline, call).await {
            Ok(Ok(r)) => r,
            Ok(Err(s)) => return Err(self.projector.failed(proj, s)),
            Err(_) => return Err(self.projector.deadline_failure()),
        };
        let fingerprint = fingerprint_of(projected.metadata());
        self.stages.identity.observe("projector", fingerprint);
        let sent = SentLog::default();
        let feed = Feed {
            stages: self.stages,
            job: self.job,
            source: self.source,
            encoder: self.encoder,
            sent: &sent,
        };
        let forward = Forward {
            projector: self.projector,
            lease: proj,
            sent: &sent,
            out: self.out,
            forwarded: self.forwarded,
        };
        let (stats, ()) =
            tokio::try_join!(feed.run(to_projector), forward.run(projected.into_inner()))?;
        Ok(stats)
    }
}

/// The projector's input: cached features, or the encoder's stream teed into the cache.
struct Feed<'a> {
    stages: &'a Stages,
    job: &'a ImageJob,
    source: &'a mut Source,
    encoder: &'a mut StageCall,
    sent: &'a SentLog,
}

impl Feed<'_> {
    /// Owns `to_projector`: when this completes, the projector's input stream ends.
    async fn run(
        self,
        to_projector: mpsc::Sender<TensorChunk>,
    ) -> Result<Option<EncodeStats>, Failure> {
        if let Some(value) = &self.source.cached {
            for chunk in value.chunks(DEFAULT_CHUNK_BYTES) {
                if !self.sent.send(&to_projector, chunk).await {
                    break;
                }
            }
            return Ok(None);
        }
        let enc = self.encoder.pick()?;
        let req = EncodeRequest {
            region: self.job.region,
            views: vec![],
            layout_only: false,
            image: self.job.image.clone(),
            options: Some(EncodeOptions {
                wire_dtype: self.stages.wire_dtype,
                chunk_bytes: 0,
                monitor_layers: self.job.monitor_layers,
            }),
        };
        // The encoder computes the whole image before streaming, so the first message is what
        // the per-image adaptive timeout bounds.
        let timeout = &self.encoder.stage.timeout;
        let limit = self.encoder.limit(&enc, timeout, 1.0);
        let started = Instant::now();
        let mut client = EncoderClient::new(enc.channel());
        let call = client.encode(with_deadline(req, self.job.deadline));
        let encoder = &self.encoder;
        let response = match encoder
            .wait_unless_outlier(&enc, timeout, 1.0, started, limit, call)
            .await
        {
            Ok(Ok(r)) => r,
            Ok(Err(s)) => return Err(self.encoder.failed(enc, s)),
            Err(limit) => return Err(self.encoder.too_slow(enc, limit, "did not answer", SLOW)),
        };
        let fingerprint = fingerprint_of(response.metadata()).map(str::to_owned);
        self.stages
            .identity
            .observe("encoder", fingerprint.as_deref());
        let mut features = response.into_inner();
        if let Some(fill) = &mut self.source.fill {
            fill.restart();
        }
        let mut stats = None;
        let mut first = true;
        loop {
            let msg = if first {
                let next = features.message();
                encoder
                    .wait_unless_outlier(&enc, timeout, 1.0, started, limit, next)
                    .await
            } else {
                tokio::time::timeout_at(self.job.deadline, features.message())
                    .await
                    .map_err(|_| limit)
            };
            let msg = match msg {
                Ok(Ok(m)) => m,
                Ok(Err(s)) => return Err(self.encoder.failed(enc, s)),
                Err(limit) => {
                    return Err(self.encoder.too_slow(enc, limit, "did not answer", SLOW))
                }
            };
            if first {
                let took = started.elapsed();
                self.encoder.stage.timeout.observe(enc.id(), took, 1.0);
                first = false;
            }
            let Some(msg) = msg else { break };
            match msg.kind {
                Some(EncodeKind::Chunk(c)) => {
                    if let Some(fill) = &mut self.source.fill {
                        fill.push(&c);
                    }
                    if !self.sent.send(&to_projector, c).await {
                        break; // the projector call ended; its status is reported by `Forward`
                    }
                }
                Some(EncodeKind::Stats(s)) => stats = Some(s),
                None => {
                    let status = Status::internal("encoder sent an empty message");
                    return Err(Failure::new("encoder", status));
                }
            }
        }
        enc.success();
        // Stored only under the key of the weights that produced the features (a replica swapped
        // for other weights since the lookup leaves the cache alone).
        if let Some(fill) = self.source.fill.take() {
            if fingerprint.is_some() && fingerprint == self.source.fingerprint {
                fill.finish();
            }
        }
        Ok(stats)
    }
}

/// The projector's output, relayed to the request's chunk channel.
struct Forward<'a> {
    projector: &'a mut StageCall,
    lease: Lease,
    sent: &'a SentLog,
    out: &'a ChunkTx,
    forwarded: &'a mut usize,
}

impl Forward<'_> {
    async fn run(self, mut projected: Streaming<TensorChunk>) -> Result<(), Failure> {
        let mut index = 0usize;
        loop {
            let msg = match self.next(&mut projected, index).await {
                Ok(m) => m,
                Err(why) => return Err(self.give_up(why)),
            };
            let Some((chunk, sent_at)) = msg else { break };
            if let Some(t0) = sent_at {
                let timeout = &self.projector.stage.timeout;
                timeout.observe(self.lease.id(), t0.elapsed(), 1.0);
            }
            if index >= *self.forwarded {
                if self.out.send(Ok(chunk)).await.is_err() {
                    return Err(Failure::cancelled());
                }
                *self.forwarded += 1;
            }
            index += 1;
        }
        self.lease.success();
        Ok(())
    }

    /// The projector's next chunk, with when its input was sent; bounded by the adaptive timeout
    /// per row block from that moment.
    async fn next(
        &self,
        projected: &mut Streaming<TensorChunk>,
        index: usize,
    ) -> Result<Option<(TensorChunk, Option<Instant>)>, GiveUp> {
        let next = projected.message();
        tokio::pin!(next);
        loop {
            match self.sent.sent_at(index) {
                Some(t0) => {
                    let timeout = &self.projector.stage.timeout;
                    let limit = self.projector.limit(&self.lease, timeout, 1.0);
                    let r = self
                        .projector
                        .wait_unless_outlier(&self.lease, timeout, 1.0, t0, limit, &mut next)
                        .await
                        .map_err(GiveUp::TooSlow)?;
                    return r.map(|m| m.map(|c| (c, Some(t0)))).map_err(GiveUp::Status);
                }
                // Nothing sent yet for this block: the encoder is still working (and has its own
                // timeout); wait for the projector or for the next send.
                None => tokio::select! {
                    r = &mut next => return r.map(|m| m.map(|c| (c, None))).map_err(GiveUp::Status),
                    _ = self.sent.signal.notified() => continue,
                    _ = tokio::time::sleep_until(self.projector.deadline) => {
                        return Err(GiveUp::TooSlow(Duration::ZERO));
                    }
                },
            }
        }
    }

    fn give_up(self, why: GiveUp) -> Failure {
        match why {
            GiveUp::Status(s) => self.projector.failed(self.lease, s),
            GiveUp::TooSlow(limit) => {
                self.projector
                    .too_slow(self.lease, limit, "did not answer", SLOW)
            }
        }
    }
}

/// Why a wait for the projector ended without a chunk.
enum GiveUp {
    Status(Status),
    TooSlow(Duration),
}
