//! The few-row kernels: dot products of a few input rows (a decode step's sequences) with the rows
//! of a weight matrix, attention scores and a weighted sum of value rows, on the widest vector
//! instructions the CPU has. Every output element is one fixed chain of operations whatever rows it
//! is computed with, so a sequence gets the same numbers in a batch as alone.

mod out;
#[cfg(target_arch = "x86_64")]
pub(crate) mod qgemm;
pub(crate) mod qpack;
pub(crate) mod sgemm;

pub(crate) use qpack::{Packed, QActs};

/// `VLM_NO_GEMM` set (to anything) when the process starts: the GEMMs are not used, whatever the
/// CPU (quantized weights keep their blocks and portable products, f32 products go to candle's
/// matmul: the paths of CPUs without AVX-512), for measuring one against the other.
pub(crate) fn gemm_disabled() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| std::env::var_os("VLM_NO_GEMM").is_some())
}

/// Whether quantized products run on the int8 GEMM (AVX-512 VNNI, and not [`gemm_disabled`]):
/// weights are repacked for it at load only then.
pub(crate) fn qgemm_available() -> bool {
    qgemm_supported() && !gemm_disabled()
}

/// Whether the CPU runs the int8 GEMM.
pub(crate) fn qgemm_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    return qgemm::available();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `[m, n]` products of packed weights with activation rows quantized for them.
///
/// # Panics
/// Where [`qgemm_available`] is false (nothing is packed there).
pub(crate) fn qgemm(w: &Packed, a: &QActs) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    return qgemm::gemm(w, a);
    #[cfg(not(target_arch = "x86_64"))]
    panic!(
        "packed weights without the int8 GEMM: {} x {}",
        w.n,
        a.rows()
    )
}

/// Output elements per rayon task: large enough that scheduling costs nothing next to the
/// `ROWS_PER_TASK × k` weights each task streams, small enough to balance two to a few dozen cores.
pub(crate) const ROWS_PER_TASK: usize = 64;

/// One task's products: `w` holds its weight rows (`[rows, k]`), `out` receives them laid out
/// `[input row][ROWS_PER_TASK]`.
pub(crate) fn task_products(isa: Isa, w: &[f32], k: usize, xs: &[f32], m: usize, out: &mut [f32]) {
    let rows = w.len() / k;
    let w = |j: usize| &w[j * k..(j + 1) * k];
    let x = |r: usize| &xs[r * k..(r + 1) * k];
    let mut put = |j: usize, r: usize, v: f32| out[r * ROWS_PER_TASK + j] = v;
    let mut r = 0;
    // Input rows in groups as wide as the registers allow (each loaded weight chunk used once per
    // row of the group), the rest narrower: every element is the same `products` chain whatever
    // the grouping.
    match isa {
        Isa::Avx512 => {
            while r + 8 <= m {
                sweep::<3, 8>(isa, &w, rows, r, &x, &mut put);
                r += 8;
            }
            while r + 4 <= m {
                sweep::<4, 4>(isa, &w, rows, r, &x, &mut put);
                r += 4;
            }
            while r + 2 <= m {
                sweep::<6, 2>(isa, &w, rows, r, &x, &mut put);
                r += 2;
            }
            while r < m {
                sweep::<8, 1>(isa, &w, rows, r, &x, &mut put);
                r += 1;
            }
        }
        Isa::Avx2 | Isa::Portable => {
            while r + 4 <= m {
                sweep::<2, 4>(isa, &w, rows, r, &x, &mut put);
                r += 4;
            }
            while r < m {
                sweep::<4, 1>(isa, &w, rows, r, &x, &mut put);
                r += 1;
            }
        }
    }
}

/// The vector instructions the few-row kernels use, fixed for the process: every product of a run
/// uses the same lane count, so a row's result never depends on when or with whom it ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// 16 f32 lanes, 32 registers.
    Avx512,
    /// 8 f32 lanes, 16 registers.
    Avx2,
    /// 8 lanes in portable code (`mul_add`: the same numbers as AVX2, slower).
    Portable,
}

pub(crate) fn isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    })
}

/// Products of input rows `r0..r0 + C` with every weight row of a task, `R` weight rows per
/// kernel call (the rest one at a time), each result handed to `put(weight row, input row, v)`.
#[inline(always)]
fn sweep<'a, const R: usize, const C: usize>(
    isa: Isa,
    w: &impl Fn(usize) -> &'a [f32],
    rows: usize,
    r0: usize,
    x: &impl Fn(usize) -> &'a [f32],
    put: &mut impl FnMut(usize, usize, f32),
) {
    let xr: [&[f32]; C] = std::array::from_fn(|c| x(r0 + c));
    let mut j = 0;
    while j + R <= rows {
        let d = products::<R, C>(isa, std::array::from_fn(|i| w(j + i)), xr);
        for (dj, row) in d.iter().enumerate() {
            for (dc, &v) in row.iter().enumerate() {
                put(j + dj, r0 + dc, v);
            }
        }
        j += R;
    }
    for j in j..rows {
        let d = products::<1, C>(isa, [w(j)], xr);
        for (dc, &v) in d[0].iter().enumerate() {
            put(j, r0 + dc, v);
        }
    }
}

/// Dot products of `R` weight rows with `C` input rows: `out[r][c] = w[r] · x[c]`. Each element is
/// one chain: fused multiply-adds over `L` lanes in order, then the lanes summed as a fixed tree,
/// then the tail, so it is bit-identical for any `R` and `C`: a row's result never depends on which rows
/// it was grouped with (a sequence decodes the same in a batch as alone). The `R × C` independent
/// accumulators keep the FMA units busy while each loaded weight chunk is used `C` times.
fn products_lanes<const L: usize, const R: usize, const C: usize>(
    w: [&[f32]; R],
    x: [&[f32]; C],
) -> [[f32; C]; R] {
    let k = w[0].len();
    let body = k / L * L;
    let mut acc = [[[0f32; L]; C]; R];
    let mut at = 0;
    while at < body {
        for (ar, wr) in acc.iter_mut().zip(&w) {
            let wc: &[f32; L] = wr[at..at + L].try_into().expect("L lanes");
            for (a, xr) in ar.iter_mut().zip(&x) {
                let xc: &[f32; L] = xr[at..at + L].try_into().expect("L lanes");
                for i in 0..L {
                    a[i] = wc[i].mul_add(xc[i], a[i]);
                }
            }
        }
        at += L;
    }
    let mut out = [[0f32; C]; R];
    for ((o, ar), wr) in out.iter_mut().zip(&acc).zip(&w) {
        for ((o, a), xr) in o.iter_mut().zip(ar).zip(&x) {
            *o = lanes_and_tail(a, &wr[body..], &xr[body..]);
        }
    }
    out
}

/// The tail's products, summed in order.
#[inline(always)]
fn tail(w_tail: &[f32], x_tail: &[f32]) -> f32 {
    w_tail.iter().zip(x_tail).map(|(p, q)| p * q).sum()
}

/// [`lanes_and_tail`]'s tree over the 16 lanes of a register, with shuffles: lane i gets lane
/// i + 8, then i + 4, i + 2, i + 1 added (the same additions, so the same sum).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn tree_sum_512(v: std::arch::x86_64::__m512) -> f32 {
    use std::arch::x86_64::*;
    // 256-bit halves swapped, then 128-bit quarters within them, then pairs, then neighbours.
    let v = _mm512_add_ps(v, _mm512_shuffle_f32x4::<0b01_00_11_10>(v, v));
    let v = _mm512_add_ps(v, _mm512_shuffle_f32x4::<0b10_11_00_01>(v, v));
    let v = _mm512_add_ps(v, _mm512_permute_ps::<0b01_00_11_10>(v));
    let v = _mm512_add_ps(v, _mm512_permute_ps::<0b10_11_00_01>(v));
    _mm512_cvtss_f32(v)
}

/// The end of every product chain: the lanes summed as a fixed tree (each half added to the other
/// half, lane by lane, down to one), then the tail's products in order. A tree is 4 dependent
/// additions deep for 16 lanes instead of 15, and the same on every path of the same lane count.
#[inline(always)]
fn lanes_and_tail<const L: usize>(lanes: &[f32; L], w_tail: &[f32], x_tail: &[f32]) -> f32 {
    let mut v = *lanes;
    let mut width = L;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            v[i] += v[i + width];
        }
    }
    v[0] + tail(w_tail, x_tail)
}

/// [`products_lanes`] with 8 lanes in AVX2 registers: the same per-element operations.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn products_avx2<const R: usize, const C: usize>(
    w: [&[f32]; R],
    x: [&[f32]; C],
) -> [[f32; C]; R] {
    use std::arch::x86_64::*;
    const L: usize = 8;
    let k = w[0].len();
    let body = k / L * L;
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    let mut at = 0;
    while at < body {
        let mut xv = [_mm256_setzero_ps(); C];
        for c in 0..C {
            // SAFETY: at + L <= body <= x[c].len() (every row has k elements).
            xv[c] = unsafe { _mm256_loadu_ps(x[c].as_ptr().add(at)) };
        }
        for r in 0..R {
            // SAFETY: as above, for the weight rows.
            let wv = unsafe { _mm256_loadu_ps(w[r].as_ptr().add(at)) };
            for c in 0..C {
                acc[r][c] = _mm256_fmadd_ps(wv, xv[c], acc[r][c]);
            }
        }
        at += L;
    }
    let mut out = [[0f32; C]; R];
    for r in 0..R {
        for c in 0..C {
            let mut lanes = [0f32; L];
            // SAFETY: `lanes` holds L f32.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r][c]) };
            out[r][c] = lanes_and_tail(&lanes, &w[r][body..], &x[c][body..]);
        }
    }
    out
}

/// An AVX-512 kernel of one shape (`R` weight rows × `C` input rows): [`products_lanes`] with 16
/// lanes, the same per-element operations. The accumulators are named locals, not an array:
/// arrays of registers indexed in loops get spilled to the stack (measured 3× slower in cache).
/// Each iteration also prefetches the same offsets of the next `R` weight rows (they follow these
/// in memory): a few weight streams alone do not keep enough loads in flight to use the memory
/// bandwidth (measured 2× the bytes/s from memory with 3 rows × 8 inputs).
macro_rules! avx512_kernel {
    ($name:ident, $r:literal x $c:literal, w = [$($wi:literal $w:ident),+],
     cols = [$($ci:literal: [$($cw:ident $acc:ident),+]),+]) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f")]
        unsafe fn $name(w: [&[f32]; $r], x: [&[f32]; $c]) -> [[f32; $c]; $r] {
            use std::arch::x86_64::*;
            const L: usize = 16;
            let k = w[0].len();
            let body = k / L * L;
            $($(let mut $acc = _mm512_setzero_ps();)+)+
            let mut at = 0;
            while at < body {
                // SAFETY: at + L <= body <= the length of every row (each has k elements).
                $(let $w = unsafe { _mm512_loadu_ps(w[$wi].as_ptr().add(at)) };)+
                // A hint only (never faults, whatever the address).
                $(_mm_prefetch::<_MM_HINT_T0>(w[$wi].as_ptr().wrapping_add($r * k + at) as *const i8);)+
                $({
                    // SAFETY: as above, for the input rows.
                    let xv = unsafe { _mm512_loadu_ps(x[$ci].as_ptr().add(at)) };
                    $($acc = _mm512_fmadd_ps($cw, xv, $acc);)+
                })+
                at += L;
            }
            let cols: [[__m512; $r]; $c] = [$({
                let _ = $ci;
                [$($acc),+]
            }),+];
            let mut out = [[0f32; $c]; $r];
            for (c, col) in cols.iter().enumerate() {
                for (r, acc) in col.iter().enumerate() {
                    out[r][c] = tree_sum_512(*acc) + tail(&w[r][body..], &x[c][body..]);
                }
            }
            out
        }
    };
}

avx512_kernel!(k3x8, 3 x 8, w = [0 w0, 1 w1, 2 w2], cols = [0: [w0 a0_0, w1 a1_0, w2 a2_0], 1: [w0 a0_1, w1 a1_1, w2 a2_1], 2: [w0 a0_2, w1 a1_2, w2 a2_2], 3: [w0 a0_3, w1 a1_3, w2 a2_3], 4: [w0 a0_4, w1 a1_4, w2 a2_4], 5: [w0 a0_5, w1 a1_5, w2 a2_5], 6: [w0 a0_6, w1 a1_6, w2 a2_6], 7: [w0 a0_7, w1 a1_7, w2 a2_7]]);
avx512_kernel!(k4x4, 4 x 4, w = [0 w0, 1 w1, 2 w2, 3 w3], cols = [0: [w0 a0_0, w1 a1_0, w2 a2_0, w3 a3_0], 1: [w0 a0_1, w1 a1_1, w2 a2_1, w3 a3_1], 2: [w0 a0_2, w1 a1_2, w2 a2_2, w3 a3_2], 3: [w0 a0_3, w1 a1_3, w2 a2_3, w3 a3_3]]);
avx512_kernel!(k6x2, 6 x 2, w = [0 w0, 1 w1, 2 w2, 3 w3, 4 w4, 5 w5], cols = [0: [w0 a0_0, w1 a1_0, w2 a2_0, w3 a3_0, w4 a4_0, w5 a5_0], 1: [w0 a0_1, w1 a1_1, w2 a2_1, w3 a3_1, w4 a4_1, w5 a5_1]]);
avx512_kernel!(k8x1, 8 x 1, w = [0 w0, 1 w1, 2 w2, 3 w3, 4 w4, 5 w5, 6 w6, 7 w7], cols = [0: [w0 a0_0, w1 a1_0, w2 a2_0, w3 a3_0, w4 a4_0, w5 a5_0, w6 a6_0, w7 a7_0]]);
avx512_kernel!(k1x8, 1 x 8, w = [0 w0], cols = [0: [w0 a0_0], 1: [w0 a0_1], 2: [w0 a0_2], 3: [w0 a0_3], 4: [w0 a0_4], 5: [w0 a0_5], 6: [w0 a0_6], 7: [w0 a0_7]]);
avx512_kernel!(k1x4, 1 x 4, w = [0 w0], cols = [0: [w0 a0_0], 1: [w0 a0_1], 2: [w0 a0_2], 3: [w0 a0_3]]);
avx512_kernel!(k1x2, 1 x 2, w = [0 w0], cols = [0: [w0 a0_0], 1: [w0 a0_1]]);
avx512_kernel!(k1x1, 1 x 1, w = [0 w0], cols = [0: [w0 a0_0]]);

/// [`products_lanes`] with 16 lanes, by the AVX-512 kernel of the shape (the portable chain for a
/// shape without one: the same numbers).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn products_avx512<const R: usize, const C: usize>(
    w: [&[f32]; R],
    x: [&[f32]; C],
) -> [[f32; C]; R] {
    macro_rules! route {
        ($($kr:literal x $kc:literal => $k:ident),+) => {
            $(if R == $kr && C == $kc {
                let o = unsafe {
                    $k(std::array::from_fn(|i| w[i]), std::array::from_fn(|i| x[i]))
                };
                return std::array::from_fn(|r| std::array::from_fn(|c| o[r][c]));
            })+
        };
    }
    route!(3 x 8 => k3x8, 4 x 4 => k4x4, 6 x 2 => k6x2, 8 x 1 => k8x1,
           1 x 8 => k1x8, 1 x 4 => k1x4, 1 x 2 => k1x2, 1 x 1 => k1x1);
    products_lanes::<16, R, C>(w, x)
}

/// [`products_lanes`] with the process's instruction set.
#[inline(always)]
fn products<const R: usize, const C: usize>(
    isa: Isa,
    w: [&[f32]; R],
    x: [&[f32]; C],
) -> [[f32; C]; R] {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` chose Avx512 only where the CPU has AVX-512F.
        Isa::Avx512 => unsafe { products_avx512(w, x) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` chose Avx2 only where the CPU has AVX2 and FMA.
        Isa::Avx2 => unsafe { products_avx2(w, x) },
        #[cfg(not(target_arch = "x86_64"))]
        Isa::Avx512 => products_lanes::<16, R, C>(w, x),
        #[cfg(not(target_arch = "x86_64"))]
        Isa::Avx2 => products_lanes::<8, R, C>(w, x),
        Isa::Portable => products_lanes::<8, R, C>(w, x),
    }
}

#[inline(always)]
fn weighted_sum_body<const D: usize>(weights: &[f32], rows: &[f32], out: &mut [f32]) {
    let d = out.len();
    // One `D`-wide slice of `out` at a time, held in registers across all rows.
    for (c, o) in out.chunks_mut(D).enumerate() {
        let at = c * D;
        if let Ok(o) = <&mut [f32; D]>::try_from(&mut *o) {
            let mut acc = *o;
            for (p, row) in weights.iter().zip(rows.chunks_exact(d)) {
                let v: &[f32; D] = row[at..at + D].try_into().expect("D floats");
                for i in 0..D {
                    acc[i] += p * v[i];
                }
            }
            *o = acc;
        } else {
            for (p, row) in weights.iter().zip(rows.chunks_exact(d)) {
                for (a, v) in o.iter_mut().zip(&row[at..]) {
                    *a += p * v;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn weighted_sum_avx512(weights: &[f32], rows: &[f32], out: &mut [f32]) {
    weighted_sum_body::<64>(weights, rows, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn weighted_sum_avx2(weights: &[f32], rows: &[f32], out: &mut [f32]) {
    weighted_sum_body::<32>(weights, rows, out)
}

/// `out += Σ_j weights[j] · rows[j]` over the `out.len()`-long rows of `rows`, row by row in order
/// and each term a multiply then an add, never fused (the numbers of one `out[i] += p · v[i]` per
/// row: the same on every instruction set, only wider registers where the CPU has them).
pub(crate) fn weighted_sum(weights: &[f32], rows: &[f32], out: &mut [f32]) {
    debug_assert_eq!(rows.len(), weights.len() * out.len());
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` chose Avx512 only where the CPU has AVX-512F.
        Isa::Avx512 => unsafe { weighted_sum_avx512(weights, rows, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` chose Avx2 only where the CPU has AVX2.
        Isa::Avx2 => unsafe { weighted_sum_avx2(weights, rows, out) },
        _ => weighted_sum_body::<32>(weights, rows, out),
    }
}

/// Appends `q · row` for every `q.len()`-long row of `rows` (attention scores over a block of
/// keys): the few-row kernel's chain, 8 rows per call.
pub(crate) fn row_dots(q: &[f32], rows: &[f32], out: &mut Vec<f32>) {
    let d = q.len();
    let isa = isa();
    let mut chunks = rows.chunks_exact(8 * d);
    for eight in &mut chunks {
        let r: [&[f32]; 8] = std::array::from_fn(|i| &eight[i * d..(i + 1) * d]);
        out.extend(products::<8, 1>(isa, r, [q]).iter().map(|v| v[0]));
    }
    for row in chunks.remainder().chunks_exact(d) {
        out.push(products::<1, 1>(isa, [row], [q])[0][0]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every vector kernel shape does exactly the portable chain of its lane count (with a tail:
    /// k is not a multiple of the lanes), and a 1 × 1 product equals the same element of a wider
    /// block.
    #[test]
    fn the_vector_kernels_are_the_portable_chain_bit_for_bit() {
        let k = 16 * 5 + 3;
        let rows: Vec<Vec<f32>> = (0..16)
            .map(|r| {
                (0..k)
                    .map(|i| (((r * 131 + i * 17) % 97) as f32 - 48.0) / 13.0)
                    .collect()
            })
            .collect();
        let isa = isa();
        macro_rules! check {
            ($($r:literal x $c:literal),+) => {$({
                let w: [&[f32]; $r] = std::array::from_fn(|i| rows[i].as_slice());
                let x: [&[f32]; $c] = std::array::from_fn(|i| rows[8 + i].as_slice());
                let ours = products::<$r, $c>(isa, w, x);
                let portable = match isa {
                    Isa::Avx512 => products_lanes::<16, $r, $c>(w, x),
                    Isa::Avx2 | Isa::Portable => products_lanes::<8, $r, $c>(w, x),
                };
                assert_eq!(ours, portable, "{isa:?} {} x {}", $r, $c);
                let last = products::<1, 1>(isa, [w[$r - 1]], [x[$c - 1]]);
                assert_eq!(last[0][0], ours[$r - 1][$c - 1], "{isa:?}: 1 x 1 vs {} x {}", $r, $c);
            })+};
        }
        check!(3 x 8, 4 x 4, 6 x 2, 8 x 1, 1 x 8, 1 x 4, 1 x 2, 1 x 1, 2 x 4, 4 x 1, 2 x 3);
    }

    /// Each instruction set's kernels the CPU has (not only the one this process picked) do the
    /// portable chain of their lane count bit for bit.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn every_available_instruction_set_matches_its_portable_chain() {
        let k = 16 * 4 + 5;
        let rows: Vec<Vec<f32>> = (0..12)
            .map(|r| {
                (0..k)
                    .map(|i| ((r * 7 + i * 5) % 23) as f32 / 7.0 - 1.5)
                    .collect()
            })
            .collect();
        let w: [&[f32]; 2] = [&rows[0], &rows[1]];
        let x: [&[f32]; 4] = std::array::from_fn(|i| rows[4 + i].as_slice());
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA.
            let ours = unsafe { products_avx2::<2, 4>(w, x) };
            assert_eq!(ours, products_lanes::<8, 2, 4>(w, x), "AVX2");
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            let w: [&[f32]; 3] = [&rows[0], &rows[1], &rows[2]];
            let x: [&[f32]; 8] = std::array::from_fn(|i| rows[3 + i].as_slice());
            // SAFETY: the CPU has AVX-512F.
            let ours = unsafe { products_avx512::<3, 8>(w, x) };
            assert_eq!(ours, products_lanes::<16, 3, 8>(w, x), "AVX-512");
        }
        // The weighted sum: wider registers, the same numbers as one row at a time.
        let weights = [0.25f32, -1.5, 3.0];
        let vals: Vec<f32> = rows[..3].iter().flat_map(|r| r[..k].to_vec()).collect();
        let mut ours = vec![0.5f32; k];
        weighted_sum(&weights, &vals, &mut ours);
        let mut one_by_one = vec![0.5f32; k];
        for (p, row) in weights.iter().zip(vals.chunks_exact(k)) {
            for (o, v) in one_by_one.iter_mut().zip(row) {
                *o += p * v;
            }
        }
        assert_eq!(ours, one_by_one);
    }
}
