//! `vlm-mesh bench --quick` smoke run: every section's report is produced and well formed. No
//! timing assertions (CI machines are noisy); only that each measure is a real, ordered spread, the
//! ratios are what the medians say, and the sizes are what was asked for.

mod common;
use common::OutputWithin;

use serde_json::Value;

fn num(v: &Value, what: &str) -> f64 {
    v.as_f64()
        .unwrap_or_else(|| panic!("{what} missing or not a number: {v}"))
}

/// Checks an ordered p50/p90/min/max spread of positive values; returns the p50.
fn spread(v: &Value, what: &str) -> f64 {
    let get = |k: &str| num(&v[k], &format!("{what}.{k}"));
    let (p50, p90, min, max) = (get("p50"), get("p90"), get("min"), get("max"));
    assert!(min.is_finite() && max.is_finite(), "{what}: {v}");
    assert!(
        0.0 <= min && min <= p50 && p50 <= p90 && p90 <= max,
        "{what} is not an ordered spread: {v}"
    );
    p50
}

/// `ratio` is `num / den` (as the report says it is).
fn assert_ratio(ratio: &Value, num_: f64, den: f64, what: &str) {
    let r = num(ratio, what);
    assert!(num_ > 0.0 && den > 0.0, "{what}: {num_} / {den}");
    assert!(
        (r - num_ / den).abs() <= 1e-9 * r.abs(),
        "{what} = {r} is not {num_} / {den} = {}",
        num_ / den
    );
}

/// The frames section (quick: 40 frames of the clip, a question every 10): the counts add up,
/// the ratio is what the sums say, and every answer on a reused frame equals the naive one.
fn check_frames(f: &Value) {
    assert_eq!(f["bench"], "frames", "{f}");
    let count = |k: &str| f[k].as_u64().unwrap_or_else(|| panic!("{k}: {f}"));
    assert_eq!(count("frames"), 40, "{f}");
    assert_eq!(count("questions"), 4, "{f}");
    assert_eq!(
        count("reused") + count("partial") + count("full"),
        40,
        "{f}"
    );
    assert!(count("reused") > 0 && count("full") > 0, "{f}");
    let watch = num(&f["watch_encoder_s"], "watch_encoder_s");
    let naive = num(&f["naive_encoder_s"], "naive_encoder_s");
    assert_ratio(
        &f["encoder_seconds_saved_ratio"],
        naive,
        watch,
        "encoder seconds",
    );
    for k in [
        "watch_encode_ms",
        "naive_encode_ms",
        "watch_answer_ms",
        "naive_answer_ms",
    ] {
        spread(&f[k], k);
    }
    assert_eq!(f["identical_on_reused"], f["asked_on_reused"], "{f}");
}

fn check_mesh(m: &Value) {
    assert_eq!(m["bench"], "mesh", "{m}");
    assert_eq!(m["cache"], "off", "{m}");
    assert_eq!(m["rounds"], 3, "--quick runs 3 rounds: {m}");
    assert_eq!(m["max_tokens"], 4, "{m}");
    let tokens = m["tokens"].as_u64().expect("tokens");
    assert!((1..=4).contains(&tokens), "{m}");
    assert!(m["cores"].as_u64().expect("cores") >= 1, "{m}");
    for row in ["ttft_ms", "itl_ms"] {
        let r = &m[row];
        let a = spread(&r["in_process"], &format!("{row}.in_process"));
        let b = spread(&r["mesh"], &format!("{row}.mesh"));
        if row == "ttft_ms" || tokens > 1 {
            assert_ratio(&r["ratio_p50"], b, a, row);
        }
    }
    // The first token cannot come before the request was sent, in either setup.
    assert!(num(&m["ttft_ms"]["mesh"]["min"], "ttft min") > 0.0);

    let e = &m["encoder"];
    assert_eq!(e["rounds"], 1, "--quick runs 1 encoder round: {e}");
    assert_eq!(e["images"], 8, "{e}");
    assert_eq!(e["concurrency"], 8, "{e}");
    assert!(
        e["max_concurrent"].as_u64().expect("max_concurrent") >= 1,
        "{e}"
    );
    let seq = spread(&e["sequential_img_per_s"], "encoder.sequential");
    let conc = spread(&e["concurrent_img_per_s"], "encoder.concurrent");
    assert_ratio(
        &e["concurrent_over_sequential_p50"],
        conc,
        seq,
        "encoder concurrency",
    );
    let single = spread(&e["single_forwards_ms"], "encoder.single");
    let batched = spread(&e["batched_forward_ms"], "encoder.batched");
    assert_ratio(&e["batching_speedup_p50"], single, batched, "batching");

    let peak = m["peak_rss_mib"].as_object().expect("peak_rss_mib");
    let now = m["rss_mib"].as_object().expect("rss_mib");
    for role in ["encoder", "projector", "decoder", "gateway"] {
        let p = num(&peak[role], &format!("peak RSS of the {role}"));
        let n = num(&now[role], &format!("RSS of the {role}"));
        // A live Rust process with a runtime is well over 1 MiB; the tiny model well under 2 GiB;
        // the peak is a peak.
        assert!((1.0..2048.0).contains(&p), "{role}: {p} MiB");
        assert!(1.0 <= n && n <= p, "{role}: RSS {n} MiB, peak {p} MiB");
    }
    assert_eq!(peak.len(), 5, "4 services and the bench process: {peak:?}");
    assert_eq!(now.len(), 5, "{now:?}");
}

fn check_cache(c: &Value) {
    assert_eq!(c["bench"], "cache", "{c}");
    let rounds = c["rounds"].as_u64().expect("rounds");
    assert!((1..=3).contains(&rounds), "miss/hit pairs counted: {c}");
    let miss = spread(&c["ttft_miss_ms"], "ttft_miss_ms");
    let hit = spread(&c["ttft_hit_ms"], "ttft_hit_ms");
    assert_ratio(&c["hit_over_miss_p50"], hit, miss, "hit/miss");
    // Every counted miss ran the encoder.
    assert!(num(&c["encode_ms"]["min"], "encode_ms.min") > 0.0, "{c}");
    let fetch = c["redis_fetch"].as_array().expect("redis_fetch");
    if c["redis"] == "in-memory" {
        assert!(fetch.is_empty(), "Redis fetch rows without Redis: {c}");
        return;
    }
    let sizes: Vec<(u64, u64, &str)> = fetch
        .iter()
        .map(|f| {
            spread(&f["fetch_ms"], "fetch_ms");
            let bytes = f["bytes"].as_u64().unwrap();
            let elems = f["rows"].as_u64().unwrap() * f["dim"].as_u64().unwrap();
            let width = if f["dtype"] == "f16" { 2 } else { 4 };
            // The stored value is the tensor plus a small header.
            assert!(bytes > elems * width && bytes < elems * width + 1024, "{f}");
            (
                f["rows"].as_u64().unwrap(),
                f["dim"].as_u64().unwrap(),
                f["dtype"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        sizes,
        [(25, 32, "f32"), (576, 1024, "f16"), (576, 1024, "f32")],
        "{c}"
    );
}

fn check_stream(s: &Value) {
    assert_eq!(s["bench"], "stream", "{s}");
    assert_eq!(s["rounds"], 3, "{s}");
    let chunk = s["chunk_bytes"].as_u64().expect("chunk_bytes");
    let cases = s["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), 2, "{s}");
    for (case, (rows, dim)) in cases.iter().zip([(576u64, 1024u64), (576, 4096)]) {
        assert_eq!(case["shape"], serde_json::json!([rows, dim]), "{case}");
        assert_eq!(case["dtype"], "f16", "{case}");
        let bytes = rows * dim * 2;
        assert_eq!(
            case["bytes"], bytes,
            "every f16 element arrived once: {case}"
        );
        // Chunks hold whole rows, at most chunk_bytes of them.
        let rows_per_chunk = chunk / (dim * 2);
        assert_eq!(case["chunks"], rows.div_ceil(rows_per_chunk), "{case}");
        let grpc = spread(&case["grpc_mtls_ms"], "grpc_mtls_ms");
        let raw = spread(&case["raw_tls_ms"], "raw_tls_ms");
        assert_ratio(&case["grpc_over_raw_p50"], raw, grpc, "gRPC/raw");
        assert_ratio(
            &case["grpc_gb_per_s"],
            bytes as f64 / 1e6,
            grpc,
            "gRPC GB/s",
        );
        assert_ratio(&case["raw_gb_per_s"], bytes as f64 / 1e6, raw, "raw GB/s");
    }
}

/// The concurrency section of a `--quick` run (1 round, levels 1 and 2, 8 tokens, a 100-token
/// prefix, 3 in-process steps); `plot` is the `--plot` path given, if any.
fn check_concurrency(c: &Value, plot: Option<&std::path::Path>) {
    assert_eq!(c["bench"], "concurrency", "{c}");
    assert_eq!(c["cache"], "hit", "{c}");
    assert_eq!(c["rounds"], 1, "--quick runs 1 round: {c}");
    assert_eq!(c["max_tokens"], 8, "{c}");
    assert!(c["cores"].as_u64().expect("cores") >= 1, "{c}");
    let levels = c["levels"].as_array().expect("levels");
    let ns: Vec<u64> = levels
        .iter()
        .map(|l| l["concurrency"].as_u64().expect("concurrency"))
        .collect();
    assert_eq!(ns, [1, 2], "--quick measures levels 1 and 2: {c}");
    for l in levels {
        let n = l["concurrency"].as_u64().unwrap();
        let what = |k: &str| format!("concurrency {n}: {k}");
        // n requests per phase, each 1 to 8 tokens (greedy answers may end early).
        for k in [
            "completion_tokens_at_once",
            "completion_tokens_one_at_a_time",
        ] {
            let tokens = l[k].as_u64().unwrap_or_else(|| panic!("{}", what(k)));
            assert!((n..=8 * n).contains(&tokens), "{}: {l}", what(k));
        }
        let one = spread(
            &l["one_at_a_time_tok_per_s"],
            &what("one_at_a_time_tok_per_s"),
        );
        let alone = spread(&l["itl_alone_ms"], &what("itl_alone_ms"));
        spread(
            &l["itl_at_once_all_gaps_ms"],
            &what("itl_at_once_all_gaps_ms"),
        );
        spread(
            &l["busy_at_once_tok_per_s"],
            &what("busy_at_once_tok_per_s"),
        );
        // The steady window (every stream decoding) exists whenever the streams overlapped; one
        // stream always overlaps itself.
        let steady = l["steady_rounds"].as_u64().expect("steady_rounds");
        assert!(steady <= 1, "{l}");
        if n == 1 {
            assert_eq!(steady, 1, "a lone stream is its own steady window: {l}");
        }
        if steady == 1 {
            let at_once = spread(&l["at_once_tok_per_s"], &what("at_once_tok_per_s"));
            assert_ratio(
                &l["at_once_over_one_at_a_time_p50"],
                at_once,
                one,
                &what("tokens/s ratio"),
            );
            let itl = spread(&l["itl_at_once_ms"], &what("itl_at_once_ms"));
            assert_ratio(
                &l["itl_at_once_over_alone_p50"],
                itl,
                alone,
                &what("ITL ratio"),
            );
        } else {
            for k in [
                "at_once_tok_per_s",
                "at_once_over_one_at_a_time_p50",
                "itl_at_once_ms",
            ] {
                assert!(
                    l[k].is_null(),
                    "{}: no steady window, no number: {l}",
                    what(k)
                );
            }
        }
        // A first token cannot come before its request was sent.
        for k in ["ttft_at_once_ms", "ttft_alone_ms"] {
            spread(&l[k], &what(k));
            assert!(num(&l[k]["min"], &what(k)) > 0.0, "{l}");
        }
    }

    // The in-process decode step: batch 1 is the base of both ratios.
    let steps = c["step"].as_array().expect("step");
    let batches: Vec<u64> = steps.iter().map(|s| s["batch"].as_u64().unwrap()).collect();
    assert_eq!(batches, [1, 2], "{c}");
    let base = spread(&steps[0]["step_ms"], "step[0].step_ms");
    for s in steps {
        let b = s["batch"].as_u64().unwrap() as f64;
        let ms = spread(&s["step_ms"], "step.step_ms");
        assert!(s["context"].as_u64().expect("context") >= 1, "{s}");
        assert_ratio(&s["step_over_batch_1"], ms, base, "step / batch 1");
        let tps = num(&s["tok_per_s"], "tok_per_s");
        assert!((tps - b * 1e3 / ms).abs() <= 1e-9 * tps, "{s}");
        assert_ratio(
            &s["tok_per_s_over_batch_1"],
            tps,
            1e3 / base,
            "tok/s / batch 1",
        );
    }

    let p = &c["prefix"];
    assert_eq!(
        p["prefix_tokens_asked"], 100,
        "--quick asks for a 100-token prefix: {p}"
    );
    assert_eq!(
        p["prefix_tokens"], 100,
        "which fits the tiny model's context: {p}"
    );
    assert_eq!(p["rounds"], 1, "{p}");
    let image_tokens = p["image_tokens"].as_u64().expect("image_tokens");
    let context = p["context_length"].as_u64().expect("context_length");
    let (min, max) = (
        p["prompt_tokens_min"].as_u64().expect("prompt_tokens_min"),
        p["prompt_tokens_max"].as_u64().expect("prompt_tokens_max"),
    );
    assert!(image_tokens >= 1 && min <= max && max < context, "{p}");
    // The text part of the measured prompt is what was asked for, give or take the calibration's
    // tolerance and the per-round marker.
    let text = min - image_tokens;
    assert!((90..=110).contains(&text), "text tokens {text}: {p}");
    let cold = spread(&p["ttft_cold_ms"], "prefix.ttft_cold_ms");
    let warm = spread(&p["ttft_warm_ms"], "prefix.ttft_warm_ms");
    assert_ratio(&p["warm_over_cold_p50"], warm, cold, "prefix warm/cold");
    assert!(num(&p["ttft_warm_ms"]["min"], "warm TTFT") > 0.0, "{p}");
    spread(&p["prefill_cold_ms"], "prefix.prefill_cold_ms");
    spread(&p["prefill_warm_ms"], "prefix.prefill_warm_ms");
    // A prompt that starts unlike any before it shares no cached prefix.
    assert_eq!(
        p["cached_prompt_tokens_cold"],
        serde_json::json!([0]),
        "{p}"
    );
    let warm_cached = p["cached_prompt_tokens_warm"]
        .as_array()
        .expect("cached_prompt_tokens_warm");
    assert_eq!(warm_cached.len(), 1, "one per round: {p}");
    // The identical prompt sent again reuses most of its prefix (whole KV blocks of 16, less than
    // the prompt: its last position is always computed).
    for w in warm_cached {
        let w = w.as_u64().expect("cached_prompt_tokens_warm");
        assert!(w > 0 && w < min && w.is_multiple_of(16), "{p}");
    }

    match plot {
        Some(path) => {
            assert_eq!(c["plot"], path.to_str().unwrap(), "{c}");
            let svg = std::fs::read_to_string(path).expect("the plot was written");
            assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
            for text in [
                "N at once, all decoding",
                "N at once, incl. their prefills",
                "N one at a time",
                "decode tokens/s",
            ] {
                assert!(svg.contains(text), "the plot has no {text:?}: {svg}");
            }
            assert_eq!(svg.matches("<polyline").count(), 3, "{svg}");
        }
        None => assert!(c["plot"].is_null(), "{c}"),
    }
}

#[test]
fn bench_quick_reports_every_section_well_formed() {
    let redis = common::RedisProc::start();
    let model = common::model();
    let plot_dir = tempfile::tempdir().unwrap();
    let plot = plot_dir.path().join("concurrency.svg");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vlm-mesh"))
        .args(["bench", "--quick", "--json", "--model"])
        .arg(&model)
        .args(["--redis", &redis.url()])
        .arg("--plot")
        .arg(&plot)
        .env_remove("VLM_BENCH_PYTHON")
        .output_within(std::time::Duration::from_secs(1200));
    assert!(
        out.status.success(),
        "bench --quick failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not one JSON object ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    // Progress on stderr, one line per section as it starts, in order.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let starts: Vec<usize> = (1..=6)
        .map(|i| {
            stderr
                .find(&format!("bench: [{i}/6] "))
                .unwrap_or_else(|| panic!("no progress line {i}: {stderr}"))
        })
        .collect();
    assert!(starts.is_sorted(), "progress out of order: {stderr}");
    assert_eq!(report["bench"], "all", "{report}");
    assert_eq!(report["quick"], true, "{report}");
    assert_eq!(report["model"], model.to_str().unwrap(), "{report}");
    assert!(
        num(&report["started_unix_s"], "started_unix_s") > 1.7e9,
        "{report}"
    );
    check_mesh(&report["mesh"]);
    check_cache(&report["cache"]);
    check_concurrency(&report["concurrency"], Some(&plot));
    check_stream(&report["stream"]);
    check_frames(&report["frames"]);
    // No Python was named, so the comparison says so rather than vanishing.
    let skipped = report["transformers"]["skipped"]
        .as_str()
        .expect("transformers.skipped");
    assert!(skipped.contains("--python"), "{skipped}");
}

#[test]
fn bench_mesh_alone_reports_the_mesh_section() {
    let model = common::model();
    let report = common::run_json(&[
        "bench",
        "mesh",
        "--quick",
        "--json",
        "--model",
        model.to_str().unwrap(),
    ]);
    check_mesh(&report);
}

#[test]
fn bench_concurrency_alone_reports_the_concurrency_section() {
    let model = common::model();
    let report = common::run_json(&[
        "bench",
        "concurrency",
        "--quick",
        "--json",
        "--model",
        model.to_str().unwrap(),
    ]);
    check_concurrency(&report, None);
}

/// `bench quantized --quick` (2 rounds of 4 tokens, one mesh per mode): every mode answers, its
/// decode speed is a real spread, its ratio to the unquantized mode is what the medians say, and
/// every service's memory was read.
#[test]
fn bench_quantized_quick_reports_every_mode() {
    let model = common::model();
    let r = common::run_json(&[
        "bench",
        "quantized",
        "--quick",
        "--json",
        "--model",
        model.to_str().unwrap(),
    ]);
    assert_eq!(r["bench"], "quantized", "{r}");
    assert_eq!(
        (r["rounds"].as_u64(), r["max_tokens"].as_u64()),
        (Some(2), Some(4)),
        "{r}"
    );
    assert!(num(&r["prompt_tokens"], "prompt_tokens") > 0.0, "{r}");
    let modes = r["modes"].as_array().expect("modes");
    let names: Vec<&str> = modes.iter().map(|m| m["mode"].as_str().unwrap()).collect();
    assert_eq!(names, ["none", "q8_0", "q4_k"], "{r}");
    let none = spread(&modes[0]["decode_tok_s"], "none.decode_tok_s");
    for m in modes {
        let name = m["mode"].as_str().unwrap();
        let p50 = spread(&m["decode_tok_s"], &format!("{name}.decode_tok_s"));
        assert!(p50 > 0.0, "{name}: {m}");
        assert_ratio(&m["vs_none"], p50, none, &format!("{name}.vs_none"));
        assert_eq!(m["tokens"].as_array().map(Vec::len), Some(4), "{name}: {m}");
        let memory = m["memory_mib"].as_object().expect("memory_mib");
        let who: Vec<&str> = memory.keys().map(String::as_str).collect();
        assert_eq!(
            who,
            ["decoder", "encoder", "gateway", "projector"],
            "{name}"
        );
        for (who, mem) in memory {
            let f = |k: &str| num(&mem[k], &format!("{name}.{who}.{k}"));
            assert!(f("ready") > 0.0 && f("steady") > 0.0, "{name}.{who}: {mem}");
            assert!(
                f("load_peak") >= f("ready") && f("peak") >= f("steady"),
                "{name}.{who}: {mem}"
            );
            assert_ratio(
                &mem["peak_over_steady"],
                f("peak"),
                f("steady"),
                &format!("{name}.{who}"),
            );
        }
        assert!(m["llama_cpp"].is_null(), "no llama.cpp was named: {m}");
    }
}

/// `bench scale --quick` (one decoder, then two with prefix routing and with plain balancing, then
/// two under busy threads on every core with the outlier rule and with abandonment off; an
/// image-heavy and a long-generation second): every run is reported with consistent figures,
/// cached prefixes are counted, and each workload pushes its own stage's saturation over the
/// autoscaling target while the other stays under.
#[test]
fn bench_scale_quick_reports_routing_and_signals() {
    let model = common::model();
    let r = common::run_json(&[
        "bench",
        "scale",
        "--quick",
        "--json",
        "--model",
        model.to_str().unwrap(),
    ]);
    assert_eq!(r["bench"], "scale", "{r}");
    let runs = r["agent"].as_array().expect("agent");
    let shape: Vec<(u64, &str, bool, &str)> = runs
        .iter()
        .map(|x| {
            (
                x["decoders"].as_u64().unwrap(),
                x["routing"].as_str().unwrap(),
                x["outside_load"].as_bool().unwrap(),
                x["abandonment"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        shape,
        [
            (1, "prefix", false, "outliers"),
            (2, "prefix", false, "outliers"),
            (2, "balance", false, "outliers"),
            (2, "prefix", true, "outliers"),
            (2, "prefix", true, "off"),
        ],
        "{r}"
    );
    let one = num(&runs[0]["cached_tokens"], "cached_tokens");
    assert!(one > 0.0, "later steps reuse the system prompt: {r}");
    for x in runs {
        let cached = num(&x["cached_tokens"], "cached_tokens");
        assert_ratio(&x["cached_vs_one"], cached, one, "cached_vs_one");
        let served = x["requests_per_replica"].as_array().expect("requests");
        assert_eq!(served.len() as u64, x["decoders"].as_u64().unwrap(), "{x}");
        let total: f64 = served.iter().map(|v| v.as_f64().unwrap()).sum();
        assert_eq!(total, 3.0 * 3.0, "every step is one decoder call: {x}");
        assert!(spread(&x["ttft_ms"], "ttft_ms") > 0.0, "{x}");
        assert!(num(&x["steps_per_s"], "steps_per_s") > 0.0, "{x}");
        // Every replica equally slow (even under the outside load): nothing abandoned.
        assert_eq!(num(&x["abandoned"], "abandoned"), 0.0, "{x}");
    }
    let signals = r["signals"].as_array().expect("signals");
    let s = |w: &str, k: &str| {
        let x = signals.iter().find(|s| s["workload"] == w).expect(w);
        num(&x[k], k)
    };
    assert!(s("image-heavy", "encoder_max") > 0.7, "{r}");
    assert!(s("image-heavy", "decoder_max") < 0.7, "{r}");
    assert!(s("long-generation", "decoder_max") > 0.7, "{r}");
    assert!(s("long-generation", "encoder_max") < 0.7, "{r}");
}

/// An installed binary, run anywhere: `bench cache --quick` with no flags serves the bundled model
/// and image, uses the gateway's in-memory cache (no Redis needed, nothing written to one) and
/// still measures misses against hits.
#[test]
fn bench_cache_quick_runs_from_anywhere_on_the_bundled_inputs_without_redis() {
    let cwd = tempfile::tempdir().unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vlm-mesh"))
        .args(["bench", "cache", "--quick", "--json"])
        .current_dir(cwd.path())
        .env_remove("VLM_REDIS")
        .env_remove("VLM_MODEL")
        .env("VLM_CACHE_DIR", cache_dir.path())
        .output_within(std::time::Duration::from_secs(600));
    assert!(
        out.status.success(),
        "bench cache --quick failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let c: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(c["redis"], "in-memory", "{c}");
    let model = c["model"].as_str().unwrap();
    assert!(
        std::path::Path::new(model).starts_with(cache_dir.path()),
        "not the bundled model unpacked into VLM_CACHE_DIR: {model}"
    );
    check_cache(&c);
}

/// `bench structured --quick`: both batches decode (tokens/s positive, the ratio their quotient)
/// and the 20-tool agent's schemas compile, the second time from the cache.
#[test]
fn bench_structured_quick_reports_the_constrained_batch_and_compile_times() {
    let r = common::run_json(&["bench", "structured", "--quick", "--json"]);
    assert_eq!(r["bench"], "structured", "{r}");
    assert_eq!(r["batch"], 8, "{r}");
    let free = num(&r["unconstrained_tok_s"]["p50"], "unconstrained");
    let held = num(&r["constrained_tok_s"]["p50"], "constrained");
    assert!(free > 0.0 && held > 0.0, "{r}");
    assert_ratio(
        &r["constrained_vs_unconstrained"],
        held,
        free,
        "constrained_vs_unconstrained",
    );
    assert_eq!(r["tools"], 20, "{r}");
    let compile = num(&r["compile_ms"]["p50"], "compile_ms");
    let cached = num(&r["cached_compile_ms"]["p50"], "cached_compile_ms");
    assert!(compile > 0.0 && cached > 0.0, "{r}");
    assert!(
        cached < compile,
        "the second compile comes from the cache: {r}"
    );
}

/// Bytes one decode step of `models/shapes-llava` reads at `context` in `precision`, written out
/// here from the block formats (q8_0: 34 bytes per 32 values; q4_K: 144 per 256, q6_K for the
/// head: 210 per 256, q8_0 where 256 does not divide a row, as llama.cpp does), not by the bench.
fn shapes_llava_decode_bytes(precision: &str, context: f64) -> f64 {
    let (h, i, layers, vocab) = (128.0, 256.0, 3.0, 429.0);
    let matrix = |rows: f64, cols: f64, head: bool| -> f64 {
        let values = rows * cols;
        match precision {
            "none" => values * 4.0,
            "q8_0" => values / 32.0 * 34.0,
            _ if cols % 256.0 == 0.0 => values / 256.0 * if head { 210.0 } else { 144.0 },
            _ => values / 32.0 * 34.0,
        }
    };
    // q, k, v, o: [128, 128]; gate, up: [256, 128]; down: [128, 256]; head: [429, 128].
    let layer = 4.0 * matrix(h, h, false) + 2.0 * matrix(i, h, false) + matrix(h, i, false);
    let kv = 2.0 * layers * h * context * 4.0;
    layers * layer + matrix(vocab, h, true) + kv
}

/// `bench realsize --quick` on the bundled model: every precision's prefill and decode rows are
/// measured, decode is read against the measured bandwidth with the bytes a token reads (checked
/// against the formats written out above), prefill against the measured peak, the machine's
/// probe is reported; without llama.cpp its columns are empty, never invented.
#[test]
fn bench_realsize_quick_reports_every_precision_against_the_limits() {
    let r = common::run_json(&["bench", "realsize", "--quick", "--json"]);
    assert_eq!(r["bench"], "realsize", "{r}");
    let m = &r["machine"];
    let bw = num(&m["read_bandwidth_gb_s"], "read_bandwidth_gb_s");
    let peak = num(&m["peak_gflop_s"], "peak_gflop_s");
    assert!(bw > 0.1 && peak > 0.1, "{m}");
    assert!(
        m["load_before"].as_str().is_some_and(|s| !s.is_empty()),
        "{m}"
    );
    assert!(m["idle"].is_boolean(), "{m}");
    assert!(
        r["llama_cpp"].as_str().unwrap().starts_with("not run"),
        "{r}"
    );
    let rows = r["rows"].as_array().expect("rows");
    let mut seen = vec![];
    for row in rows {
        let (p, kind, n) = (
            row["precision"].as_str().unwrap(),
            row["kind"].as_str().unwrap(),
            row["tokens"].as_u64().unwrap(),
        );
        seen.push(format!("{p} {kind} {n}"));
        let ours = num(&row["ours_tok_s"]["p50"], "ours_tok_s");
        assert!(ours > 0.0, "{row}");
        assert!(row["llama_cpp_tok_s"].is_null() && row["ours_over_llama_cpp"].is_null());
        let work = num(&row["work"], "work");
        let limit = row["limit"].as_str().unwrap();
        match (kind, p) {
            ("decode", _) => assert_eq!(limit, "bandwidth"),
            (_, "none") => assert_eq!(limit, "f32 peak"),
            _ => assert!(limit == "int8 peak" || limit == "f32 peak", "{row}"),
        }
        let of_limit = num(&row["of_limit"], "of_limit");
        if kind == "decode" {
            // The quick run decodes the last 4 tokens up to the context: KV at the mean, n - 2.
            let want = shapes_llava_decode_bytes(p, n as f64 - 2.0);
            assert!(
                (work - want).abs() < 0.5,
                "{p} at {n}: {work} bytes, want {want}"
            );
            let expect = ours * work / (bw * 1e9);
            assert!((of_limit - expect).abs() <= 1e-9 * expect.max(1.0), "{row}");
        } else {
            assert!(work > 0.0, "{row}");
            // Quantized prefill against the int8 (VNNI) peak where the machine has one.
            let peak = match (p, m["peak_int8_gop_s"].as_f64()) {
                ("none", _) | (_, None) => peak,
                (_, Some(int8)) => int8,
            };
            let expect = ours / n as f64 * work / (peak * 1e9);
            assert!((of_limit - expect).abs() <= 1e-9 * expect.max(1.0), "{row}");
        }
    }
    let mut want = vec![];
    for p in ["none", "q8_0", "q4_k"] {
        for (kind, n) in [
            ("prefill", 32),
            ("prefill", 96),
            ("decode", 64),
            ("decode", 128),
        ] {
            want.push(format!("{p} {kind} {n}"));
        }
    }
    assert_eq!(seen, want);
    // Vision tower + projector at every precision (no transformers side without --python).
    let vision = r["vision"]["Ok"].as_array().expect("vision rows");
    let precisions: Vec<&str> = vision
        .iter()
        .map(|v| v["precision"].as_str().unwrap())
        .collect();
    assert_eq!(precisions, ["none", "q8_0", "q4_k"], "{r}");
    for v in vision {
        assert!(num(&v["ours_ms"]["p50"], "vision ours_ms") > 0.0, "{v}");
        assert!(
            v["features"].as_u64().unwrap() > 0 && v["transformers_ms"].is_null(),
            "{v}"
        );
    }
    // One request through `up --quantize q4_k`: TTFT split by stage, every service's peak RSS.
    let mesh = &r["mesh"]["Ok"];
    assert_eq!(mesh["quantize"], "q4_k", "{r}");
    let ttft = num(&mesh["ttft_ms"], "ttft_ms");
    for stage in ["encode_ms", "prefill_ms"] {
        let ms = num(&mesh[stage], stage);
        assert!(ms > 0.0 && ms < ttft, "{stage} {ms} vs TTFT {ttft}: {mesh}");
    }
    let prompt = mesh["prompt_tokens"].as_u64().unwrap();
    let cached = mesh["cached_prompt_tokens"].as_u64().unwrap();
    assert!(prompt > 0, "{mesh}");
    assert!(
        cached < 16,
        "the measured request's image rows were cached: {mesh}"
    );
    let rss = mesh["peak_rss_mib"].as_object().expect("peak_rss_mib");
    assert_eq!(rss.len(), 4, "encoder, projector, decoder, gateway: {mesh}");
    assert!(rss.values().all(|v| v.as_f64().unwrap() > 1.0), "{mesh}");
}

/// A context past the model's own is refused before anything is measured, naming the flags.
#[test]
fn bench_realsize_refuses_a_context_past_the_model() {
    let out = std::process::Command::new(common::EXE)
        .args(["bench", "realsize", "--contexts", "100000", "--rounds", "1"])
        .output_within(std::time::Duration::from_secs(60));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--prefill/--contexts need 100000 positions") && err.contains("256"),
        "{err}"
    );
}
