//! 3-D rotary positions (M-RoPE) of GLM-4.1V's text model, as transformers'
//! `Glm4vModel.get_rope_index` builds them: a text token has one position on all three axes
//! (temporal, height, width); the rows of an image with a `rows × cols` token grid starting at
//! position `p` get `(p, p + r, p + c)`, and the text after it continues at `p + max(rows, cols)`.
//! Tokens after the prompt (generated or resumed) continue one by one from the prompt's largest
//! position plus one, on all axes (transformers' `rope_deltas`).
//!
//! A prompt without images gets `(i, i, i)`: exactly the positions of ordinary RoPE.

use crate::anyres::TileGrid;
use crate::error::{ModelError, Result};
use crate::prompt::PreparedPrompt;

/// The 3-D positions of a prompt's rows, and where the positions after it start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RopePositions {
    rows: Vec<[u32; 3]>,
    /// Position of the first row after the prompt (all three axes).
    next: u32,
}

impl RopePositions {
    /// The positions of `prompt`, whose image spans hold, in order, the rows of the images with
    /// token grids `grids` (an image's span may hold several grids back to back: the image's own,
    /// then its regions'). Each span must be covered by whole grids exactly, and every grid used.
    pub fn for_prompt(prompt: &PreparedPrompt, grids: &[TileGrid]) -> Result<Self> {
        let mut rows = Vec::with_capacity(prompt.ids.len());
        let mut pos: u32 = 0;
        let mut grids = grids.iter();
        let mut at = 0;
        let text = |rows: &mut Vec<[u32; 3]>, pos: &mut u32, n: usize| {
            for _ in 0..n {
                rows.push([*pos; 3]);
                *pos += 1;
            }
        };
        for (i, &(start, len)) in prompt.image_spans.iter().enumerate() {
            text(&mut rows, &mut pos, start - at);
            let mut left = len;
            while left > 0 {
                let g = grids.next().ok_or_else(|| {
                    ModelError::InvalidInput(format!(
                        "image {i} has {len} rows but no token grid covers them"
                    ))
                })?;
                let n = (g.rows * g.cols) as usize;
                if n == 0 || n > left {
                    return Err(ModelError::InvalidInput(format!(
                        "a {}x{} token grid does not fit the {left} rows left of image {}",
                        g.rows, g.cols, i
                    )));
                }
                for r in 0..g.rows {
                    for c in 0..g.cols {
                        rows.push([pos, pos + r, pos + c]);
                    }
                }
                pos += g.rows.max(g.cols);
                left -= n;
            }
            at = start + len;
        }
        text(&mut rows, &mut pos, prompt.ids.len() - at);
        if grids.next().is_some() {
            return Err(ModelError::InvalidInput(format!(
                "more token grids than the {} image(s) of the prompt hold",
                prompt.image_spans.len()
            )));
        }
        Ok(RopePositions { rows, next: pos })
    }

    /// Prompt rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The position of row `index`: a prompt row's own, or for the rows after the prompt,
    /// one more per row from the prompt's largest position plus one.
    pub fn at(&self, index: usize) -> [u32; 3] {
        match self.rows.get(index) {
            Some(&p) => p,
            None => [self.next + (index - self.rows.len()) as u32; 3],
        }
    }

    /// The prompt's largest position plus one.
    pub fn next(&self) -> u32 {
        self.next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(ids: usize, spans: &[(usize, usize)]) -> PreparedPrompt {
        PreparedPrompt {
            ids: vec![0; ids],
            image_spans: spans.to_vec(),
        }
    }

    #[test]
    fn text_only_is_ordinary_rope() {
        let p = RopePositions::for_prompt(&prompt(4, &[]), &[]).unwrap();
        assert_eq!(p.len(), 4);
        assert_eq!(p.at(2), [2, 2, 2]);
        assert_eq!(p.at(6), [6, 6, 6]);
    }

    #[test]
    fn image_rows_follow_their_grid_and_text_continues_after_the_longer_side() {
        // 2 text, a 2x3 image, 1 text, then a generated row.
        let p = RopePositions::for_prompt(&prompt(9, &[(2, 6)]), &[TileGrid { rows: 2, cols: 3 }])
            .unwrap();
        assert_eq!(p.at(1), [1, 1, 1]);
        assert_eq!(p.at(2), [2, 2, 2]);
        assert_eq!(p.at(4), [2, 2, 4]);
        assert_eq!(p.at(5), [2, 3, 2]);
        assert_eq!(p.at(7), [2, 3, 4]);
        assert_eq!(p.at(8), [5, 5, 5]);
        assert_eq!(p.next(), 6);
        assert_eq!(p.at(9), [6, 6, 6]);
    }

    #[test]
    fn a_span_may_hold_several_grids_but_must_be_covered_exactly() {
        let two = [TileGrid { rows: 1, cols: 2 }, TileGrid { rows: 2, cols: 1 }];
        let p = RopePositions::for_prompt(&prompt(5, &[(1, 4)]), &two).unwrap();
        assert_eq!(p.at(3), [3, 3, 3]);
        assert_eq!(p.at(4), [3, 4, 3]);
        assert!(RopePositions::for_prompt(&prompt(5, &[(1, 3)]), &two).is_err());
        assert!(RopePositions::for_prompt(&prompt(5, &[(1, 4)]), &two[..1]).is_err());
        assert!(RopePositions::for_prompt(&prompt(5, &[]), &two).is_err());
    }
}
