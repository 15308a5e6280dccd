//! The encoder service: image bytes → preprocessing → vision tower (CLIP, or GLM-4.1V's up to
//! its downsample) → feature chunks. Loads only the vision tower's weights from the checkpoint.

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
use vlm_proto::{
    EncodeRequest, EncodeResponse, EncodeStats, EncoderInfo, EncoderInfoRequest, ImagePlan,
};
use vlm_serving::{from_model_tensor, run_model, wire_dtype_for};
use vlm_tensor::{TensorChunker, WireDType};

#[derive(Debug, Clone)]
pub struct EncoderConfig {
    /// Checkpoint directory (a LLaVA, LLaVA-NeXT or GLM-4.1V layout).
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
        let device = Device::Cpu;
        let preprocessor = Preprocessor::new(
            ImageProcessorConfig::for_model(&cfg.model, ckpt.config())?,
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
        self.check_bytes(&req.image)?;
        if req.layout_only {
            return Err(Status::invalid_argument(
                "encoder: `layout_only` is a Plan option; Encode always decodes the image",
            ));
        }
        let options = req.options.unwrap_or_default();
        let wire = WireDType::from_proto_or(options.wire_dtype, self.default_wire)?;
        let region = req
            .region
            .as_ref()
            .map(vlm_serving::region_from_proto)
            .transpose()?;
        let views = req.views;
        let model = self.model.clone();
        let queued = Instant::now();
        // The model runs on a blocking thread; its stage spans hang off this call's span.
        let call_span = tracing::Span::current();
        let monitor_layers = options.monitor_layers;
        let (features, layout, stats) = run_model(&self.permits, move |cancel| {
            let queue_ms = ms(queued);
            let t = Instant::now();
            let (layout, pixels) = tracing::info_span!(parent: &call_span, "preprocess", image.bytes = req.image.len())
                .in_scope(|| model.pixels(&req.image, region, &views))?;
            let preprocess_ms = ms(t);
            cancel.check()?;
            vlm_telemetry::metrics::observe_stage("preprocess", t.elapsed());
            let t = Instant::now();
            let mut monitored = Vec::new();
            let (features, layers) = tracing::info_span!(parent: &call_span, "vision_forward", views = pixels.dim(0)?)
                .in_scope(|| {
                    let monitor = monitor_layers.then_some(&mut monitored);
                    let features = model.vision.forward_monitored(&pixels, monitor, cancel)?;
                    let layers = vlm_serving::layer_stats_rows("vision", &monitored);
                    Ok::<_, vlm_model::ModelError>((features, layers))
                })?;
            // A single-view model answers [rows, dim], as it always has; a tiling or
            // native-resolution one [views, rows, dim] with the layout in the header.
            let features = if layout.is_plain() {
                features.squeeze(0)?
            } else {
                features
            };
            vlm_telemetry::metrics::observe_stage("vision_forward", t.elapsed());
            let stats = EncodeStats {
                preprocess_ms,
                encode_ms: ms(t),
                queue_ms,
                layers,
            };
            Ok((features, layout, stats))
        })
        .await?;
        if let Some(d) = self.fault_encode_delay {
            tokio::time::sleep(d).await;
        }
        let (shape, values) = from_model_tensor(&features)?;
        tracing::debug!(?shape, ?stats, "encoded image");
        let chunks = TensorChunker::new(values, &shape, wire, options.chunk_bytes as usize)?;
        // Tiled (LLaVA-NeXT) and native-resolution (GLM-4.1V) images carry their layout.
        let layout = (!layout.is_plain()).then(|| vlm_serving::layout_to_proto(&layout));
        let out = chunks
            .map(move |mut c| {
                if let Some(h) = &mut c.header {
                    h.layout = layout;
                }
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

    async fn plan(&self, req: Request<EncodeRequest>) -> Result<Response<ImagePlan>, Status> {
        let req = req.into_inner();
        self.check_bytes(&req.image)?;
        let region = req
            .region
            .as_ref()
            .map(vlm_serving::region_from_proto)
            .transpose()?;
        let model = self.model.clone();
        if req.layout_only {
            // A header read: no model permit, no pixel decoded.
            let t = Instant::now();
            let layout = model
                .preprocessor
                .layout_of(&req.image, region)
                .map_err(vlm_serving::model_status)?;
            return Ok(Response::new(model.plan(&layout, vec![], ms(t))));
        }
        let plan = run_model(&self.permits, move |_| {
            let t = Instant::now();
            let views = model.preprocessor.image_views(&req.image, region)?;
            let digests = views.digests().iter().map(|d| d.to_vec().into()).collect();
            Ok(model.plan(&views.layout, digests, ms(t)))
        })
        .await?;
        Ok(Response::new(plan))
    }

    async fn info(
        &self,
        _req: Request<EncoderInfoRequest>,
    ) -> Result<Response<EncoderInfo>, Status> {
        Ok(Response::new(EncoderService::info(self)))
    }
}

impl Model {
    /// The plan of an image of `layout` (its views' digests given, or none).
    fn plan(
        &self,
        layout: &vlm_model::ImageLayout,
        view_digests: Vec<tonic::codegen::Bytes>,
        preprocess_ms: f64,
    ) -> ImagePlan {
        let side = self.vision.patches_per_side();
        let packed_rows = layout.packed_rows(side, self.vision.num_features());
        // A native-resolution view is the whole image: its rows are the image's.
        let rows_per_view = match layout.tokens {
            Some(_) => packed_rows,
            None => self.vision.num_features(),
        };
        ImagePlan {
            layout: Some(vlm_serving::layout_to_proto(layout)),
            view_digests,
            rows_per_view: rows_per_view as u32,
            packed_rows: packed_rows as u32,
            preprocess_ms,
        }
    }

    /// The pixel values of the requested views (all when `views` is empty) of the image or its
    /// region, with the image's layout.
    fn pixels(
        &self,
        image: &[u8],
        region: Option<vlm_model::Region>,
        views: &[u32],
    ) -> Result<(vlm_model::ImageLayout, vlm_model::Tensor), vlm_model::ModelError> {
        let all = self.preprocessor.image_views(image, region)?;
        let n = all.views.len();
        let picked: Vec<_> = if views.is_empty() {
            all.views
        } else {
            let mut seen = vec![false; n];
            let mut out = Vec::with_capacity(views.len());
            for &v in views {
                match seen.get_mut(v as usize) {
                    Some(s) if !*s => {
                        *s = true;
                        out.push(all.views[v as usize].clone());
                    }
                    Some(_) => {
                        return Err(vlm_model::ModelError::InvalidInput(format!(
                            "view {v} is asked for twice"
                        )))
                    }
                    None => {
                        return Err(vlm_model::ModelError::InvalidInput(format!(
                            "view {v} does not exist: this image has {n} views"
                        )))
                    }
                }
            }
            out
        };
        let pixels = self.preprocessor.pixel_values(&picked, &self.device)?;
        Ok((all.layout, pixels))
    }
}

impl EncoderService {
    fn check_bytes(&self, image: &[u8]) -> Result<(), Status> {
        if image.len() > self.max_image_bytes {
            return Err(Status::resource_exhausted(format!(
                "image of {} bytes exceeds the limit of {} bytes",
                image.len(),
                self.max_image_bytes
            )));
        }
        Ok(())
    }

    fn info(&self) -> EncoderInfo {
        EncoderInfo {
            tiles: self
                .model
                .preprocessor
                .config()
                .image_grid_pinpoints
                .is_some()
                || self.model.vision.native_resolution(),
            model_fingerprint: self.model.vision.fingerprint().to_string(),
            quantization: self.model.vision.quantization().to_string(),
            preprocessing: self.preprocessing.clone(),
            requests_total: self.requests.load(Ordering::Relaxed),
            feature_rows: self.model.vision.num_features() as u32,
            feature_dim: self.model.vision.feature_dim() as u32,
            default_wire_dtype: self.default_wire.to_proto() as i32,
            image_size: self.model.vision.image_size() as u32,
            vision_model_type: if self.model.vision.native_resolution() {
                "glm4v_vision".into()
            } else {
                "clip_vision_model".into()
            },
        }
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}
