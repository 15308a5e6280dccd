//! What the machine is and whether it is quiet: CPU flags, load, other busy processes, and the
//! two physical limits the decoder's speed is read against (read bandwidth, peak multiply-adds).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;

#[derive(Serialize, Debug, Clone)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    /// The SIMD features that decide which kernels run (avx2, fma, avx512*, amx*).
    pub flags: Vec<String>,
    pub load_before: String,
    pub load_after: String,
    /// Other processes above 2 % of one core over a 1 s sample before the run.
    pub busy_processes: Vec<String>,
    /// Load average (1 min) under 1.0 and no other process above 5 % before the run.
    pub idle: bool,
    /// The higher of the read bandwidths measured before and after the run (a VM's bandwidth
    /// moves with its neighbours; the limit is the best it showed).
    pub read_bandwidth_gb_s: f64,
    /// Before and after the run.
    pub read_bandwidth_samples_gb_s: Vec<f64>,
    pub peak_gflop_s: f64,
    pub peak_isa: &'static str,
    /// int8 multiply-adds (AVX-512 VNNI `vpdpbusd`, what the quantized GEMMs run), GOP/s.
    pub peak_int8_gop_s: Option<f64>,
}

const INTERESTING: [&str; 4] = ["avx2", "fma", "avx512", "amx"];

fn cpuinfo() -> (String, Vec<String>) {
    let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    let mut flags: Vec<String> = field("flags")
        .split_whitespace()
        .filter(|f| INTERESTING.iter().any(|p| f.starts_with(p)))
        .map(String::from)
        .collect();
    flags.sort();
    (field("model name"), flags)
}

pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// CPU ticks (user + system) and the command of every process but this one.
fn ticks() -> BTreeMap<u32, (String, u64)> {
    let me = std::process::id();
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": utime and stime are fields 14 and 15.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_string();
        let rest: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let t = |i: usize| rest.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        out.insert(pid, (comm, t(11) + t(12)));
    }
    out
}

/// Processes above 2 % of a core over `window`, busiest first, as "comm (pid): N %".
fn busy(window: Duration) -> Vec<(String, f64)> {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let before = ticks();
    let t = Instant::now();
    std::thread::sleep(window);
    let secs = t.elapsed().as_secs_f64();
    let mut out: Vec<(String, f64)> = ticks()
        .into_iter()
        .filter_map(|(pid, (comm, now))| {
            let was = before.get(&pid)?.1;
            let pct = now.saturating_sub(was) as f64 / hz / secs * 100.0;
            (pct > 2.0).then(|| (format!("{comm} ({pid})"), pct))
        })
        .collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1));
    out
}

/// The machine before a run; `quick` measures the limits on smaller buffers and shorter loops.
pub fn probe(quick: bool) -> Machine {
    let (cpu, flags) = cpuinfo();
    let load_before = load_average();
    // The sample is the quiet-machine check, not a pause for something to finish.
    let others = busy(Duration::from_secs(1));
    let load1: f64 = load_before
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::INFINITY);
    let idle = load1 < 1.0 && others.iter().all(|(_, p)| *p <= 5.0);
    let cores = super::super::cores();
    let (bytes, rounds, millis) = if quick {
        (64 << 20, 2, 50)
    } else {
        (1 << 30, 5, 400)
    };
    let read_bandwidth_gb_s = vlm_model::bench::read_bandwidth_gbs(bytes, cores, rounds);
    let (peak_gflop_s, peak_isa) = vlm_model::bench::peak_fma_gflops(cores, millis);
    let peak_int8_gop_s = vlm_model::bench::peak_int8_gops(cores, millis);
    Machine {
        cpu,
        cores,
        flags,
        load_before,
        load_after: String::new(),
        busy_processes: others
            .into_iter()
            .map(|(p, pct)| format!("{p}: {pct:.0} %"))
            .collect(),
        idle,
        read_bandwidth_gb_s,
        read_bandwidth_samples_gb_s: vec![read_bandwidth_gb_s],
        peak_gflop_s,
        peak_isa,
        peak_int8_gop_s,
    }
}

impl Machine {
    /// The end of the run: the load average and a second read-bandwidth measurement.
    pub fn finish(&mut self, quick: bool) {
        self.load_after = load_average();
        let (bytes, rounds) = if quick { (64 << 20, 2) } else { (1 << 30, 5) };
        let again = vlm_model::bench::read_bandwidth_gbs(bytes, self.cores, rounds);
        self.read_bandwidth_samples_gb_s.push(again);
        self.read_bandwidth_gb_s = self.read_bandwidth_gb_s.max(again);
    }

    pub fn print(&self) {
        println!("machine: {} ({} cores)", self.cpu, self.cores);
        println!("flags: {}", self.flags.join(" "));
        println!(
            "load average before: {}  after: {}  other busy processes: {}  => {}",
            self.load_before,
            self.load_after,
            if self.busy_processes.is_empty() {
                "none".to_string()
            } else {
                self.busy_processes.join(", ")
            },
            if self.idle {
                "idle"
            } else {
                "NOT idle: read the ratios, not the times"
            }
        );
        println!(
            "read bandwidth: {:.1} GB/s (before, after: {:.1?})   peak multiply-add: {:.0} GFLOP/s f32 ({}), {} ({} threads)",
            self.read_bandwidth_gb_s,
            self.read_bandwidth_samples_gb_s,
            self.peak_gflop_s,
            self.peak_isa,
            self.peak_int8_gop_s
                .map_or("no int8 VNNI".into(), |g| format!("{g:.0} GOP/s int8 (vpdpbusd)")),
            self.cores
        );
    }
}
