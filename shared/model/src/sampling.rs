//! Token sampling: frequency and presence penalties, then greedy, or temperature, top-k, top-p.
//!
//! Each step draws from a ChaCha8 stream selected by `(seed, step)` alone, never from state carried
//! between steps. That makes a stream resumable: a replica that re-prefills the prompt plus the tokens
//! already produced continues with exactly the draws an uninterrupted run would have made.

use std::borrow::Cow;
use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::constraint::{OutputFormat, TokenMask};
use crate::error::{ModelError, Result};

/// Largest number of stop strings and their length, bounding the per-token stop scan.
pub const MAX_STOP_STRINGS: usize = 16;
pub const MAX_STOP_LEN: usize = 256;
/// Most `logit_bias` entries (OpenAI accepts 300; vLLM any number): each costs a write per step.
pub const MAX_LOGIT_BIAS: usize = 1024;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Tokens to generate at most (≥ 1).
    pub max_tokens: u32,
    /// 0 (or absent) means greedy.
    pub temperature: f32,
    /// Nucleus sampling mass in (0, 1]; 1 disables it.
    pub top_p: f32,
    /// Keep only the k most likely tokens; 0 disables it.
    pub top_k: u32,
    pub seed: u64,
    /// Generation stops when the text contains one of these (the stop string itself is not returned).
    pub stop: Vec<String>,
    /// OpenAI/vLLM frequency penalty: a token's logit is lowered by this × its count among the
    /// tokens generated so far. In [-2, 2].
    pub frequency_penalty: f32,
    /// OpenAI/vLLM presence penalty: a token's logit is lowered by this once it has been
    /// generated. In [-2, 2].
    pub presence_penalty: f32,
    /// OpenAI's logit bias: (token id, value added to its logit) before the format's mask,
    /// penalties and sampling, greedy too. Values in [-100, 100]; ids in the vocabulary.
    pub logit_bias: Vec<(u32, f32)>,
    /// Constrained decoding: the output must match this format ([`crate::constraint`]).
    pub format: Option<OutputFormat>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            max_tokens: 64,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            stop: vec![],
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            logit_bias: vec![],
            format: None,
        }
    }
}

impl SamplingParams {
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// Rejects out-of-range values with a message that names the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::InvalidParams(m));
        if self.max_tokens == 0 {
            return bad("max_tokens must be at least 1".into());
        }
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(format!(
                "temperature must be a finite number >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        for (name, v) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(format!("{name} must be in [-2, 2], got {v}"));
            }
        }
        if self.stop.len() > MAX_STOP_STRINGS {
            return bad(format!(
                "at most {MAX_STOP_STRINGS} stop strings, got {}",
                self.stop.len()
            ));
        }
        if self.logit_bias.len() > MAX_LOGIT_BIAS {
            return bad(format!(
                "logit_bias: at most {MAX_LOGIT_BIAS} entries, got {}",
                self.logit_bias.len()
            ));
        }
        if let Some((t, v)) = self
            .logit_bias
            .iter()
            .find(|(_, v)| !(-100.0..=100.0).contains(v))
        {
            return bad(format!(
                "logit_bias values must be in [-100, 100]; token {t} has {v}"
            ));
        }
        if let Some(f) = &self.format {
            f.validate()?;
        }
        // The message names the string by index and length, never echoes it: it is input of
        // any size.
        if let Some((i, s)) = self
            .stop
            .iter()
            .enumerate()
            .find(|(_, s)| s.is_empty() || s.len() > MAX_STOP_LEN)
        {
            return bad(format!(
                "stop strings must be 1..={MAX_STOP_LEN} bytes; stop[{i}] is {} bytes",
                s.len()
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Sampler { params }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the token for generation step `step` (0 = first generated token) after the tokens
    /// `generated` so far: the logits are penalised ([`Sampler::penalized`]), then the argmax
    /// when greedy, otherwise the inverse CDF of [`Sampler::distribution`] at the step's uniform
    /// draw. A pure function of (seed, step, logits, generated), so a resumed stream is the same.
    pub fn sample(&self, logits: &[f32], step: u64, generated: &[u32]) -> u32 {
        self.sample_masked(logits, step, generated, None)
    }

    /// [`Self::sample`] after the logit bias and, when the sequence has a format, its mask for
    /// this step (disallowed tokens get −∞ and are never drawn).
    pub fn sample_masked(
        &self,
        logits: &[f32],
        step: u64,
        generated: &[u32],
        mask: Option<&TokenMask>,
    ) -> u32 {
        let logits = self.biased(logits, mask);
        let logits = self.penalized(&logits, generated);
        if self.params.is_greedy() {
            return argmax(&logits);
        }
        let dist = self.distribution(&logits);
        let Some(&(last, _)) = dist.last() else {
            return 0;
        };
        let mut rng = ChaCha8Rng::seed_from_u64(self.params.seed);
        rng.set_stream(step);
        let u: f64 = rng.random::<f64>();
        let mut cum = 0.0;
        for &(i, p) in &dist {
            cum += p;
            if u < cum {
                return i;
            }
        }
        last
    }

    /// `logits` with the logit bias added and the mask applied; borrowed when there is neither.
    pub fn biased<'a>(&self, logits: &'a [f32], mask: Option<&TokenMask>) -> Cow<'a, [f32]> {
        if self.params.logit_bias.is_empty() && mask.is_none() {
            return Cow::Borrowed(logits);
        }
        let mut out = logits.to_vec();
        for &(t, v) in &self.params.logit_bias {
            if let Some(l) = out.get_mut(t as usize) {
                *l += v;
            }
        }
        if let Some(m) = mask {
            m.apply(&mut out);
        }
        Cow::Owned(out)
    }

    /// `logits` with the frequency and presence penalties of the tokens `generated` so far, as
    /// vLLM applies OpenAI's: `logit[t] -= frequency_penalty × count(t) + presence_penalty ×
    /// (count(t) > 0)`, counting generated tokens only (not the prompt). Borrowed unchanged when
    /// both penalties are 0 or nothing was generated yet.
    pub fn penalized<'a>(&self, logits: &'a [f32], generated: &[u32]) -> Cow<'a, [f32]> {
        let (f, p) = (self.params.frequency_penalty, self.params.presence_penalty);
        if (f == 0.0 && p == 0.0) || generated.is_empty() {
            return Cow::Borrowed(logits);
        }
        let mut counts: BTreeMap<u32, u32> = BTreeMap::new();
        for &t in generated {
            *counts.entry(t).or_default() += 1;
        }
        let mut out = logits.to_vec();
        for (t, n) in counts {
            if let Some(l) = out.get_mut(t as usize) {
                *l -= f * n as f32 + p;
            }
        }
        Cow::Owned(out)
    }

    /// The distribution a sampled step draws from: the candidates (most likely first, ties by
    /// index) and their probabilities, summing to 1. Logits are divided by the temperature,
    /// cut to the `top_k` largest, softmaxed, cut to the smallest prefix whose mass reaches
    /// `top_p` (at least one token) and renormalised: the order transformers' generate applies
    /// its temperature, top-k and top-p warpers. NaN logits are never candidates; empty when all
    /// are NaN. Greedy parameters (temperature 0) have no distribution: use [`argmax`].
    pub fn distribution(&self, logits: &[f32]) -> Vec<(u32, f64)> {
        let t = self.params.temperature as f64;
        if t <= 0.0 {
            return Vec::new();
        }
        // NaN and −∞ (masked) logits are never candidates.
        let mut idx: Vec<u32> = (0..logits.len() as u32)
            .filter(|&i| {
                let l = logits[i as usize];
                !l.is_nan() && l != f32::NEG_INFINITY
            })
            .collect();
        if idx.is_empty() {
            return Vec::new();
        }
        // Descending by logit, ties by index, so the order (and the draw) is fully determined.
        idx.sort_unstable_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        if self.params.top_k > 0 {
            idx.truncate(self.params.top_k as usize);
        }
        let max = logits[idx[0] as usize] as f64 / t;
        let mut probs: Vec<f64> = idx
            .iter()
            .map(|&i| (logits[i as usize] as f64 / t - max).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if self.params.top_p < 1.0 {
            // Smallest prefix whose mass reaches top_p (always at least one token).
            let mut cum = 0.0;
            let mut keep = probs.len();
            for (n, p) in probs.iter().enumerate() {
                cum += p;
                if cum >= self.params.top_p as f64 {
                    keep = n + 1;
                    break;
                }
            }
            probs.truncate(keep);
            idx.truncate(keep);
            let total: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= total);
        }
        idx.into_iter().zip(probs).collect()
    }
}

/// Index of the largest value, the first one on ties (torch.argmax); NaN never wins.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_p: f32, top_k: u32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_p,
            top_k,
            seed,
            ..Default::default()
        }
    }

    #[test]
    fn greedy_takes_first_maximum_and_ignores_nan() {
        let s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, f32::NAN, -1.0], 0, &[]), 1);
    }

    #[test]
    fn draws_depend_only_on_seed_and_step() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 7919) % 13) as f32 * 0.3).collect();
        let s = Sampler::new(params(1.0, 1.0, 0, 42));
        let a: Vec<u32> = (0..20).map(|k| s.sample(&logits, k, &[])).collect();
        // Same (seed, step) in any order, from a fresh sampler: same tokens.
        let s2 = Sampler::new(params(1.0, 1.0, 0, 42));
        let b: Vec<u32> = (0..20).rev().map(|k| s2.sample(&logits, k, &[])).collect();
        assert_eq!(a, b.into_iter().rev().collect::<Vec<_>>());
        // A different seed gives a different sequence.
        let s3 = Sampler::new(params(1.0, 1.0, 0, 43));
        let c: Vec<u32> = (0..20).map(|k| s3.sample(&logits, k, &[])).collect();
        assert_ne!(a, c);
        // Draws vary across steps (not one token repeated).
        assert!(a.iter().any(|&x| x != a[0]));
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let logits = [5.0, 4.9, 4.8, -10.0, -10.0, 1.0];
        let k1 = Sampler::new(params(1.0, 1.0, 1, 7));
        assert!((0..100).all(|step| k1.sample(&logits, step, &[]) == 0));
        let k2 = Sampler::new(params(1.0, 1.0, 2, 7));
        let picked: std::collections::BTreeSet<u32> =
            (0..200).map(|s| k2.sample(&logits, s, &[])).collect();
        assert_eq!(picked, [0, 1].into_iter().collect());
        // p small enough that only the top token's mass (~0.36) is needed.
        let p = Sampler::new(params(1.0, 0.3, 0, 7));
        assert!((0..100).all(|step| p.sample(&logits, step, &[]) == 0));
    }

    fn penalties(frequency_penalty: f32, presence_penalty: f32) -> SamplingParams {
        SamplingParams {
            frequency_penalty,
            presence_penalty,
            ..Default::default()
        }
    }

    /// OpenAI's definition, as vLLM applies it: `logit[t] - count(t) * frequency - (count(t) > 0)
    /// * presence`, over the generated tokens only.
    #[test]
    fn penalties_follow_the_openai_definition() {
        let logits = [2.0, 1.5, 1.0, 0.5, -1.0];
        let generated = [0, 0, 1, 0, 3];
        let s = Sampler::new(penalties(0.25, 0.5));
        let got = s.penalized(&logits, &generated);
        let want = [
            2.0 - 3.0 * 0.25 - 0.5, // token 0, generated 3 times
            1.5 - 0.25 - 0.5,       // token 1, once
            1.0,                    // never generated
            0.5 - 0.25 - 0.5,       // token 3, once
            -1.0,
        ];
        assert_eq!(&*got, &want);
        // Greedy decoding sees the penalised logits: token 2 now wins over 0 and 1.
        assert_eq!(s.sample(&logits, 5, &generated), 2);
        // Without history, or with both penalties 0, the logits are untouched (and not copied).
        assert!(matches!(s.penalized(&logits, &[]), Cow::Borrowed(_)));
        let off = Sampler::new(SamplingParams::default());
        assert!(matches!(
            off.penalized(&logits, &generated),
            Cow::Borrowed(_)
        ));
        assert_eq!(off.sample(&logits, 5, &generated), 0);
        // Negative values encourage repetition; ids beyond the vocabulary are ignored.
        let s = Sampler::new(penalties(-1.0, 0.0));
        assert_eq!(
            &*s.penalized(&logits, &[4, 4, 99]),
            &[2.0, 1.5, 1.0, 0.5, 1.0]
        );
    }

    /// A sampled step draws from the penalised distribution, still by (seed, step) alone.
    #[test]
    fn sampled_penalties_shift_the_distribution() {
        let logits = [1.0, 1.0, 1.0];
        let mut p = penalties(0.0, 2.0);
        p.temperature = 1.0;
        p.seed = 9;
        let s = Sampler::new(p);
        let dist = s.distribution(&s.penalized(&logits, &[0]));
        let p0 = dist.iter().find(|(i, _)| *i == 0).unwrap().1;
        let e = (-2.0f64).exp();
        assert!((p0 - e / (e + 2.0)).abs() < 1e-12, "{dist:?}");
        let a: Vec<u32> = (0..50).map(|k| s.sample(&logits, k, &[0])).collect();
        let b: Vec<u32> = (0..50).map(|k| s.sample(&logits, k, &[0])).collect();
        assert_eq!(a, b);
        let zeros = a.iter().filter(|&&t| t == 0).count();
        assert!(
            zeros < 15,
            "token 0 drawn {zeros} times of 50 at p = {p0:.3}"
        );
    }

    #[test]
    fn validation_names_the_field() {
        let mut p = SamplingParams {
            max_tokens: 0,
            ..Default::default()
        };
        assert!(p.validate().unwrap_err().to_string().contains("max_tokens"));
        p.max_tokens = 4;
        p.top_p = 0.0;
        assert!(p.validate().unwrap_err().to_string().contains("top_p"));
        p.top_p = 1.0;
        p.temperature = f32::NAN;
        assert!(p
            .validate()
            .unwrap_err()
            .to_string()
            .contains("temperature"));
        p.temperature = 0.5;
        p.stop = vec![String::new()];
        assert!(p.validate().unwrap_err().to_string().contains("stop"));
        p.stop = vec![];
        p.frequency_penalty = 2.5;
        assert!(p
            .validate()
            .unwrap_err()
            .to_string()
            .contains("frequency_penalty must be in [-2, 2]"));
        p.frequency_penalty = 0.0;
        p.presence_penalty = f32::NAN;
        assert!(p
            .validate()
            .unwrap_err()
            .to_string()
            .contains("presence_penalty"));
        p.presence_penalty = 0.0;
        p.stop = vec!["ok".into(), "x".repeat(100_000)];
        let msg = p.validate().unwrap_err().to_string();
        assert!(msg.contains("stop[1] is 100000 bytes"), "{msg}");
        assert!(
            msg.len() < 200,
            "the message echoes the input: {} bytes",
            msg.len()
        );
    }
}
