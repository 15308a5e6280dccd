//! Matrix products at prefill and decode shapes: GFLOP/s and ms of the old and new kernels
//! (q8_0, q4_k: portable blocks vs the int8 GEMM on repacked weights; f32: candle's matmul vs
//! ours where there is one), next to the machine's peak multiply-add rates measured in the same
//! run.
//!
//! ```text
//! cargo run --release -p vlm-model --example kernel_bench [-- --quick] [-- --shapes 768x2560,...]
//! ```
//! Run it on an idle machine: it prints the load average first. `--cpu` times CPU time instead
//! of wall time (for comparisons on a busy machine; not a measurement to report).

use std::time::{Duration, Instant};

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use vlm_model::bench::{F32Matrix, QuantMatrix};

/// The old and the new product of one weight.
type Pair = (
    Box<dyn Fn(&Tensor) -> Tensor>,
    Box<dyn Fn(&Tensor) -> Tensor>,
);

fn main() -> candle_core::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let shapes: Vec<(usize, usize)> = match args.iter().position(|a| a == "--shapes") {
        Some(i) => args[i + 1]
            .split(',')
            .map(|s| {
                let (k, n) = s.split_once('x').expect("KxN");
                (k.parse().unwrap(), n.parse().unwrap())
            })
            .collect(),
        None if quick => vec![(768, 2560)],
        // The small decoder's MLP (up, down), a ViT-L layer, LLaVA-1.5-7B's MLP up.
        None => vec![(768, 2560), (2560, 768), (1024, 4096), (4096, 11008)],
    };
    let rows: Vec<usize> = match args.iter().position(|a| a == "--rows") {
        Some(i) => args[i + 1].split(',').map(|s| s.parse().unwrap()).collect(),
        None => vec![1, 32, 229, 640],
    };
    let formats: Vec<String> = match args.iter().position(|a| a == "--formats") {
        Some(i) => args[i + 1].split(',').map(str::to_string).collect(),
        None => vec!["f32".into(), "q8_0".into(), "q4_k".into()],
    };
    println!(
        "load average: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    let threads = rayon::current_num_threads();
    println!("threads: {threads}");
    let (fma, vnni) = peaks(threads);
    println!(
        "peak f32 FMA: {fma:.1} GFLOP/s; peak int8 VNNI: {vnni:.1} GOP/s (2 ops per multiply-add)"
    );
    println!("format | k x n | M | old ms | old GFLOP/s | new ms | new GFLOP/s | new / old | new % of peak");
    let dev = Device::Cpu;
    for &(k, n) in &shapes {
        let w = Tensor::randn(0f32, 0.05, (n, k), &dev)?;
        for format in &formats {
            let (old, new): Pair = match format.as_str() {
                "f32" => {
                    let wt = w.clone();
                    let ours = F32Matrix::new(&w)?;
                    (
                        Box::new(move |x| x.matmul(&wt.t().unwrap()).unwrap()),
                        Box::new(move |x| ours.forward(x).unwrap()),
                    )
                }
                q => {
                    let f = if q == "q8_0" {
                        GgmlDType::Q8_0
                    } else {
                        GgmlDType::Q4K
                    };
                    let t = Instant::now();
                    let a = QuantMatrix::new(&w, f, false)?;
                    let t_blocks = t.elapsed();
                    let t = Instant::now();
                    let b = QuantMatrix::new(&w, f, true)?;
                    let t_packed = t.elapsed();
                    println!(
                        "{q} {k} x {n}: quantized in {:.0} ms; quantized and repacked in {:.0} ms",
                        t_blocks.as_secs_f64() * 1e3,
                        t_packed.as_secs_f64() * 1e3
                    );
                    assert!(b.is_packed(), "no int8 GEMM on this CPU");
                    (
                        Box::new(move |x| a.forward(x).unwrap()),
                        Box::new(move |x| b.forward(x).unwrap()),
                    )
                }
            };
            for &m in &rows {
                let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
                let flop = 2.0 * (m * k * n) as f64;
                let budget = if quick { 0.1 } else { 0.6 };
                // `--new-only`: the old kernel is not run (profiling the new one).
                let t_old = if args.iter().any(|a| a == "--new-only") {
                    Duration::from_secs(1)
                } else {
                    time(|| drop(old(&x)), budget)
                };
                let t_new = time(|| drop(new(&x)), budget);
                let peak = if format == "f32" { fma } else { vnni };
                let g = |t: Duration| flop / t.as_secs_f64() / 1e9;
                println!(
                    "{format} | {k} x {n} | {m} | {:.3} | {:.1} | {:.3} | {:.1} | {:.2}x | {:.0} %",
                    t_old.as_secs_f64() * 1e3,
                    g(t_old),
                    t_new.as_secs_f64() * 1e3,
                    g(t_new),
                    t_old.as_secs_f64() / t_new.as_secs_f64(),
                    100.0 * g(t_new) / peak
                );
            }
        }
    }
    println!(
        "load average after: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    Ok(())
}

/// The best of repeated runs (one warm-up, then at least 3 and until `budget` seconds): wall
/// time, or with `--cpu` the process's CPU time over the threads (what a loaded machine
/// leaves comparable; caches shared with other processes still count).
fn time(mut f: impl FnMut(), budget: f64) -> Duration {
    f();
    let start = Instant::now();
    let mut best = Duration::MAX;
    let mut runs = 0;
    while runs < 3 || start.elapsed().as_secs_f64() < budget {
        let t = Clock::now();
        f();
        best = best.min(t.elapsed());
        runs += 1;
    }
    best
}

/// Wall or CPU time, as `--cpu` says.
struct Clock(Instant, Duration);

impl Clock {
    fn now() -> Clock {
        Clock(Instant::now(), cpu_time())
    }

    fn elapsed(&self) -> Duration {
        if std::env::args().any(|a| a == "--cpu") {
            (cpu_time() - self.1) / rayon::current_num_threads() as u32
        } else {
            self.0.elapsed()
        }
    }
}

/// CPU time of every thread of the process.
fn cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Peak rates with every thread busy: f32 FMA (GFLOP/s) and int8 VNNI multiply-adds (GOP/s).
fn peaks(threads: usize) -> (f64, f64) {
    let run = |f: fn(u64) -> u64, iters: u64| {
        let start = Clock::now();
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(move || std::hint::black_box(f(std::hint::black_box(iters))));
            }
        });
        start.elapsed().as_secs_f64()
    };
    let iters = 20_000_000;
    // 12 independent chains × 16 lanes × 2 flops per instruction.
    let fma = run(fma_loop, iters);
    let fma = (threads as u64 * iters * 12 * 16 * 2) as f64 / fma / 1e9;
    // 12 chains × 64 byte products × 2 ops.
    let vnni = run(vnni_loop, iters);
    let vnni = (threads as u64 * iters * 12 * 64 * 2) as f64 / vnni / 1e9;
    (fma, vnni)
}

#[cfg(target_arch = "x86_64")]
fn fma_loop(iters: u64) -> u64 {
    #[target_feature(enable = "avx512f")]
    fn inner(iters: u64) -> u64 {
        use std::arch::x86_64::*;
        let mut a = [_mm512_set1_ps(1.0); 12];
        let b = _mm512_set1_ps(0.999_999);
        let c = _mm512_set1_ps(1e-7);
        for _ in 0..iters {
            for v in a.iter_mut() {
                *v = _mm512_fmadd_ps(*v, b, c);
            }
        }
        let mut s = _mm512_setzero_ps();
        for v in a {
            s = _mm512_add_ps(s, v);
        }
        _mm512_reduce_add_ps(s) as u64
    }
    assert!(std::arch::is_x86_feature_detected!("avx512f"));
    // SAFETY: the CPU has AVX-512F.
    unsafe { inner(iters) }
}

#[cfg(target_arch = "x86_64")]
fn vnni_loop(iters: u64) -> u64 {
    #[target_feature(enable = "avx512f,avx512vnni")]
    fn inner(iters: u64) -> u64 {
        use std::arch::x86_64::*;
        let mut a = [_mm512_setzero_si512(); 12];
        let b = _mm512_set1_epi8(3);
        let c = _mm512_set1_epi8(-2);
        for _ in 0..iters {
            for v in a.iter_mut() {
                *v = _mm512_dpbusd_epi32(*v, b, c);
            }
        }
        let mut s = _mm512_setzero_si512();
        for v in a {
            s = _mm512_add_epi32(s, v);
        }
        _mm512_reduce_add_epi32(s) as u64
    }
    assert!(std::arch::is_x86_feature_detected!("avx512vnni"));
    // SAFETY: the CPU has AVX-512F and VNNI.
    unsafe { inner(iters) }
}
