//! `vlm-mesh serve <role>`: runs one service in this process.
//!
//! Contract with launchers (`up`, tests): after binding, the process prints exactly one line
//! `listening <addr>` on stdout, so `--listen 127.0.0.1:0` can be used and the real port learned.
//! A gateway with `--http-listen` appends ` http=<addr>` (its OpenAI-compatible port) to that line;
//! `--metrics-listen` appends ` metrics=<addr>` (Prometheus text over HTTP).
//! With `--health-listen`, a second line `health-listening <addr>` follows it.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use tokio::net::TcpListener;
use tower::Layer;
use vlm_model::ImageLimits;
use vlm_net::TlsFiles;
use vlm_tensor::TensorLimits;

use crate::generate::default_model_dir;

#[derive(Args, Debug, Clone)]
pub struct CommonArgs {
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, env = "VLM_LISTEN")]
    pub listen: SocketAddr,
    /// Checkpoint directory in the Hugging Face llava-hf layout.
    #[arg(long, env = "VLM_MODEL", default_value_os_t = default_model_dir())]
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
    /// Compute dtype: f32, f16 or bf16.
    #[arg(long, env = "VLM_DTYPE", default_value = "f32")]
    pub dtype: String,
    /// Calls this service serves at once; see --max-queue.
    #[arg(long, env = "VLM_MAX_IN_FLIGHT", default_value_t = 64)]
    pub max_in_flight: usize,
    /// Calls that may wait for a slot beyond --max-in-flight; more are refused at once with
    /// RESOURCE_EXHAUSTED (load shedding), so memory stays bounded under overload.
    #[arg(long, env = "VLM_MAX_QUEUE", default_value_t = 64)]
    pub max_queue: usize,
    /// Also serve grpc.health.v1 (and nothing else) without TLS on this address, for probes
    /// that cannot present a client certificate, such as Kubernetes gRPC probes.
    #[arg(long, env = "VLM_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,
    /// Serve Prometheus metrics (text format, any path) over plain HTTP on this address.
    #[arg(long, env = "VLM_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Log line format on stderr: text or json.
    #[arg(long, env = "VLM_LOG_FORMAT", default_value = "text")]
    pub log_format: vlm_telemetry::LogFormat,
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

    fn dtype(&self) -> anyhow::Result<vlm_model::DType> {
        Ok(vlm_model::parse_dtype(&self.dtype)?)
    }

    /// The load-shedding layer every service is wrapped in.
    fn admission(&self) -> vlm_net::AdmissionLayer {
        vlm_net::AdmissionLayer::new(vlm_net::AdmissionLimits {
            max_in_flight: self.max_in_flight,
            max_queue: self.max_queue,
        })
    }
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

/// A test-only fault hook: `VAR=MS` delays every call of every replica by MS; `VAR=A,B,…` gives
/// replica i (its `VLM_REPLICA`, set by `up`) the i-th value, the last one repeating.
fn fault_delay(var: &str) -> Option<Duration> {
    let value = std::env::var(var).ok()?;
    let values: Vec<&str> = value.split(',').map(str::trim).collect();
    let replica: usize = std::env::var("VLM_REPLICA")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let pick = values.get(replica).or(values.last())?;
    let ms: u64 = pick.parse().ok()?;
    (ms > 0).then(|| Duration::from_millis(ms))
}

/// The encoder's default `--max-concurrent` (what `up` runs with).
pub const ENCODER_MAX_CONCURRENT: usize = 2;

#[derive(Subcommand, Debug, Clone)]
// Parsed once per process; boxing variants would only add noise to every match.
#[allow(clippy::large_enum_variant)]
pub enum ServeRole {
    /// Vision encoder: image bytes → feature chunks.
    Encoder {
        #[command(flatten)]
        common: CommonArgs,
        /// Largest encoded image accepted, in bytes.
        #[arg(long, env = "VLM_MAX_IMAGE_BYTES", default_value_t = 20 << 20)]
        max_image_bytes: usize,
        /// Largest image accepted, in pixels, checked from the header before decoding.
        #[arg(long, env = "VLM_MAX_IMAGE_PIXELS", default_value_t = ImageLimits::default().max_pixels)]
        max_image_pixels: u64,
        /// Images encoded at once.
        #[arg(long, env = "VLM_MAX_CONCURRENT", default_value_t = ENCODER_MAX_CONCURRENT)]
        max_concurrent: usize,
    },
    /// Multimodal projector: feature chunks → embedding chunks, row-wise.
    Projector {
        #[command(flatten)]
        common: CommonArgs,
        /// Chunks projected at once.
        #[arg(long, env = "VLM_MAX_CONCURRENT", default_value_t = 2)]
        max_concurrent: usize,
    },
    /// Language decoder: prompt + embeddings → tokens.
    Decoder {
        #[command(flatten)]
        common: CommonArgs,
        /// Most sequences advanced together in one batch step (continuous batching); further
        /// requests wait in the queue.
        #[arg(long, env = "VLM_MAX_CONCURRENT", default_value_t = 16)]
        max_concurrent: usize,
        /// KV-cache budget in bytes (admission is by this memory: a request is admitted when its
        /// prompt + max_tokens fit). Default: 2 × --max-concurrent × the model's context, capped
        /// at half the memory available to the process (cgroup-aware); reported at start-up.
        #[arg(long, env = "VLM_KV_CACHE_BYTES")]
        kv_cache_bytes: Option<usize>,
        /// Prompt positions per prefill chunk; chunks are interleaved with decode steps so a long
        /// prompt does not freeze running streams.
        #[arg(long, env = "VLM_PREFILL_CHUNK", default_value_t = vlm_model::engine::DEFAULT_PREFILL_CHUNK)]
        prefill_chunk: usize,
        /// Longest a request waits in the queue for KV memory when its deadline allows more
        /// (then RESOURCE_EXHAUSTED), in milliseconds.
        #[arg(long, env = "VLM_MAX_QUEUE_WAIT_MS", default_value_t = 30_000)]
        max_queue_wait_ms: u64,
        /// max_tokens for requests that do not set it.
        #[arg(long, env = "VLM_DEFAULT_MAX_TOKENS", default_value_t = 64)]
        default_max_tokens: u32,
    },
    /// Public gateway: orchestrates the stages per request.
    Gateway {
        #[command(flatten)]
        common: CommonArgs,
        /// Encoder replicas: `https://host:port[,https://host:port…]`, or `dns://name:port` for
        /// every address the name resolves to, re-resolved periodically (a Kubernetes headless
        /// Service). The same forms work for --projector and --decoder.
        #[arg(long, env = "VLM_ENCODER")]
        encoder: String,
        /// Projector replicas (see --encoder).
        #[arg(long, env = "VLM_PROJECTOR")]
        projector: String,
        /// Decoder replicas (see --encoder).
        #[arg(long, env = "VLM_DECODER")]
        decoder: String,
        #[command(flatten)]
        resilience: ResilienceArgs,
        /// Largest encoded image accepted, in bytes (larger: RESOURCE_EXHAUSTED).
        #[arg(long, env = "VLM_MAX_IMAGE_BYTES", default_value_t = 20 << 20)]
        max_image_bytes: usize,
        /// Most images per request.
        #[arg(long, env = "VLM_MAX_IMAGES", default_value_t = 8)]
        max_images: usize,
        /// Deadline in seconds for requests that set none (a client's grpc-timeout is capped by it).
        #[arg(long, env = "VLM_REQUEST_TIMEOUT", default_value_t = 300)]
        request_timeout: u64,
        /// Element type of tensors on internal hops: f32, f16 or bf16 (default: the compute dtype).
        #[arg(long, env = "VLM_WIRE_DTYPE")]
        wire_dtype: Option<String>,
        /// Serve the public port without TLS (internal hops stay mTLS). For local debugging only.
        #[arg(long, env = "VLM_PLAINTEXT")]
        plaintext: bool,
        #[command(flatten)]
        http: HttpArgs,
        #[command(flatten)]
        cache: CacheArgs,
    },
}

/// The gateway's OpenAI-compatible HTTP endpoint (also accepted by `up`, which passes them through).
#[derive(Args, Debug, Clone, Default)]
pub struct HttpArgs {
    /// Also serve the OpenAI-compatible API (POST /v1/chat/completions, GET /v1/models) over
    /// HTTP/1.1 on this address, with the same TLS as the gRPC port (port 0 picks a free port).
    #[arg(long, env = "VLM_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// Let the OpenAI endpoint fetch http(s):// image URLs (otherwise they get a 400; only
    /// inline data: URLs are accepted).
    #[arg(long, env = "VLM_ALLOW_IMAGE_URLS")]
    pub allow_image_urls: bool,
}

impl HttpArgs {
    /// The same settings as `serve gateway` arguments.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec![];
        if let Some(addr) = self.http_listen {
            args.extend(["--http-listen".to_string(), addr.to_string()]);
        }
        if self.allow_image_urls {
            args.push("--allow-image-urls".into());
        }
        args
    }
}

/// Feature-cache flags of the gateway (also accepted by `up`, which passes them through).
#[derive(Args, Debug, Clone, Default)]
pub struct CacheArgs {
    /// Redis URL for the shared feature cache (e.g. redis://127.0.0.1:6379). Without it, an
    /// in-memory LRU of --cache-max-bytes is used.
    #[arg(long, env = "VLM_REDIS")]
    pub redis: Option<String>,
    /// Lifetime of cached features, in seconds.
    #[arg(long, env = "VLM_CACHE_TTL", default_value_t = 3600)]
    pub cache_ttl: u64,
    /// Size bound of the in-memory cache, in bytes.
    #[arg(long, env = "VLM_CACHE_MAX_BYTES", default_value_t = 256 << 20)]
    pub cache_max_bytes: usize,
    /// Disable the feature cache.
    #[arg(long, env = "VLM_NO_CACHE", conflicts_with = "redis")]
    pub no_cache: bool,
}

impl CacheArgs {
    pub fn build(&self) -> anyhow::Result<Option<std::sync::Arc<vlm_cache::FeatureCache>>> {
        if self.no_cache {
            return Ok(None);
        }
        let backend: std::sync::Arc<dyn vlm_cache::CacheBackend> = match &self.redis {
            Some(url) => std::sync::Arc::new(vlm_cache::RedisCache::new(url, Default::default())?),
            None => std::sync::Arc::new(vlm_cache::MemoryCache::new(self.cache_max_bytes)),
        };
        let ttl = Duration::from_secs(self.cache_ttl);
        Ok(Some(vlm_cache::FeatureCache::new(
            backend,
            ttl,
            TensorLimits::default(),
        )))
    }

    /// The same settings as `serve gateway` arguments.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            "--cache-ttl".to_string(),
            self.cache_ttl.to_string(),
            "--cache-max-bytes".into(),
            self.cache_max_bytes.to_string(),
        ];
        if let Some(url) = &self.redis {
            args.extend(["--redis".to_string(), url.clone()]);
        }
        if self.no_cache {
            args.push("--no-cache".into());
        }
        args
    }
}

/// Messages larger than this are refused by the transport; the gateway's own limits (images,
/// prompt) are checked first for anything below it, with clearer errors.
const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// The served model's name: the checkpoint directory's name (the gateway reads nothing in it
/// but the chat template, for the OpenAI endpoint).
fn model_id(dir: &std::path::Path) -> String {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let listener = bind_quietly(addr).await?;
    announce(&listener, None)?;
    Ok(listener)
}

async fn bind_quietly(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))
}

/// Prints the `listening <addr> [http=<addr>]` line.
fn announce(grpc: &TcpListener, http: Option<&TcpListener>) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    write!(out, "listening {}", grpc.local_addr()?)?;
    if let Some(h) = http {
        write!(out, " http={}", h.local_addr()?)?;
    }
    if let Some(m) = METRICS_ADDR.get() {
        write!(out, " metrics={m}")?;
    }
    writeln!(out)?;
    out.flush()?;
    Ok(())
}

/// Binds the plaintext health port, if asked for, and announces it after `listening`.
async fn bind_health(addr: Option<SocketAddr>) -> anyhow::Result<Option<TcpListener>> {
    let Some(addr) = addr else { return Ok(None) };
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (--health-listen)"))?;
    let local = listener.local_addr()?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "health-listening {local}")?;
    out.flush()?;
    Ok(Some(listener))
}

impl ServeRole {
    fn name_and_common(&self) -> (&'static str, &CommonArgs) {
        match self {
            ServeRole::Encoder { common, .. } => ("encoder", common),
            ServeRole::Projector { common, .. } => ("projector", common),
            ServeRole::Decoder { common, .. } => ("decoder", common),
            ServeRole::Gateway { common, .. } => ("gateway", common),
        }
    }
}

/// The bound `--metrics-listen` address, announced as ` metrics=<addr>` on the `listening` line.
static METRICS_ADDR: std::sync::OnceLock<SocketAddr> = std::sync::OnceLock::new();

pub fn run(role: ServeRole) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (name, common) = role.name_and_common();
    // The OTLP exporter's channel lives on this runtime; the guard flushes the last spans after
    // the service stops and before the runtime goes away.
    let telemetry = {
        let _rt = rt.enter();
        vlm_telemetry::init(name, common.log_format, "info")?
    };
    let metrics_listen = common.metrics_listen;
    let served = rt.block_on(async move {
        if let Some(addr) = metrics_listen {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (--metrics-listen)"))?;
            let _ = METRICS_ADDR.set(listener.local_addr()?);
            vlm_telemetry::serve_metrics(listener);
        }
        serve(role).await
    });
    drop(telemetry);
    served
}

async fn serve(role: ServeRole) -> anyhow::Result<()> {
    match role {
        ServeRole::Encoder {
            common,
            max_image_bytes,
            max_image_pixels,
            max_concurrent,
        } => {
            let tls = vlm_net::server_tls(&common.tls_files("encoder")?)?;
            let cfg = vlm_encoder::EncoderConfig {
                model: common.model.clone(),
                dtype: common.dtype()?,
                image_limits: ImageLimits {
                    max_pixels: max_image_pixels,
                },
                max_image_bytes,
                max_concurrent,
                fault_encode_delay: fault_delay("VLM_FAULT_ENCODE_DELAY_MS"),
            };
            let svc = vlm_encoder::EncoderService::load(&cfg)?;
            let listener = bind(common.listen).await?;
            let health = bind_health(common.health_listen).await?;
            let server = svc.into_server().max_decoding_message_size(
                max_image_bytes
                    .saturating_add(1 << 20)
                    .min(MAX_MESSAGE_BYTES),
            );
            let server = common.admission().layer(server);
            vlm_net::serve_grpc_with_health_port(
                listener,
                health,
                Some(tls),
                server,
                vlm_net::shutdown_signal(),
            )
            .await?;
        }
        ServeRole::Projector {
            common,
            max_concurrent,
        } => {
            let tls = vlm_net::server_tls(&common.tls_files("projector")?)?;
            let cfg = vlm_projector::ProjectorConfig {
                model: common.model.clone(),
                dtype: common.dtype()?,
                limits: TensorLimits::default(),
                max_concurrent,
            };
            let svc = vlm_projector::ProjectorService::load(&cfg)?;
            let listener = bind(common.listen).await?;
            let health = bind_health(common.health_listen).await?;
            vlm_net::serve_grpc_with_health_port(
                listener,
                health,
                Some(tls),
                common.admission().layer(svc.into_server()),
                vlm_net::shutdown_signal(),
            )
            .await?;
        }
        ServeRole::Decoder {
            common,
            max_concurrent,
            kv_cache_bytes,
            prefill_chunk,
            max_queue_wait_ms,
            default_max_tokens,
        } => {
            let tls = vlm_net::server_tls(&common.tls_files("decoder")?)?;
            let cfg = vlm_decoder::DecoderConfig {
                model: common.model.clone(),
                dtype: common.dtype()?,
                limits: TensorLimits::default(),
                max_concurrent,
                kv_cache_bytes,
                prefill_chunk,
                max_queue_wait: std::time::Duration::from_millis(max_queue_wait_ms),
                default_max_tokens,
                fault_decode_delay: fault_delay("VLM_FAULT_DECODE_DELAY_MS"),
            };
            let svc = vlm_decoder::DecoderService::load(&cfg)?;
            let listener = bind(common.listen).await?;
            let health = bind_health(common.health_listen).await?;
            vlm_net::serve_grpc_with_health_port(
                listener,
                health,
                Some(tls),
                common.admission().layer(svc.into_server()),
                vlm_net::shutdown_signal(),
            )
            .await?;
        }
        ServeRole::Gateway {
            common,
            encoder,
            projector,
            decoder,
            max_image_bytes,
            max_images,
            request_timeout,
            wire_dtype,
            plaintext,
            http,
            cache,
            resilience: r,
        } => {
            let files = common.tls_files("gateway")?;
            // Internal hops: the gateway presents its certificate and checks each stage's name.
            let tls_files = files.clone();
            let tls: vlm_net::TlsForHost = std::sync::Arc::new(move |host: &str| {
                Ok(Some(vlm_net::client_tls(&tls_files, host)?))
            });
            let replica_opts = vlm_net::ReplicaOptions {
                health_interval: Duration::from_millis(r.health_interval_ms.max(10)),
                dns_refresh: Duration::from_secs(r.dns_refresh_secs.max(1)),
                ..Default::default()
            };
            let replicas = |stage: &str, spec: &str| {
                vlm_net::ReplicaSet::new(stage, spec, tls.clone(), replica_opts.clone())
                    .with_context(|| format!("--{stage}"))
            };
            let wire_dtype = match wire_dtype.as_deref() {
                None => None,
                Some(s) => Some(match vlm_tensor::WireDType::from_str_name(s)? {
                    vlm_tensor::WireDType::F32 => vlm_proto::DType::DtypeF32,
                    vlm_tensor::WireDType::F16 => vlm_proto::DType::DtypeF16,
                    vlm_tensor::WireDType::BF16 => vlm_proto::DType::DtypeBf16,
                }),
            };
            let cfg = vlm_gateway::GatewayConfig {
                model_id: model_id(&common.model),
                encoder: replicas("encoder", &encoder)?,
                projector: replicas("projector", &projector)?,
                decoder: replicas("decoder", &decoder)?,
                retry: vlm_net::RetryOptions {
                    max_attempts: r.retry_attempts.max(1),
                    budget_ratio: r.retry_budget_percent / 100.0,
                    ..Default::default()
                },
                timeouts: vlm_net::AdaptiveTimeoutOptions {
                    factor: r.timeout_factor,
                    min: Duration::from_millis(r.timeout_min_ms),
                    max: Duration::from_millis(r.timeout_max_ms.max(r.timeout_min_ms)),
                },
                max_image_bytes,
                max_images,
                max_prompt_bytes: 1 << 20,
                default_timeout: Duration::from_secs(request_timeout),
                wire_dtype,
                cache: cache.build()?,
            };
            let svc = std::sync::Arc::new(vlm_gateway::GatewayService::new(cfg)?);
            let tls = if plaintext {
                None
            } else {
                Some(vlm_net::server_tls_client_auth_optional(&files)?)
            };
            // The OpenAI endpoint shares the gateway (its cache, limits and stage channels).
            let openai = match http.http_listen {
                None => None,
                Some(addr) => {
                    let endpoint = vlm_gateway::openai::OpenAiEndpoint::new(
                        svc.clone(),
                        vlm_gateway::openai::OpenAiConfig {
                            model_dir: common.model.clone(),
                            allow_image_urls: http.allow_image_urls,
                            max_body_bytes: MAX_MESSAGE_BYTES,
                            max_image_bytes,
                        },
                    )
                    .await?;
                    let http_tls = if plaintext {
                        None
                    } else {
                        Some(vlm_net::HttpTlsAcceptor::new(
                            &files,
                            vlm_net::ClientAuth::Optional,
                        )?)
                    };
                    Some((
                        std::sync::Arc::new(endpoint),
                        http_tls,
                        bind_quietly(addr).await?,
                    ))
                }
            };
            let listener = bind_quietly(common.listen).await?;
            announce(&listener, openai.as_ref().map(|(_, _, l)| l))?;
            let health = bind_health(common.health_listen).await?;
            let server = vlm_proto::gateway_server::GatewayServer::from_arc(svc)
                .max_decoding_message_size(MAX_MESSAGE_BYTES);
            let server = common.admission().layer(server);
            let grpc = vlm_net::serve_grpc_with_health_port(
                listener,
                health,
                tls,
                server,
                vlm_net::shutdown_signal(),
            );
            match openai {
                None => grpc.await?,
                Some((endpoint, http_tls, http_listener)) => {
                    let http = endpoint.serve(http_listener, http_tls, vlm_net::shutdown_signal());
                    let (g, h) = tokio::join!(grpc, http);
                    g?;
                    h?;
                }
            }
        }
    }
    Ok(())
}
