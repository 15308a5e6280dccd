//! The encoder service: image bytes → preprocessing → CLIP vision tower → feature chunks.
//! Loads only `vision_tower.*` from the checkpoint.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use futures::Stream;
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};
use vlm_model::{
    Checkpoint, DType, Device, ImageLimits, ImageProcessorConfig, Preprocessor, Quantization,
    VisionEncoder,
};
use vlm_proto::encode_response::Kind;
use vlm_proto::encoder_server::{Encoder, EncoderServer};
use vlm_proto::{EncodeRequest, EncodeResponse, EncodeStats, EncoderInfo, EncoderInfoRequest};
use vlm_serving::{from_model_tensor, run_model, wire_dtype_for};
use vlm_tensor::{TensorChunker, WireDType};

#[derive(Debug, Clone)]
pub struct EncoderConfig {
    /// Checkpoint directory (llava-hf layout).
    pub model: PathBuf,
    pub dtype: DType,
    /// How the vision tower's linear layers are stored (`--quantize`).
    pub quantization: Quantization,
    pub image_limits: ImageLimits,
    /// Largest encoded image accepted, in bytes.
    pub max_image_bytes: usize,
    /// Images encoded at the same time; further requests wait for a slot.
    pub max_concurrent: usize,
    /// Test-only fault hook: answer every request this much later, to play a slow replica. Set
    /// from `VLM_FAULT_ENCODE_DELAY_MS`.
    pub fault_encode_delay: Option<std::time::Duration>,
}

struct Model {
    preprocessor: Preprocessor,
    vision: VisionEncoder,
    device: Device,
}

pub struct EncoderService {
    model: Arc<Model>,
    permits: Arc<Semaphore>,
    max_image_bytes: usize,
    default_wire: WireDType,
    requests: AtomicU64,
    preprocessing: String,
    fault_encode_delay: Option<std::time::Duration>,
}

impl EncoderService {
    pub fn load(cfg: &EncoderConfig) -> anyhow::Result<Self> {
        if let Some(d) = cfg.fault_encode_delay {
            tracing::warn!(
                delay_ms = d.as_millis() as u64,
                "FAULT HOOK ACTIVE: every encode is delayed (test use only)"
            );
        }
        let ckpt = Checkpoint::open(&cfg.model)?;
        vlm_serving::check_servable(ckpt.config())?;
        let device = Device::Cpu;
        let preprocessor = Preprocessor::new(
            ImageProcessorConfig::from_dir(&cfg.model, &ckpt.config().vision)?,
            cfg.image_limits,
        )?;
        let vision = VisionEncoder::load_quantized(&ckpt, cfg.dtype, &device, cfg.quantization)?;
        let preprocessing = format!("{:?}", preprocessor.config());
        Ok(EncoderService {
            requests: AtomicU64::new(0),
            preprocessing,
            fault_encode_delay: cfg.fault_encode_delay,
            model: Arc::new(Model {
                preprocessor,
                vision,
                device,
            }),
            permits: Arc::new(Semaphore::new(cfg.max_concurrent.max(1))),
            max_image_bytes: cfg.max_image_bytes,
            default_wire: wire_dtype_for(cfg.dtype),
        })
    }

    pub fn into_server(self) -> EncoderServer<Self> {
        EncoderServer::new(self)
    }
}

type EncodeStream = Pin<Box<dyn Stream<Item = Result<EncodeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Encoder for EncoderService {
    type EncodeStream = EncodeStream;

    async fn encode(&self, req: Request<EncodeRequest>) -> Result<Response<EncodeStream>, Status> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let req = req.into_inner();
        if req.image.len() > self.max_image_bytes {
            return Err(Status::resource_exhausted(format!(
                "image of {} bytes exceeds the limit of {} bytes",
                req.image.len(),
                self.max_image_bytes
            )));
        }
        let options = req.options.unwrap_or_default();
        let wire = WireDType::from_proto_or(options.wire_dtype, self.default_wire)?;
        let model = self.model.clone();
        let queued = Instant::now();
        // The model runs on a blocking thread; its stage spans hang off this call's span.
        let call_span = tracing::Span::current();
        let monitor_layers = options.monitor_layers;
        let (features, stats) = run_model(&self.permits, move |cancel| {
            let queue_ms = ms(queued);
            let t = Instant::now();
            let pixels = tracing::info_span!(parent: &call_span, "preprocess", image.bytes = req.image.len())
                .in_scope(|| model.preprocessor.preprocess(&req.image, &model.device))?;
            let preprocess_ms = ms(t);
            cancel.check()?;
            vlm_telemetry::metrics::observe_stage("preprocess", t.elapsed());
            let t = Instant::now();
            let mut monitored = Vec::new();
            let (features, layers) = tracing::info_span!(parent: &call_span, "vision_forward")
                .in_scope(|| {
                    let monitor = monitor_layers.then_some(&mut monitored);
                    let features = model.vision.forward_monitored(&pixels, monitor, cancel)?;
                    let layers = vlm_serving::layer_stats_rows("vision", &monitored);
                    Ok::<_, vlm_model::ModelError>((features, layers))
                })?;
            let features = features.squeeze(0)?;
            vlm_telemetry::metrics::observe_stage("vision_forward", t.elapsed());
            let stats = EncodeStats {
                preprocess_ms,
                encode_ms: ms(t),
                queue_ms,
                layers,
            };
            Ok((features, stats))
        })
        .await?;
        if let Some(d) = self.fault_encode_delay {
            tokio::time::sleep(d).await;
        }
        let (shape, values) = from_model_tensor(&features)?;
        tracing::debug!(?shape, ?stats, "encoded image");
        let chunks = TensorChunker::new(values, &shape, wire, options.chunk_bytes as usize)?;
        let out = chunks
            .map(|c| {
                Ok(EncodeResponse {
                    kind: Some(Kind::Chunk(c)),
                })
            })
            .chain(std::iter::once(Ok(EncodeResponse {
                kind: Some(Kind::Stats(stats)),
            })));
        let fingerprint = self.model.vision.fingerprint();
        Ok(vlm_net::with_fingerprint(
            Response::new(Box::pin(tokio_stream::iter(out))),
            fingerprint,
        ))
    }

    async fn info(
        &self,
        _req: Request<EncoderInfoRequest>,
    ) -> Result<Response<EncoderInfo>, Status> {
        Ok(Response::new(EncoderService::info(self)))
    }
}

impl EncoderService {
    fn info(&self) -> EncoderInfo {
        EncoderInfo {
            model_fingerprint: self.model.vision.fingerprint().to_string(),
            quantization: self.model.vision.quantization().to_string(),
            preprocessing: self.preprocessing.clone(),
            requests_total: self.requests.load(Ordering::Relaxed),
            feature_rows: self.model.vision.num_features() as u32,
            feature_dim: self.model.vision.feature_dim() as u32,
            default_wire_dtype: self.default_wire.to_proto() as i32,
            image_size: self.model.vision.image_size() as u32,
            vision_model_type: "clip_vision_model".into(),
        }
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}
