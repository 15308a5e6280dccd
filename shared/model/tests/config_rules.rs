//! Config keys read as transformers reads them, where the loader used to read them otherwise
//! (issue 38's siblings of GLM-4.1V's rope defect): each case is a varied fixture's config with one
//! key changed, and what the loader makes of it.

use std::path::Path;

use serde_json::{json, Value};
use vlm_model::config::ImageProcessorConfig;
use vlm_model::{ImageLimits, LlavaConfig, Preprocessor};

mod support;

fn config(fixture: &str) -> Value {
    let path = support::models_dir().join(fixture).join("config.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn parse(v: &Value) -> vlm_model::Result<LlavaConfig> {
    LlavaConfig::from_json(&v.to_string())
}

#[test]
fn the_head_is_tied_when_either_level_says_so() {
    // transformers 5 reads the top level; checkpoints from before it name it in text_config.
    let mut v = config("varied-glm4v");
    assert_eq!(v["tie_word_embeddings"], true);
    assert!(v["text_config"].get("tie_word_embeddings").is_none());
    assert!(
        parse(&v).unwrap().text.tie_word_embeddings,
        "top level only"
    );
    v["tie_word_embeddings"] = json!(false);
    v["text_config"]["tie_word_embeddings"] = json!(true);
    assert!(
        parse(&v).unwrap().text.tie_word_embeddings,
        "text_config only"
    );
    v["text_config"]["tie_word_embeddings"] = json!(false);
    assert!(!parse(&v).unwrap().text.tie_word_embeddings, "neither");
}

#[test]
fn glm4v_text_rotary_defaults_and_fixed_attention_are_transformers() {
    let v = config("varied-glm4v");
    let c = parse(&v).unwrap().text;
    assert_eq!((c.head_dim, c.rope_dim, c.rope_theta), (16, 12, 100.0));
    // Without partial_rotary_factor, Glm4vTextRotaryEmbedding rotates the whole head (its
    // default is 1.0, not GLM's 0.5).
    let mut w = v.clone();
    let rope = w["text_config"]["rope_parameters"].as_object_mut().unwrap();
    rope.remove("partial_rotary_factor");
    rope.insert("mrope_section".into(), json!([2, 3, 3]));
    let c = parse(&w).unwrap().text;
    assert_eq!(c.rope_dim, 16);
    // Glm4vTextAttention always has q/k/v biases, and a head width of hidden / heads.
    let mut w = v.clone();
    w["text_config"]["attention_bias"] = json!(false);
    let e = parse(&w).unwrap_err().to_string();
    assert!(e.contains("attention_bias"), "{e}");
    w["text_config"]["attention_bias"] = json!(true);
    assert!(parse(&w).unwrap().text.attention_bias);
    let mut w = v.clone();
    w["text_config"]["head_dim"] = json!(32);
    let e = parse(&w).unwrap_err().to_string();
    assert!(e.contains("head_dim 32"), "{e}");
    w["text_config"]["head_dim"] = json!(16);
    assert_eq!(parse(&w).unwrap().text.head_dim, 16);
}

#[test]
fn llama_scaled_rope_applies_partial_rotary_factor() {
    // transformers' linear and llama3 inits read partial_rotary_factor; the default init does not.
    let mut v = config("varied-llava-next");
    assert_eq!(v["text_config"]["rope_parameters"]["rope_type"], "linear");
    assert_eq!(parse(&v).unwrap().text.rope_dim, 16);
    v["text_config"]["rope_parameters"]["partial_rotary_factor"] = json!(0.5);
    assert_eq!(parse(&v).unwrap().text.rope_dim, 8);
    v["text_config"]["rope_parameters"]["rope_type"] = json!("default");
    assert_eq!(parse(&v).unwrap().text.rope_dim, 16);
}

/// The fixture's files with `processor_config.json`'s image processor edited.
fn with_processor(fixture: &str, edit: impl FnOnce(&mut Value)) -> tempfile::TempDir {
    let src = support::models_dir().join(fixture);
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "processor_config.json"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let path = dir.path().join("processor_config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v["image_processor"]);
    std::fs::write(&path, v.to_string()).unwrap();
    dir
}

fn processor(dir: &Path) -> vlm_model::Result<Preprocessor> {
    let cfg = LlavaConfig::from_file(&dir.join("config.json"))?;
    Preprocessor::new(
        ImageProcessorConfig::for_model(dir, &cfg)?,
        ImageLimits::default(),
    )
}

#[test]
fn glm4v_refuses_do_resize_false() {
    let dir = with_processor("varied-glm4v", |p| p["do_resize"] = json!(false));
    let e = processor(dir.path()).unwrap_err().to_string();
    assert!(e.contains("do_resize false"), "{e}");
}

#[test]
fn do_convert_rgb_false_takes_rgb_images_only() {
    let png = |img: image::DynamicImage| {
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    };
    let rgba = png(image::DynamicImage::new_rgba8(30, 30));
    let rgb = png(image::DynamicImage::new_rgb8(30, 30));
    let dir = support::models_dir().join("varied-llava");
    let p = processor(&dir).unwrap();
    assert!(!p.config().do_convert_rgb);
    assert!(p.decode(&rgb).is_ok());
    let e = p.decode(&rgba).unwrap_err().to_string();
    assert!(e.contains("do_convert_rgb"), "{e}");
    // With it (the default), alpha is dropped as PIL's convert("RGB") does.
    let dir = with_processor("varied-llava", |p| p["do_convert_rgb"] = json!(true));
    assert!(processor(dir.path()).unwrap().decode(&rgba).is_ok());
}
