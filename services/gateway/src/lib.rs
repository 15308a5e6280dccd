//! The gateway: the mesh's public API. Per request it runs, for every image, encoder → projector
//! as a pipelined relay (chunks are forwarded as they arrive, never buffered whole), feeds the
//! projected rows to the decoder in prompt order, and streams the decoder's tokens back.
//! It loads no weights; it reads `config.json` only to describe the model.

use std::path::PathBuf;
use std::pin::Pin;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant as TokioInstant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
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
    DecodeRequest, DecodeSetup, EncodeOptions, EncodeRequest, GenerateFinal, GenerateRequest,
    GenerateResponse, GetModelInfoRequest, ImageSlot, ModelInfo, StageTimings, TensorChunk,
    TextDelta, Usage,
};
use vlm_serving::params_from_proto;

#[derive(Debug, Clone)]
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
}

pub struct GatewayService {
    cfg: GatewayConfig,
    info: ModelInfo,
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
        Ok(GatewayService { cfg, info })
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

/// Encoder → projector for one image; forwards projected chunks to `out` as they arrive.
async fn image_pipeline(
    mut encoder: EncoderClient<Channel>,
    mut projector: ProjectorClient<Channel>,
    image: bytes::Bytes,
    wire_dtype: i32,
    deadline: TokioInstant,
    out: mpsc::Sender<Result<TensorChunk, Status>>,
) -> Result<ImageTimings, Status> {
    let mut timings = ImageTimings::default();
    let req = EncodeRequest {
        image,
        options: Some(EncodeOptions {
            wire_dtype,
            chunk_bytes: 0,
        }),
    };
    let mut features = encoder
        .encode(with_deadline(req, deadline))
        .await
        .map_err(|s| stage_status("encoder", s))?
        .into_inner();
    let (to_projector, projector_in) = mpsc::channel::<TensorChunk>(4);
    let started = Instant::now();
    let mut projected = projector
        .project(with_deadline(ReceiverStream::new(projector_in), deadline))
        .await
        .map_err(|s| stage_status("projector", s))?
        .into_inner();
    // Relay encoder chunks to the projector while projected chunks flow to the decoder.
    let relay = async {
        while let Some(msg) = features
            .message()
            .await
            .map_err(|s| stage_status("encoder", s))?
        {
            match msg.kind {
                Some(EncodeKind::Chunk(c)) => {
                    if to_projector.send(c).await.is_err() {
                        break; // the projector call ended; its status is reported below
                    }
                }
                Some(EncodeKind::Stats(s)) => {
                    timings.preprocess_ms = s.preprocess_ms;
                    timings.encode_ms = s.encode_ms;
                }
                None => return Err(Status::internal("encoder sent an empty message")),
            }
        }
        drop(to_projector);
        Ok::<_, Status>(())
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
    tokio::try_join!(relay, forward)?;
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
                EncoderClient::new(self.cfg.encoder.clone()),
                ProjectorClient::new(self.cfg.projector.clone()),
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
            let mut totals = ImageTimings::default();
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
                    Ok(Ok(t)) => {
                        totals.preprocess_ms += t.preprocess_ms;
                        totals.encode_ms += t.encode_ms;
                        totals.project_ms += t.project_ms;
                    }
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
                let mut totals = ImageTimings::default();
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
