//! An `[rows, stride]` f32 output filled by parallel tasks, each in its own block of columns
//! (a GEMM task owns some output columns of every row): the blocks are disjoint by
//! construction, so the tasks write straight into the result, with no per-task buffer to
//! gather afterwards.

use rayon::prelude::*;

/// Runs `task(t, columns)` on the rayon pool for every block `t` of `width` columns of `dst`
/// (`rows × stride`, row-major; the last block narrower).
pub(crate) fn par_column_blocks(
    dst: &mut [f32],
    (rows, stride): (usize, usize),
    width: usize,
    task: impl Fn(usize, &Columns<'_>) + Sync,
) {
    assert!(dst.len() == rows * stride && width > 0);
    let base = Base(dst.as_mut_ptr());
    let base = &base;
    (0..stride.div_ceil(width)).into_par_iter().for_each(|t| {
        let col0 = t * width;
        let columns = Columns {
            base,
            rows,
            stride,
            col0,
            cols: width.min(stride - col0),
        };
        task(t, &columns)
    });
}

/// The start of the output, shared by the tasks.
struct Base(*mut f32);
// SAFETY: the tasks write disjoint elements (see `Columns`).
unsafe impl Sync for Base {}

/// Columns `col0..col0 + cols` of every row: one task's part of the output. Only
/// [`par_column_blocks`] makes them, one per block, while it holds the output borrowed: no two
/// overlap, and the output outlives them.
pub(crate) struct Columns<'a> {
    base: &'a Base,
    rows: usize,
    stride: usize,
    col0: usize,
    cols: usize,
}

impl Columns<'_> {
    /// Columns in this block.
    pub(crate) fn cols(&self) -> usize {
        self.cols
    }

    /// Writes `v` at row `r`, the block's columns `c..c + v.len()`.
    pub(crate) fn put(&self, r: usize, c: usize, v: &[f32]) {
        assert!(r < self.rows && c + v.len() <= self.cols);
        // SAFETY: in bounds of the output (checked above: row `r < rows`, columns within
        // this block, which lies within `stride`), and no other task writes this block.
        unsafe {
            std::ptr::copy_nonoverlapping(
                v.as_ptr(),
                self.base.0.add(r * self.stride + self.col0 + c),
                v.len(),
            )
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_element_is_written_by_its_block() {
        let (rows, stride, width) = (5, 23, 4);
        let mut dst = vec![-1f32; rows * stride];
        par_column_blocks(&mut dst, (rows, stride), width, |t, cols| {
            assert_eq!(cols.cols(), width.min(stride - t * width));
            for r in 0..rows {
                let v: Vec<f32> = (0..cols.cols())
                    .map(|c| (r * stride + t * width + c) as f32)
                    .collect();
                cols.put(r, 0, &v);
            }
        });
        assert_eq!(
            dst,
            (0..rows * stride).map(|i| i as f32).collect::<Vec<_>>()
        );
    }
}
