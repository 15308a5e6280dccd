use std::collections::HashMap;

use prometheus_parse::{Scrape, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;

fn parse(text: &str) -> Scrape {
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("parses")
}

/// `# TYPE` lines: series name → type.
fn types(text: &str) -> HashMap<&str, &str> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .collect()
}

fn counter(scrape: &Scrape, name: &str, label: (&str, &str)) -> Option<f64> {
    scrape.samples.iter().find_map(|s| match s.value {
        Value::Counter(v) if s.metric == name && s.labels.get(label.0) == Some(label.1) => Some(v),
        _ => None,
    })
}

/// (upper bound, cumulative count) of one histogram series.
fn buckets(scrape: &Scrape, name: &str, label: (&str, &str)) -> Vec<(f64, f64)> {
    let s = scrape
        .samples
        .iter()
        .find(|s| s.metric == name && s.labels.get(label.0) == Some(label.1))
        .unwrap_or_else(|| panic!("no {name} series with {label:?}"));
    match &s.value {
        Value::Histogram(b) => b.iter().map(|b| (b.less_than, b.count)).collect(),
        other => panic!("{name} is not a histogram: {other:?}"),
    }
}

#[test]
fn typed_records_encode_as_prometheus_text_under_their_names() {
    let m = MeshMetrics::new();
    assert_eq!(m.encode(), "", "nothing recorded, nothing exposed");
    let miss = CacheLookupLabels {
        result: CacheLookup::miss,
    };
    m.cache_lookups.get_or_create(&miss).inc();
    m.cache_lookups.get_or_create(&miss).inc();
    let odd = StageLabels {
        stage: "a\"b\\c\nd".to_string(),
    };
    m.stage_duration
        .get_or_create(&odd)
        .observe(Duration::from_millis(3).as_secs_f64());
    m.decoder_batch_size.get_or_create(&NoLabels).observe(3.0);
    m.kv_cache_blocks
        .get_or_create(&KvBlockLabels {
            state: KvBlockState::free,
        })
        .set(7);
    m.rpc_server_requests
        .get_or_create(&RpcCallLabels {
            rpc: RpcLabels {
                service: "vlm.v1.Encoder".into(),
                method: "Encode".into(),
            },
            code: 0,
        })
        .inc();
    let text = m.encode();

    let t = types(&text);
    assert_eq!(t["vlm_cache_lookups_total"], "counter", "{text}");
    assert_eq!(t["vlm_stage_duration_seconds"], "histogram", "{text}");
    assert_eq!(t["vlm_decoder_batch_size"], "histogram", "{text}");
    assert_eq!(t["vlm_kv_cache_blocks"], "gauge", "{text}");
    assert_eq!(t["vlm_rpc_server_requests_total"], "counter", "{text}");
    assert_eq!(t.len(), 5, "only recorded families appear: {text}");
    assert!(
        !text.contains("# EOF") && !text.contains("# UNIT"),
        "{text}"
    );

    // Label values escaped as the text format requires; label order as declared.
    assert!(
        text.contains("vlm_stage_duration_seconds_count{stage=\"a\\\"b\\\\c\\nd\"} 1\n"),
        "{text}"
    );
    assert!(text.contains(
        "vlm_rpc_server_requests_total{service=\"vlm.v1.Encoder\",method=\"Encode\",code=\"0\"} 1\n"
    ));
    assert!(
        text.contains("vlm_kv_cache_blocks{state=\"free\"} 7\n"),
        "{text}"
    );

    let scrape = parse(&text);
    assert_eq!(
        counter(&scrape, "vlm_cache_lookups_total", ("result", "miss")),
        Some(2.0)
    );
    // 3 ms: outside the 1 and 2.5 ms buckets, inside every one from 5 ms.
    let latency = buckets(
        &scrape,
        "vlm_stage_duration_seconds",
        ("stage", "a\\\"b\\\\c\\nd"),
    );
    let bounds: Vec<f64> = latency.iter().map(|b| b.0).collect();
    let mut want: Vec<f64> = LATENCY_BUCKETS.to_vec();
    want.push(f64::INFINITY);
    assert_eq!(bounds, want);
    assert_eq!(latency[1], (0.0025, 0.0));
    assert_eq!(latency[2], (0.005, 1.0));
    // Batch sizes keep their own buckets, with integer bounds written as integers.
    assert!(
        text.contains("vlm_decoder_batch_size_bucket{le=\"2\"} 0\n"),
        "{text}"
    );
    assert!(
        text.contains("vlm_decoder_batch_size_bucket{le=\"4\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("vlm_decoder_batch_size_bucket{le=\"128\"} 1\n"),
        "{text}"
    );
}

#[test]
fn named_helpers_record_into_the_global_families() {
    let m = MeshMetrics::global();
    let hits = || {
        m.cache_lookups
            .get_or_create(&CacheLookupLabels {
                result: CacheLookup::hit,
            })
            .get()
    };
    let failovers = || {
        m.gateway_retries
            .get_or_create(&RetryLabels {
                stage: "decoder".into(),
                kind: RetryKind::failover,
            })
            .get()
    };
    let (hits0, failovers0) = (hits(), failovers());
    cache_lookup("hit");
    cache_lookup("hit");
    cache_lookup("no such result");
    stage_retry("decoder", "failover");
    assert_eq!(hits() - hits0, 2);
    assert_eq!(failovers() - failovers0, 1);

    let tokens = || m.tokens_generated.get_or_create(&NoLabels).get();
    let tokens0 = tokens();
    token_streamed(Some(Duration::from_millis(40)), None);
    token_streamed(None, Some(Duration::from_millis(5)));
    assert_eq!(tokens() - tokens0, 2);
    let text = m.encode();
    assert!(
        text.contains("# TYPE vlm_time_to_first_token_seconds histogram\n"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE vlm_inter_token_latency_seconds histogram\n"),
        "{text}"
    );
}

async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    raw
}

#[tokio::test]
async fn the_metrics_port_answers_on_metrics_and_any_other_path() {
    observe_stage("http-test", Duration::from_millis(1));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = serve_metrics(listener);
    for path in ["/metrics", "/"] {
        let raw = get(addr, path).await;
        let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
        assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
            "{path}: {head}"
        );
        assert!(
            body.contains("vlm_stage_duration_seconds_count{stage=\"http-test\"} 1\n"),
            "{path}: {body}"
        );
    }
    server.abort();
}
