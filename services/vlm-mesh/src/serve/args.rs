//! `vlm-mesh serve` arguments: those every role takes ([`CommonArgs`]) and each role's own.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::builder::TypedValueParser;
use clap::{Args, Subcommand};

pub use super::cache_args::CacheArgs;
use vlm_model::{ImageLimits, Quantization};
use vlm_net::TlsFiles;

#[derive(Args, Debug, Clone)]
pub struct CommonArgs {
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, env = "VLM_LISTEN", value_parser = crate::listen_arg::listen_addr)]
    pub listen: SocketAddr,
    /// Checkpoint directory in the Hugging Face llava-hf layout; `bundled:shapes-llava` is the
    /// demo model compiled into this binary (unpacked once into ~/.cache/vlm-mesh, or $VLM_CACHE_DIR).
    #[arg(long, env = "VLM_MODEL", default_value = crate::bundled::BUNDLED_MODEL)]
    pub model: PathBuf,
    /// Directory with `ca.pem`, `<role>.pem` and `<role>.key` (as written by `vlm-mesh certs`).
    #[arg(long, env = "VLM_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Mesh CA certificate (overrides the one in --tls-dir).
    #[arg(long, env = "VLM_TLS_CA")]
    pub ca: Option<PathBuf>,
    /// This service's certificate (overrides the one in --tls-dir).
    #[arg(long, env = "VLM_TLS_CERT")]
    pub cert: Option<PathBuf>,
    /// This service's private key (overrides the one in --tls-dir).
    #[arg(long, env = "VLM_TLS_KEY")]
    pub key: Option<PathBuf>,
    /// Compute dtype: f32 or f16. This build computes on the CPU only, where bf16 has no matmul;
    /// `bf16` is refused at start-up with that reason.
    #[arg(long, env = "VLM_DTYPE", default_value = "f32")]
    pub dtype: String,
    /// Calls this service serves at once; see --max-queue.
    #[arg(long, env = "VLM_MAX_IN_FLIGHT", default_value_t = 64)]
    pub max_in_flight: usize,
    /// Calls that may wait for a slot beyond --max-in-flight; more are refused at once with
    /// RESOURCE_EXHAUSTED (load shedding), so memory stays bounded under overload.
    #[arg(long, env = "VLM_MAX_QUEUE", default_value_t = 64)]
    pub max_queue: usize,
    /// Bytes of request data this service holds at once (request messages, image embeddings
    /// kept for a request or received before decoding, HTTP bodies being read): a call that
    /// does not fit waits in the queue until its deadline; one larger than all of it is refused
    /// with RESOURCE_EXHAUSTED. Model weights and the KV cache are budgeted apart.
    #[arg(long, env = "VLM_MAX_BYTES_IN_FLIGHT", default_value_t = vlm_net::DEFAULT_MAX_BYTES_IN_FLIGHT)]
    pub max_bytes_in_flight: u64,
    /// Also serve grpc.health.v1 (and nothing else) without TLS on this address, for probes
    /// that cannot present a client certificate, such as Kubernetes gRPC probes.
    #[arg(long, env = "VLM_HEALTH_LISTEN", value_parser = crate::listen_arg::listen_addr)]
    pub health_listen: Option<SocketAddr>,
    /// Serve Prometheus metrics (text format, any path) over plain HTTP on this address.
    #[arg(long, env = "VLM_METRICS_LISTEN", value_parser = crate::listen_arg::listen_addr)]
    pub metrics_listen: Option<SocketAddr>,
    /// Log line format on stderr: text or json.
    #[arg(long, env = "VLM_LOG_FORMAT", default_value = "text")]
    pub log_format: vlm_telemetry::LogFormat,
    /// Caller roles this service accepts: `any`, or roles such as `gateway` or `gateway,client`,
    /// matched against the caller certificate's `spiffe://vlm-mesh/<role>` URI SAN; others get
    /// PERMISSION_DENIED (health checks excepted). Default: `gateway` for the encoder, projector
    /// and decoder; `any` for the gateway.
    #[arg(long, env = "VLM_ALLOWED_CALLERS")]
    pub allowed_callers: Option<vlm_net::AllowedCallers>,
    /// Seconds between checks of the certificate, key and CA files: changed files are loaded
    /// for new connections (calls in flight carry on); unusable ones are refused with a
    /// warning and the previous ones kept. 0 reads them once, at start-up.
    #[arg(long, env = "VLM_TLS_RELOAD_INTERVAL_SECS", default_value_t = 10)]
    pub tls_reload_interval_secs: u64,
}

impl CommonArgs {
    /// TLS files for `role`: explicit paths win over `--tls-dir`; one of them is required.
    pub fn tls_files(&self, role: &str) -> anyhow::Result<TlsFiles> {
        let from_dir = self.tls_dir.as_ref().map(|d| TlsFiles::for_role(d, role));
        let pick = |explicit: &Option<PathBuf>, dir: Option<PathBuf>, what: &str| {
            explicit.clone().or(dir).with_context(|| {
                format!("no TLS {what}: pass --tls-dir (see `vlm-mesh certs`) or --{what}")
            })
        };
        Ok(TlsFiles {
            ca: pick(&self.ca, from_dir.as_ref().map(|f| f.ca.clone()), "ca")?,
            cert: pick(
                &self.cert,
                from_dir.as_ref().map(|f| f.cert.clone()),
                "cert",
            )?,
            key: pick(&self.key, from_dir.as_ref().map(|f| f.key.clone()), "key")?,
        })
    }

    /// `role`'s mesh identity, its expiry exported and its files watched
    /// (`--tls-reload-interval-secs`).
    pub(super) fn mesh_tls(&self, role: &str) -> anyhow::Result<Arc<vlm_net::TlsSource>> {
        self.watched_tls(&self.tls_files(role)?, role, vlm_net::TlsKind::Mesh)
    }

    /// `files` as `role`'s `kind` identity, exported and watched.
    pub(super) fn watched_tls(
        &self,
        files: &TlsFiles,
        role: &str,
        kind: vlm_net::TlsKind,
    ) -> anyhow::Result<Arc<vlm_net::TlsSource>> {
        let label = vlm_net::TlsLabel {
            service: role.to_string(),
            kind,
        };
        let source = vlm_net::TlsSource::load(files, Some(label))?;
        source.watch(std::time::Duration::from_secs(
            self.tls_reload_interval_secs,
        ));
        Ok(source)
    }

    pub(super) fn dtype(&self) -> anyhow::Result<vlm_model::DType> {
        Ok(vlm_model::parse_dtype(&self.dtype)?)
    }

    /// The admission (slots, queue, memory budget) `service` is served with; create it once
    /// per process and share it with whatever else admits or buffers for the service. With
    /// `peer_share`, one peer may hold at most that share of each of them.
    pub(super) fn admission(
        &self,
        service: &'static str,
        peer_share: Option<f64>,
    ) -> vlm_net::AdmissionGate {
        let limits = vlm_net::AdmissionLimits {
            max_in_flight: self.max_in_flight,
            max_queue: self.max_queue,
        };
        let mut memory =
            vlm_net::ByteBudget::new(service, self.max_bytes_in_flight, self.max_queue);
        if let Some(share) = peer_share {
            memory = memory.per_peer(share);
        }
        tracing::info!(
            service,
            max_in_flight = limits.max_in_flight,
            max_queue = limits.max_queue,
            max_bytes_in_flight = memory.limit(),
            ?peer_share,
            "admission"
        );
        let gate = vlm_net::AdmissionGate::new(service, limits, memory);
        match peer_share {
            Some(share) => gate.per_peer(share),
            None => gate,
        }
    }
}

/// `--quantize` of a model stage: one of [`Quantization::NAMES`] (clap lists them when another
/// value is given).
pub fn quantize_parser() -> impl clap::builder::TypedValueParser<Value = Quantization> {
    clap::builder::PossibleValuesParser::new(Quantization::NAMES)
        .map(|s| s.parse::<Quantization>().expect("one of the names"))
}

/// How the gateway copes with failing, slow and overloaded stages.
#[derive(Args, Debug, Clone)]
pub struct ResilienceArgs {
    /// Attempts per stage call, the first included (retries go to other replicas).
    #[arg(long, env = "VLM_RETRY_ATTEMPTS", default_value_t = 3)]
    pub retry_attempts: u32,
    /// Retries allowed on top of calls, in percent of the calls of the last 10 s (plus 10/s).
    #[arg(long, env = "VLM_RETRY_BUDGET_PERCENT", default_value_t = 20.0)]
    pub retry_budget_percent: f32,
    /// Adaptive timeout = factor × the fastest replica's high-percentile latency per unit of work…
    #[arg(long, env = "VLM_TIMEOUT_FACTOR", default_value_t = 5.0)]
    pub timeout_factor: f64,
    /// …but at least this many milliseconds…
    #[arg(long, env = "VLM_TIMEOUT_MIN_MS", default_value_t = 500)]
    pub timeout_min_ms: u64,
    /// …and at most this many (also the limit before any latency was observed).
    #[arg(long, env = "VLM_TIMEOUT_MAX_MS", default_value_t = 60_000)]
    pub timeout_max_ms: u64,
    /// Interval of the health checks that eject and re-admit replicas, in milliseconds.
    #[arg(long, env = "VLM_HEALTH_INTERVAL_MS", default_value_t = 1000)]
    pub health_interval_ms: u64,
    /// How often `dns://host:port` replica names are re-resolved, in seconds.
    #[arg(long, env = "VLM_DNS_REFRESH_SECS", default_value_t = 5)]
    pub dns_refresh_secs: u64,
}

/// The encoder's default `--max-concurrent` (what `up` runs with).
pub const ENCODER_MAX_CONCURRENT: usize = 2;

#[derive(Subcommand, Debug, Clone)]
// Parsed once per process; boxing variants would only add noise to every match.
#[allow(clippy::large_enum_variant)]
pub enum ServeRole {
    /// Vision encoder: image bytes → feature chunks.
    Encoder(EncoderArgs),
    /// Multimodal projector: feature chunks → embedding chunks, row-wise.
    Projector(ProjectorArgs),
    /// Language decoder: prompt + embeddings → tokens.
    Decoder(DecoderArgs),
    /// Public gateway: orchestrates the stages per request.
    Gateway(GatewayArgs),
}

// `serve encoder`'s arguments (the variant's doc comment is the subcommand's help).
#[derive(Args, Debug, Clone)]
pub struct EncoderArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Largest encoded image accepted, in bytes.
    #[arg(long, env = "VLM_MAX_IMAGE_BYTES", default_value_t = 20 << 20)]
    pub max_image_bytes: usize,
    /// Largest image accepted, in pixels, checked from the header before decoding.
    #[arg(long, env = "VLM_MAX_IMAGE_PIXELS", default_value_t = ImageLimits::default().max_pixels)]
    pub max_image_pixels: u64,
    /// Largest long side : short side ratio accepted (e.g. 200 refuses a 201×1 image), checked
    /// from the header before decoding; it also bounds the resize target.
    #[arg(long, env = "VLM_MAX_IMAGE_ASPECT_RATIO", default_value_t = vlm_model::DEFAULT_MAX_ASPECT_RATIO, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_image_aspect_ratio: u32,
    /// How the weights are stored: none (the compute dtype), q8_0 (8-bit blocks) or q4_k (4-bit
    /// super-blocks), quantized as they are loaded (see the README's Quantization section).
    #[arg(long, env = "VLM_QUANTIZE", default_value = "none", value_parser = quantize_parser())]
    pub quantize: Quantization,
    /// Images encoded at once.
    #[arg(long, env = "VLM_MAX_CONCURRENT", default_value_t = ENCODER_MAX_CONCURRENT)]
    pub max_concurrent: usize,
}

// `serve projector`'s arguments.
#[derive(Args, Debug, Clone)]
pub struct ProjectorArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// How the weights are stored: none (the compute dtype), q8_0 (8-bit blocks) or q4_k (4-bit
    /// super-blocks), quantized as they are loaded (see the README's Quantization section).
    #[arg(long, env = "VLM_QUANTIZE", default_value = "none", value_parser = quantize_parser())]
    pub quantize: Quantization,
    /// Chunks projected at once.
    #[arg(long, env = "VLM_MAX_CONCURRENT", default_value_t = 2)]
    pub max_concurrent: usize,
}

// `serve decoder`'s arguments.
#[derive(Args, Debug, Clone)]
pub struct DecoderArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// How the weights are stored: none (the compute dtype), q8_0 (8-bit blocks) or q4_k (4-bit
    /// super-blocks), quantized as they are loaded (see the README's Quantization section).
    #[arg(long, env = "VLM_QUANTIZE", default_value = "none", value_parser = quantize_parser())]
    pub quantize: Quantization,
    /// Most sequences advanced together in one batch step (continuous batching); further
    /// requests wait in the queue.
    #[arg(long, env = "VLM_MAX_CONCURRENT", default_value_t = 16)]
    pub max_concurrent: usize,
    /// KV-cache budget in bytes (admission is by this memory: a request is admitted when its
    /// prompt + max_tokens fit). Default: 2 × --max-concurrent × the model's context, capped
    /// at half the memory available to the process (cgroup-aware); reported at start-up.
    #[arg(long, env = "VLM_KV_CACHE_BYTES")]
    pub kv_cache_bytes: Option<usize>,
    /// Prompt positions per prefill chunk; chunks are interleaved with decode steps so a long
    /// prompt does not freeze running streams.
    #[arg(long, env = "VLM_PREFILL_CHUNK", default_value_t = vlm_model::engine::DEFAULT_PREFILL_CHUNK)]
    pub prefill_chunk: usize,
    /// Longest a request waits in the queue for KV memory when its deadline allows more
    /// (then RESOURCE_EXHAUSTED), in milliseconds.
    #[arg(long, env = "VLM_MAX_QUEUE_WAIT_MS", default_value_t = 30_000)]
    pub max_queue_wait_ms: u64,
    /// max_tokens for requests that do not set it.
    #[arg(long, env = "VLM_DEFAULT_MAX_TOKENS", default_value_t = 64)]
    pub default_max_tokens: u32,
}

// `serve gateway`'s arguments.
#[derive(Args, Debug, Clone)]
pub struct GatewayArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Encoder replicas: `https://host:port[,https://host:port…]`, or `dns://name:port` for
    /// every address the name resolves to, re-resolved periodically (a Kubernetes headless
    /// Service). The same forms work for --projector and --decoder.
    #[arg(long, env = "VLM_ENCODER")]
    pub encoder: String,
    /// Projector replicas (see --encoder).
    #[arg(long, env = "VLM_PROJECTOR")]
    pub projector: String,
    /// Decoder replicas (see --encoder).
    #[arg(long, env = "VLM_DECODER")]
    pub decoder: String,
    #[command(flatten)]
    pub resilience: ResilienceArgs,
    /// Largest encoded image accepted, in bytes (larger: RESOURCE_EXHAUSTED).
    #[arg(long, env = "VLM_MAX_IMAGE_BYTES", default_value_t = 20 << 20)]
    pub max_image_bytes: usize,
    /// Most images per request.
    #[arg(long, env = "VLM_MAX_IMAGES", default_value_t = 8)]
    pub max_images: usize,
    /// Most regions of interest per image (each is encoded as one more image).
    #[arg(long, env = "VLM_MAX_REGIONS", default_value_t = 4)]
    pub max_regions: usize,
    /// Deadline in seconds for requests that set none (a client's grpc-timeout is capped by it).
    #[arg(long, env = "VLM_REQUEST_TIMEOUT", default_value_t = 300)]
    pub request_timeout: u64,
    /// Element type of tensors on internal hops: f32, f16 or bf16 (default: the compute dtype).
    #[arg(long, env = "VLM_WIRE_DTYPE")]
    pub wire_dtype: Option<String>,
    /// Serve the public port without TLS (internal hops stay mTLS). For local debugging only.
    #[arg(long, env = "VLM_PLAINTEXT")]
    pub plaintext: bool,
    /// Certificate chain for the public ports (gRPC and --http-listen) instead of the mesh
    /// certificate; with --public-key. Reloaded like the mesh certificate. Client certificates
    /// offered there are still checked against the mesh CA.
    #[arg(long, env = "VLM_PUBLIC_CERT", requires = "public_key")]
    pub public_cert: Option<PathBuf>,
    /// Private key of --public-cert.
    #[arg(long, env = "VLM_PUBLIC_KEY", requires = "public_cert")]
    pub public_key: Option<PathBuf>,
    /// Most of each shared limit one peer may hold, as a fraction (0 < share ≤ 1): of the calls
    /// still sending their request, of the slots and queue places (--max-in-flight +
    /// --max-queue), and of the Watch streams. A peer is a connection, and a client certificate
    /// or else a source address (an IPv6 /64). 1 turns the per-peer bound off (e.g. behind a
    /// proxy that terminates TLS, where every client has the proxy's address).
    #[arg(long, env = "VLM_MAX_PEER_SHARE", default_value_t = 0.25)]
    pub max_peer_share: f64,
    /// How decoder calls pick a replica: `prefix` (to the replica most likely to hold the
    /// prompt's prefix in its cache, within the load bound; see the README's Routing section)
    /// or `balance` (power of two choices over load, as for the other stages).
    #[arg(long, env = "VLM_DECODER_ROUTING", default_value = "prefix", value_parser = ["prefix", "balance"])]
    pub decoder_routing: String,
    /// The load bound of prefix routing: a replica takes a call while its calls in flight stay
    /// within this factor × the mean (rounded up); > 1.
    #[arg(long, env = "VLM_ROUTING_BALANCE", default_value_t = 1.25)]
    pub routing_balance: f64,
    #[command(flatten)]
    pub http: HttpArgs,
    #[command(flatten)]
    pub cache: CacheArgs,
    #[command(flatten)]
    pub watch: WatchArgs,
}

/// Live frame streams (`Gateway/Watch`).
#[derive(Args, Debug, Clone)]
pub struct WatchArgs {
    /// Watch (live frame) streams open at once; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "VLM_MAX_WATCH_STREAMS", default_value_t = 16)]
    pub max_watch_streams: usize,
    /// Questions of one Watch stream being answered at once; more get a RESOURCE_EXHAUSTED
    /// answer. Each question also takes one of the gateway's --max-in-flight slots while it is
    /// answered.
    #[arg(long, env = "VLM_MAX_WATCH_QUESTIONS", default_value_t = 4)]
    pub max_watch_questions: usize,
    /// A frame reuses the current features (no encoder call) when no block's mean absolute
    /// difference from the frame they came from exceeds this many 8-bit levels; 0 re-encodes on
    /// any change.
    #[arg(long, env = "VLM_FRAME_THRESHOLD", default_value_t = 2.0)]
    pub frame_threshold: f32,
    /// Side of the blocks frames are compared on, in pixels.
    #[arg(long, env = "VLM_FRAME_BLOCK", default_value_t = 32)]
    pub frame_block: u32,
    /// Largest frame, in pixels (width × height), checked from its header before decoding;
    /// larger: RESOURCE_EXHAUSTED for that frame.
    #[arg(long, env = "VLM_MAX_FRAME_PIXELS", default_value_t = 16 << 20)]
    pub max_frame_pixels: u64,
    /// Bytes of image features each Watch stream keeps in its own cache (the frames a question
    /// may look at; older ones are encoded again if asked about).
    #[arg(long, env = "VLM_WATCH_CACHE_BYTES", default_value_t = 64 << 20)]
    pub watch_cache_bytes: usize,
    /// Seconds a Watch stream may go without a frame or question (and with no question being
    /// answered) before it is ended with DEADLINE_EXCEEDED.
    #[arg(long, env = "VLM_WATCH_IDLE_TIMEOUT", default_value_t = 300)]
    pub watch_idle_timeout: u64,
}

impl WatchArgs {
    pub fn config(&self) -> anyhow::Result<vlm_gateway::WatchConfig> {
        anyhow::ensure!(
            self.frame_threshold.is_finite() && self.frame_threshold >= 0.0,
            "--frame-threshold must be a finite number >= 0 (8-bit levels), not {}",
            self.frame_threshold
        );
        anyhow::ensure!(self.frame_block >= 1, "--frame-block must be at least 1");
        anyhow::ensure!(
            self.max_watch_questions >= 1,
            "--max-watch-questions must be at least 1"
        );
        let side = (self.max_frame_pixels as f64).sqrt().ceil() as u64;
        Ok(vlm_gateway::WatchConfig {
            max_streams: self.max_watch_streams,
            max_questions: self.max_watch_questions,
            frame_threshold: self.frame_threshold,
            block: self.frame_block,
            frame_limits: vlm_frames::FrameLimits {
                max_pixels: self.max_frame_pixels,
                // Any aspect ratio within the pixel bound, up to a 64:1 strip.
                max_side: u32::try_from(side.saturating_mul(8)).unwrap_or(u32::MAX),
            },
            cache_bytes: self.watch_cache_bytes,
            peer_share: 1.0,
            idle_timeout: std::time::Duration::from_secs(self.watch_idle_timeout.max(1)),
        })
    }
}

/// The gateway's OpenAI-compatible HTTP endpoint (also accepted by `up`, which passes them through).
#[derive(Args, Debug, Clone, Default)]
pub struct HttpArgs {
    /// Also serve the OpenAI-compatible API (POST /v1/chat/completions, GET /v1/models) over
    /// HTTP/1.1 on this address, with the same TLS as the gRPC port (port 0 picks a free port).
    #[arg(long, env = "VLM_HTTP_LISTEN", value_parser = crate::listen_arg::listen_addr)]
    pub http_listen: Option<SocketAddr>,
    /// Also serve the OpenAI-compatible API over plain HTTP (no TLS) on this address, for a
    /// TLS-terminating ingress in front. It has no client certificates: a peer is its source
    /// address (the ingress's), for per-peer shares. Same admission and limits as --http-listen.
    #[arg(long, env = "VLM_HTTP_PLAINTEXT_LISTEN", value_parser = crate::listen_arg::listen_addr)]
    pub http_plaintext_listen: Option<SocketAddr>,
    /// Let the OpenAI endpoint fetch http(s):// image URLs (otherwise they get a 400; only
    /// inline data: URLs are accepted).
    #[arg(long, env = "VLM_ALLOW_IMAGE_URLS")]
    pub allow_image_urls: bool,
    /// With --allow-image-urls: also fetch URLs whose host is (or resolves only to) a loopback,
    /// private, link-local or other internal address. Off by default: a client could otherwise
    /// make the gateway reach internal services (server-side request forgery).
    #[arg(
        long,
        env = "VLM_ALLOW_PRIVATE_IMAGE_URLS",
        requires = "allow_image_urls"
    )]
    pub allow_private_image_urls: bool,
    /// Names clients may pass as `model` on the OpenAI endpoint, comma separated or repeated
    /// (as vLLM's flag); the first is the one responses carry. Default: the checkpoint
    /// directory's name.
    #[arg(long, env = "VLM_SERVED_MODEL_NAME", value_delimiter = ',')]
    pub served_model_name: Vec<String>,
    /// Require `Authorization: Bearer <key>` on the OpenAI endpoint (401 otherwise). Without it,
    /// any key or none is accepted. Prefer the VLM_API_KEY environment variable to the flag, which
    /// other users can read in the process list.
    #[arg(long, env = "VLM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Refuse OpenAI requests that carry a field this server does not know (400 naming it).
    /// Without it such fields are logged once per name and ignored, as vLLM does (README,
    /// "OpenAI request fields").
    #[arg(long, env = "VLM_STRICT_OPENAI")]
    pub strict_openai: bool,
}

impl HttpArgs {
    /// The same settings as `serve gateway` arguments.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec![];
        if let Some(addr) = self.http_listen {
            args.extend(["--http-listen".to_string(), addr.to_string()]);
        }
        if let Some(addr) = self.http_plaintext_listen {
            args.extend(["--http-plaintext-listen".to_string(), addr.to_string()]);
        }
        if self.allow_image_urls {
            args.push("--allow-image-urls".into());
        }
        if self.allow_private_image_urls {
            args.push("--allow-private-image-urls".into());
        }
        if self.strict_openai {
            args.push("--strict-openai".into());
        }
        if !self.served_model_name.is_empty() {
            args.extend([
                "--served-model-name".to_string(),
                self.served_model_name.join(","),
            ]);
        }
        // The API key is not an argument: the gateway inherits VLM_API_KEY (see `up`), so the
        // key never shows in the process list.
        args
    }
}

impl ServeRole {
    /// Replaces `--model bundled:…` by the directory the bundled model is unpacked in.
    pub(super) fn resolve_model(&mut self) -> anyhow::Result<()> {
        let common = match self {
            ServeRole::Encoder(a) => &mut a.common,
            ServeRole::Projector(a) => &mut a.common,
            ServeRole::Decoder(a) => &mut a.common,
            ServeRole::Gateway(a) => &mut a.common,
        };
        common.model = crate::bundled::model_dir(&common.model)?;
        Ok(())
    }

    pub(super) fn name_and_common(&self) -> (&'static str, &CommonArgs) {
        match self {
            ServeRole::Encoder(a) => ("encoder", &a.common),
            ServeRole::Projector(a) => ("projector", &a.common),
            ServeRole::Decoder(a) => ("decoder", &a.common),
            ServeRole::Gateway(a) => ("gateway", &a.common),
        }
    }
}
