//! Rotary position embeddings of the decoder families: transformers' inverse frequencies (with
//! linear / llama3 scaling, over the rotary width), the cos/sin table, rotate-half (LLaMA) or
//! interleaved pairs (GLM) on the rotary part of each head, and GLM-4.1V's M-RoPE, whose
//! frequencies follow the temporal, height or width position ([`crate::mrope`]).

use candle_core::{DType, Device, Tensor, D};

use crate::config::{RopeScaling, TextConfig};
use crate::error::Result;

/// Inverse RoPE frequencies as transformers computes them, including llama3 / linear scaling, over
/// the rotary width `rope_dim` (the whole head for LLaMA, `partial_rotary_factor` of it for GLM).
fn inv_freq(c: &TextConfig) -> Vec<f32> {
    let d = c.rope_dim;
    let base: Vec<f32> = (0..d)
        .step_by(2)
        .map(|i| 1.0 / (c.rope_theta as f32).powf(i as f32 / d as f32))
        .collect();
    match c.rope_scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor as f32).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let old = original_max_position_embeddings as f32;
            let (factor, low, high) = (
                factor as f32,
                low_freq_factor as f32,
                high_freq_factor as f32,
            );
            let low_wavelen = old / low;
            let high_wavelen = old / high;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    let scaled = if wavelen > low_wavelen { f / factor } else { f };
                    // transformers: ~(wavelen < high) & ~(wavelen > low); wavelen is never NaN here.
                    let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                    if medium {
                        let smooth = (old / wavelen - low) / (high - low);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    }
                })
                .collect()
        }
    }
}

pub(super) struct Rope {
    cos: Tensor,
    sin: Tensor,
    /// Leading values of each head that are rotated; the rest pass through unchanged.
    rotary_dim: usize,
    interleaved: bool,
    /// M-RoPE: per axis (temporal, height, width), a `[1, rotary/2]` 0/1 mask of the
    /// frequencies that follow that axis's position.
    axes: Option<[Tensor; 3]>,
}

impl Rope {
    /// Whether positions are 3-D (M-RoPE).
    pub(super) fn is_mrope(&self) -> bool {
        self.axes.is_some()
    }

    pub(super) fn new(c: &TextConfig, dtype: DType, device: &Device) -> Result<Self> {
        let inv = inv_freq(c);
        let n = c.max_position_embeddings;
        let half = inv.len();
        let mut freqs = Vec::with_capacity(n * half);
        for p in 0..n {
            freqs.extend(inv.iter().map(|f| p as f32 * f));
        }
        let freqs = Tensor::from_vec(freqs, (n, half), device)?;
        let axes = match &c.mrope_section {
            None => None,
            Some(section) => {
                // Section i follows axis i % 3 (transformers' recomposition_frequencies).
                let mut axis_of = Vec::with_capacity(half);
                for (i, &len) in section.iter().enumerate() {
                    axis_of.extend(std::iter::repeat_n(i % 3, len));
                }
                let mask = |axis: usize| {
                    let m: Vec<f32> = (0..half)
                        .map(|j| f32::from(axis_of.get(j) == Some(&axis)))
                        .collect();
                    Tensor::from_vec(m, (1, half), device)?.to_dtype(dtype)
                };
                Some([mask(0)?, mask(1)?, mask(2)?])
            }
        };
        Ok(Rope {
            cos: freqs.cos()?.to_dtype(dtype)?,
            sin: freqs.sin()?.to_dtype(dtype)?,
            rotary_dim: 2 * half,
            interleaved: c.family.interleaved_rope(),
            axes,
        })
    }

    /// `cos` and `sin` rows `[T, rotary/2]` at 3-D positions (M-RoPE): each frequency takes the
    /// angle of its axis's position. A model without M-RoPE takes the temporal position.
    pub(super) fn at_3d(
        &self,
        positions: &[[u32; 3]],
        device: &Device,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let n = positions.len();
        let axis = |a: usize| Tensor::from_vec(positions.iter().map(|p| p[a]).collect(), n, device);
        let Some(masks) = &self.axes else {
            return self.at(&axis(0)?);
        };
        let (mut cos, mut sin) = (None, None);
        for (a, mask) in masks.iter().enumerate() {
            let (c, s) = self.at(&axis(a)?)?;
            let (c, s) = (c.broadcast_mul(mask)?, s.broadcast_mul(mask)?);
            cos = Some(match cos {
                None => c,
                Some(acc) => (acc + c)?,
            });
            sin = Some(match sin {
                None => s,
                Some(acc) => (acc + s)?,
            });
        }
        Ok((cos.expect("three axes"), sin.expect("three axes")))
    }

    /// Rotates `[B, H, T, D]` at positions `pos..pos+T`.
    pub(super) fn apply(&self, x: &Tensor, pos: usize) -> candle_core::Result<Tensor> {
        let t = x.dim(2)?;
        let cos = self.cos.narrow(0, pos, t)?;
        let sin = self.sin.narrow(0, pos, t)?;
        self.apply_with(x, &cos, &sin)
    }

    /// `cos` and `sin` rows `[T, rotary/2]` at the given positions (one per row of a batch).
    pub(super) fn at(&self, positions: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        Ok((
            self.cos.index_select(positions, 0)?,
            self.sin.index_select(positions, 0)?,
        ))
    }

    /// Rotates `[B, H, T, D]` with row t at the angle of `cos[t]`, `sin[t]`: LLaMA pairs value i
    /// with i + D/2 (rotate-half); GLM pairs 2i with 2i+1 and rotates only the first `rotary_dim`
    /// values.
    pub(super) fn apply_with(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let d = x.dim(3)?;
        let rotate = |x: &Tensor| {
            if self.interleaved {
                candle_nn::rotary_emb::rope_i(&x.contiguous()?, cos, sin)
            } else {
                candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin)
            }
        };
        if self.rotary_dim == d {
            return rotate(x);
        }
        let rotated = rotate(&x.narrow(D::Minus1, 0, self.rotary_dim)?)?;
        let pass = x.narrow(D::Minus1, self.rotary_dim, d - self.rotary_dim)?;
        Tensor::cat(&[&rotated, &pass], D::Minus1)
    }
}
