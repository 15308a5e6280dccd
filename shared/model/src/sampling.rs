//! Token sampling: greedy, temperature, top-k, top-p.
//!
//! Each step draws from a ChaCha8 stream selected by `(seed, step)` alone, never from state carried
//! between steps. That makes a stream resumable: a replica that re-prefills the prompt plus the tokens
//! already produced continues with exactly the draws an uninterrupted run would have made.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{ModelError, Result};

/// Largest number of stop strings and their length, bounding the per-token stop scan.
pub const MAX_STOP_STRINGS: usize = 16;
pub const MAX_STOP_LEN: usize = 256;

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
        if self.stop.len() > MAX_STOP_STRINGS {
            return bad(format!(
                "at most {MAX_STOP_STRINGS} stop strings, got {}",
                self.stop.len()
            ));
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

    /// Picks the token for generation step `step` (0 = first generated token): the argmax when
    /// greedy, otherwise the inverse CDF of [`Sampler::distribution`] at the step's uniform draw.
    pub fn sample(&self, logits: &[f32], step: u64) -> u32 {
        if self.params.is_greedy() {
            return argmax(logits);
        }
        let dist = self.distribution(logits);
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
        let mut idx: Vec<u32> = (0..logits.len() as u32)
            .filter(|&i| !logits[i as usize].is_nan())
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
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, f32::NAN, -1.0], 0), 1);
    }

    #[test]
    fn draws_depend_only_on_seed_and_step() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 7919) % 13) as f32 * 0.3).collect();
        let s = Sampler::new(params(1.0, 1.0, 0, 42));
        let a: Vec<u32> = (0..20).map(|k| s.sample(&logits, k)).collect();
        // Same (seed, step) in any order, from a fresh sampler: same tokens.
        let s2 = Sampler::new(params(1.0, 1.0, 0, 42));
        let b: Vec<u32> = (0..20).rev().map(|k| s2.sample(&logits, k)).collect();
        assert_eq!(a, b.into_iter().rev().collect::<Vec<_>>());
        // A different seed gives a different sequence.
        let s3 = Sampler::new(params(1.0, 1.0, 0, 43));
        let c: Vec<u32> = (0..20).map(|k| s3.sample(&logits, k)).collect();
        assert_ne!(a, c);
        // Draws vary across steps (not one token repeated).
        assert!(a.iter().any(|&x| x != a[0]));
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let logits = [5.0, 4.9, 4.8, -10.0, -10.0, 1.0];
        let k1 = Sampler::new(params(1.0, 1.0, 1, 7));
        assert!((0..100).all(|step| k1.sample(&logits, step) == 0));
        let k2 = Sampler::new(params(1.0, 1.0, 2, 7));
        let picked: std::collections::BTreeSet<u32> =
            (0..200).map(|s| k2.sample(&logits, s)).collect();
        assert_eq!(picked, [0, 1].into_iter().collect());
        // p small enough that only the top token's mass (~0.36) is needed.
        let p = Sampler::new(params(1.0, 0.3, 0, 7));
        assert!((0..100).all(|step| p.sample(&logits, step) == 0));
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
