//! The int8 GEMM of quantized weights ([`Packed`]) with quantized activation rows ([`QActs`]) on
//! AVX-512 VNNI: register tiles of `MR` activation rows × `NR` groups of 16 output columns, one
//! `vpdpbusd` per tile element per four values of `k`.
//!
//! Each output element is one chain: its block's integer sum (exact), then one fixed float
//! step per block in `k` order. The tile shape decides only which elements are computed
//! together, so a row gets the same bits whether it is multiplied alone (a decode step) or in a
//! prefill of hundreds: [`super::qpack::product_scalar`] is that chain in portable code, and
//! the tests hold every tile shape to it.

use super::out::{par_column_blocks, Columns};
use super::qpack::{ActRow, Format, Line, Packed, QActs, GROUP, Q4K_LINES, Q8_LINES};

/// Groups of output columns per rayon task (64 columns): each task's weights stay in the L2
/// cache while every activation row passes over them.
const TASK_GROUPS: usize = 4;
/// Output columns per task.
pub(crate) const TASK_COLS: usize = TASK_GROUPS * GROUP;

/// Whether the CPU runs these kernels (AVX-512 F and BW for the byte shuffles, VNNI for the
/// products).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vnni")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `out[r][j] = x[r] · w[j]` for every activation row of `a` and weight row of `w`, `[m, n]`
/// row-major.
///
/// # Panics
/// If the CPU lacks [`available`]'s features, or `a` was quantized for another format or `k`.
pub(crate) fn gemm(w: &Packed, a: &QActs) -> Vec<f32> {
    assert!(available(), "the int8 GEMM needs AVX-512 VNNI");
    assert!(
        a.format == w.format && a.k == w.k,
        "activations quantized for another matrix"
    );
    let (m, n, groups) = (a.rows(), w.n, w.groups());
    let mut dst = vec![0f32; m * n];
    par_column_blocks(&mut dst, (m, n), TASK_COLS, |t, out| {
        let g0 = t * TASK_GROUPS;
        task_tiles(w, a, g0..groups.min(g0 + TASK_GROUPS), out);
    });
    dst
}

/// One task: groups `gs` for every row, written to `out` (the groups' columns). Tiles go over
/// all rows for `NR` groups before the next `NR` (those groups' weights stay in cache).
fn task_tiles(w: &Packed, a: &QActs, gs: std::ops::Range<usize>, out: &Columns<'_>) {
    let m = a.rows();
    let (mr_max, nr_max) = tile_shape(w.format, m);
    let mut g = gs.start;
    while g < gs.end {
        let nr = nr_max.min(gs.end - g);
        let mut r = 0;
        while r < m {
            let mr = mr_max.min(m - r);
            tile(w, a, (r, mr), (g, nr), &mut |rr, gg, v: &[f32; GROUP]| {
                // The last group's padding columns are not part of the output.
                let c = (g + gg - gs.start) * GROUP;
                let live = GROUP.min(out.cols() - c);
                out.put(r + rr, c, &v[..live]);
            });
            r += mr;
        }
        g += nr;
    }
}

/// The largest tile (rows, groups) for `m` rows: a decode step's few rows use wide tiles of
/// columns, a prefill's many rows tall tiles that reuse each loaded weight line for 5 or 6 rows
/// (12 or 10 independent sums of 16 lanes: enough to hide `vpdpbusd`'s latency, few enough
/// to stay in registers; measured best of 3 to 6 rows × 2 or 3 groups).
fn tile_shape(format: Format, m: usize) -> (usize, usize) {
    match (format, m) {
        (_, 1) => (1, 4),
        (_, 2) => (2, 4),
        (Format::Q8_0, _) => (6, 2),
        (Format::Q4K, _) => (5, 2),
    }
}

/// One tile: rows `r0..r0 + mr` × groups `g0..g0 + nr`, each 16-column result handed to
/// `put(row in tile, group in tile, values)`. Checks every bound the kernels rely on.
fn tile(
    w: &Packed,
    a: &QActs,
    (r0, mr): (usize, usize),
    (g0, nr): (usize, usize),
    put: &mut impl FnMut(usize, usize, &[f32; GROUP]),
) {
    assert!(available() && r0 + mr <= a.rows() && g0 + nr <= w.groups());
    assert!(a.format == w.format && a.k == w.k && w.k.is_multiple_of(w.format.block()));
    let wl: [&[Line]; 4] = std::array::from_fn(|i| w.group(g0 + i.min(nr - 1)));
    let xr: [ActRow<'_>; 6] = std::array::from_fn(|i| a.row(r0 + i.min(mr - 1)));
    macro_rules! shapes {
        ($kernel:ident: $($m:literal x $n:literal),+) => {
            match (mr, nr) {
                $(($m, $n) => {
                    let mut o = [[[0f32; GROUP]; $n]; $m];
                    // SAFETY: `available()` (asserted) is the kernels' target features; every
                    // group slice holds `blocks × lines` lines and every activation row `k`
                    // values, `k / block` scales and its sums (both checked above: the same
                    // format and `k`, by construction of `Packed` and `QActs`).
                    unsafe {
                        $kernel::<$m, $n>(
                            std::array::from_fn(|i| wl[i]),
                            std::array::from_fn(|i| xr[i]),
                            &mut o,
                        )
                    };
                    for (rr, row) in o.iter().enumerate() {
                        for (gg, v) in row.iter().enumerate() {
                            put(rr, gg, v);
                        }
                    }
                })+
                _ => unreachable!("tile {mr} x {nr}"),
            }
        };
    }
    match w.format {
        Format::Q8_0 => {
            shapes!(q8_tile: 1 x 1, 1 x 2, 1 x 3, 1 x 4, 2 x 1, 2 x 2, 2 x 3, 2 x 4, 3 x 1, 3 x 2, 4 x 1, 4 x 2, 5 x 1, 5 x 2, 6 x 1, 6 x 2)
        }
        Format::Q4K => {
            shapes!(q4k_tile: 1 x 1, 1 x 2, 1 x 3, 1 x 4, 2 x 1, 2 x 2, 2 x 3, 2 x 4, 3 x 1, 3 x 2, 4 x 1, 4 x 2, 5 x 1, 5 x 2)
        }
    }
}

/// The q8_0 tile. Per block of 32: each element's integer sum starts at the activation's
/// `−128 · Σ x` (the weights are stored plus 128), gains 8 `vpdpbusd` steps of 4 values, and is
/// added to the float accumulator as `sum · (d_w · d_x)` with one fused multiply-add.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VNNI; every `w[g]` holds `kb · Q8_LINES` lines and every
/// `x[r]` `32 · kb` values, `kb` scales and `kb` sums, where `kb = x[0].d.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
// Indexed loops over the register arrays: with constant bounds they unroll into named registers.
#[allow(clippy::needless_range_loop)]
unsafe fn q8_tile<const MR: usize, const NR: usize>(
    w: [&[Line]; NR],
    x: [ActRow<'_>; MR],
    out: &mut [[[f32; GROUP]; NR]; MR],
) {
    use std::arch::x86_64::*;
    let kb = x[0].d.len();
    let mut facc = [[_mm512_setzero_ps(); NR]; MR];
    for b in 0..kb {
        let mut iacc = [[_mm512_setzero_si512(); NR]; MR];
        for r in 0..MR {
            // SAFETY (all loads below): within the lengths the caller guarantees.
            let start = _mm512_set1_epi32(unsafe { *x[r].sums.get_unchecked(b) });
            for acc in iacc[r].iter_mut() {
                *acc = start;
            }
        }
        for quad in 0..8 {
            let mut wv = [_mm512_setzero_si512(); NR];
            for g in 0..NR {
                wv[g] = unsafe {
                    _mm512_load_si512(w[g].as_ptr().add(b * Q8_LINES + quad) as *const __m512i)
                };
            }
            for r in 0..MR {
                let xb = _mm512_set1_epi32(unsafe {
                    (x[r].qs.as_ptr().add(b * 32 + 4 * quad) as *const i32).read_unaligned()
                });
                for g in 0..NR {
                    iacc[r][g] = _mm512_dpbusd_epi32(iacc[r][g], wv[g], xb);
                }
            }
        }
        let mut dw = [_mm512_setzero_ps(); NR];
        for g in 0..NR {
            dw[g] = unsafe { _mm512_load_ps(w[g].as_ptr().add(b * Q8_LINES + 8) as *const f32) };
        }
        for r in 0..MR {
            let dx = _mm512_set1_ps(unsafe { *x[r].d.get_unchecked(b) });
            for g in 0..NR {
                let scale = _mm512_mul_ps(dw[g], dx);
                facc[r][g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[r][g]), scale, facc[r][g]);
            }
        }
    }
    for r in 0..MR {
        for g in 0..NR {
            // SAFETY: `out[r][g]` holds 16 f32.
            unsafe { _mm512_storeu_ps(out[r][g].as_mut_ptr(), facc[r][g]) };
        }
    }
}

/// The q4_K tile. Per super-block of 256, per 32-value sub-block: its four values of 16 columns
/// are one line's low or high nibbles (the line holds a pair of sub-blocks); each sub-block's
/// integer sum is multiplied by its 6-bit scale and added to the super-block's total; the mins
/// meet the activation's sub-block sums in 16-bit pairs (`vpdpwssd`). Then, in floats,
/// `+ total · (d · d_x)` and `− mins · (dmin · d_x)`, each one fused multiply-add.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VNNI; every `w[g]` holds `kb · Q4K_LINES` lines and every
/// `x[r]` `256 · kb` values, `kb` scales and `4 · kb` sums, where `kb = x[0].d.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
// Indexed loops over the register arrays: with constant bounds they unroll into named registers.
#[allow(clippy::needless_range_loop)]
unsafe fn q4k_tile<const MR: usize, const NR: usize>(
    w: [&[Line]; NR],
    x: [ActRow<'_>; MR],
    out: &mut [[[f32; GROUP]; NR]; MR],
) {
    use std::arch::x86_64::*;
    let kb = x[0].d.len();
    let nibble = _mm512_set1_epi8(0x0F);
    let mut facc = [[_mm512_setzero_ps(); NR]; MR];
    for b in 0..kb {
        // SAFETY (all loads below): within the lengths the caller guarantees.
        let line =
            |g: usize, l: usize| unsafe { w[g].as_ptr().add(b * Q4K_LINES + l) as *const u8 };
        let mut total = [[_mm512_setzero_si512(); NR]; MR];
        // Sub-block `j`: the low nibbles of pair `j / 2`'s lines when `j` is even, the high ones
        // when odd (each line is loaded twice, from L1: one sum register per element instead
        // of two).
        for j in 0..8 {
            let (pair, high) = (j / 2, j % 2 == 1);
            let mut isum = [[_mm512_setzero_si512(); NR]; MR];
            for quad in 0..8 {
                let mut wv = [_mm512_setzero_si512(); NR];
                for g in 0..NR {
                    let v =
                        unsafe { _mm512_load_si512(line(g, pair * 8 + quad) as *const __m512i) };
                    let v = if high { _mm512_srli_epi16::<4>(v) } else { v };
                    wv[g] = _mm512_and_si512(v, nibble);
                }
                for r in 0..MR {
                    let at = b * 256 + 32 * j + 4 * quad;
                    let xb = _mm512_set1_epi32(unsafe {
                        (x[r].qs.as_ptr().add(at) as *const i32).read_unaligned()
                    });
                    for g in 0..NR {
                        isum[r][g] = _mm512_dpbusd_epi32(isum[r][g], wv[g], xb);
                    }
                }
            }
            for g in 0..NR {
                let sc = _mm512_cvtepu8_epi32(unsafe {
                    _mm_load_si128(line(g, 32).add(j * GROUP) as *const __m128i)
                });
                for r in 0..MR {
                    total[r][g] = _mm512_add_epi32(total[r][g], _mm512_mullo_epi32(isum[r][g], sc));
                }
            }
        }
        for g in 0..NR {
            let mut mins = [_mm512_setzero_si512(); 4];
            for (pair, m) in mins.iter_mut().enumerate() {
                *m = _mm512_cvtepu8_epi16(unsafe {
                    _mm256_load_si256(line(g, 34).add(pair * 2 * GROUP) as *const __m256i)
                });
            }
            let d = unsafe { _mm512_load_ps(line(g, 36) as *const f32) };
            let dmin = unsafe { _mm512_load_ps(line(g, 37) as *const f32) };
            for r in 0..MR {
                let mut mn = _mm512_setzero_si512();
                for (pair, m) in mins.iter().enumerate() {
                    let s = _mm512_set1_epi32(unsafe { *x[r].sums.get_unchecked(4 * b + pair) });
                    mn = _mm512_dpwssd_epi32(mn, *m, s);
                }
                let dx = _mm512_set1_ps(unsafe { *x[r].d.get_unchecked(b) });
                let acc = _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(total[r][g]),
                    _mm512_mul_ps(d, dx),
                    facc[r][g],
                );
                facc[r][g] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(mn), _mm512_mul_ps(dmin, dx), acc);
            }
        }
    }
    for r in 0..MR {
        for g in 0..NR {
            // SAFETY: `out[r][g]` holds 16 f32.
            unsafe { _mm512_storeu_ps(out[r][g].as_mut_ptr(), facc[r][g]) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::qpack::{product_scalar, Packed, QActs, GROUP};
    use super::*;

    /// Deterministic values in [-1, 1) with a few exact zeros and large outliers.
    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let v = (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
                match i % 97 {
                    0 => 0.0,
                    1 => v * 40.0,
                    _ => v,
                }
            })
            .collect()
    }

    fn q8_packed(n: usize, k: usize, seed: u64) -> Packed {
        let mut rows = crate::qweight::Q8Rows::with_capacity(n * k);
        rows.push(&values(n * k, seed));
        let (qs, d) = rows.parts();
        Packed::q8_0(qs, d, (n, k))
    }

    fn q4k_packed(n: usize, k: usize, seed: u64) -> Packed {
        use candle_core::quantized::k_quants::{BlockQ4K, GgmlType};
        let w = values(n * k, seed);
        let mut blocks = vec![BlockQ4K::zeros(); n * k / 256];
        BlockQ4K::from_float(&w, &mut blocks);
        Packed::q4k(&crate::qweight::block_bytes(&blocks), (n, k))
    }

    /// Every tile shape equals the portable chain bit for bit, for odd shapes: `n` not a multiple
    /// of the group (padding columns), row counts that leave every remainder, one block of `k`.
    #[test]
    fn every_tile_is_the_portable_chain_bit_for_bit() {
        if !available() {
            eprintln!("no AVX-512 VNNI here: the int8 GEMM is not used");
            return;
        }
        for (format, k) in [
            (Format::Q8_0, 32),
            (Format::Q8_0, 96),
            (Format::Q4K, 256),
            (Format::Q4K, 512),
        ] {
            for n in [1, 17, 80, 16 * 9 + 5] {
                let w = match format {
                    Format::Q8_0 => q8_packed(n, k, n as u64),
                    Format::Q4K => q4k_packed(n, k, n as u64),
                };
                for m in [1, 2, 3, 4, 5, 11, 13] {
                    let x = values(m * k, 7 + m as u64);
                    let a = QActs::quantize(format, &x, k);
                    let ours = gemm(&w, &a);
                    assert_eq!(ours.len(), m * n);
                    for r in 0..m {
                        for j in 0..n {
                            let want = product_scalar(&w, j / GROUP, j % GROUP, a.row(r));
                            assert_eq!(
                                ours[r * n + j].to_bits(),
                                want.to_bits(),
                                "{format:?} m {m} n {n} k {k}: [{r}, {j}]"
                            );
                        }
                    }
                }
            }
        }
    }
}
