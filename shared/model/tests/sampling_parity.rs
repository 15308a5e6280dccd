//! The sampler against transformers: for random logits and a grid of (temperature, top_k, top_p),
//! the distribution a sampled step draws from equals the softmax of transformers' temperature,
//! top-k and top-p warpers (models/make_sampling_fixtures.py wrote it), and the tokens actually
//! drawn follow that distribution.

use std::path::PathBuf;

use vlm_model::{Sampler, SamplingParams};

struct Case {
    params: SamplingParams,
    logits: Vec<f32>,
    probs: Vec<f64>,
}

fn cases() -> Vec<Case> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/sampling/reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let floats = |v: &serde_json::Value| -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let cases: Vec<Case> = json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(n, c)| Case {
            params: SamplingParams {
                temperature: c["temperature"].as_f64().unwrap() as f32,
                top_k: c["top_k"].as_u64().unwrap() as u32,
                top_p: c["top_p"].as_f64().unwrap() as f32,
                seed: 1000 + n as u64,
                ..Default::default()
            },
            logits: floats(&c["logits"]).into_iter().map(|x| x as f32).collect(),
            probs: floats(&c["probs"]),
        })
        .collect();
    assert!(cases.len() >= 10, "{} cases", cases.len());
    cases
}

/// Our distribution as a vector over the vocabulary (0 outside the candidates).
fn ours(case: &Case) -> Vec<f64> {
    let mut full = vec![0.0; case.logits.len()];
    for (i, p) in Sampler::new(case.params.clone()).distribution(&case.logits) {
        full[i as usize] = p;
    }
    full
}

#[test]
fn the_distribution_is_transformers_softmax_after_its_warpers() {
    for case in cases() {
        let ours = ours(&case);
        let support = |v: &[f64]| -> Vec<usize> { (0..v.len()).filter(|&i| v[i] > 0.0).collect() };
        assert_eq!(
            support(&ours),
            support(&case.probs),
            "candidates differ for {:?}",
            case.params
        );
        for (i, (a, b)) in ours.iter().zip(&case.probs).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6,
                "{:?}: token {i}: ours {a}, transformers {b}",
                case.params
            );
        }
        // The grid exercises real cuts: some cases keep only part of the vocabulary.
    }
    let cut = cases()
        .iter()
        .filter(|c| c.probs.iter().filter(|&&p| p > 0.0).count() < c.logits.len())
        .count();
    assert!(cut >= 6, "only {cut} cases cut the vocabulary");
}

#[test]
fn drawn_tokens_follow_transformers_distribution() {
    // The draws are a fixed function of (seed, step), so this either always holds or never does.
    const DRAWS: u64 = 20_000;
    for case in cases() {
        let sampler = Sampler::new(case.params.clone());
        let mut counts = vec![0u64; case.logits.len()];
        for step in 0..DRAWS {
            counts[sampler.sample(&case.logits, step, &[]) as usize] += 1;
        }
        for (i, (&n, &p)) in counts.iter().zip(&case.probs).enumerate() {
            let freq = n as f64 / DRAWS as f64;
            // Five standard deviations of a binomial frequency, plus a floor for tiny p.
            let tolerance = 5.0 * (p * (1.0 - p) / DRAWS as f64).sqrt() + 2e-4;
            assert!(
                (freq - p).abs() <= tolerance,
                "{:?}: token {i} drawn {freq}, transformers' probability {p}",
                case.params
            );
            if p == 0.0 {
                assert_eq!(n, 0, "{:?}: token {i} is outside the support", case.params);
            }
        }
    }
}
