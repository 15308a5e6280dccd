//! The gRPC face: request limits, then `Generate` wires the image pipelines, the embedding log and
//! the decoder relay together; `GetModelInfo` answers from the stages' own description.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;
use vlm_proto::gateway_server::{Gateway, GatewayServer};
use vlm_proto::{
    DecodeSetup, GenerateRequest, GenerateResponse, GetModelInfoRequest, ImagePlan, ImageSlot,
    ModelInfo, WatchRequest, WatchResponse,
};

use crate::chat_template::{ChatTemplate, TemplateCache};
use crate::decode::{open_decoder, Relay};
use crate::embeddings::{self, AbortOnDrop};
use crate::identity::encoder_info;
use crate::images::ImageJob;
use crate::routing::{self, RouteKey};
use crate::watch::Watches;
use crate::{fit, slots, views};
use crate::{GatewayConfig, Stages};

pub struct GatewayService {
    gen: Generator,
    watches: Watches,
}

impl GatewayService {
    pub fn new(cfg: GatewayConfig) -> anyhow::Result<Self> {
        let stages = Arc::new(Stages::new(&cfg));
        let watches = Watches::new(cfg.watch.clone());
        let gen = Generator {
            cfg: Arc::new(cfg),
            stages,
        };
        Ok(GatewayService { gen, watches })
    }

    /// The served model's name (`ModelInfo.model_id`).
    pub fn model_id(&self) -> &str {
        self.gen.stages.identity.model_id()
    }

    /// The gateway's compiled chat template, for the OpenAI endpoint beside it.
    pub fn templates(&self) -> Arc<TemplateCache> {
        self.gen.stages.templates.clone()
    }

    pub fn into_server(self) -> GatewayServer<Self> {
        GatewayServer::new(self)
    }
}

/// What one generation needs: the gateway's limits and the stages (with the cache they use).
#[derive(Clone)]
pub(crate) struct Generator {
    pub cfg: Arc<GatewayConfig>,
    pub stages: Arc<Stages>,
}

impl Generator {
    /// The same stages with another feature cache (a Watch stream's own).
    pub fn with_cache(&self, cache: Arc<vlm_cache::FeatureCache>) -> Generator {
        let stages = Stages {
            cache: Some(cache),
            ..(*self.stages).clone()
        };
        Generator {
            cfg: self.cfg.clone(),
            stages: Arc::new(stages),
        }
    }

    /// The model's chat template (the decoder's, through the model identity), compiled once.
    pub async fn template(
        &self,
        deadline: tokio::time::Instant,
    ) -> Result<Arc<ChatTemplate>, Status> {
        let info = self
            .stages
            .identity
            .model_info(&self.stages, deadline)
            .await?;
        self.stages.templates.compiled(info.chat_template.as_ref())
    }

    /// A `question` becomes the `prompt` the model's chat template makes of it: one user turn
    /// with one image part per image (regions add none), then the text. From here on the request
    /// is checked and run as if that prompt had been sent.
    async fn render_question(
        &self,
        req: &mut GenerateRequest,
        deadline: tokio::time::Instant,
    ) -> Result<(), Status> {
        if req.question.is_empty() {
            return Ok(());
        }
        if !req.prompt.is_empty() {
            return Err(Status::invalid_argument(
                "gateway: both `prompt` and `question` are set; set one: `prompt` is the raw \
                 prompt in the model's chat format, `question` plain text the gateway renders \
                 with the model's chat template",
            ));
        }
        if req.question.trim().is_empty() {
            return Err(Status::invalid_argument("gateway: question is empty"));
        }
        let max = self.cfg.max_prompt_bytes;
        if req.question.len() > max {
            return Err(Status::resource_exhausted(format!(
                "gateway: question of {} bytes exceeds the prompt limit of {max} bytes",
                req.question.len()
            )));
        }
        let template = self.template(deadline).await?;
        let images = req.images.len() + req.image_inputs.len();
        req.prompt = template
            .render_question(images, &req.question)
            .map_err(|e| {
                Status::invalid_argument(format!(
                    "gateway: the model's chat template refused the question: {e}"
                ))
            })?;
        Ok(())
    }

    /// The gateway's own limits; everything about the prompt and sampling is the decoder's.
    fn validate(&self, req: &GenerateRequest) -> Result<(), Status> {
        let c = &self.cfg;
        if req.prompt.trim().is_empty() {
            return Err(Status::invalid_argument(
                "gateway: prompt is empty (set `prompt` or `question`)",
            ));
        }
        if req.prompt.len() > c.max_prompt_bytes {
            return Err(Status::resource_exhausted(format!(
                "gateway: prompt of {} bytes exceeds the limit of {} bytes",
                req.prompt.len(),
                c.max_prompt_bytes
            )));
        }
        let images = req
            .images
            .iter()
            .chain(req.image_inputs.iter().map(|i| &i.data));
        for (i, img) in images.enumerate() {
            if img.is_empty() {
                return Err(Status::invalid_argument(format!(
                    "gateway: image {i} is empty (0 bytes; images count from 0)"
                )));
            }
            if img.len() > c.max_image_bytes {
                return Err(Status::resource_exhausted(format!(
                    "gateway: image {} is {} bytes, over the limit of {} bytes",
                    i,
                    img.len(),
                    c.max_image_bytes
                )));
            }
        }
        Ok(())
    }
}

impl Generator {
    /// For a tiling model, each slot's plan (views and packed rows, which the decoder needs before
    /// any embedding arrives); `None`s for a single-view model, whose images all have one size.
    pub async fn plans(
        &self,
        slots: &[slots::Slot],
        monitor_layers: bool,
        deadline: tokio::time::Instant,
    ) -> Result<Vec<Option<ImagePlan>>, Status> {
        if slots.is_empty() || !encoder_info(&self.stages, deadline).await?.tiles {
            return Ok(vec![None; slots.len()]);
        }
        let plans = slots.iter().map(|s| {
            let job = ImageJob {
                image: s.image.clone(),
                region: s.region,
                monitor_layers,
                deadline,
            };
            let stages = self.stages.clone();
            async move { views::plan(&stages, &job, false).await.map(Some) }
        });
        futures::future::try_join_all(plans).await
    }

    /// Starts one generation: images through cache, encoder and projector, the decoder's tokens
    /// relayed to the returned channel (deltas, then one final). Errors before the first decoder
    /// call (limits, plans, prompt and sampling checks) are returned as the status.
    pub async fn start(
        &self,
        mut req: GenerateRequest,
        deadline: tokio::time::Instant,
        started: Instant,
        session: Option<String>,
    ) -> Result<mpsc::Receiver<Result<GenerateResponse, Status>>, Status> {
        let slots = slots::slots(&req, self.cfg.max_images, self.cfg.max_regions)?;
        self.render_question(&mut req, deadline).await?;
        self.validate(&req)?;
        // Refused before any image is decoded if its images cannot fit the context.
        fit::check(&self.stages, &req, &slots, deadline).await?;
        let plans = self.plans(&slots, req.monitor_layers, deadline).await?;
        let setup = DecodeSetup {
            prompt: req.prompt,
            params: req.params,
            images: slots
                .iter()
                .zip(&plans)
                .map(|(s, p)| {
                    let layout = p.as_ref().and_then(|p| p.layout);
                    ImageSlot {
                        rows: p.as_ref().map_or(0, |p| p.packed_rows),
                        region: s.region.is_some(),
                        token_rows: layout.map_or(0, |l| l.token_rows),
                        token_cols: layout.map_or(0, |l| l.token_cols),
                    }
                })
                .collect(),
            resume_token_ids: vec![],
            monitor_layers: req.monitor_layers,
        };
        // The decoder call goes where this prompt's prefix most likely is (see `routing`).
        let images = slots.iter().map(|s| &s.image[..]);
        let key = RouteKey::new(&setup.prompt, images, session.as_deref());
        let jobs = slots.into_iter().zip(plans).collect();
        let (log, sequencer) = embeddings::start(&self.stages, jobs, req.monitor_layers, deadline);
        let sequencer_abort = AbortOnDrop::new(&sequencer);

        // The first decoder call is made here, so prompt and sampling errors (the decoder checks
        // them) reach the client as the call's status; once it streams, the relay handles
        // failures.
        let mut calls = self
            .stages
            .decoder
            .call(deadline)
            .routed(self.stages.router.clone(), key);
        let first = open_decoder(&self.stages, &mut calls, &setup, &[], &log).await?;
        sequencer_abort.disarm(); // the relay owns the sequencer from here

        let (tx, rx) = mpsc::channel(32);
        let relay = Relay {
            stages: self.stages.clone(),
            calls,
            setup,
            log,
            started,
            // The trace this request belongs to (the caller's, if it sent a traceparent).
            trace_id: vlm_telemetry::current_trace_id().unwrap_or_else(vlm_net::new_request_id),
            tx,
            sequencer: Some(sequencer),
            produced: Vec::new(),
        };
        tokio::spawn(relay.run(first).in_current_span());
        Ok(rx)
    }
}

type GenerateStream = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send>>;
type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Gateway for GatewayService {
    type GenerateStream = GenerateStream;
    type WatchStream = WatchStream;

    async fn generate(
        &self,
        req: Request<GenerateRequest>,
    ) -> Result<Response<GenerateStream>, Status> {
        let started = Instant::now();
        let deadline = vlm_net::request_deadline(req.metadata(), self.gen.cfg.default_timeout);
        let session = routing::session_of(req.metadata())?;
        let rx = self
            .gen
            .start(req.into_inner(), deadline, started, session)
            .await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx).fuse())))
    }

    async fn watch(
        &self,
        req: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<WatchStream>, Status> {
        let deadline = vlm_net::DeadlineSource::call_deadline(&req);
        let peer = vlm_net::Peer::of_grpc(&req);
        // Behind the admission layer every message is charged to the budget; in-process calls
        // (tests) have no ledger and charge nothing.
        let ledger = req
            .extensions()
            .get::<vlm_net::MessageLedger>()
            .cloned()
            .unwrap_or_default();
        let rx = self
            .watches
            .open(&self.gen, peer, req.into_inner(), ledger, deadline)?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx).fuse())))
    }

    async fn get_model_info(
        &self,
        req: Request<GetModelInfoRequest>,
    ) -> Result<Response<ModelInfo>, Status> {
        let deadline = vlm_net::request_deadline(req.metadata(), self.gen.cfg.default_timeout);
        let info = self
            .gen
            .stages
            .identity
            .model_info(&self.gen.stages, deadline)
            .await?;
        Ok(Response::new(info))
    }
}
