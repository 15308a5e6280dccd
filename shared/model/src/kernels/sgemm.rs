//! The f32 GEMM of prefill and the vision tower, `out[m, n] = x[m, k] · w[n, k]ᵀ`, on AVX-512:
//! weights read as stored (row-major, no second copy), the activation rows packed per call into
//! transposed panels (`[k][up to 64 rows]`), and register tiles of [`MR`] weight rows × up to 64
//! activation rows (four registers): each step broadcasts one weight value per tile row and
//! multiplies it with four loaded registers of activations, 24 independent fused multiply-adds
//! per 10 loads. `k` is cut into [`KC`]-long slices so a panel slice stays in the L1/L2 caches
//! while every weight tile of a task passes over it.
//!
//! Every output element is one chain, `acc = fma(w[p], x[p], acc)` for `p = 0, 1, …, k − 1`
//! from zero, whatever the tile, the slice or the number of rows: a row gets the same bits in
//! a prefill of hundreds as alone ([`product_scalar`] is that chain in portable code).

use rayon::prelude::*;

use super::out::{par_column_blocks, Columns};

/// Weight rows per register tile.
const MR: usize = 6;
/// Activation rows per panel (four 16-lane registers).
const XP: usize = 64;
/// Values of `k` per slice.
const KC: usize = 256;
/// Weight rows per rayon task (a multiple of [`MR`]).
const TASK_ROWS: usize = 16 * MR;

/// Whether the CPU runs [`gemm`].
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// 16 f32 on a 64-byte boundary.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct V16([f32; 16]);

/// The element `(r, j)` in portable code: the chain every tile computes.
#[cfg(test)]
pub(crate) fn product_scalar(w_row: &[f32], x_row: &[f32]) -> f32 {
    w_row
        .iter()
        .zip(x_row)
        .fold(0f32, |acc, (w, x)| w.mul_add(*x, acc))
}

/// `[m, n]` = `x [m, k]` · `w [n, k]`ᵀ.
///
/// # Panics
/// If the CPU lacks AVX-512F ([`available`]) or the lengths are not `n · k` and `m · k`.
pub(crate) fn gemm(w: &[f32], n: usize, x: &[f32], m: usize, k: usize) -> Vec<f32> {
    let mut dst = vec![0f32; m * n];
    gemm_into(w, n, x, m, k, &mut dst);
    dst
}

/// [`gemm`] into `dst` (`m · n` values, every one overwritten).
///
/// # Panics
/// As [`gemm`], and if `dst` does not hold `m · n` values.
pub(crate) fn gemm_into(w: &[f32], n: usize, x: &[f32], m: usize, k: usize, dst: &mut [f32]) {
    assert!(available(), "the f32 GEMM needs AVX-512F");
    assert!(w.len() == n * k && x.len() == m * k && k > 0 && dst.len() == m * n);
    if m == 0 || n == 0 {
        return;
    }
    with_scratch(&PANELS, |panels| {
        pack_panels(x, m, k, panels);
        par_column_blocks(dst, (m, n), task_rows(n), |t, out| {
            let i0 = t * task_rows(n);
            let rows = out.cols();
            task(&w[i0 * k..(i0 + rows) * k], rows, panels, (m, k), out);
        });
    });
}

thread_local! {
    /// The packed activation panels of a product, kept between calls (a fresh buffer each time
    /// costs page faults and zeroing: a fifth of the time at prefill shapes).
    static PANELS: std::cell::RefCell<Vec<V16>> = const { std::cell::RefCell::new(Vec::new()) };
    /// A task's accumulators, the same way.
    static ACC: std::cell::RefCell<Vec<V16>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `f` with the calling thread's buffer `key`, or a fresh one when the thread is already using
/// it (a rayon worker that took up another product while it waited for its own).
fn with_scratch<R>(
    key: &'static std::thread::LocalKey<std::cell::RefCell<Vec<V16>>>,
    f: impl FnOnce(&mut Vec<V16>) -> R,
) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => f(&mut buf),
        Err(_) => f(&mut Vec::new()),
    })
}

/// Weight rows per task: [`TASK_ROWS`], fewer where that leaves fewer than two tasks per thread.
fn task_rows(n: usize) -> usize {
    // Multiples of 48 where possible: whole tiles of 6 rows, whole 16-row transposes.
    let per_thread = n.div_ceil(2 * rayon::current_num_threads()).div_ceil(48) * 48;
    TASK_ROWS.min(per_thread)
}

/// The activation rows as transposed panels in `panels`: panel `p` holds rows `64p..64p + 64`
/// laid out `[k][64]` (16-value groups). The rows past `m` in the last panel are left as they
/// were: their lanes are multiplied but never read back.
fn pack_panels(x: &[f32], m: usize, k: usize, panels: &mut Vec<V16>) {
    let per = k * XP / 16;
    panels.resize(m.div_ceil(XP) * per, V16([0.0; 16]));
    panels
        .par_chunks_mut(per)
        .enumerate()
        .for_each(|(p, panel)| {
            let rows = XP.min(m - p * XP);
            let row = |j: usize| &x[(p * XP + j) * k..(p * XP + j + 1) * k];
            // 16 rows × 16 values at a time, transposed in registers; the rest one by one.
            for j0 in (0..rows / 16 * 16).step_by(16) {
                let mut kk = 0;
                while kk + 16 <= k {
                    let block: [&[f32; 16]; 16] = std::array::from_fn(|r| {
                        row(j0 + r)[kk..kk + 16].try_into().expect("16 values")
                    });
                    for (c, col) in transpose16(block).into_iter().enumerate() {
                        panel[(kk + c) * (XP / 16) + j0 / 16] = col;
                    }
                    kk += 16;
                }
                for kk in kk..k {
                    for r in 0..16 {
                        panel[kk * (XP / 16) + j0 / 16].0[r] = row(j0 + r)[kk];
                    }
                }
            }
            for j in rows / 16 * 16..rows {
                for (kk, &v) in row(j).iter().enumerate() {
                    panel[kk * (XP / 16) + j / 16].0[j % 16] = v;
                }
            }
        });
}

/// One task: weight rows `w` (`rows` of them) against every panel, written to `out`. Slices of
/// `k` outermost: a slice of the task's weight rows stays in cache while every panel passes;
/// the accumulators of the whole task (`[panel][row][4]`) wait in the L2 cache between slices.
fn task(w: &[f32], rows: usize, panels: &[V16], (m, k): (usize, usize), out: &Columns<'_>) {
    let per = k * XP / 16;
    let np = panels.len() / per;
    with_scratch(&ACC, |acc| {
        acc.resize(np * rows * XP / 16, V16([0.0; 16]));
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            for (p, panel) in panels.chunks(per).enumerate() {
                let nv = (XP.min(m - p * XP)).div_ceil(16);
                let acc = &mut acc[p * rows * XP / 16..(p + 1) * rows * XP / 16];
                let mut i = 0;
                while i < rows {
                    let mr = MR.min(rows - i);
                    tile(
                        w,
                        k,
                        (i, mr),
                        (k0, kc),
                        &panel[k0 * XP / 16..(k0 + kc) * XP / 16],
                        nv,
                        &mut acc[i * XP / 16..(i + mr) * XP / 16],
                    );
                    i += mr;
                }
            }
        }
        for (p, acc) in acc[..np * rows * XP / 16]
            .chunks(rows * XP / 16)
            .enumerate()
        {
            write_panel(acc, rows, p * XP, XP.min(m - p * XP), out);
        }
    });
}

/// One panel's results (`acc`: `[weight row][4 registers of activation rows]`), transposed into
/// rows `j0..j0 + live` of output: 16 × 16 blocks at once, the rest one by one.
fn write_panel(acc: &[V16], rows: usize, j0: usize, live: usize, out: &Columns<'_>) {
    let mut i = 0;
    while i + 16 <= rows {
        for v in 0..live.div_ceil(16) {
            let block: [&[f32; 16]; 16] = std::array::from_fn(|r| &acc[(i + r) * XP / 16 + v].0);
            let t = transpose16(block);
            for (jj, row) in t.iter().enumerate().take(live - 16 * v) {
                out.put(j0 + 16 * v + jj, i, &row.0);
            }
        }
        i += 16;
    }
    for i in i..rows {
        for j in 0..live {
            out.put(j0 + j, i, &[acc[i * XP / 16 + j / 16].0[j % 16]]);
        }
    }
}

/// The 16 × 16 transpose of `rows`.
fn transpose16(rows: [&[f32; 16]; 16]) -> [V16; 16] {
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { transpose16_avx512(rows) };
    }
    std::array::from_fn(|c| V16(std::array::from_fn(|r| rows[r][c])))
}

/// [`transpose16`] in 64 shuffles: 32-bit then 64-bit interleaves within 128-bit lanes (each
/// lane then holds 4 rows of one column), then two rounds of 128-bit lane shuffles.
///
/// # Safety
/// AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose16_avx512(rows: [&[f32; 16]; 16]) -> [V16; 16] {
    use std::arch::x86_64::*;
    let mut r = [_mm512_setzero_ps(); 16];
    for (v, row) in r.iter_mut().zip(rows) {
        // SAFETY: 16 f32.
        *v = unsafe { _mm512_loadu_ps(row.as_ptr()) };
    }
    let mut t = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // u[4i + q], lane L: rows 4i..4i + 4 of column 4L + q.
    let mut u = [_mm512_setzero_ps(); 16];
    for i in 0..4 {
        let pd = |a: __m512| _mm512_castps_pd(a);
        u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(t[4 * i]), pd(t[4 * i + 2])));
        u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(t[4 * i]), pd(t[4 * i + 2])));
        u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(t[4 * i + 1]), pd(t[4 * i + 3])));
        u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(t[4 * i + 1]), pd(t[4 * i + 3])));
    }
    let mut out = [V16([0.0; 16]); 16];
    for q in 0..4 {
        let v0 = _mm512_shuffle_f32x4::<0b10_00_10_00>(u[q], u[4 + q]);
        let v1 = _mm512_shuffle_f32x4::<0b11_01_11_01>(u[q], u[4 + q]);
        let w0 = _mm512_shuffle_f32x4::<0b10_00_10_00>(u[8 + q], u[12 + q]);
        let w1 = _mm512_shuffle_f32x4::<0b11_01_11_01>(u[8 + q], u[12 + q]);
        let cols = [
            (q, _mm512_shuffle_f32x4::<0b10_00_10_00>(v0, w0)),
            (4 + q, _mm512_shuffle_f32x4::<0b10_00_10_00>(v1, w1)),
            (8 + q, _mm512_shuffle_f32x4::<0b11_01_11_01>(v0, w0)),
            (12 + q, _mm512_shuffle_f32x4::<0b11_01_11_01>(v1, w1)),
        ];
        for (c, v) in cols {
            // SAFETY: as above.
            unsafe { _mm512_store_ps(out[c].0.as_mut_ptr(), v) };
        }
    }
    out
}

/// Checks the bounds of one tile and runs the kernel of its shape: weight rows `i..i + mr`
/// (values `k0..k0 + kc` of each) against the panel slice `xt` (`kc` steps of 4 registers),
/// `nv` registers of it live; `acc` holds the tile's `[mr][4]` accumulators, zero-started when
/// `k0 == 0`.
fn tile(
    w: &[f32],
    k: usize,
    (i, mr): (usize, usize),
    (k0, kc): (usize, usize),
    xt: &[V16],
    nv: usize,
    acc: &mut [V16],
) {
    assert!((1..=MR).contains(&mr) && (1..=4).contains(&nv) && kc > 0);
    assert!((i + mr) * k <= w.len() && k0 + kc <= k);
    assert!(xt.len() == kc * 4 && acc.len() == mr * 4);
    let wp: [*const f32; MR] = std::array::from_fn(|r| w[(i + r.min(mr - 1)) * k + k0..].as_ptr());
    macro_rules! shapes {
        ($($m:literal),+) => {
            match (mr, nv) {
                $(($m, 1) => run::<$m, 1>(wp, xt, kc, k0 == 0, acc),
                  ($m, 2) => run::<$m, 2>(wp, xt, kc, k0 == 0, acc),
                  ($m, 3) => run::<$m, 3>(wp, xt, kc, k0 == 0, acc),
                  ($m, 4) => run::<$m, 4>(wp, xt, kc, k0 == 0, acc),)+
                _ => unreachable!("tile {mr} x {nv}"),
            }
        };
    }
    shapes!(1, 2, 3, 4, 5, 6);
}

/// The kernel of one shape, called with the bounds [`tile`] checked.
#[inline(always)]
fn run<const R: usize, const V: usize>(
    wp: [*const f32; MR],
    xt: &[V16],
    kc: usize,
    first: bool,
    acc: &mut [V16],
) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `available()` (asserted by `gemm`) is the kernel's target feature; each `wp[r]`
    // points at `kc` readable values (checked by `tile`), `xt` holds `kc` steps of 4 registers
    // and `acc` `R` rows of 4.
    unsafe {
        kernel::<R, V>(
            std::array::from_fn(|r| wp[r]),
            xt.as_ptr(),
            kc,
            first,
            acc.as_mut_ptr(),
        )
    };
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!(
        "no f32 GEMM without AVX-512: {wp:?} {} {kc} {first} {}",
        xt.len(),
        acc.len()
    );
}

/// `R` weight rows × `V` registers of activation rows over `kc` steps: per step, `V` loads of the
/// panel and `R` broadcasts, `R · V` fused multiply-adds into the accumulators (loaded from
/// `acc`, or zero when `first`), stored back at the end.
///
/// # Safety
/// AVX-512F; `w[r]` valid for `kc` reads, `xt` for `4 · kc` registers, `acc` for `4 · R`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
// Indexed loops over the register arrays: with constant bounds they unroll into named registers.
#[allow(clippy::needless_range_loop)]
unsafe fn kernel<const R: usize, const V: usize>(
    w: [*const f32; R],
    xt: *const V16,
    kc: usize,
    first: bool,
    acc: *mut V16,
) {
    use std::arch::x86_64::*;
    let mut a = [[_mm512_setzero_ps(); V]; R];
    if !first {
        for r in 0..R {
            for v in 0..V {
                // SAFETY: within `acc`'s 4 · R registers.
                a[r][v] = unsafe { _mm512_load_ps(acc.add(4 * r + v) as *const f32) };
            }
        }
    }
    for p in 0..kc {
        let mut xv = [_mm512_setzero_ps(); V];
        for v in 0..V {
            // SAFETY: step p < kc of the panel slice.
            xv[v] = unsafe { _mm512_load_ps(xt.add(4 * p + v) as *const f32) };
        }
        for r in 0..R {
            // SAFETY: value p < kc of weight row r.
            let wb = _mm512_set1_ps(unsafe { *w[r].add(p) });
            for v in 0..V {
                a[r][v] = _mm512_fmadd_ps(wb, xv[v], a[r][v]);
            }
        }
    }
    for r in 0..R {
        for v in 0..V {
            // SAFETY: as above.
            unsafe { _mm512_store_ps(acc.add(4 * r + v) as *mut f32, a[r][v]) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let h = (i as u32)
                    .wrapping_mul(2_654_435_761)
                    .wrapping_add(seed.wrapping_mul(40_503));
                ((h >> 8) % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn the_transpose_is_a_transpose() {
        let rows: Vec<V16> = (0..16)
            .map(|r| V16(std::array::from_fn(|c| (r * 16 + c) as f32)))
            .collect();
        let t = transpose16(std::array::from_fn(|r| &rows[r].0));
        for (c, col) in t.iter().enumerate() {
            for (r, &v) in col.0.iter().enumerate() {
                assert_eq!(v, (r * 16 + c) as f32, "[{c}][{r}]");
            }
        }
    }

    /// Every element is the portable chain bit for bit, for shapes that leave every remainder:
    /// `k` shorter and longer than a slice and not a multiple of 16, rows not a multiple of the
    /// panel or the register, weight rows not a multiple of the tile or the task; and a row's
    /// result is the same alone as among many.
    #[test]
    fn every_element_is_the_portable_chain_bit_for_bit() {
        if !available() {
            eprintln!("no AVX-512 here: the f32 GEMM is not used");
            return;
        }
        for (m, n, k) in [
            (1, 1, 1),
            (3, 7, 19),
            (17, 50, 300),
            (70, 49, 517),
            (130, 97, 33),
        ] {
            let w = values(n * k, 1);
            let x = values(m * k, 2);
            let ours = gemm(&w, n, &x, m, k);
            for r in 0..m {
                for j in 0..n {
                    let want = product_scalar(&w[j * k..(j + 1) * k], &x[r * k..(r + 1) * k]);
                    assert_eq!(
                        ours[r * n + j].to_bits(),
                        want.to_bits(),
                        "{m}x{n}x{k} [{r}, {j}]"
                    );
                }
            }
            let last = gemm(&w, n, &x[(m - 1) * k..], 1, k);
            assert_eq!(last, ours[(m - 1) * n..], "{m}x{n}x{k}: the last row alone");
        }
    }
}
