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
    let mesh_tls = a.common.mesh_tls("gateway")?;
    // The public ports' TLS (gRPC and OpenAI HTTP): their own certificate, or the mesh one.
    let public_tls = public_tls(&a, &files, &mesh_tls)?
        .map(|source| vlm_net::ServerTls::new(source, vlm_net::ClientAuth::Optional));
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
        &a, &mesh_tls, &admission,
    )?)?);
    let mut http = Vec::new();
    if let Some(addr) = a.http.http_listen {
        let tls = public_tls
            .clone()
            .map(vlm_net::HttpTlsAcceptor::from_server_tls);
        let port = (addr, "http", "--http-listen");
        http.push(openai_port(&a, svc.clone(), admission.clone(), port, tls).await?);
    }
    if let Some(addr) = a.http.http_plaintext_listen {
        tracing::warn!(%addr, "serving the OpenAI-compatible endpoint over plain HTTP (--http-plaintext-listen): \
            no TLS and no client certificates there, so each peer is its source address (a TLS-terminating \
            ingress's own); keep the port reachable only from the ingress");
        let port = (addr, "http-plaintext", "--http-plaintext-listen");
        http.push(openai_port(&a, svc.clone(), admission.clone(), port, None).await?);
    }
    let stage = Stage {
        server: vlm_proto::gateway_server::GatewayServer::from_arc(svc),
        tls: public_tls,
        max_message_bytes: MAX_MESSAGE_BYTES,
        http,
        admission,
    };
    serve_stage(&a.common, stage).await
}

/// The public ports' TLS source: `--public-cert`/`--public-key` (trusting the mesh CA for the
/// optional client certificates), else the mesh identity; `None` with `--plaintext`.
fn public_tls(
    a: &GatewayArgs,
    mesh_files: &TlsFiles,
    mesh: &Arc<vlm_net::TlsSource>,
) -> anyhow::Result<Option<Arc<vlm_net::TlsSource>>> {
    match (&a.public_cert, &a.public_key) {
        (None, None) => Ok((!a.plaintext).then(|| mesh.clone())),
        (Some(cert), Some(key)) => {
            anyhow::ensure!(
                !a.plaintext,
                "--public-cert has no use with --plaintext (the public ports serve no TLS)"
            );
            let files = TlsFiles {
                ca: mesh_files.ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            };
            let source = a
                .common
                .watched_tls(&files, "gateway", vlm_net::TlsKind::Public)
                .context("--public-cert/--public-key")?;
            Ok(Some(source))
        }
        _ => anyhow::bail!("--public-cert and --public-key go together: pass both or neither"),
    }
}

fn config(
    a: &GatewayArgs,
    mesh_tls: &Arc<vlm_net::TlsSource>,
    admission: &vlm_net::AdmissionGate,
) -> anyhow::Result<vlm_gateway::GatewayConfig> {
    let r = &a.resilience;
    // Internal hops: the gateway presents its certificate and checks each stage's name; every
    // new connection takes the mesh identity of its moment.
    let source = mesh_tls.clone();
    let tls: vlm_net::TlsForHost = Arc::new(move |host: &str| {
        Ok(Some(vlm_net::ClientTls::Reloading {
            source: source.clone(),
            server_name: host.to_string(),
        }))
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

/// The OpenAI endpoint on `port` (address, label on the `listening` line, flag), with `http_tls`
/// or without TLS; it shares the gateway (its cache, limits and stage channels).
async fn openai_port(
    a: &GatewayArgs,
    svc: Arc<vlm_gateway::GatewayService>,
    admission: vlm_net::AdmissionGate,
    (addr, label, flag): (SocketAddr, &'static str, &str),
    http_tls: Option<vlm_net::HttpTlsAcceptor>,
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
            strict_openai: a.http.strict_openai,
        },
    )?;
    let listener = bind(addr, flag).await?;
    Ok(HttpPort {
        label,
        addr: listener.local_addr()?,
        served: Box::pin(Arc::new(endpoint).serve(listener, http_tls, vlm_net::shutdown_signal())),
    })
}
