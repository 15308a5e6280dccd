//! The gateway: the mesh's public API. Per request it runs, for every image, encoder → projector
//! as a pipelined relay (chunks are forwarded as they arrive, never buffered whole), feeds the
//! projected rows to the decoder in prompt order, and streams the decoder's tokens back. It loads
//! no weights and links no model code: what the model is comes from the stages' `Info` calls.
//!
//! Where things live:
//! - [`service`]: the gRPC face (request limits, `Generate`, `GetModelInfo`);
//! - [`stage`]: the one stage-call abstraction (replica choice, adaptive timeouts, retries with
//!   budget and backoff, failure booking, retry metrics and span events);
//! - [`slots`]: a request's images and regions of interest, checked;
//! - [`images`]: per single-view image, feature-cache lookup → encoder → projector;
//! - [`views`]: per tiled (LLaVA-NeXT) image, per-view cache lookups → encoder for the missing
//!   views → projector (which packs);
//! - [`embeddings`]: the request's projected rows in prompt order, for every decoder attempt;
//! - [`decode`]: decoder calls, failover with resume, and the token relay to the client;
//! - [`routing`]: which decoder replica a call goes to (prefix-aware, within a load bound);
//! - [`identity`]: the model's identity and limits as the stages report them;
//! - [`chat_template`]: the model's chat template (compiled once), which renders a plain
//!   `question` and the OpenAI endpoint's `messages`;
//! - [`watch`]: live frame streams (`Watch`): change detection, feature reuse, questions;
//! - [`openai`]: the OpenAI-compatible HTTP endpoint over the same service.

pub mod chat_template;
mod decode;
mod embeddings;
mod fetch;
mod fit;
mod identity;
mod images;
pub mod openai;
mod routing;
mod service;
mod slots;
mod stage;
mod views;
mod watch;

use std::sync::Arc;
use std::time::Duration;

use vlm_net::{AdaptiveTimeout, AdaptiveTimeoutOptions, ReplicaSet, RetryOptions};

pub use routing::{RoutingConfig, RoutingMode};
pub use service::GatewayService;
pub use watch::WatchConfig;

use identity::Identity;
use stage::Stage;

#[derive(Clone)]
pub struct GatewayConfig {
    /// The served model's name (`ModelInfo.model_id`, the OpenAI `model`).
    pub model_id: String,
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
    /// Most regions of interest per image.
    pub max_regions: usize,
    /// Largest prompt accepted, in bytes.
    pub max_prompt_bytes: usize,
    /// Deadline for requests whose client sets none.
    pub default_timeout: Duration,
    /// Element type of feature/embedding chunks on internal hops (None = the encoder's default).
    pub wire_dtype: Option<vlm_proto::DType>,
    /// Feature cache (None = off).
    pub cache: Option<Arc<vlm_cache::FeatureCache>>,
    /// The gateway's memory budget (`--max-bytes-in-flight`, shared with its admission): every
    /// request's projected image embeddings, kept for the request's life, are held against it.
    pub memory: vlm_net::ByteBudget,
    /// The slots and queue the gateway's calls share (`--max-in-flight`, `--max-queue`): each
    /// question of a Watch stream takes a slot while it is answered (the stream itself holds
    /// none). None: questions are not admitted separately.
    pub admission: Option<vlm_net::AdmissionGate>,
    /// Live frame streams.
    pub watch: WatchConfig,
    /// How decoder calls pick their replica.
    pub routing: RoutingConfig,
}

/// What every request shares: the stages as the gateway calls them, the cache, the identity.
/// (A Watch stream's requests share all but the cache: they use the stream's own.)
#[derive(Clone)]
pub(crate) struct Stages {
    pub encoder: Arc<Stage>,
    pub projector: Arc<Stage>,
    pub decoder: Arc<Stage>,
    /// The decoder's prefill, per position (the per-step timeout is `decoder.timeout`).
    pub prefill: Arc<AdaptiveTimeout>,
    pub cache: Option<Arc<vlm_cache::FeatureCache>>,
    pub identity: Arc<Identity>,
    /// The model's chat template, compiled (for `question`s and the OpenAI endpoint).
    pub templates: Arc<chat_template::TemplateCache>,
    /// `EncodeOptions.wire_dtype` (0: the encoder's default).
    pub wire_dtype: i32,
    pub memory: vlm_net::ByteBudget,
    /// Where decoder calls go (prefix-aware routing).
    pub router: Arc<routing::Router>,
}

impl Stages {
    fn new(cfg: &GatewayConfig) -> Self {
        let stage = |name, replicas: &Arc<ReplicaSet>, unit| {
            Arc::new(Stage::new(
                name,
                replicas.clone(),
                cfg.retry.clone(),
                cfg.timeouts.clone(),
                unit,
            ))
        };
        Stages {
            encoder: stage("encoder", &cfg.encoder, "image"),
            projector: stage("projector", &cfg.projector, "row block"),
            decoder: stage("decoder", &cfg.decoder, "decode step"),
            prefill: Arc::new(AdaptiveTimeout::new("prefill token", cfg.timeouts.clone())),
            cache: cfg.cache.clone(),
            identity: Arc::new(Identity::new(cfg.model_id.clone(), cfg.wire_dtype)),
            templates: Arc::default(),
            wire_dtype: cfg.wire_dtype.map_or(0, |d| d as i32),
            memory: cfg.memory.clone(),
            router: Arc::new(routing::Router::new(cfg.routing)),
        }
    }
}
