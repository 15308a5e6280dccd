//! `vlm-mesh serve <role>`: runs one service in this process.
//!
//! Contract with launchers (`up`, tests): after binding, the process prints exactly one line
//! `listening <addr>` on stdout, so `--listen 127.0.0.1:0` can be used and the real port learned.
//! A gateway with `--http-listen` appends ` http=<addr>` (its OpenAI-compatible port) to that line,
//! and ` http-plaintext=<addr>` with `--http-plaintext-listen`;
//! `--metrics-listen` appends ` metrics=<addr>` (Prometheus text over HTTP).
//! With `--health-listen`, a second line `health-listening <addr>` follows it.
//!
//! Each role builds its service here (TLS first, then the model, so a bad certificate fails
//! fast) and hands it to [`stage::serve_stage`], which serves every role the same way.

mod args;
mod cache_args;
mod gateway;
mod stage;

use std::time::Duration;

use vlm_model::ImageLimits;
use vlm_tensor::TensorLimits;

pub use args::{quantize_parser, CacheArgs, HttpArgs, ServeRole, ENCODER_MAX_CONCURRENT};
use args::{CommonArgs, DecoderArgs, EncoderArgs, GatewayArgs, ProjectorArgs};
use stage::{serve_stage, Stage, DEFAULT_MESSAGE_BYTES, MAX_MESSAGE_BYTES};

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

pub fn run(mut role: ServeRole) -> anyhow::Result<()> {
    role.resolve_model()?;
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
            vlm_telemetry::metrics::preregister(name);
            stage::serve_metrics(addr).await?;
        }
        match role {
            ServeRole::Encoder(a) => encoder(a).await,
            ServeRole::Projector(a) => projector(a).await,
            ServeRole::Decoder(a) => decoder(a).await,
            ServeRole::Gateway(a) => gateway::gateway(a).await,
        }
    });
    drop(telemetry);
    served
}

async fn encoder(a: EncoderArgs) -> anyhow::Result<()> {
    let tls = vlm_net::ServerTls::new(a.common.mesh_tls("encoder")?, vlm_net::ClientAuth::Required);
    let cfg = vlm_encoder::EncoderConfig {
        model: a.common.model.clone(),
        dtype: a.common.dtype()?,
        quantization: a.quantize,
        image_limits: ImageLimits {
            max_pixels: a.max_image_pixels,
            max_aspect_ratio: a.max_image_aspect_ratio,
        },
        max_image_bytes: a.max_image_bytes,
        max_concurrent: a.max_concurrent,
        fault_encode_delay: fault_delay("VLM_FAULT_ENCODE_DELAY_MS"),
    };
    let svc = vlm_encoder::EncoderService::load(&cfg)?;
    let admission = a
        .common
        .admission(vlm_proto::encoder_server::SERVICE_NAME, None);
    admission.report_saturation(a.max_concurrent, SATURATION_EVERY);
    let stage = Stage {
        admission,
        server: svc.into_server(),
        tls: Some(tls),
        // An image and its request around it.
        max_message_bytes: a
            .max_image_bytes
            .saturating_add(1 << 20)
            .min(MAX_MESSAGE_BYTES),
        http: Vec::new(),
    };
    serve_stage(&a.common, stage).await
}

/// How often the encoder's and projector's `vlm_saturation` is sampled (the decoder's follows
/// its step loop).
const SATURATION_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

async fn projector(a: ProjectorArgs) -> anyhow::Result<()> {
    let tls = vlm_net::ServerTls::new(
        a.common.mesh_tls("projector")?,
        vlm_net::ClientAuth::Required,
    );
    let cfg = vlm_projector::ProjectorConfig {
        model: a.common.model.clone(),
        dtype: a.common.dtype()?,
        quantization: a.quantize,
        limits: TensorLimits::default(),
        max_concurrent: a.max_concurrent,
        fault_project_delay: fault_delay("VLM_FAULT_PROJECT_DELAY_MS"),
    };
    let svc = vlm_projector::ProjectorService::load(&cfg)?;
    let admission = a
        .common
        .admission(vlm_proto::projector_server::SERVICE_NAME, None);
    admission.report_saturation(a.max_concurrent, SATURATION_EVERY);
    let stage = Stage {
        admission,
        server: svc.into_server(),
        tls: Some(tls),
        max_message_bytes: DEFAULT_MESSAGE_BYTES,
        http: Vec::new(),
    };
    serve_stage(&a.common, stage).await
}

async fn decoder(a: DecoderArgs) -> anyhow::Result<()> {
    let tls = vlm_net::ServerTls::new(a.common.mesh_tls("decoder")?, vlm_net::ClientAuth::Required);
    let admission = a
        .common
        .admission(vlm_proto::decoder_server::SERVICE_NAME, None);
    let cfg = vlm_decoder::DecoderConfig {
        memory: admission.memory().clone(),
        model: a.common.model.clone(),
        dtype: a.common.dtype()?,
        quantization: a.quantize,
        limits: TensorLimits::default(),
        max_concurrent: a.max_concurrent,
        kv_cache_bytes: a.kv_cache_bytes,
        prefill_chunk: a.prefill_chunk,
        max_queue_wait: Duration::from_millis(a.max_queue_wait_ms),
        default_max_tokens: a.default_max_tokens,
        fault_decode_delay: fault_delay("VLM_FAULT_DECODE_DELAY_MS"),
    };
    let svc = vlm_decoder::DecoderService::load(&cfg)?;
    let stage = Stage {
        admission,
        server: svc.into_server(),
        tls: Some(tls),
        max_message_bytes: DEFAULT_MESSAGE_BYTES,
        http: Vec::new(),
    };
    serve_stage(&a.common, stage).await
}
