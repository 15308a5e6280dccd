//! Parity with Hugging Face transformers on tiny random checkpoints that transformers itself wrote
//! (models/make_tiny_fixtures.py). References are committed; these tests never run Python.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use vlm_model::checkpoint::PartKind;
use vlm_model::{Checkpoint, ImageLimits, Pipeline, SamplingParams};

mod support;
use support::{max_abs_diff, models_dir, references};

struct Fixture {
    dir: PathBuf,
    refs: HashMap<String, Tensor>,
    image: Vec<u8>,
    prompt: String,
    greedy: Vec<u32>,
}

fn fixture(name: &str) -> Fixture {
    let dir = models_dir().join(name);
    let (refs, meta) = references(&dir);
    let image = std::fs::read(dir.join(meta["image"].as_str().unwrap())).unwrap();
    let greedy = meta["greedy_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    Fixture {
        dir,
        refs,
        image,
        prompt: meta["prompt"].as_str().unwrap().to_string(),
        greedy,
    }
}

fn check_fixture(name: &str) {
    let f = fixture(name);
    let p = Pipeline::load(&f.dir, DType::F32, &Device::Cpu, ImageLimits::default()).unwrap();

    // Preprocessing: within one 8-bit level after normalisation, per channel.
    let pv = p.preprocessor.preprocess(&f.image, &Device::Cpu).unwrap();
    let want_pv = &f.refs["pixel_values"];
    for ch in 0..3 {
        let d = max_abs_diff(
            &pv.narrow(1, ch, 1).unwrap(),
            &want_pv.narrow(1, ch, 1).unwrap(),
        );
        let tol = 1.0 / 255.0 / p.preprocessor.config().image_std[ch] + 1e-6;
        eprintln!("{name}: pixel_values channel {ch} max diff {d:.3e} (tolerance {tol:.3e})");
        assert!(
            d <= tol,
            "{name}: pixel_values channel {ch} differs by {d} > {tol}"
        );
    }

    // Stage tensors, each computed from the reference input of that stage.
    let feats = p.vision.forward(want_pv).unwrap().squeeze(0).unwrap();
    let d = max_abs_diff(&feats, &f.refs["image_features"]);
    eprintln!("{name}: vision features max diff {d:.3e}");
    assert!(d <= 1e-4, "{name}: vision features differ by {d}");

    let proj = p.projector.forward(&f.refs["image_features"]).unwrap();
    let d = max_abs_diff(&proj, &f.refs["projected"]);
    eprintln!("{name}: projector output max diff {d:.3e}");
    assert!(d <= 1e-4, "{name}: projector output differs by {d}");

    let prepared = p
        .prompt
        .prepare(&f.prompt, &[p.vision.num_features()])
        .unwrap();
    let want_ids: Vec<u32> = f.refs["input_ids"]
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|&x| x as u32)
        .collect();
    assert_eq!(
        prepared.ids, want_ids,
        "{name}: expanded prompt ids differ from LlavaProcessor's"
    );

    let embeds = prepared
        .embeddings(&p.decoder, &[f.refs["projected"].clone()])
        .unwrap();
    let mut cache = p.decoder.new_cache();
    let logits = p.decoder.forward_embeds(&embeds, &mut cache).unwrap();
    let d = max_abs_diff(&logits, &f.refs["prefill_logits"]);
    eprintln!("{name}: prefill logits max diff {d:.3e}");
    assert!(d <= 1e-4, "{name}: prefill logits differ by {d}");

    // End to end from the image file: 16 greedy ids identical to transformers' generate().
    let params = SamplingParams {
        max_tokens: 16,
        ..Default::default()
    };
    let out = p.generate(&[&f.image], &f.prompt, &params, |_| {}).unwrap();
    assert_eq!(out.token_ids, f.greedy, "{name}: greedy ids differ");
    let ref_greedy: Vec<u32> = f.refs["greedy_ids"]
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|&x| x as u32)
        .collect();
    assert_eq!(ref_greedy, f.greedy);
    assert_eq!(out.prompt_tokens, want_ids.len());
}

#[test]
fn fixture_a_mha_default_strategy_matches_transformers() {
    check_fixture("tiny-llava");
}

#[test]
fn fixture_b_gqa_full_strategy_sharded_llama3_rope_matches_transformers() {
    check_fixture("tiny-llava-gqa");
}

#[test]
fn each_part_loads_only_its_own_tensors() {
    for name in ["tiny-llava", "tiny-llava-gqa"] {
        let ckpt = Checkpoint::open(models_dir().join(name)).unwrap();
        let cfg = ckpt.config().clone();
        let all: Vec<String> = ckpt.tensor_names().map(String::from).collect();

        let part = ckpt
            .part(PartKind::Vision, DType::F32, &Device::Cpu)
            .unwrap();
        vlm_model::VisionEncoder::new(&cfg, part.vb()).unwrap();
        let loaded = part.loaded_tensors();
        assert!(!loaded.is_empty());
        assert!(
            loaded.iter().all(|n| n.starts_with("vision_tower.")),
            "{name}: {loaded:?}"
        );
        // Everything of the tower up to the selected layer, nothing after it, no post_layernorm.
        let n = cfg.vision.num_hidden_layers as i64;
        let l = cfg.vision_feature_layers[0];
        let depth = if l < 0 { n + 1 + l } else { l } as usize;
        let expected: Vec<&String> = all
            .iter()
            .filter(|t| t.starts_with("vision_tower."))
            .filter(|t| !t.contains("post_layernorm"))
            .filter(|t| match t.split("layers.").nth(1) {
                Some(rest) => rest.split('.').next().unwrap().parse::<usize>().unwrap() < depth,
                None => true,
            })
            .collect();
        assert_eq!(
            loaded.iter().collect::<Vec<_>>(),
            expected,
            "{name}: vision tensors"
        );
        if ckpt.tensor_names().count() > 0 && name == "tiny-llava-gqa" {
            // Sharded checkpoint: only shards holding vision tensors are mapped.
            let all_shards: std::collections::BTreeSet<_> = std::fs::read_dir(ckpt.dir())
                .unwrap()
                .filter_map(|e| {
                    let p = e.unwrap().path();
                    (p.extension().is_some_and(|x| x == "safetensors")).then_some(p)
                })
                .collect();
            assert!(
                part.mapped_files().len() < all_shards.len(),
                "{name}: vision part mapped every shard"
            );
        }

        let part = ckpt
            .part(PartKind::Projector, DType::F32, &Device::Cpu)
            .unwrap();
        vlm_model::Projector::new(&cfg, part.vb()).unwrap();
        let loaded = part.loaded_tensors();
        let expected: Vec<&String> = all
            .iter()
            .filter(|t| t.starts_with("multi_modal_projector."))
            .collect();
        assert_eq!(
            loaded.iter().collect::<Vec<_>>(),
            expected,
            "{name}: projector tensors"
        );

        let part = ckpt
            .part(PartKind::Decoder, DType::F32, &Device::Cpu)
            .unwrap();
        vlm_model::Decoder::new(&cfg, part.vb()).unwrap();
        let loaded = part.loaded_tensors();
        let expected: Vec<&String> = all
            .iter()
            .filter(|t| t.starts_with("language_model."))
            .collect();
        assert_eq!(
            loaded.iter().collect::<Vec<_>>(),
            expected,
            "{name}: decoder tensors"
        );
    }
}
