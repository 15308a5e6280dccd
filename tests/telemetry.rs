//! Observability end to end: a real OTLP/gRPC trace receiver (the collector's TraceService,
//! served by tonic here) collects what the four service processes export; one request sent with
//! a client `traceparent` must come back as one trace across all of them, a cached image must skip
//! the encoder, a decoder killed mid-stream must show up as a failover event on the same trace,
//! and every service's Prometheus endpoint must parse and count.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use vlm_proto::generate_response::Kind;
use vlm_proto::GenerateRequest;

mod common;
use common::*;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One exported span with the resource it came from.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    pid: i64,
    trace_id: String,
    span_id: String,
    parent: String,
    name: String,
    attrs: HashMap<String, String>,
    events: Vec<(String, HashMap<String, String>)>,
}

fn value_string(kv: &KeyValue) -> String {
    match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        other => format!("{other:?}"),
    }
}

fn attrs(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), value_string(kv)))
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Got>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut out = self.spans.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            let res = attrs(&rs.resource.map(|r| r.attributes).unwrap_or_default());
            for ss in rs.scope_spans {
                for s in ss.spans {
                    out.push(Got {
                        service: res.get("service.name").cloned().unwrap_or_default(),
                        pid: res
                            .get("process.pid")
                            .and_then(|p| p.parse().ok())
                            .unwrap_or(0),
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent: hex(&s.parent_span_id),
                        name: s.name.clone(),
                        attrs: attrs(&s.attributes),
                        events: s
                            .events
                            .iter()
                            .map(|e| (e.name.clone(), attrs(&e.attributes)))
                            .collect(),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    /// Starts the receiver on a free loopback port; returns its `http://` URL.
    async fn start(&self) -> String {
        self.start_on("127.0.0.1:0").await
    }

    /// Starts the receiver on `addr`.
    async fn start_on(&self, addr: &str) -> String {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = TraceServiceServer::new(self.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        format!("http://{addr}")
    }

    fn trace(&self, trace_id: &str) -> Vec<Got> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect()
    }

    fn all(&self) -> Vec<Got> {
        self.spans.lock().unwrap().clone()
    }

    /// Waits (bounded) until the trace holds a span for which `done` holds; spans arrive in
    /// batches, so this polls the collected set.
    async fn wait_for(
        &self,
        trace_id: &str,
        what: &str,
        done: impl Fn(&[Got]) -> bool,
    ) -> Vec<Got> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let spans = self.trace(trace_id);
            if done(&spans) {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; trace has {:?}",
                spans
                    .iter()
                    .map(|s| (&s.service, &s.name))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn has(spans: &[Got], service: &str, name: &str) -> bool {
    spans.iter().any(|s| s.service == service && s.name == name)
}

fn find<'a>(spans: &'a [Got], service: &str, name: &str) -> &'a Got {
    spans
        .iter()
        .find(|s| s.service == service && s.name == name)
        .unwrap_or_else(|| panic!("no {name} span from {service}"))
}

fn request(max_tokens: u32) -> GenerateRequest {
    request_monitored(max_tokens, false)
}

fn request_monitored(max_tokens: u32, monitor_layers: bool) -> GenerateRequest {
    GenerateRequest {
        image_inputs: vec![],
        images: vec![std::fs::read(image_path()).unwrap().into()],
        prompt: PROMPT.into(),
        params: Some(vlm_proto::SamplingParams {
            max_tokens: Some(max_tokens),
            top_p: 1.0,
            seed: Some(1),
            ..Default::default()
        }),
        monitor_layers,
        question: String::new(),
    }
}

/// A fresh client trace id and parent span id (what an instrumented caller would send).
fn client_ids() -> (String, String) {
    let id = vlm_net::new_request_id();
    (id.clone(), id[..16].to_string())
}

/// Sends a request carrying `traceparent`; returns (token count, the final message's trace id,
/// its layer statistics).
async fn generate_traced(
    mut client: vlm_proto::gateway_client::GatewayClient<tonic::transport::Channel>,
    req: GenerateRequest,
    trace_id: &str,
    parent: &str,
    seen: Option<Arc<AtomicUsize>>,
) -> (usize, String, Vec<vlm_proto::LayerStats>) {
    let mut req = tonic::Request::new(req);
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{parent}-01").parse().unwrap(),
    );
    let mut stream = bounded("the call", client.generate(req))
        .await
        .unwrap()
        .into_inner();
    let mut tokens = 0;
    let mut final_msg = None;
    while let Some(msg) = next_message(&mut stream).await.unwrap() {
        match msg.kind {
            Some(Kind::Delta(d)) => {
                tokens += d.token_ids.len();
                if let Some(seen) = &seen {
                    seen.store(tokens, Ordering::SeqCst);
                }
            }
            Some(Kind::Final(f)) => final_msg = Some(f),
            None => {}
        }
    }
    let f = final_msg.expect("no final message");
    (tokens, f.trace_id, f.layer_stats)
}

/// Parses Prometheus text format strictly enough to catch malformed output: comments are HELP or
/// TYPE lines, samples are `name{labels} value` with a valid name and a float value. Returns
/// `series → value`.
fn parse_prometheus(text: &str) -> HashMap<String, f64> {
    // A second opinion from a third-party parser (prometheus-parse): every line must be a HELP,
    // TYPE or sample line it recognises, every sample value a float, and every TYPEd metric
    // must come back from its full scrape.
    let mut types = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match prometheus_parse::LineInfo::parse(line) {
            prometheus_parse::LineInfo::Sample { value, .. } => assert!(
                value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value),
                "prometheus-parse: bad value in {line}"
            ),
            prometheus_parse::LineInfo::Type {
                metric_name,
                metric_alias,
                ..
            } => types.push(metric_alias.unwrap_or(metric_name)),
            prometheus_parse::LineInfo::Doc { .. } => {}
            other => panic!("prometheus-parse does not recognise {line:?}: {other:?}"),
        }
    }
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    let metrics: HashSet<&str> = scrape.samples.iter().map(|s| s.metric.as_str()).collect();
    for t in &types {
        assert!(
            metrics.contains(t.as_str()),
            "prometheus-parse found no samples of {t}: {metrics:?}"
        );
    }
    let valid_name = |n: &str| {
        !n.is_empty()
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            && !n.starts_with(|c: char| c.is_ascii_digit())
    };
    let mut out = HashMap::new();
    let mut typed = HashSet::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut w = rest.splitn(3, ' ');
            let kind = w.next().unwrap();
            let name = w.next().unwrap_or("");
            assert!(kind == "HELP" || kind == "TYPE", "bad comment: {line}");
            assert!(valid_name(name), "bad name in {line}");
            if kind == "TYPE" {
                let t = w.next().unwrap_or("");
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&t),
                    "bad type: {line}"
                );
                typed.insert(name.to_string());
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line}"));
        let name = series.split('{').next().unwrap();
        assert!(valid_name(name), "bad metric name in {line}");
        if let Some(labels) = series.strip_prefix(name) {
            if !labels.is_empty() {
                assert!(
                    labels.starts_with('{') && labels.ends_with('}'),
                    "bad labels: {line}"
                );
            }
        }
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|b| typed.contains(*b)))
            .unwrap_or(name);
        assert!(typed.contains(base), "sample before its TYPE: {line}");
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line}"));
        out.insert(series.to_string(), v);
    }
    out
}

fn metrics_addrs(mesh: &MeshProc) -> Vec<(String, String)> {
    mesh.mesh_json()["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["role"].as_str().unwrap().to_string(),
                s["metrics"]
                    .as_str()
                    .unwrap_or_else(|| panic!("no metrics address for {s}"))
                    .to_string(),
            )
        })
        .collect()
}

fn sum(m: &HashMap<String, f64>, prefix: &str) -> f64 {
    m.iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(_, v)| v)
        .sum()
}

fn otel_env(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.to_string()),
        // Export promptly, so the test waits milliseconds rather than the 5 s default.
        ("OTEL_BSP_SCHEDULE_DELAY", "50".to_string()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_request_is_one_trace_across_all_services_and_metrics_count() {
    let _serial = SERIAL.lock().await;
    let collector = Collector::default();
    let endpoint = collector.start().await;
    let env = otel_env(&endpoint);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mesh = MeshProc::start(&env);

    let addrs = metrics_addrs(&mesh);
    assert_eq!(addrs.len(), 4, "{addrs:?}");
    let before: HashMap<String, HashMap<String, f64>> = addrs
        .iter()
        .map(|(role, a)| (role.clone(), parse_prometheus(&scrape(a))))
        .collect();

    // Request 1: a cache miss, so every stage runs.
    let (trace1, client_span) = client_ids();
    // With intermediate-state monitoring on.
    let (tokens, returned, layer_stats) = generate_traced(
        mesh.client().await,
        request_monitored(8, true),
        &trace1,
        &client_span,
        None,
    )
    .await;
    assert!(tokens > 0);
    assert_eq!(
        returned, trace1,
        "the final message carries the caller's trace id"
    );
    let spans = collector
        .wait_for(
            &trace1,
            "the decoder's decode span and the cache store",
            |s| {
                has(s, "decoder", "decode")
                    && has(s, "gateway", "vlm.v1.Gateway/Generate")
                    && has(s, "gateway", "cache.store")
            },
        )
        .await;
    // The miss's features were written to the cache, under the request's trace.
    let store = find(&spans, "gateway", "cache.store");
    assert_eq!(store.attrs["cache.result"], "ok", "{:?}", store.attrs);
    assert!(store.attrs["cache.bytes"].parse::<u64>().unwrap() > 0);

    // Every span exported so far belongs to the request's trace (no orphan roots).
    let all = collector.all();
    let stray: Vec<_> = all.iter().filter(|s| s.trace_id != trace1).collect();
    assert!(
        stray.is_empty(),
        "spans outside the request's trace: {stray:?}"
    );
    // Spans from all four services.
    let services: HashSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
    for svc in ["gateway", "encoder", "projector", "decoder"] {
        assert!(services.contains(svc), "no span from {svc}: {services:?}");
    }
    // Every span's parent is in the trace, or is the caller's span.
    let ids: HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    for s in &spans {
        assert!(
            s.parent == client_span || ids.contains(s.parent.as_str()),
            "{} ({}) has a parent {} that is not in the trace",
            s.name,
            s.service,
            s.parent
        );
    }
    let root = find(&spans, "gateway", "vlm.v1.Gateway/Generate");
    assert_eq!(
        root.parent, client_span,
        "the gateway continues the caller's span"
    );
    // RPC semantic conventions on server spans of every hop.
    for (svc, name) in [
        ("gateway", "vlm.v1.Gateway/Generate"),
        ("encoder", "vlm.v1.Encoder/Encode"),
        ("projector", "vlm.v1.Projector/Project"),
        ("decoder", "vlm.v1.Decoder/Generate"),
    ] {
        let s = find(&spans, svc, name);
        assert_eq!(s.attrs["rpc.system"], "grpc", "{s:?}");
        assert_eq!(s.attrs["rpc.method"], name.split('/').nth(1).unwrap());
        assert_eq!(s.attrs["rpc.service"], name.split('/').next().unwrap());
        assert_eq!(s.attrs["rpc.grpc.status_code"], "0", "{s:?}");
        // Its client span on the gateway is its parent.
        if svc != "gateway" {
            let parent = spans.iter().find(|p| p.span_id == s.parent).unwrap();
            assert_eq!(parent.service, "gateway");
            assert_eq!(parent.name, name, "client span named like the call");
        }
    }
    // Stage spans with their attributes.
    let lookup = find(&spans, "gateway", "cache.lookup");
    assert_eq!(lookup.attrs["cache.result"], "miss");
    assert!(has(&spans, "encoder", "preprocess"));
    assert!(has(&spans, "encoder", "vision_forward"));
    assert!(has(&spans, "projector", "project"));
    let prefill = find(&spans, "decoder", "prefill");
    assert_eq!(prefill.attrs["gen_ai.request.max_tokens"], "8");
    assert_eq!(prefill.attrs["gen_ai.request.temperature"], "0");
    assert_eq!(prefill.attrs["gen_ai.request.model"], "tiny-llava");
    assert!(
        prefill.attrs["gen_ai.usage.input_tokens"]
            .parse::<i64>()
            .unwrap()
            > 0
    );
    let decode = find(&spans, "decoder", "decode");
    assert_eq!(
        decode.attrs["gen_ai.usage.output_tokens"],
        tokens.to_string()
    );

    // monitor_layers: one row per vision layer run and per decoder layer, each also a span event
    // on the stage span it was measured in. Layer counts come from the checkpoint's config.
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model().join("config.json")).unwrap()).unwrap();
    let vision_layers = config["vision_config"]["num_hidden_layers"]
        .as_i64()
        .unwrap();
    let feature_layer = config["vision_feature_layer"].as_i64().unwrap();
    // hidden_states[i] is the output of layer i-1; layers after the selected one never run.
    let vision_run = if feature_layer < 0 {
        vision_layers + 1 + feature_layer
    } else {
        feature_layer
    } as usize;
    let decoder_layers = config["text_config"]["num_hidden_layers"].as_u64().unwrap() as usize;
    let per = |c: &str| {
        layer_stats
            .iter()
            .filter(|r| r.component == c)
            .collect::<Vec<_>>()
    };
    let (vision, decoder) = (per("vision"), per("decoder"));
    assert_eq!(vision.len(), vision_run, "{layer_stats:?}");
    assert_eq!(decoder.len(), decoder_layers, "{layer_stats:?}");
    assert_eq!(layer_stats.len(), vision_run + decoder_layers);
    for (rows, (svc, span)) in [
        (&vision, ("encoder", "vision_forward")),
        (&decoder, ("decoder", "prefill")),
    ] {
        let events: Vec<_> = find(&spans, svc, span)
            .events
            .iter()
            .filter(|(n, _)| n == "layer_stats")
            .collect();
        assert_eq!(events.len(), rows.len(), "{svc} {span}");
        for (i, (r, (_, ev))) in rows.iter().zip(events).enumerate() {
            assert_eq!(r.layer as usize, i);
            assert!(
                r.std > 0.0 && r.abs_max > 0.0 && r.mean.is_finite(),
                "{r:?}"
            );
            assert_eq!((r.nan_count, r.inf_count), (0, 0));
            assert_eq!(ev["vlm.layer"], i.to_string());
            assert_eq!(ev["vlm.mean"], r.mean.to_string(), "{svc} layer {i}");
            assert_eq!(ev["vlm.abs_max"], r.abs_max.to_string());
        }
    }

    // Request 2, same image: served from the cache, so no encoder span in its trace.
    let (trace2, client_span2) = client_ids();
    let (tokens2, returned2, layer_stats2) = generate_traced(
        mesh.client().await,
        request(8),
        &trace2,
        &client_span2,
        None,
    )
    .await;
    assert!(layer_stats2.is_empty(), "monitoring is off by default");
    assert!(
        collector
            .trace(&trace2)
            .iter()
            .all(|s| s.events.iter().all(|(n, _)| n != "layer_stats")),
        "layer_stats events without monitor_layers"
    );
    assert_eq!(returned2, trace2);
    assert_eq!(tokens2, tokens);
    let spans2 = collector
        .wait_for(&trace2, "the second request's decode span", |s| {
            has(s, "decoder", "decode") && has(s, "gateway", "vlm.v1.Gateway/Generate")
        })
        .await;
    assert_eq!(
        find(&spans2, "gateway", "cache.lookup").attrs["cache.result"],
        "hit"
    );
    // The gateway asks an encoder replica which weights it serves (the cache key's fingerprint),
    // but a hit never reaches the encoder's Encode.
    assert!(has(&spans2, "encoder", "vlm.v1.Encoder/Info"));
    let encoder_spans: Vec<_> = spans2
        .iter()
        .filter(|s| s.service == "encoder" && s.name != "vlm.v1.Encoder/Info")
        .collect();
    assert!(
        encoder_spans.is_empty(),
        "cache hit still reached the encoder: {encoder_spans:?}"
    );
    assert!(has(&spans2, "projector", "project"));

    // Metrics: every port parses, and the counters moved with the two requests.
    let after: HashMap<String, HashMap<String, f64>> = addrs
        .iter()
        .map(|(role, a)| (role.clone(), parse_prometheus(&scrape(a))))
        .collect();
    let moved = |role: &str, prefix: &str| {
        sum(&after[role], prefix) - sum(before.get(role).unwrap(), prefix)
    };
    assert_eq!(
        moved(
            "gateway",
            "vlm_rpc_server_requests_total{service=\"vlm.v1.Gateway\",method=\"Generate\",code=\"0\"}"
        ),
        2.0
    );
    assert_eq!(
        moved(
            "encoder",
            "vlm_rpc_server_requests_total{service=\"vlm.v1.Encoder\",method=\"Encode\",code=\"0\"}"
        ),
        1.0,
        "one encode: the second image came from the cache"
    );
    assert_eq!(
        moved(
            "projector",
            "vlm_rpc_server_requests_total{service=\"vlm.v1.Projector\",method=\"Project\""
        ),
        2.0
    );
    assert_eq!(
        moved(
            "decoder",
            "vlm_rpc_server_requests_total{service=\"vlm.v1.Decoder\",method=\"Generate\""
        ),
        2.0
    );
    // A miss may look twice (again once this request leads the single flight).
    assert!(moved("gateway", "vlm_cache_lookups_total{result=\"miss\"}") >= 1.0);
    assert_eq!(
        moved("gateway", "vlm_cache_lookups_total{result=\"hit\"}"),
        1.0
    );
    assert_eq!(
        moved("gateway", "vlm_tokens_generated_total"),
        (tokens + tokens2) as f64
    );
    assert_eq!(
        moved("gateway", "vlm_time_to_first_token_seconds_count"),
        2.0
    );
    assert_eq!(
        moved("gateway", "vlm_inter_token_latency_seconds_count"),
        (tokens + tokens2 - 2) as f64
    );
    assert_eq!(
        moved(
            "decoder",
            "vlm_stage_duration_seconds_count{stage=\"decode\"}"
        ),
        2.0
    );
    assert_eq!(
        moved(
            "encoder",
            "vlm_stage_duration_seconds_count{stage=\"vision_forward\"}"
        ),
        1.0
    );
    // Server durations to the end of each response stream: one sample per call.
    assert_eq!(
        moved(
            "gateway",
            "vlm_rpc_server_duration_seconds_count{service=\"vlm.v1.Gateway\",method=\"Generate\",code=\"0\"}"
        ),
        2.0
    );
    assert_eq!(
        moved("gateway", "vlm_cache_stores_total{result=\"ok\"}"),
        1.0,
        "one store: the miss"
    );
    // Every stage the README lists has its duration series, on the service that runs it.
    for (role, stage, calls) in [
        ("encoder", "preprocess", 1.0),
        ("projector", "project", 2.0),
        ("decoder", "prefill", 2.0),
    ] {
        let series = format!("vlm_stage_duration_seconds_count{{stage=\"{stage}\"}}");
        assert_eq!(moved(role, &series), calls, "{role} {stage}");
    }
    assert!(
        moved(
            "gateway",
            "vlm_stage_duration_seconds_count{stage=\"cache.lookup\"}"
        ) >= 2.0
    );
    // Nothing retried or shed in a healthy mesh (tests/resilience.rs and tests/failures.rs read
    // these series when something is).
    for series in ["vlm_gateway_retries_total", "vlm_admission_shed_total"] {
        assert_eq!(moved("gateway", series), 0.0, "{series}");
    }
    // Nothing in flight once the streams are over.
    for role in ["gateway", "encoder", "projector", "decoder"] {
        assert_eq!(sum(&after[role], "vlm_rpc_server_in_flight"), 0.0, "{role}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn decoder_killed_mid_stream_is_a_failover_event_on_the_same_trace() {
    let _serial = SERIAL.lock().await;
    let collector = Collector::default();
    let endpoint = collector.start().await;
    let mut env = otel_env(&endpoint);
    // Slow tokens, so the stream is still running when its decoder is killed.
    env.push(("VLM_FAULT_DECODE_DELAY_MS", "100".to_string()));
    env.push(("VLM_HEALTH_INTERVAL_MS", "200".to_string()));
    // And JSON logs (`--log-format json` through its env var), checked at the end.
    env.push(("VLM_LOG_FORMAT", "json".to_string()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mesh = MeshProc::start_with(&model(), &["--replicas", "decoder=2"], &env);

    let (trace, client_span) = client_ids();
    let client = mesh.client().await;
    let (t2, c2) = (trace.clone(), client_span.clone());
    let seen = Arc::new(AtomicUsize::new(0));
    let seen2 = seen.clone();
    let run =
        tokio::spawn(
            async move { generate_traced(client, request(24), &t2, &c2, Some(seen2)).await },
        );
    // The prefill span names the decoder process serving the request; kill that one once
    // tokens have reached the client, so the stream is resumed mid-way.
    let spans = collector
        .wait_for(&trace, "the first decoder's prefill span", |s| {
            has(s, "decoder", "prefill")
        })
        .await;
    let victim = find(&spans, "decoder", "prefill").pid;
    assert!(victim > 0, "no process.pid on the decoder's resource");
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.load(Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline, "no tokens flowing");
        tokio::time::sleep(Duration::from_millis(5)).await; // polling a counter, bounded above
    }
    let at_kill = seen.load(Ordering::SeqCst);
    // SAFETY: kill(2) on a decoder process this test's mesh started.
    assert_eq!(unsafe { libc::kill(victim as i32, libc::SIGKILL) }, 0);
    let (tokens, returned, _) = run.await.unwrap();
    assert!(tokens > at_kill, "the stream went on on the other replica");
    assert_eq!(returned, trace);

    let spans = collector
        .wait_for(&trace, "a failover event", |s| {
            s.iter()
                .any(|x| x.events.iter().any(|(name, _)| name == "failover"))
                && s.iter()
                    .any(|x| x.service == "decoder" && x.name == "prefill" && x.pid != victim)
        })
        .await;
    let (holder, (_, attrs)) = spans
        .iter()
        .find_map(|s| {
            s.events
                .iter()
                .find(|(n, _)| n == "failover")
                .map(|e| (s, e))
        })
        .unwrap();
    assert_eq!(holder.service, "gateway");
    assert_eq!(attrs["vlm.stage"], "decoder");
    assert!(!attrs["reason"].is_empty(), "{attrs:?}");
    // The resumed prefill on the surviving replica is in the same trace and re-sent the tokens
    // already produced.
    let resumed = spans
        .iter()
        .find(|s| s.service == "decoder" && s.name == "prefill" && s.pid != victim)
        .unwrap();
    assert!(resumed.attrs["vlm.resume_tokens"].parse::<i64>().unwrap() > 0);

    // Every service logged JSON objects (`up` prefixes each line with the service's label).
    let log = mesh.log.lock().unwrap().clone();
    for label in ["[gateway] ", "[encoder] ", "[projector] ", "[decoder] "] {
        let lines: Vec<&String> = log.iter().filter(|l| l.starts_with(label)).collect();
        assert!(!lines.is_empty(), "no log lines from {label}");
        for l in lines {
            let v: serde_json::Value = serde_json::from_str(&l[label.len()..])
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}"));
            assert!(v["level"].is_string() && v["fields"].is_object(), "{l}");
        }
    }
}

/// A collector that is down is reported once (not per batch, not silently), and its return too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn export_failures_and_recovery_are_logged_once() {
    let _serial = SERIAL.lock().await;
    // A loopback port with nothing on it (yet).
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let env = otel_env(&format!("http://{addr}"));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mesh = MeshProc::start(&env);
    for _ in 0..2 {
        let (trace, span) = client_ids();
        generate_traced(mesh.client().await, request(4), &trace, &span, None).await;
    }
    let failed = mesh
        .wait_for_log(
            &["[gateway]", "exporting spans over OTLP", "failed"],
            Duration::from_secs(60),
        )
        .expect("the gateway never reported that its collector is down");
    assert!(
        failed.contains(&addr),
        "the line names the endpoint: {failed}"
    );

    let collector = Collector::default();
    collector.start_on(&addr).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let recovered = loop {
        let (trace, span) = client_ids();
        generate_traced(mesh.client().await, request(4), &trace, &span, None).await;
        if let Some(line) = mesh.wait_for_log(
            &["[gateway]", "exporting spans over OTLP", "works again"],
            Duration::from_secs(2),
        ) {
            break line;
        }
        assert!(
            Instant::now() < deadline,
            "no recovery logged within 60 s of the collector starting; it got {} spans",
            collector.all().len()
        );
    };
    assert!(recovered.contains("batch(es) lost"), "{recovered}");
    let log = mesh.log.lock().unwrap().join("\n");
    let failures = log
        .lines()
        .filter(|l| {
            l.starts_with("[gateway]")
                && l.contains("exporting spans over OTLP")
                && l.contains("failed")
        })
        .count();
    assert_eq!(
        failures, 1,
        "one failure line per outage, not one per batch: {log}"
    );
}

/// Every series the README names whose labels are known in advance is exported, at zero, before
/// the first request (dashboards, alerts and `rate()` need it to exist).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_exist_at_zero_before_any_request() {
    let _serial = SERIAL.lock().await;
    let mesh = MeshProc::start(&[]);
    let expect: &[(&str, &[&str])] = &[
        (
            "gateway",
            &[
                "vlm_admission_queue_depth{service=\"vlm.v1.Gateway\"}",
                "vlm_admission_shed_total{service=\"vlm.v1.Gateway\"}",
                "vlm_cache_lookups_total{result=\"hit\"}",
                "vlm_cache_lookups_total{result=\"miss\"}",
                "vlm_cache_lookups_total{result=\"error\"}",
                "vlm_cache_stores_total{result=\"ok\"}",
                "vlm_cache_stores_total{result=\"error\"}",
                "vlm_gateway_retries_total{stage=\"encoder\",kind=\"retry\"}",
                "vlm_gateway_retries_total{stage=\"decoder\",kind=\"failover\"}",
                "vlm_gateway_routing_decisions_total{reason=\"prefix\"}",
                "vlm_gateway_routed_cached_tokens_total{reason=\"prefix\"}",
                "vlm_gateway_abandoned_calls_total{stage=\"decoder\",reason=\"slow_token\"}",
                "vlm_tokens_generated_total",
                "vlm_time_to_first_token_seconds_count",
                "vlm_inter_token_latency_seconds_count",
                "vlm_stage_duration_seconds_count{stage=\"cache.lookup\"}",
            ],
        ),
        (
            "encoder",
            &[
                "vlm_admission_shed_total{service=\"vlm.v1.Encoder\"}",
                "vlm_saturation{service=\"vlm.v1.Encoder\"}",
                "vlm_stage_duration_seconds_count{stage=\"preprocess\"}",
                "vlm_stage_duration_seconds_count{stage=\"vision_forward\"}",
            ],
        ),
        (
            "projector",
            &["vlm_stage_duration_seconds_count{stage=\"project\"}"],
        ),
        (
            "decoder",
            &[
                "vlm_admission_queue_depth{service=\"vlm.v1.Decoder\"}",
                "vlm_stage_duration_seconds_count{stage=\"prefill\"}",
                "vlm_stage_duration_seconds_count{stage=\"decode\"}",
                "vlm_decoder_batch_size_count",
                "vlm_kv_cache_blocks{state=\"used\"}",
                "vlm_saturation{service=\"vlm.v1.Decoder\"}",
                "vlm_prefix_cache_tokens_total{result=\"hit\"}",
                "vlm_decoder_queue_wait_seconds_count{outcome=\"expired\"}",
                "vlm_decoder_running_sequences",
                "vlm_decoder_queued_requests",
            ],
        ),
    ];
    for (role, series) in expect {
        let text = scrape(&mesh.metrics_addr(role));
        for s in *series {
            let line = text
                .lines()
                .find(|l| l.strip_prefix(s).is_some_and(|rest| rest.starts_with(' ')))
                .unwrap_or_else(|| panic!("{role}: no {s} before any request:\n{text}"));
            let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
            // KV blocks and running sequences are gauges of state, not events; the rest are zero.
            if !s.starts_with("vlm_kv_cache_blocks") {
                assert_eq!(value, 0.0, "{role}: {line}");
            }
        }
    }
}
