//! `serve gateway`: the gateway's stage channels, cache and limits from its flags, and its
//! OpenAI-compatible port beside the gRPC one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use vlm_net::TlsFiles;

use super::stage::{bind, HttpPort};
use super::{serve_stage, GatewayArgs, Stage, MAX_MESSAGE_BYTES};

pub(super) async fn gateway(a: GatewayArgs) -> anyhow::Result<()> {
    let files = a.common.tls_files("gateway")?;
    // One admission for both front doors: gRPC calls and chat completions share slots, queue
    // and memory budget.
    anyhow::ensure!(
        a.max_peer_share > 0.0 && a.max_peer_share <= 1.0,
        "--max-peer-share must be a fraction above 0 and at most 1, not {}",
        a.max_peer_share
    );
    let admission = a.common.admission(
        vlm_proto::gateway_server::SERVICE_NAME,
        Some(a.max_peer_share),
    );
    a.cache.check_redis().await?;
    let svc = Arc::new(vlm_gateway::GatewayService::new(config(
        &a, &files, &admission,
    )?)?);
    let tls = if a.plaintext {
        None
    } else {
        Some(vlm_net::server_tls_client_auth_optional(&files)?)
    };
    let http = match a.http.http_listen {
        None => None,
        Some(addr) => Some(openai_port(&a, &files, svc.clone(), admission.clone(), addr).await?),
    };
    let stage = Stage {
        server: vlm_proto::gateway_server::GatewayServer::from_arc(svc),
        tls,
        max_message_bytes: MAX_MESSAGE_BYTES,
        http,
        admission,
    };
    serve_stage(&a.common, stage).await
}

fn config(
    a: &GatewayArgs,
    files: &TlsFiles,
    admission: &vlm_net::AdmissionGate,
) -> anyhow::Result<vlm_gateway::GatewayConfig> {
    let r = &a.resilience;
    // Internal hops: the gateway presents its certificate and checks each stage's name.
    let tls_files = files.clone();
    let tls: vlm_net::TlsForHost =
        Arc::new(move |host: &str| Ok(Some(vlm_net::client_tls(&tls_files, host)?)));
    let replica_opts = vlm_net::ReplicaOptions {
        health_interval: Duration::from_millis(r.health_interval_ms.max(10)),
        dns_refresh: Duration::from_secs(r.dns_refresh_secs.max(1)),
        ..Default::default()
    };
    let replicas = |stage: &str, spec: &str| {
        vlm_net::ReplicaSet::new(stage, spec, tls.clone(), replica_opts.clone())
            .with_context(|| format!("--{stage}"))
    };
    let wire_dtype = match a.wire_dtype.as_deref() {
        None => None,
        Some(s) => Some(match vlm_tensor::WireDType::from_str_name(s)? {
            vlm_tensor::WireDType::F32 => vlm_proto::DType::DtypeF32,
            vlm_tensor::WireDType::F16 => vlm_proto::DType::DtypeF16,
            vlm_tensor::WireDType::BF16 => vlm_proto::DType::DtypeBf16,
        }),
    };
    Ok(vlm_gateway::GatewayConfig {
        model_id: model_id(&a.common.model),
        encoder: replicas("encoder", &a.encoder)?,
        projector: replicas("projector", &a.projector)?,
        decoder: replicas("decoder", &a.decoder)?,
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
        max_image_bytes: a.max_image_bytes,
        max_images: a.max_images,
        max_regions: a.max_regions,
        max_prompt_bytes: 1 << 20,
        default_timeout: Duration::from_secs(a.request_timeout),
        wire_dtype,
        cache: a.cache.build()?,
        memory: admission.memory().clone(),
        admission: Some(admission.clone()),
        watch: vlm_gateway::WatchConfig {
            peer_share: a.max_peer_share,
            ..a.watch.config()?
        },
        routing: routing(a)?,
    })
}

/// `--decoder-routing` and `--routing-balance`, checked.
fn routing(a: &GatewayArgs) -> anyhow::Result<vlm_gateway::RoutingConfig> {
    anyhow::ensure!(
        a.routing_balance.is_finite() && a.routing_balance > 1.0,
        "--routing-balance must be above 1 (got {})",
        a.routing_balance
    );
    let mode = match a.decoder_routing.as_str() {
        "prefix" => vlm_gateway::RoutingMode::Prefix,
        "balance" => vlm_gateway::RoutingMode::Balance,
        other => anyhow::bail!("--decoder-routing {other:?}: expected prefix or balance"),
    };
    Ok(vlm_gateway::RoutingConfig {
        mode,
        balance: a.routing_balance,
    })
}

/// The served model's name: the checkpoint directory's name. The gateway reads nothing in it
/// (the OpenAI endpoint's chat template comes from the decoder), so the directory need not
/// exist where the gateway runs.
fn model_id(dir: &std::path::Path) -> String {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The OpenAI endpoint on `addr`; it shares the gateway (its cache, limits and stage channels).
async fn openai_port(
    a: &GatewayArgs,
    files: &TlsFiles,
    svc: Arc<vlm_gateway::GatewayService>,
    admission: vlm_net::AdmissionGate,
    addr: SocketAddr,
) -> anyhow::Result<HttpPort> {
    // `--served-model-name`: the first names the model in responses, all are accepted.
    let mut names = a.http.served_model_name.clone();
    let model_id = if names.is_empty() {
        svc.model_id().to_string()
    } else {
        names.remove(0)
    };
    let templates = svc.templates();
    let endpoint = vlm_gateway::openai::OpenAiEndpoint::new(
        svc,
        vlm_gateway::openai::OpenAiConfig {
            templates,
            model_id,
            aliases: names,
            api_key: a.http.api_key.clone(),
            allow_image_urls: a.http.allow_image_urls,
            allow_private_image_urls: a.http.allow_private_image_urls,
            max_images: a.max_images,
            max_body_bytes: MAX_MESSAGE_BYTES,
            max_image_bytes: a.max_image_bytes,
            admission,
        },
    )?;
    let http_tls = if a.plaintext {
        None
    } else {
        Some(vlm_net::HttpTlsAcceptor::new(
            files,
            vlm_net::ClientAuth::Optional,
        )?)
    };
    let listener = bind(addr, "--http-listen").await?;
    Ok(HttpPort {
        addr: listener.local_addr()?,
        served: Box::pin(Arc::new(endpoint).serve(listener, http_tls, vlm_net::shutdown_signal())),
    })
}
