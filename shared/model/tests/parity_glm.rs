//! Parity with Hugging Face transformers for the GLM decoder family and the LayerNorm projector, on
//! tiny random checkpoints that transformers itself wrote (models/make_glm_fixtures.py). References
//! are committed; these tests never run Python.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use vlm_model::checkpoint::PartKind;
use vlm_model::config::DecoderFamily;
use vlm_model::{Checkpoint, ImageLimits, LlavaConfig, ModelError, Pipeline, SamplingParams};

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

fn ids_of(t: &Tensor) -> Vec<u32> {
    t.to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|&x| x as u32)
        .collect()
}

/// Every stage against transformers, each from the reference input of that stage, then 16 greedy
/// ids end to end from the image file.
fn check_fixture(name: &str, family: DecoderFamily) {
    let f = fixture(name);
    let p = Pipeline::load(&f.dir, DType::F32, &Device::Cpu, ImageLimits::default()).unwrap();
    assert_eq!(p.config.text.family, family, "{name}: decoder family");

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

    let feats = p.vision.forward(want_pv).unwrap().squeeze(0).unwrap();
    let d = max_abs_diff(&feats, &f.refs["image_features"]);
    eprintln!("{name}: vision features max diff {d:.3e}");
    assert!(d <= 1e-4, "{name}: vision features differ by {d}");

    let proj = p.projector.forward(&f.refs["image_features"]).unwrap();
    let d = max_abs_diff(&proj, &f.refs["projected"]);
    eprintln!("{name}: projector output max diff {d:.3e}");
    assert!(d <= 1e-4, "{name}: projector output differs by {d}");
    if let Some(probe) = f.refs.get("ln_probe_features") {
        // Rows of small spread around a large mean: they expose the LayerNorm's eps and how its
        // variance is computed, which the CLIP features cannot.
        let got = p.projector.forward(probe).unwrap();
        let d = max_abs_diff(&got, &f.refs["ln_probe_projected"]);
        eprintln!("{name}: projector LayerNorm probe max diff {d:.3e}");
        assert!(
            d <= 1e-4,
            "{name}: projector LayerNorm probe differs by {d}"
        );
    }

    let prepared = p
        .prompt
        .prepare(&f.prompt, &[p.vision.num_features()])
        .unwrap();
    let want_ids = ids_of(&f.refs["input_ids"]);
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

    // The same prompt prefilled in two pieces: the second sees the first only through the KV cache,
    // at shifted rotary positions, so a cache or partial-RoPE offset bug changes these logits.
    let t = embeds.dim(0).unwrap();
    let cut = t / 2 + 1;
    let mut cache = p.decoder.new_cache();
    p.decoder
        .forward_embeds(&embeds.narrow(0, 0, cut).unwrap(), &mut cache)
        .unwrap();
    let split = p
        .decoder
        .forward_embeds(&embeds.narrow(0, cut, t - cut).unwrap(), &mut cache)
        .unwrap();
    assert_eq!(cache.len(), t);
    let d = max_abs_diff(&split, &f.refs["prefill_logits"]);
    eprintln!(
        "{name}: prefill logits in two pieces ({cut}+{}) max diff {d:.3e}",
        t - cut
    );
    assert!(d <= 1e-4, "{name}: two-piece prefill logits differ by {d}");

    let params = SamplingParams {
        max_tokens: 16,
        ..Default::default()
    };
    let out = p.generate(&[&f.image], &f.prompt, &params, |_| {}).unwrap();
    eprintln!("{name}: greedy ids {:?}", out.token_ids);
    assert_eq!(out.token_ids, f.greedy, "{name}: greedy ids differ");
    assert_eq!(ids_of(&f.refs["greedy_ids"]), f.greedy);
    assert_eq!(out.token_ids.len(), 16);
    assert_eq!(out.prompt_tokens, want_ids.len());
}

#[test]
fn glm_decoder_matches_transformers() {
    check_fixture("tiny-llava-glm", DecoderFamily::Glm);
}

#[test]
fn glm4_decoder_with_post_norms_wide_heads_and_tied_head_matches_transformers() {
    check_fixture("tiny-llava-glm4", DecoderFamily::Glm4);
}

#[test]
fn layer_norm_projector_with_two_feature_layers_matches_torch_reference() {
    check_fixture("tiny-llava-lnproj", DecoderFamily::Glm);
}

#[test]
fn glm_fixtures_exercise_what_they_claim() {
    // Guards the fixtures themselves: a regenerated fixture that lost its distinguishing feature
    // would make the parity tests above vacuous for it.
    let cfg = |name: &str| {
        Checkpoint::open(models_dir().join(name))
            .unwrap()
            .config()
            .clone()
    };
    let glm = cfg("tiny-llava-glm");
    assert_eq!(glm.text.model_type, "glm");
    assert!(glm.text.attention_bias);
    assert!(glm.text.num_key_value_heads < glm.text.num_attention_heads);
    assert!(glm.text.rope_dim < glm.text.head_dim, "partial rotary");
    assert!(!glm.text.tie_word_embeddings);

    let glm4 = cfg("tiny-llava-glm4");
    assert_eq!(glm4.text.model_type, "glm4");
    assert_ne!(
        glm4.text.head_dim,
        glm4.text.hidden_size / glm4.text.num_attention_heads
    );
    assert_eq!((glm4.text.head_dim, glm4.text.rope_dim), (24, 18));
    assert!(glm4.text.tie_word_embeddings);

    let ln = cfg("tiny-llava-lnproj");
    assert_eq!(ln.vision_feature_layers.len(), 2);
    let ckpt = Checkpoint::open(models_dir().join("tiny-llava-lnproj")).unwrap();
    assert!(ckpt
        .tensor_names()
        .any(|n| n == "multi_modal_projector.layer_norm.bias"));
    let refs = fixture("tiny-llava-lnproj").refs;
    assert!(refs.contains_key("ln_probe_features") && refs.contains_key("ln_probe_projected"));
}

#[test]
fn each_part_loads_only_its_own_tensors() {
    for name in ["tiny-llava-glm", "tiny-llava-glm4", "tiny-llava-lnproj"] {
        let ckpt = Checkpoint::open(models_dir().join(name)).unwrap();
        let cfg = ckpt.config().clone();
        let all: Vec<String> = ckpt.tensor_names().map(String::from).collect();

        let part = ckpt
            .part(PartKind::Vision, DType::F32, &Device::Cpu)
            .unwrap();
        vlm_model::VisionEncoder::new(&cfg, part.vb()).unwrap();
        let loaded = part.loaded_tensors();
        // Every layer up to the deepest selected one, nothing after it, no post_layernorm.
        let n = cfg.vision.num_hidden_layers as i64;
        let depth = cfg
            .vision_feature_layers
            .iter()
            .map(|&l| if l < 0 { n + 1 + l } else { l } as usize)
            .max()
            .unwrap();
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
        assert_eq!(
            loaded.iter().any(|t| t.contains("layer_norm")),
            name == "tiny-llava-lnproj",
            "{name}: projector LayerNorm"
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
        // The GLM-specific tensors are among them (a LLaMA-shaped loader would miss these).
        let has = |s: &str| loaded.iter().any(|t| t.ends_with(s));
        assert!(has("layers.0.mlp.gate_up_proj.weight"), "{name}");
        assert!(has("layers.0.self_attn.k_proj.bias"), "{name}");
        assert!(!has("o_proj.bias"), "{name}");
        assert_eq!(
            has("layers.0.post_mlp_layernorm.weight")
                && has("layers.0.post_self_attn_layernorm.weight"),
            cfg.text.family == DecoderFamily::Glm4,
            "{name}: GLM-4 post norms"
        );
    }
}

/// A minimal llava config around `text_config`.
fn llava_json(text_config: &str) -> String {
    format!(
        r#"{{"model_type": "llava", "image_token_index": 4,
            "vision_config": {{"model_type": "clip_vision_model"}},
            "text_config": {text_config}}}"#
    )
}

#[test]
fn unsupported_decoder_type_is_refused_naming_the_supported_ones() {
    let err = LlavaConfig::from_json(&llava_json(r#"{"model_type": "qwen2"}"#)).unwrap_err();
    assert!(matches!(err, ModelError::Unsupported(_)), "{err}");
    let msg = err.to_string();
    for needle in ["'qwen2'", "llama", "glm", "glm4"] {
        assert!(msg.contains(needle), "{msg:?} lacks {needle}");
    }

    // The same through a checkpoint directory: the fixture with its model_type edited.
    let tmp = tempfile::tempdir().unwrap();
    let src = models_dir().join("tiny-llava-glm");
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, tmp.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    let cfg_path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["text_config"]["model_type"] = "chatglm".into();
    std::fs::write(&cfg_path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let err = Checkpoint::open(tmp.path()).unwrap_err();
    assert!(err.to_string().contains("'chatglm'"), "{err}");
    assert!(err.to_string().contains("glm4"), "{err}");
}

#[test]
fn glm_config_defaults_follow_transformers() {
    // GlmConfig() in transformers 5.24: head_dim 128, 2 KV heads, partial_rotary_factor 0.5,
    // rms_norm_eps 1.5625e-7, attention_bias, no BOS, three EOS ids, 131072 positions.
    for mt in ["glm", "glm4"] {
        let c = LlavaConfig::from_json(&llava_json(&format!(r#"{{"model_type": "{mt}"}}"#)))
            .unwrap()
            .text;
        assert_eq!(
            (c.hidden_size, c.num_attention_heads, c.num_key_value_heads),
            (4096, 32, 2)
        );
        assert_eq!((c.head_dim, c.rope_dim), (128, 64));
        assert_eq!((c.vocab_size, c.intermediate_size), (151552, 13696));
        assert_eq!(c.num_hidden_layers, 40);
        assert_eq!(c.rms_norm_eps, 1.5625e-7);
        assert_eq!(c.max_position_embeddings, 131072);
        assert!(c.attention_bias && !c.mlp_bias && !c.tie_word_embeddings);
        assert_eq!(c.eos_token_ids, [151329, 151336, 151338]);
    }
    // transformers 4.x layout (THUDM/glm-4-9b-chat-hf): rope keys at the top level.
    let c = LlavaConfig::from_json(&llava_json(
        r#"{"model_type": "glm", "head_dim": 64, "partial_rotary_factor": 0.25,
            "rope_theta": 500000.0, "rope_scaling": null}"#,
    ))
    .unwrap()
    .text;
    assert_eq!((c.head_dim, c.rope_dim, c.rope_theta), (64, 16, 500000.0));
    // transformers 5 layout: inside rope_parameters, which wins.
    let c = LlavaConfig::from_json(&llava_json(
        r#"{"model_type": "glm4", "partial_rotary_factor": 0.25,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000.0, "partial_rotary_factor": 1.0}}"#,
    ))
    .unwrap()
    .text;
    assert_eq!((c.head_dim, c.rope_dim, c.rope_theta), (128, 128, 1000.0));
    // LLaMA ignores partial_rotary_factor, as LlamaRotaryEmbedding does, and keeps its defaults.
    let c = LlavaConfig::from_json(&llava_json(
        r#"{"model_type": "llama", "partial_rotary_factor": 0.5}"#,
    ))
    .unwrap()
    .text;
    assert_eq!(c.family, DecoderFamily::Llama);
    assert_eq!(
        (c.head_dim, c.rope_dim, c.num_key_value_heads),
        (128, 128, 32)
    );
    assert_eq!(c.eos_token_ids, [2]);
    // A rotary width the head cannot hold is refused at load.
    let err = LlavaConfig::from_json(&llava_json(
        r#"{"model_type": "glm", "head_dim": 16, "partial_rotary_factor": 1.5}"#,
    ))
    .unwrap_err();
    assert!(err.to_string().contains("partial_rotary_factor"), "{err}");
}

#[test]
fn mistral_context_is_capped_at_its_sliding_window() {
    let ctx = |text: &str| {
        LlavaConfig::from_json(&llava_json(text))
            .unwrap()
            .text
            .max_position_embeddings
    };
    // MistralConfig's default window is 4096; beyond it full attention would differ.
    assert_eq!(
        ctx(r#"{"model_type": "mistral", "max_position_embeddings": 32768}"#),
        4096
    );
    assert_eq!(
        ctx(
            r#"{"model_type": "mistral", "max_position_embeddings": 32768, "sliding_window": 8192}"#
        ),
        8192
    );
    assert_eq!(
        ctx(
            r#"{"model_type": "mistral", "max_position_embeddings": 32768, "sliding_window": null}"#
        ),
        32768
    );
    assert_eq!(
        ctx(r#"{"model_type": "llama", "max_position_embeddings": 32768, "sliding_window": 8192}"#),
        32768
    );
}
