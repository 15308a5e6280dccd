//! Weight quantization at load (`--quantize none | q8_0 | q4_k`), in GGML's block formats.
//!
//! What is quantized, as llama.cpp's and mistral.rs's in-situ quantization do: the linear layers
//! of attention and MLP in every stage (vision q/k/v/out and fc1/fc2, projector linear_1/2,
//! decoder q/k/v/o and gate/up/down), the decoder's token embeddings and its LM head. The LM head
//! gets q6_K under `q4_k` (llama.cpp's Q4_K_M does the same: the output projection is the most
//! sensitive tensor). Norms, biases, RoPE tables, the vision patch convolution and the position
//! and class embeddings stay in the compute dtype: they are a fraction of a percent of the bytes
//! and precision-critical. A matrix whose rows (its last dimension) are not a multiple of the
//! block size (32 for q8_0, 256 for q4_k / q6_K) cannot be cut into those blocks: under `q4_k`
//! it falls back to q8_0 where its rows are a multiple of 32 (as llama.cpp falls back from its
//! k-quants: GLM-4.1V-9B's MLP down projection, 13,696 wide, would otherwise stay f32 and make the
//! q4_k decoder larger than the q8_0 one), and stays as it is otherwise. The part logs every such
//! tensor in one line ([`QuantPlan::report`]).
//!
//! Products with quantized weights (`QWeight`) read each weight once per step and compute
//! every output element with one fixed chain whatever the number of rows, so a sequence decodes
//! the same in a batch as alone. Where the CPU has AVX-512 VNNI, q8_0 and q4_K matrices are
//! repacked at load for an int8 GEMM (inputs rounded to 8 bits per block, as llama.cpp does:
//! the prefill's products run on integer multiply-adds); elsewhere q8_0 uses our own kernel
//! (int8 widened to f32 in registers, f32 inputs) and q4_K / q6_K candle's k-quant dot
//! products (inputs rounded to 8 bits per block of 256), all split over output columns on the
//! rayon pool.

use std::sync::{Arc, Mutex};

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use crate::error::{ModelError, Result};
use crate::linear::Linear;
use crate::qweight::QWeight;

/// How a stage stores its weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum Quantization {
    /// As the compute dtype (f32 / f16).
    #[default]
    None,
    /// 8-bit weights in blocks of 32 with one f16 scale (8.5 bits per weight).
    Q8_0,
    /// 4-bit weights in super-blocks of 256 (8 sub-blocks with 6-bit scales and mins; 4.5 bits
    /// per weight); the LM head in q6_K.
    Q4K,
}

impl Quantization {
    /// Every mode, as the CLI spells it.
    pub const NAMES: [&'static str; 3] = ["none", "q8_0", "q4_k"];

    pub fn name(self) -> &'static str {
        match self {
            Quantization::None => "none",
            Quantization::Q8_0 => "q8_0",
            Quantization::Q4K => "q4_k",
        }
    }

    pub fn is_none(self) -> bool {
        self == Quantization::None
    }

    /// What a stage adds to its fingerprint's config string: nothing when unquantized, the mode
    /// otherwise.
    pub fn fingerprint_suffix(self) -> String {
        match self {
            Quantization::None => String::new(),
            // Rows a k-quant block cannot cut are q8_0 (they were f32 before): features cached
            // by an older build must not be served as this one's.
            Quantization::Q4K => format!("|quantize={self}|fallback=q8_0"),
            Quantization::Q8_0 => format!("|quantize={self}"),
        }
    }

    /// The block format of a tensor of `role` (`None`: kept in the compute dtype).
    fn format(self, role: Role) -> Option<GgmlDType> {
        match (self, role) {
            (Quantization::None, _) => None,
            (Quantization::Q8_0, _) => Some(GgmlDType::Q8_0),
            (Quantization::Q4K, Role::Head) => Some(GgmlDType::Q6K),
            (Quantization::Q4K, _) => Some(GgmlDType::Q4K),
        }
    }

    /// The block format a `[rows, cols]` weight of `role` is stored in: `None` where it stays
    /// dense (no quantization, or `cols` not a multiple of 32); a k-quant that 256 does not
    /// divide falls back to q8_0 (llama.cpp's rule).
    fn format_for(self, role: Role, cols: usize) -> Option<GgmlDType> {
        let format = self.format(role)?;
        if cols.is_multiple_of(format.block_size()) {
            Some(format)
        } else if cols.is_multiple_of(GgmlDType::Q8_0.block_size()) {
            Some(GgmlDType::Q8_0)
        } else {
            None
        }
    }

    /// Bytes a decoder's `[rows, cols]` linear layer (`head`: its LM head) occupies in this mode,
    /// `dense_bytes` per value where it stays dense: what one decode step reads of it.
    pub fn matrix_bytes(self, (rows, cols): (usize, usize), head: bool, dense_bytes: usize) -> u64 {
        let role = if head { Role::Head } else { Role::Layer };
        let values = (rows * cols) as u64;
        match self.format_for(role, cols) {
            Some(f) => values / f.block_size() as u64 * f.type_size() as u64,
            None => values * dense_bytes as u64,
        }
    }
}

impl std::fmt::Display for Quantization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Quantization {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "none" | "f32" => Ok(Quantization::None),
            "q8_0" => Ok(Quantization::Q8_0),
            "q4_k" => Ok(Quantization::Q4K),
            other => Err(ModelError::Unsupported(format!(
                "quantization '{other}' (supported: {})",
                Quantization::NAMES.join(", ")
            ))),
        }
    }
}

/// What a weight is used for, which decides its block format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// A linear layer of attention, MLP or the projector.
    Layer,
    /// The decoder's token embeddings.
    Embedding,
    /// The decoder's output projection.
    Head,
}

/// Reads one weight straight from the checkpoint into blocks (the checkpoint part implements it:
/// rows are converted and quantized a slice at a time, so the f32 matrix never exists whole).
pub(crate) trait QuantSource: Send + Sync {
    /// `name` is the logical name the stage asks its `VarBuilder` for (`model.layers.0.…weight`).
    fn quantized(
        &self,
        name: &str,
        dims: (usize, usize),
        format: GgmlDType,
    ) -> candle_core::Result<QWeight>;
}

/// One stage's quantization while it loads: the mode, where quantized weights come from, and
/// the tensors that had to stay unquantized.
pub struct QuantPlan {
    mode: Quantization,
    source: Option<Arc<dyn QuantSource>>,
    kept: Mutex<Vec<String>>,
    /// Matrices a k-quant block cannot cut, quantized to q8_0 instead.
    fallback: Mutex<Vec<String>>,
}

impl QuantPlan {
    /// No quantization (what `new(cfg, vb)` builds with).
    pub fn none() -> Self {
        Self::new(Quantization::None)
    }

    /// `mode`, quantizing tensors read whole through the `VarBuilder` (models built in memory).
    pub fn new(mode: Quantization) -> Self {
        QuantPlan {
            mode,
            source: None,
            kept: Mutex::new(Vec::new()),
            fallback: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn streaming(mode: Quantization, source: Arc<dyn QuantSource>) -> Self {
        QuantPlan {
            mode,
            source: Some(source),
            kept: Mutex::new(Vec::new()),
            fallback: Mutex::new(Vec::new()),
        }
    }

    pub fn mode(&self) -> Quantization {
        self.mode
    }

    /// Refuses what quantized weights cannot compute with, at load time.
    pub fn check(&self, dtype: DType, device: &Device) -> Result<()> {
        if self.mode.is_none() {
            return Ok(());
        }
        if dtype != DType::F32 || !device.is_cpu() {
            return Err(ModelError::Unsupported(format!(
                "--quantize {} computes in f32 on the CPU (asked: {dtype:?} on {device:?}); use --dtype f32",
                self.mode
            )));
        }
        Ok(())
    }

    /// `y = x Wᵀ + b` for a linear layer of attention, MLP or the projector.
    pub fn linear(
        &self,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        vb: VarBuilder,
    ) -> candle_core::Result<Linear> {
        self.linear_as(Role::Layer, in_dim, out_dim, bias, vb)
    }

    /// [`Self::linear`] for the vision tower and projector: dense layers multiply every input on
    /// the f32 GEMM (the same numbers for a row whatever the chunking; see `Linear::plain`).
    pub fn linear_plain(
        &self,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        vb: VarBuilder,
    ) -> candle_core::Result<Linear> {
        match self.weight(Role::Layer, (out_dim, in_dim), &vb)? {
            Some(w) => self.with_bias(w, out_dim, bias, &vb),
            None => {
                let l = candle_nn::linear_b(in_dim, out_dim, bias, vb)?;
                Ok(Linear::plain(l.weight().clone(), l.bias().cloned()))
            }
        }
    }

    /// The decoder's LM head (no bias).
    pub fn head(
        &self,
        in_dim: usize,
        out_dim: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Linear> {
        self.linear_as(Role::Head, in_dim, out_dim, false, vb)
    }

    fn linear_as(
        &self,
        role: Role,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        vb: VarBuilder,
    ) -> candle_core::Result<Linear> {
        let Some(w) = self.weight(role, (out_dim, in_dim), &vb)? else {
            return crate::linear::linear_b(in_dim, out_dim, bias, vb);
        };
        self.with_bias(w, out_dim, bias, &vb)
    }

    fn with_bias(
        &self,
        w: QWeight,
        out_dim: usize,
        bias: bool,
        vb: &VarBuilder,
    ) -> candle_core::Result<Linear> {
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Linear::quantized(w, bias))
    }

    /// The token embedding table `[rows, hidden]`.
    pub(crate) fn embedding(
        &self,
        rows: usize,
        hidden: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<TokenEmbedding> {
        match self.weight(Role::Embedding, (rows, hidden), &vb)? {
            Some(q) => Ok(TokenEmbedding::Quantized(q)),
            None => Ok(TokenEmbedding::Dense(candle_nn::embedding(
                rows, hidden, vb,
            )?)),
        }
    }

    /// `vb`'s `weight` quantized for `role`, or `None` where it stays dense (no quantization, or
    /// a shape that does not divide into blocks: recorded for [`Self::report`]).
    fn weight(
        &self,
        role: Role,
        dims: (usize, usize),
        vb: &VarBuilder,
    ) -> candle_core::Result<Option<QWeight>> {
        let Some(wanted) = self.mode.format(role) else {
            return Ok(None);
        };
        let format = self.mode.format_for(role, dims.1);
        if format != Some(wanted) {
            let name = format!("{} [{}, {}]", vb.prefix(), dims.0, dims.1);
            match format {
                Some(_) => self.fallback.lock().expect("quant plan lock").push(name),
                None => self.kept.lock().expect("quant plan lock").push(name),
            }
        }
        let Some(format) = format else {
            return Ok(None);
        };
        let q = match &self.source {
            Some(src) => src.quantized(&format!("{}.weight", vb.prefix()), dims, format)?,
            None => QWeight::quantize(&vb.get(dims, "weight")?, format)?,
        };
        Ok(Some(q))
    }

    /// Logs, in one line, every matrix that stayed unquantized because of its shape.
    pub fn report(&self, part: &str) {
        if self.mode.is_none() {
            return;
        }
        let fallback = self.fallback.lock().expect("quant plan lock");
        if !fallback.is_empty() {
            tracing::info!(
                part,
                quantization = %self.mode,
                count = fallback.len(),
                "quantized to q8_0 instead (last dimension a multiple of 32, not of 256): {}",
                fallback.join(", ")
            );
        }
        let kept = self.kept.lock().expect("quant plan lock");
        if kept.is_empty() {
            tracing::info!(part, quantization = %self.mode, "every linear layer quantized");
        } else {
            tracing::info!(
                part,
                quantization = %self.mode,
                count = kept.len(),
                "left unquantized (last dimension not a multiple of the block size): {}",
                kept.join(", ")
            );
        }
    }

    /// The matrices left unquantized so far (`name [rows, cols]`).
    pub fn kept(&self) -> Vec<String> {
        self.kept.lock().expect("quant plan lock").clone()
    }

    /// The matrices quantized to q8_0 because a k-quant block cannot cut them (`name [rows, cols]`).
    pub fn fallback(&self) -> Vec<String> {
        self.fallback.lock().expect("quant plan lock").clone()
    }
}

/// The decoder's token embeddings, dense or quantized (rows dequantized as they are looked up).
#[derive(Debug, Clone)]
pub(crate) enum TokenEmbedding {
    Dense(candle_nn::Embedding),
    Quantized(QWeight),
}

impl TokenEmbedding {
    /// The dense table, when there is one (a tied LM head reuses it).
    pub fn dense(&self) -> Option<&Tensor> {
        match self {
            TokenEmbedding::Dense(e) => Some(e.embeddings()),
            TokenEmbedding::Quantized(_) => None,
        }
    }

    /// The quantized table, when there is one (a tied LM head multiplies by it).
    pub fn quantized(&self) -> Option<&QWeight> {
        match self {
            TokenEmbedding::Dense(_) => None,
            TokenEmbedding::Quantized(q) => Some(q),
        }
    }
}

impl Module for TokenEmbedding {
    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            TokenEmbedding::Dense(e) => e.forward(ids),
            TokenEmbedding::Quantized(q) => q.rows(ids),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_list_the_choices() {
        for name in Quantization::NAMES {
            let q: Quantization = name.parse().unwrap();
            assert_eq!(q.name(), name);
        }
        let err = "q5_k".parse::<Quantization>().unwrap_err().to_string();
        assert!(err.contains("none, q8_0, q4_k"), "{err}");
    }

    /// A q8_0 product is close to the dense one, and rows of a batch get exactly what they get
    /// alone (the batched decode path depends on it).
    #[test]
    fn quantized_linear_is_close_and_rows_do_not_depend_on_the_batch() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (n, k) = (96, 256);
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
        let small = Tensor::randn(0f32, 1.0, (8, 64), &dev)?;
        let odd = Tensor::randn(0f32, 1.0, (8, 48), &dev)?;
        let tensors = [
            ("l.weight".to_string(), w.clone()),
            ("s.weight".into(), small),
            ("u.weight".into(), odd),
        ];
        let vb = VarBuilder::from_tensors(tensors.into_iter().collect(), DType::F32, &dev);
        for (mode, tol) in [(Quantization::Q8_0, 0.02f32), (Quantization::Q4K, 0.15)] {
            let plan = QuantPlan::new(mode);
            let q = plan.linear(k, n, false, vb.pp("l"))?;
            assert!(q.is_quantized(), "{mode}");
            let x = Tensor::randn(0f32, 1.0, (8, k), &dev)?;
            let dense = x.matmul(&w.t()?)?;
            let ours = q.forward(&x)?;
            let rel = ((&ours - &dense)?.sqr()?.sum_all()?.to_scalar::<f32>()?
                / dense.sqr()?.sum_all()?.to_scalar::<f32>()?)
            .sqrt();
            assert!(rel < tol, "{mode}: relative error {rel}");
            for r in 0..8 {
                let alone = q.forward(&x.narrow(0, r, 1)?)?;
                assert_eq!(
                    alone.to_vec2::<f32>()?,
                    ours.narrow(0, r, 1)?.to_vec2::<f32>()?,
                    "{mode} row {r}"
                );
            }
        }
        // 64 columns: a q8_0 block fits, a q4_k super-block does not, so q4_k falls back to
        // q8_0 (the layer then gives q8_0's numbers); 48 columns fit neither and stay dense.
        let plan = QuantPlan::new(Quantization::Q4K);
        let fell_back = plan.linear(64, 8, false, vb.pp("s"))?;
        assert!(fell_back.is_quantized());
        assert_eq!(plan.fallback(), vec!["s [8, 64]".to_string()]);
        assert!(!plan.linear(48, 8, false, vb.pp("u"))?.is_quantized());
        assert_eq!(plan.kept(), vec!["u [8, 48]".to_string()]);
        let plan = QuantPlan::new(Quantization::Q8_0);
        let q8 = plan.linear(64, 8, false, vb.pp("s"))?;
        assert!(q8.is_quantized());
        assert!(plan.kept().is_empty() && plan.fallback().is_empty());
        let x = Tensor::randn(0f32, 1.0, (3, 64), &Device::Cpu)?;
        assert_eq!(
            fell_back.forward(&x)?.to_vec2::<f32>()?,
            q8.forward(&x)?.to_vec2::<f32>()?
        );
        Ok(())
    }

    #[test]
    fn matrix_bytes_follow_the_block_formats_and_their_fallbacks() {
        // q8_0: 34 bytes per 32 values; q4_K 144 per 256; q6_K (the head) 210 per 256.
        assert_eq!(
            Quantization::Q8_0.matrix_bytes((10, 64), false, 4),
            10 * 2 * 34
        );
        assert_eq!(
            Quantization::Q4K.matrix_bytes((10, 512), false, 4),
            10 * 2 * 144
        );
        assert_eq!(
            Quantization::Q4K.matrix_bytes((10, 512), true, 4),
            10 * 2 * 210
        );
        // 96 values a row: no k-quant block fits, q8_0 does; 40: nothing does (dense).
        assert_eq!(
            Quantization::Q4K.matrix_bytes((10, 96), false, 4),
            10 * 3 * 34
        );
        assert_eq!(
            Quantization::Q4K.matrix_bytes((10, 40), false, 4),
            10 * 40 * 4
        );
        assert_eq!(
            Quantization::None.matrix_bytes((10, 64), false, 2),
            10 * 64 * 2
        );
    }
}
