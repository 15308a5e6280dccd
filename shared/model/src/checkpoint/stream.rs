//! Reading a tensor out of the memory-mapped checkpoint a slice of rows at a time, releasing the
//! mapped pages behind each slice once it is copied.
//!
//! Pages of a mapped file that the process has touched count in its resident set until they are
//! unmapped. Copying every tensor out of a mapping that stays whole until the end of loading
//! therefore peaks at the file plus the copies: about twice the weights. Here every slice's
//! pages are given back (`madvise(MADV_DONTNEED)`: the mapping stays valid, a later read faults
//! the page in again from the page cache) as soon as it has been converted, so loading holds the
//! weights loaded so far plus a few MiB. Each tensor's bytes are hashed as they are read, for the
//! part's fingerprint, so nothing is read twice.

use candle_core::quantized::k_quants::GgmlType;
use rayon::prelude::*;

use crate::qweight::Q8Rows;

/// Element types that stream (named as safetensors names them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dtype {
    F32,
    F16,
    BF16,
}

impl Dtype {
    /// From a safetensors view's dtype (by name: candle links its own safetensors version).
    pub(super) fn of(d: impl std::fmt::Debug) -> Option<Dtype> {
        match format!("{d:?}").as_str() {
            "F32" => Some(Dtype::F32),
            "F16" => Some(Dtype::F16),
            "BF16" => Some(Dtype::BF16),
            _ => None,
        }
    }

    fn width(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
        }
    }
}

/// Bytes converted per slice: large enough that the per-slice work costs nothing, small enough
/// that the mapped pages a slice holds do not show in the peak.
const SLICE_BYTES: usize = 4 << 20;

/// Converts `src` (little-endian `dtype` elements) into `dst`.
fn convert(src: &[u8], dtype: Dtype, dst: &mut [f32]) {
    match dtype {
        Dtype::F32 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            }
        }
        Dtype::F16 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = half::f16::from_le_bytes([s[0], s[1]]).to_f32();
            }
        }
        Dtype::BF16 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = half::bf16::from_le_bytes([s[0], s[1]]).to_f32();
            }
        }
    }
}

/// Gives the whole pages inside `bytes` back to the kernel (they stay mapped and readable).
fn release(bytes: &[u8]) {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as usize;
    let start = bytes.as_ptr() as usize;
    let first = start.div_ceil(page) * page;
    let end = (start + bytes.len()) / page * page;
    if end > first {
        // SAFETY: [first, end) lies inside a read-only file mapping that outlives this call;
        // MADV_DONTNEED on it only drops page-table entries (the contents read back unchanged).
        unsafe {
            libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_DONTNEED);
        }
    }
}

/// Converts `data` (rows of `cols` elements of `dtype`) to f32 a slice of whole rows at a time:
/// `each(first_row, rows)`; hashes the bytes and releases each slice's pages after it.
pub(super) fn stream_rows(
    data: &[u8],
    dtype: Dtype,
    cols: usize,
    mut each: impl FnMut(usize, &[f32]) -> candle_core::Result<()>,
) -> candle_core::Result<blake3::Hash> {
    let width = dtype.width();
    let row_bytes = (cols * width).max(1);
    let rows_per_slice = (SLICE_BYTES / row_bytes).max(1);
    let mut hasher = blake3::Hasher::new();
    let mut scratch = Vec::new();
    for (i, slice) in data.chunks(rows_per_slice * row_bytes).enumerate() {
        hasher.update(slice);
        scratch.resize(slice.len() / width, 0f32);
        convert(slice, dtype, &mut scratch);
        each(i * rows_per_slice, &scratch)?;
        release(slice);
    }
    Ok(hasher.finalize())
}

/// Converts `data` straight into `dst` (same element count), hashing and releasing as above.
pub(super) fn stream_into(
    data: &[u8],
    dtype: Dtype,
    dst: &mut [f32],
) -> candle_core::Result<blake3::Hash> {
    let width = dtype.width();
    let mut hasher = blake3::Hasher::new();
    let per_slice = SLICE_BYTES / width;
    for (slice, out) in data
        .chunks(per_slice * width)
        .zip(dst.chunks_mut(per_slice))
    {
        hasher.update(slice);
        convert(slice, dtype, out);
        release(slice);
    }
    Ok(hasher.finalize())
}

/// `data` (`[n, k]` in `dtype`) quantized to q8_0 rows ([`Q8Rows`]), a slice at a time.
pub(super) fn quantize_q8(
    data: &[u8],
    dtype: Dtype,
    (n, k): (usize, usize),
) -> candle_core::Result<(Q8Rows, blake3::Hash)> {
    let mut rows = Q8Rows::with_capacity(n * k);
    let digest = stream_rows(data, dtype, k, |_, x| {
        rows.push(x);
        Ok(())
    })?;
    Ok((rows, digest))
}

/// `data` (`[n, k]` in `dtype`) quantized into blocks of `T`, a slice of rows at a time (rows in
/// parallel: q4_K's and q6_K's scale search is the slow part of loading).
pub(super) fn quantize_rows<T: GgmlType + Send + Sync + 'static>(
    data: &[u8],
    dtype: Dtype,
    (n, k): (usize, usize),
) -> candle_core::Result<(Vec<T>, blake3::Hash)> {
    let per_row = k / T::BLCK_SIZE;
    let mut blocks = vec![T::zeros(); n * per_row];
    let digest = stream_rows(data, dtype, k, |row0, rows| {
        let count = rows.len() / k;
        rows.par_chunks(k)
            .zip(blocks[row0 * per_row..(row0 + count) * per_row].par_chunks_mut(per_row))
            .for_each(|(x, y)| T::from_float(x, y));
        Ok(())
    })?;
    Ok((blocks, digest))
}
