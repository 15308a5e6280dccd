//! Quantized weights repacked for the int8 GEMM ([`super::qgemm`]), the activation rows
//! quantized to match, and the products in portable code (the reference every vector kernel
//! equals bit for bit).
//!
//! The layout is llama.cpp's repack idea at the width of an AVX-512 register: [`GROUP`] weight
//! rows (output columns) are interleaved four bytes at a time, so one 64-byte line holds the
//! same four `k` positions of 16 columns. One `vpdpbusd` of that line with four activation
//! bytes broadcast to every lane adds four products to each of 16 outputs: one loaded line
//! feeds every activation row of a tile, one broadcast feeds 16 columns.
//!
//! Weights are the unsigned operand (`u8`), activations the signed one (`i8`):
//! - q8_0 values (−128..127) are stored plus 128; the excess, 128 · Σ x over the block, is known
//!   from the activation row and starts the block's integer sum negated;
//! - q4_K values are 0..15 already; its 6-bit sub-block scales multiply the integer sums, its
//!   mins the activation's block sums, as GGML defines the format.
//!
//! Dequantization semantics are unchanged: a q8_0 weight is still `d · q` with the same f32 `d`,
//! a q4_K weight `d · sc · q − dmin · m` with the same f16 `d` and `dmin` and 6-bit `sc`, `m`.
//! Integer sums are exact, so the only roundings are the per-block float steps, which are one
//! fixed chain per output element whatever the tile: a row gets the same numbers in a batch as
//! alone.

use half::f16;

/// Weight rows (output columns) interleaved per group: the f32/i32 lanes of a 512-bit register.
pub(crate) const GROUP: usize = 16;
/// Values per q8_0 block.
pub(crate) const Q8_BLOCK: usize = 32;
/// Values per q4_K super-block.
pub(crate) const QK: usize = 256;
/// Lines per q8_0 block of one group: 8 lines of values, 1 of scales.
pub(crate) const Q8_LINES: usize = Q8_BLOCK / 4 + 1;
/// Lines per q4_K super-block of one group: 32 lines of values (two sub-blocks' nibbles in each
/// byte), 2 of scales, 2 of mins, 1 of `d`, 1 of `dmin`.
pub(crate) const Q4K_LINES: usize = 32 + 2 + 2 + 1 + 1;

/// 64 bytes on a 64-byte boundary: one register's worth, never straddling cache lines.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct Line(pub [u8; 64]);

impl Line {
    const ZERO: Line = Line([0; 64]);

    fn f32s(v: &[f32; GROUP]) -> Line {
        let mut l = Line::ZERO;
        for (c, x) in v.iter().enumerate() {
            l.0[4 * c..4 * c + 4].copy_from_slice(&x.to_le_bytes());
        }
        l
    }

    pub(crate) fn f32_at(&self, c: usize) -> f32 {
        f32::from_le_bytes(self.0[4 * c..4 * c + 4].try_into().expect("4 bytes"))
    }
}

/// Which format a packed matrix holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    Q8_0,
    Q4K,
}

impl Format {
    /// Values of `k` per block.
    pub(crate) fn block(self) -> usize {
        match self {
            Format::Q8_0 => Q8_BLOCK,
            Format::Q4K => QK,
        }
    }

    /// Lines per block per group.
    pub(crate) fn lines(self) -> usize {
        match self {
            Format::Q8_0 => Q8_LINES,
            Format::Q4K => Q4K_LINES,
        }
    }
}

/// An `[n, k]` weight in the interleaved layout: `[group][block][line]`, groups of [`GROUP`]
/// rows (the last one padded with zero weights).
pub(crate) struct Packed {
    pub format: Format,
    pub n: usize,
    pub k: usize,
    pub lines: Vec<Line>,
}

impl Packed {
    pub(crate) fn groups(&self) -> usize {
        self.n.div_ceil(GROUP)
    }

    pub(crate) fn blocks(&self) -> usize {
        self.k / self.format.block()
    }

    /// The lines of group `g`.
    pub(crate) fn group(&self, g: usize) -> &[Line] {
        let per = self.blocks() * self.format.lines();
        &self.lines[g * per..(g + 1) * per]
    }

    /// q8_0 rows (`qs` row-major `[n, k]`, one f32 scale per block of 32) repacked.
    pub(crate) fn q8_0(qs: &[i8], d: &[f32], (n, k): (usize, usize)) -> Packed {
        assert!(k.is_multiple_of(Q8_BLOCK) && qs.len() == n * k && d.len() * Q8_BLOCK == n * k);
        let kb = k / Q8_BLOCK;
        let mut lines = Vec::with_capacity(n.div_ceil(GROUP) * kb * Q8_LINES);
        for g in 0..n.div_ceil(GROUP) {
            let col = |c: usize| Some(g * GROUP + c).filter(|&j| j < n);
            for b in 0..kb {
                for quad in 0..Q8_BLOCK / 4 {
                    // Padding columns hold 128 (the value 0).
                    let mut l = Line([128; 64]);
                    for c in 0..GROUP {
                        let Some(j) = col(c) else { continue };
                        for i in 0..4 {
                            let q = qs[j * k + b * Q8_BLOCK + 4 * quad + i];
                            l.0[4 * c + i] = (q as i16 + 128) as u8;
                        }
                    }
                    lines.push(l);
                }
                lines.push(Line::f32s(&std::array::from_fn(|c| {
                    col(c).map_or(0.0, |j| d[j * kb + b])
                })));
            }
        }
        Packed {
            format: Format::Q8_0,
            n,
            k,
            lines,
        }
    }

    /// q4_K blocks (GGML's 144-byte `block_q4_K`, `k / 256` per row, rows in order) repacked.
    pub(crate) fn q4k(blocks: &[[u8; 144]], (n, k): (usize, usize)) -> Packed {
        assert!(k.is_multiple_of(QK) && blocks.len() * QK == n * k);
        let kb = k / QK;
        let mut lines = Vec::with_capacity(n.div_ceil(GROUP) * kb * Q4K_LINES);
        for g in 0..n.div_ceil(GROUP) {
            for b in 0..kb {
                let cols: [Option<Q4KBlock>; GROUP] = std::array::from_fn(|c| {
                    let j = g * GROUP + c;
                    (j < n).then(|| Q4KBlock::parse(&blocks[j * kb + b]))
                });
                let val = |c: usize, p: usize| cols[c].as_ref().map_or(0, |x| x.q[p]);
                for pair in 0..4 {
                    for quad in 0..8 {
                        let mut l = Line::ZERO;
                        for c in 0..GROUP {
                            for i in 0..4 {
                                let p = 64 * pair + 4 * quad + i;
                                l.0[4 * c + i] = val(c, p) | (val(c, p + 32) << 4);
                            }
                        }
                        lines.push(l);
                    }
                }
                let mut sc = [Line::ZERO; 2];
                let mut mn = [Line::ZERO; 2];
                for (c, x) in cols.iter().enumerate() {
                    let Some(x) = x else { continue };
                    for j in 0..8 {
                        // Scales `[sub-block][column]`; mins `[pair][column][2]`, each column's
                        // two mins one 16-bit pair once widened.
                        let s = j * GROUP + c;
                        sc[s / 64].0[s % 64] = x.sc[j];
                        let m = (j / 2) * 2 * GROUP + 2 * c + j % 2;
                        mn[m / 64].0[m % 64] = x.m[j];
                    }
                }
                lines.extend(sc);
                lines.extend(mn);
                lines.push(Line::f32s(&std::array::from_fn(|c| {
                    cols[c].as_ref().map_or(0.0, |x| x.d)
                })));
                lines.push(Line::f32s(&std::array::from_fn(|c| {
                    cols[c].as_ref().map_or(0.0, |x| x.dmin)
                })));
            }
        }
        Packed {
            format: Format::Q4K,
            n,
            k,
            lines,
        }
    }

    /// Row `j` of the matrix, dequantized (an embedding lookup; the tests' reference).
    pub(crate) fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        assert!(j < self.n && out.len() == self.k);
        let (g, c) = (j / GROUP, j % GROUP);
        let lines = self.group(g);
        let lpb = self.format.lines();
        for (b, out) in out.chunks_exact_mut(self.format.block()).enumerate() {
            let bl = &lines[b * lpb..(b + 1) * lpb];
            match self.format {
                Format::Q8_0 => {
                    let d = bl[Q8_BLOCK / 4].f32_at(c);
                    for (p, o) in out.iter_mut().enumerate() {
                        *o = (bl[p / 4].0[4 * c + p % 4] as i32 - 128) as f32 * d;
                    }
                }
                Format::Q4K => {
                    let (d, dmin) = (bl[36].f32_at(c), bl[37].f32_at(c));
                    for (p, o) in out.iter_mut().enumerate() {
                        let (sub, within) = (p / 32, p % 32);
                        let byte = bl[(sub / 2) * 8 + within / 4].0[4 * c + within % 4];
                        let q = if sub % 2 == 0 { byte & 15 } else { byte >> 4 };
                        let s = sub * GROUP + c;
                        let m = (sub / 2) * 2 * GROUP + 2 * c + sub % 2;
                        let (sc, mn) = (bl[32 + s / 64].0[s % 64], bl[34 + m / 64].0[m % 64]);
                        *o = d * sc as f32 * q as f32 - dmin * mn as f32;
                    }
                }
            }
        }
    }
}

/// One q4_K super-block, unpacked: 256 values 0..15, eight 6-bit scales and mins, `d`, `dmin`.
struct Q4KBlock {
    q: [u8; QK],
    sc: [u8; 8],
    m: [u8; 8],
    d: f32,
    dmin: f32,
}

impl Q4KBlock {
    /// GGML's `block_q4_K`: `d`, `dmin` (f16), 12 bytes of packed 6-bit scales and mins, then
    /// 128 bytes of nibbles (each 64 values: 32 low nibbles, then the same bytes' high ones).
    fn parse(b: &[u8; 144]) -> Q4KBlock {
        let half = |i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
        let scales = &b[4..16];
        let mut sc = [0u8; 8];
        let mut m = [0u8; 8];
        for j in 0..8 {
            (sc[j], m[j]) = if j < 4 {
                (scales[j] & 63, scales[j + 4] & 63)
            } else {
                (
                    (scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4),
                    (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
                )
            };
        }
        let qs = &b[16..];
        let q = std::array::from_fn(|p| {
            let (chunk, l) = (p / 64, p % 64);
            let byte = qs[32 * chunk + l % 32];
            if l < 32 {
                byte & 15
            } else {
                byte >> 4
            }
        });
        Q4KBlock {
            q,
            sc,
            m,
            d: half(0),
            dmin: half(2),
        }
    }
}

/// Activation rows quantized for one format: int8 values row-major `[m, k]`, one f32 scale per
/// block and the per-32 block sums the weights' offsets need (q8_0: `−128 · Σ`, the start of each
/// block's sum; q4_K: two sub-blocks' sums as one pair of i16 per `i32`).
pub(crate) struct QActs {
    pub format: Format,
    pub k: usize,
    pub qs: Vec<i8>,
    pub d: Vec<f32>,
    pub sums: Vec<i32>,
}

impl QActs {
    /// Sums per row.
    pub(crate) fn sums_per_row(format: Format, k: usize) -> usize {
        match format {
            Format::Q8_0 => k / Q8_BLOCK,
            Format::Q4K => k / QK * 4,
        }
    }

    /// The `m` rows of `x` (`[m, k]`), quantized row by row (rows in parallel when there are
    /// several): a row's numbers never depend on the others.
    pub(crate) fn quantize(format: Format, x: &[f32], k: usize) -> QActs {
        use rayon::prelude::*;
        let m = x.len() / k;
        let (kb, ns) = (k / format.block(), Self::sums_per_row(format, k));
        let mut a = QActs {
            format,
            k,
            qs: vec![0; m * k],
            d: vec![0.0; m * kb],
            sums: vec![0; m * ns],
        };
        type Row<'a> = ((&'a [f32], &'a mut [i8]), (&'a mut [f32], &'a mut [i32]));
        let row = |((x, qs), (d, sums)): Row<'_>| quantize_row(format, x, qs, d, sums);
        if m > 1 {
            x.par_chunks(k)
                .zip(a.qs.par_chunks_mut(k))
                .zip(a.d.par_chunks_mut(kb).zip(a.sums.par_chunks_mut(ns)))
                .for_each(row);
        } else {
            x.chunks(k)
                .zip(a.qs.chunks_mut(k))
                .zip(a.d.chunks_mut(kb).zip(a.sums.chunks_mut(ns)))
                .for_each(row);
        }
        a
    }

    pub(crate) fn rows(&self) -> usize {
        self.qs.len() / self.k
    }

    /// Row `r`: its values, scales and sums.
    pub(crate) fn row(&self, r: usize) -> ActRow<'_> {
        let (kb, ns) = (
            self.k / self.format.block(),
            Self::sums_per_row(self.format, self.k),
        );
        ActRow {
            qs: &self.qs[r * self.k..(r + 1) * self.k],
            d: &self.d[r * kb..(r + 1) * kb],
            sums: &self.sums[r * ns..(r + 1) * ns],
        }
    }
}

/// One quantized activation row.
#[derive(Clone, Copy)]
pub(crate) struct ActRow<'a> {
    pub qs: &'a [i8],
    pub d: &'a [f32],
    pub sums: &'a [i32],
}

/// Quantizes one row: q8_0 as GGML's `quantize_row_q8_0` with an f32 scale (`d = max|x| / 127`,
/// `q = round(x / d)`), q4_K's partner as GGML's `quantize_row_q8_K` (`q = round(−127 / max · x)`
/// where `max` is the value of largest magnitude, `d` its inverse).
fn quantize_row(format: Format, x: &[f32], qs: &mut [i8], d: &mut [f32], sums: &mut [i32]) {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        let block = format.block();
        assert!(x.len() == qs.len() && x.len() == d.len() * block);
        assert!(sums.len() == d.len() * (block / 64).max(1));
        for (b, (x, q)) in x
            .chunks_exact(block)
            .zip(qs.chunks_exact_mut(block))
            .enumerate()
        {
            let sums = match format {
                Format::Q8_0 => &mut sums[b..b + 1],
                Format::Q4K => &mut sums[4 * b..4 * b + 4],
            };
            // SAFETY: the CPU has AVX-512 F and BW; the block lengths are checked above.
            d[b] = unsafe { quantize_block_avx512(format, x, q, sums) };
        }
        return;
    }
    quantize_row_scalar(format, x, qs, d, sums)
}

#[cfg(target_arch = "x86_64")]
fn avx512() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
    })
}

/// One block of [`quantize_row_scalar`] in AVX-512 registers: the same numbers for finite
/// inputs (maxima are exact, and the scale, the products and the rounding are the same
/// operations lane by lane); its scale is returned, its values and sums written.
///
/// # Safety
/// AVX-512 F and BW; `x` and `q` hold one block, `sums` the block's sums (1 or 4).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_block_avx512(format: Format, x: &[f32], q: &mut [i8], sums: &mut [i32]) -> f32 {
    use std::arch::x86_64::*;
    let regs = x.len() / 16;
    // SAFETY (every load and store): register `i < regs` of the block.
    let load = |i: usize| unsafe { _mm512_loadu_ps(x.as_ptr().add(16 * i)) };
    let mut amax = _mm512_setzero_ps();
    for i in 0..regs {
        amax = _mm512_max_ps(_mm512_abs_ps(load(i)), amax);
    }
    let amax = _mm512_reduce_max_ps(amax);
    let (scale, inv) = match format {
        Format::Q8_0 => {
            let d = amax / 127.0;
            (d, if d != 0.0 { 1.0 / d } else { 0.0 })
        }
        Format::Q4K => {
            // The first value of the largest magnitude, with its sign.
            let mut max = 0f32;
            for i in 0..regs {
                let hit =
                    _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(_mm512_abs_ps(load(i)), _mm512_set1_ps(amax));
                if hit != 0 {
                    max = x[16 * i + hit.trailing_zeros() as usize];
                    break;
                }
            }
            if amax == 0.0 {
                (0.0, 0.0)
            } else {
                let iscale = -127.0 / max;
                (1.0 / iscale, iscale)
            }
        }
    };
    let sign = _mm512_set1_epi32(i32::MIN);
    let half = _mm512_castps_si512(_mm512_set1_ps(0.499_999_97));
    let mut sum = [_mm512_setzero_si512(); 2];
    for i in 0..regs {
        let v = _mm512_mul_ps(load(i), _mm512_set1_ps(inv));
        let signed_half = _mm512_or_si512(_mm512_and_si512(_mm512_castps_si512(v), sign), half);
        let r = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(_mm512_add_ps(
            v,
            _mm512_castsi512_ps(signed_half),
        ));
        let r = _mm512_min_ps(
            _mm512_max_ps(r, _mm512_set1_ps(-128.0)),
            _mm512_set1_ps(127.0),
        );
        let n = _mm512_cvttps_epi32(r);
        unsafe {
            _mm_storeu_si128(
                q.as_mut_ptr().add(16 * i) as *mut __m128i,
                _mm512_cvtepi32_epi8(n),
            )
        };
        sum[i % 2] = _mm512_add_epi32(sum[i % 2], n);
        if i % 2 == 1 {
            // Each 32 values' sum.
            let s = _mm512_reduce_add_epi32(_mm512_add_epi32(sum[0], sum[1]));
            sum = [_mm512_setzero_si512(); 2];
            match format {
                Format::Q8_0 => sums[0] = -128 * s,
                Format::Q4K => {
                    let (pair, hi) = (i / 4, (i / 2) % 2 == 1);
                    let cur = sums[pair] as u32;
                    sums[pair] = if hi {
                        (cur & 0xFFFF | ((s as u16 as u32) << 16)) as i32
                    } else {
                        (s as u16 as u32) as i32
                    };
                }
            }
        }
    }
    scale
}

/// [`quantize_row`] in portable code (the reference of the vector version).
fn quantize_row_scalar(format: Format, x: &[f32], qs: &mut [i8], d: &mut [f32], sums: &mut [i32]) {
    let block = format.block();
    for (b, (x, q)) in x
        .chunks_exact(block)
        .zip(qs.chunks_exact_mut(block))
        .enumerate()
    {
        let (scale, inv) = match format {
            Format::Q8_0 => {
                let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                (d, if d != 0.0 { 1.0 / d } else { 0.0 })
            }
            Format::Q4K => {
                let (mut amax, mut max) = (0f32, 0f32);
                for &v in x {
                    if amax < v.abs() {
                        amax = v.abs();
                        max = v;
                    }
                }
                if amax == 0.0 {
                    (0.0, 0.0)
                } else {
                    let iscale = -127.0 / max;
                    (1.0 / iscale, iscale)
                }
            }
        };
        for (q, &v) in q.iter_mut().zip(x) {
            *q = round_half_away(v * inv).clamp(-128.0, 127.0) as i8;
        }
        d[b] = scale;
        let sum32 = |i: usize| {
            q[32 * i..32 * i + 32]
                .iter()
                .map(|&v| v as i32)
                .sum::<i32>()
        };
        match format {
            Format::Q8_0 => sums[b] = -128 * sum32(0),
            Format::Q4K => {
                for pair in 0..4 {
                    let (lo, hi) = (sum32(2 * pair), sum32(2 * pair + 1));
                    sums[4 * b + pair] = (lo as u16 as u32 | ((hi as u16 as u32) << 16)) as i32;
                }
            }
        }
    }
}

/// `v.round()` (ties away from zero, as GGML's `roundf`) for |v| ≤ 2²², in a form that
/// vectorizes: adding the largest float below one half, with `v`'s sign, then truncating, moves
/// exactly the values at or past a half to the next integer.
#[inline(always)]
fn round_half_away(v: f32) -> f32 {
    (v + 0.499_999_97f32.copysign(v)).trunc()
}

/// Output element `(r, column c of group g)` in portable code: the same integer sums and the
/// same float steps, in the same order, as the vector kernels.
#[cfg(test)]
pub(crate) fn product_scalar(w: &Packed, g: usize, c: usize, x: ActRow<'_>) -> f32 {
    let lines = w.group(g);
    let lpb = w.format.lines();
    let mut acc = 0f32;
    for b in 0..w.blocks() {
        let bl = &lines[b * lpb..(b + 1) * lpb];
        match w.format {
            Format::Q8_0 => {
                let xq = &x.qs[b * Q8_BLOCK..(b + 1) * Q8_BLOCK];
                let mut isum = x.sums[b];
                for (p, &xv) in xq.iter().enumerate() {
                    isum += bl[p / 4].0[4 * c + p % 4] as i32 * xv as i32;
                }
                let scale = bl[Q8_BLOCK / 4].f32_at(c) * x.d[b];
                acc = (isum as f32).mul_add(scale, acc);
            }
            Format::Q4K => {
                let xq = &x.qs[b * QK..(b + 1) * QK];
                let mut total = 0i32;
                let mut mins = 0i32;
                for pair in 0..4 {
                    let (mut i0, mut i1) = (0i32, 0i32);
                    for p in 0..32 {
                        let byte = bl[pair * 8 + p / 4].0[4 * c + p % 4] as i32;
                        i0 += (byte & 15) * xq[64 * pair + p] as i32;
                        i1 += (byte >> 4) * xq[64 * pair + 32 + p] as i32;
                    }
                    let sc =
                        |j: usize| bl[32 + (j * GROUP + c) / 64].0[(j * GROUP + c) % 64] as i32;
                    total = total.wrapping_add(i0 * sc(2 * pair));
                    total = total.wrapping_add(i1 * sc(2 * pair + 1));
                    let m = |h: usize| {
                        let at = pair * 2 * GROUP + 2 * c + h;
                        bl[34 + at / 64].0[at % 64] as i32
                    };
                    let s = x.sums[4 * b + pair];
                    mins += m(0) * (s as i16) as i32 + m(1) * (s >> 16);
                }
                let (d, dmin) = (bl[36].f32_at(c), bl[37].f32_at(c));
                acc = (total as f32).mul_add(d * x.d[b], acc);
                acc = (-(mins as f32)).mul_add(dmin * x.d[b], acc);
            }
        }
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector quantization of activation rows is the portable one, value for value, on
    /// random rows and edge blocks: all zeros, one huge value, equal magnitudes of both signs
    /// (q4_K's scale takes the first one's sign), values that land on exact halves.
    #[test]
    fn vector_and_portable_activation_quantization_agree() {
        let k = 512;
        let mut x: Vec<f32> = (0..4 * k)
            .map(|i| {
                ((i as u32).wrapping_mul(2_654_435_761) >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect();
        x[..64].fill(0.0);
        x[256 + 40] = 1.0e6;
        x[k..k + 256].fill(0.0);
        x[k + 3] = -2.0;
        x[k + 9] = 2.0;
        for (i, v) in x[2 * k..3 * k].iter_mut().enumerate() {
            // 127 · (i mod 5) / 4 / 127 · 4 …: quarter steps of the scale, many exact halves.
            *v = (i % 9) as f32 * 0.125 - 0.5;
        }
        for format in [Format::Q8_0, Format::Q4K] {
            let a = QActs::quantize(format, &x, k);
            let kb = k / format.block();
            let ns = QActs::sums_per_row(format, k);
            for r in 0..4 {
                let (mut qs, mut d, mut sums) = (vec![0; k], vec![0.0; kb], vec![0; ns]);
                quantize_row_scalar(format, &x[r * k..(r + 1) * k], &mut qs, &mut d, &mut sums);
                let row = a.row(r);
                assert_eq!(row.qs, &qs[..], "{format:?} row {r}: values");
                assert_eq!(row.d, &d[..], "{format:?} row {r}: scales");
                assert_eq!(row.sums, &sums[..], "{format:?} row {r}: sums");
            }
            assert!(a.row(0).qs[..32].iter().all(|&q| q == 0));
        }
        // q4_K: -2 comes before 2, so it sets the scale (-127 / -2): -2 maps to -127 (2 first
        // would have mapped it to 127).
        let a = QActs::quantize(Format::Q4K, &x[k..2 * k], k);
        assert_eq!((a.row(0).qs[3], a.row(0).qs[9]), (-127, 127));
    }
}
