//! `vlm-mesh serve <role>`: runs one service in this process.
//!
//! Contract with launchers (`up`, tests): after binding, the process prints exactly one line
//! `listening <addr>` on stdout, so `--listen 127.0.0.1:0` can be used and the real port learned.
//! With `--health-listen`, a second line `health-listening <addr>` follows it.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use tokio::net::TcpListener;
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
    /// Also serve grpc.health.v1 (and nothing else) without TLS on this address, for probes
    /// that cannot present a client certificate, such as Kubernetes gRPC probes.
    #[arg(long, env = "VLM_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,
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
}

#[derive(Subcommand, Debug, Clone)]
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
        #[arg(long, env = "VLM_MAX_CONCURRENT", default_value_t = 2)]
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
        /// Sequences decoded at once.
        #[arg(long, env = "VLM_MAX_CONCURRENT", default_value_t = 4)]
        max_concurrent: usize,
        /// max_tokens for requests that do not set it.
        #[arg(long, env = "VLM_DEFAULT_MAX_TOKENS", default_value_t = 64)]
        default_max_tokens: u32,
    },
    /// Public gateway: orchestrates the stages per request.
    Gateway {
        #[command(flatten)]
        common: CommonArgs,
        /// Encoder URL (https://host:port).
        #[arg(long, env = "VLM_ENCODER")]
        encoder: String,
        /// Projector URL.
        #[arg(long, env = "VLM_PROJECTOR")]
        projector: String,
        /// Decoder URL.
        #[arg(long, env = "VLM_DECODER")]
        decoder: String,
        /// Largest encoded image accepted, in bytes (larger: RESOURCE_EXHAUSTED).
        #[arg(long, env = "VLM_MAX_IMAGE_BYTES", default_value_t = 20 << 20)]
        max_image_bytes: usize,
        /// Most images per request.
        #[arg(long, env = "VLM_MAX_IMAGES", default_value_t = 8)]
        max_images: usize,
        /// max_tokens for requests that do not set it.
        #[arg(long, env = "VLM_DEFAULT_MAX_TOKENS", default_value_t = 64)]
        default_max_tokens: u32,
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
        cache: CacheArgs,
    },
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
    pub fn build(&self) -> anyhow::Result<Option<std::sync::Arc<dyn vlm_cache::FeatureCache>>> {
        if self.no_cache {
            return Ok(None);
        }
        Ok(Some(match &self.redis {
            Some(url) => std::sync::Arc::new(vlm_cache::RedisCache::new(url, Default::default())?),
            None => std::sync::Arc::new(vlm_cache::MemoryCache::new(self.cache_max_bytes)),
        }))
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

async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening {local}")?;
    out.flush()?;
    Ok(listener)
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

pub fn run(role: ServeRole) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(serve(role))
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
            };
            let svc = vlm_encoder::EncoderService::load(&cfg)?;
            let listener = bind(common.listen).await?;
            let health = bind_health(common.health_listen).await?;
            let server = svc.into_server().max_decoding_message_size(
                max_image_bytes
                    .saturating_add(1 << 20)
                    .min(MAX_MESSAGE_BYTES),
            );
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
                svc.into_server(),
                vlm_net::shutdown_signal(),
            )
            .await?;
        }
        ServeRole::Decoder {
            common,
            max_concurrent,
            default_max_tokens,
        } => {
            let tls = vlm_net::server_tls(&common.tls_files("decoder")?)?;
            let cfg = vlm_decoder::DecoderConfig {
                model: common.model.clone(),
                dtype: common.dtype()?,
                limits: TensorLimits::default(),
                max_concurrent,
                default_max_tokens,
                fault_decode_delay: std::env::var("VLM_FAULT_DECODE_DELAY_MS")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .map(Duration::from_millis),
            };
            let svc = vlm_decoder::DecoderService::load(&cfg)?;
            let listener = bind(common.listen).await?;
            let health = bind_health(common.health_listen).await?;
            vlm_net::serve_grpc_with_health_port(
                listener,
                health,
                Some(tls),
                svc.into_server(),
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
            default_max_tokens,
            request_timeout,
            wire_dtype,
            plaintext,
            cache,
        } => {
            let files = common.tls_files("gateway")?;
            // Internal hops: the gateway presents its certificate and checks each stage's name.
            let channel = |url: &str| -> anyhow::Result<tonic::transport::Channel> {
                let host = vlm_net::url_host(url)?;
                Ok(vlm_net::connect_lazy(
                    url,
                    Some(vlm_net::client_tls(&files, &host)?),
                )?)
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
                model: common.model.clone(),
                encoder: channel(&encoder)?,
                projector: channel(&projector)?,
                decoder: channel(&decoder)?,
                max_image_bytes,
                max_images,
                max_prompt_bytes: 1 << 20,
                default_max_tokens,
                default_timeout: Duration::from_secs(request_timeout),
                wire_dtype,
                cache: cache.build()?,
                cache_ttl: Duration::from_secs(cache.cache_ttl),
            };
            let svc = vlm_gateway::GatewayService::new(cfg)?;
            let tls = if plaintext {
                None
            } else {
                Some(vlm_net::server_tls_client_auth_optional(&files)?)
            };
            let listener = bind(common.listen).await?;
            let health = bind_health(common.health_listen).await?;
            let server = svc
                .into_server()
                .max_decoding_message_size(MAX_MESSAGE_BYTES);
            vlm_net::serve_grpc_with_health_port(
                listener,
                health,
                tls,
                server,
                vlm_net::shutdown_signal(),
            )
            .await?;
        }
    }
    Ok(())
}
