//! Time to first token's compute at the `small` bench model's shapes and LLaVA-1.5's vision
//! tower, with random weights built in memory (speed does not depend on them): the decoder's
//! prefill of 229 rows and the vision tower's encode, at f32, q8_0 and q4_k.
//!
//! ```text
//! cargo run --release -p vlm-model --example prefill_bench
//! VLM_NO_GEMM=1 cargo run --release -p vlm-model --example prefill_bench   # the old paths
//! ```
//! Run it on an idle machine: it prints the load average before and after. `--only decoder|b16|l14`
//! and `--precision none|q8_0|q4_k` narrow it down; `--quick` times one run instead of three.

use std::time::Instant;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use vlm_model::quant::QuantPlan;
use vlm_model::{Decoder, LlavaConfig, Quantization, VisionEncoder};

/// Every tensor a model asks for: normal values, small (weights at a realistic scale).
struct Random;

impl SimpleBackend for Random {
    fn get(
        &self,
        s: Shape,
        _: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        Tensor::randn(0f32, 0.02, s, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("{name}: no shape")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// `models/tiny-llava`'s config with the sizes of `make_bench_model.py`'s `small` (decoder)
/// and the vision tower `vision` (`"b16"`: CLIP ViT-B/16 @224, `"l14"`: ViT-L/14 @336).
fn config(vision: &str) -> LlavaConfig {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../models/tiny-llava/config.json"
    );
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("tiny-llava config")).unwrap();
    let t = &mut c["text_config"];
    for (k, v) in [
        ("hidden_size", 768),
        ("intermediate_size", 2560),
        ("num_hidden_layers", 12),
        ("num_attention_heads", 12),
        ("num_key_value_heads", 12),
        ("head_dim", 64),
        ("max_position_embeddings", 2048),
        ("vocab_size", 32000),
    ] {
        t[k] = v.into();
    }
    let v = &mut c["vision_config"];
    let sizes: [(&str, usize); 5] = if vision == "l14" {
        [
            ("hidden_size", 1024),
            ("intermediate_size", 4096),
            ("num_hidden_layers", 24),
            ("num_attention_heads", 16),
            ("image_size", 336),
        ]
    } else {
        [
            ("hidden_size", 768),
            ("intermediate_size", 3072),
            ("num_hidden_layers", 12),
            ("num_attention_heads", 12),
            ("image_size", 224),
        ]
    };
    for (k, n) in sizes {
        v[k] = n.into();
    }
    v["patch_size"] = (if vision == "l14" { 14 } else { 16 }).into();
    LlavaConfig::from_json(&c.to_string()).unwrap()
}

/// The best of `runs` timings of `f`, in ms (after one warm-up): wall time, or with `--cpu` the
/// process's CPU time (comparable on a busy machine when both thread pools have one thread:
/// `RAYON_NUM_THREADS=1 CANDLE_NUM_THREADS=1`; not a measurement to report).
fn best_ms(runs: usize, mut f: impl FnMut()) -> f64 {
    let cpu = std::env::args().any(|a| a == "--cpu");
    let now = || {
        if cpu {
            let mut ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: `ts` is a valid timespec to write.
            unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
            ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
        } else {
            START.with(|s| s.elapsed().as_secs_f64())
        }
    };
    f();
    (0..runs)
        .map(|_| {
            let t = now();
            f();
            (now() - t) * 1e3
        })
        .fold(f64::INFINITY, f64::min)
}

thread_local! {
    static START: Instant = Instant::now();
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn main() {
    let dev = Device::Cpu;
    let quick = std::env::args().any(|a| a == "--quick");
    let runs = if quick { 1 } else { 3 };
    println!("load average: {}", load());
    println!(
        "threads: {}; VLM_NO_GEMM {}",
        rayon::current_num_threads(),
        if std::env::var_os("VLM_NO_GEMM").is_some() {
            "set (old paths)"
        } else {
            "unset (new kernels)"
        }
    );
    println!("part | precision | ms (best of {runs})");
    // `--only PART` (decoder, b16, l14) and `--precision P` (none, q8_0, q4_k): one of each.
    let arg = |name: &str| {
        let args: Vec<String> = std::env::args().collect();
        args.iter()
            .position(|a| a == name)
            .map(|i| args[i + 1].clone())
    };
    let only = arg("--only");
    let wanted = |part: &str| only.as_deref().is_none_or(|o| o == part);
    let precisions: Vec<Quantization> = match arg("--precision") {
        Some(p) => vec![p.parse().unwrap()],
        None => vec![Quantization::None, Quantization::Q8_0, Quantization::Q4K],
    };
    let rows = 229;
    for &q in precisions.iter().filter(|_| wanted("decoder")) {
        let cfg = config("b16");
        let vb = VarBuilder::from_backend(Box::new(Random), DType::F32, dev.clone());
        let dec =
            Decoder::new_with(&cfg, vb.pp("model.language_model"), &QuantPlan::new(q)).unwrap();
        let x = Tensor::randn(0f32, 1.0, (rows, 768), &dev).unwrap();
        let ms = best_ms(runs, || {
            dec.forward_embeds(&x, &mut dec.new_cache()).unwrap();
        });
        println!("decoder prefill, {rows} rows (small: 12 x 768, MLP 2560) | {q} | {ms:.1}");
    }
    for vision in ["b16", "l14"].into_iter().filter(|v| wanted(v)) {
        let cfg = config(vision);
        let size = cfg.vision.image_size;
        for &q in &precisions {
            let vb = VarBuilder::from_backend(Box::new(Random), DType::F32, dev.clone());
            let enc =
                VisionEncoder::new_with(&cfg, vb.pp("model.vision_tower"), &QuantPlan::new(q))
                    .unwrap();
            let px = Tensor::randn(0f32, 1.0, (1, 3, size, size), &dev).unwrap();
            let ms = best_ms(runs, || {
                enc.forward(&px).unwrap();
            });
            let name = if vision == "l14" {
                "CLIP ViT-L/14 @336"
            } else {
                "CLIP ViT-B/16 @224"
            };
            println!("vision encode ({name}) | {q} | {ms:.1}");
        }
    }
    println!("load average after: {}", load());
}
