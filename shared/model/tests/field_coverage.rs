//! Every key the loader reads ([`vlm_model::config::read_sections`], taken from the loader's own
//! `Deserialize` structs, so the list cannot drift from the code) is set away from its default by
//! at least one of the varied fixtures (`varied.rs`, models/make_varied_fixtures.py): removing the
//! key from that fixture changes what the loader makes of the checkpoint (its config, image
//! processor, end ids or chat-template tokens). A key that only one value can take is listed in
//! [`REFUSED`] with another value, which must be refused; a key that is another transformers
//! version's spelling of a varied key is listed in [`ALIASES`]. The test fails naming every key
//! that is neither varied, nor refused, nor an alias of a varied key.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::{json, Value};
use vlm_model::config::{read_sections, ImageProcessorConfig};
use vlm_model::prompt::PromptBuilder;
use vlm_model::{ChatTemplateSource, LlavaConfig};

mod support;

const VARIED: [&str; 4] = [
    "varied-llava",
    "varied-llava-next",
    "varied-llava-glm",
    "varied-glm4v",
];

/// Keys that are another layout's name for a key the fixtures vary (transformers 4 wrote these;
/// `glm4v.rs`'s `transformers_4_config_layout_reads_the_same` and `parity_glm.rs` read them).
const ALIASES: &[(&str, &str)] = &[
    (
        "config.json:text_config.rope_scaling",
        "config.json:text_config.rope_parameters",
    ),
    (
        "config.json:text_config.rope_theta",
        "config.json:text_config.rope_parameters.rope_theta",
    ),
    (
        "config.json:text_config.partial_rotary_factor",
        "config.json:text_config.rope_parameters.partial_rotary_factor",
    ),
    (
        "config.json:text_config.rope_parameters.type",
        "config.json:text_config.rope_parameters.rope_type",
    ),
    // Before transformers 5 the tie flag lived in text_config; 5 writes it in both places.
    (
        "config.json:text_config.tie_word_embeddings",
        "config.json:tie_word_embeddings",
    ),
    (
        "config.json:vision_config.rope_theta",
        "config.json:vision_config.rope_parameters.rope_theta",
    ),
    (
        "config.json:vision_config.rope_parameters.type",
        "config.json:vision_config.rope_parameters.rope_type",
    ),
    (
        "processor_config.json:image_processor.min_pixels",
        "processor_config.json:image_processor.size.shortest_edge",
    ),
    (
        "processor_config.json:image_processor.max_pixels",
        "processor_config.json:image_processor.size.longest_edge",
    ),
    // Without it, the image token is the added token whose id config.json names.
    (
        "tokenizer_config.json:image_token",
        "config.json:image_token_index",
    ),
    // The template may live in its own file, which the GLM-4.1V fixture has.
    (
        "tokenizer_config.json:chat_template",
        "file:chat_template.jinja",
    ),
];

/// Keys whose only accepted value is the default (or is fixed by another key): the fixture named
/// gets the value given, which the loader must refuse.
fn refused() -> Vec<(&'static str, &'static str, Value)> {
    vec![
        (
            "config.json:model_type",
            "varied-llava",
            json!("not_a_model"),
        ),
        (
            "config.json:vision_config.model_type",
            "varied-llava",
            json!("not_a_tower"),
        ),
        (
            "config.json:vision_config.model_type",
            "varied-glm4v",
            json!("not_a_tower"),
        ),
        (
            "config.json:text_config.model_type",
            "varied-llava",
            json!("not_a_decoder"),
        ),
        // Only RGB towers.
        (
            "config.json:vision_config.num_channels",
            "varied-llava",
            json!(1),
        ),
        (
            "config.json:vision_config.in_channels",
            "varied-glm4v",
            json!(1),
        ),
        // The crop must be the tower's image size, which is also its default.
        (
            "processor_config.json:image_processor.crop_size",
            "varied-llava",
            json!({"height": 27, "width": 27}),
        ),
        // The processor's pinpoints must be config.json's, which are used.
        (
            "processor_config.json:image_processor.image_grid_pinpoints",
            "varied-llava-next",
            json!([[40, 40]]),
        ),
    ]
}

fn key_id(file: &str, path: &[&str], key: &str) -> String {
    let mut id = format!("{file}:");
    for p in path {
        id.push_str(p);
        id.push('.');
    }
    id.push_str(key);
    id
}

/// Splits `file:a.b.c` into the file and the JSON path.
fn split(id: &str) -> (&str, Vec<&str>) {
    let (file, path) = id.split_once(':').unwrap();
    (file, path.split('.').collect())
}

/// What the loader makes of the checkpoint in `dir`, as text (errors included).
fn resolve(dir: &Path) -> String {
    let cfg = match LlavaConfig::from_file(&dir.join("config.json")) {
        Ok(c) => c,
        Err(e) => return format!("config.json refused: {e}"),
    };
    let processor = ImageProcessorConfig::for_model(dir, &cfg).and_then(|p| {
        vlm_model::Preprocessor::new(p, Default::default()).map(|p| p.config().clone())
    });
    let eos = PromptBuilder::from_dir(dir, &cfg).map(|p| p.eos_ids().to_vec());
    let template = ChatTemplateSource::from_dir(dir);
    format!("{cfg:?}\n{processor:?}\n{eos:?}\n{template:?}")
}

/// A copy of the fixture's files except the weights, where `edit` may change one JSON file.
fn copy_without_weights(src: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(src).unwrap().flatten() {
        let name = entry.file_name();
        let n = name.to_string_lossy();
        if entry.path().is_file() && !n.ends_with(".safetensors") {
            std::fs::copy(entry.path(), dir.path().join(&name)).unwrap();
        }
    }
    dir
}

/// The fixture with the value at `file:path` replaced (`Some`) or removed (`None`); `None` when
/// the fixture has no such key.
fn edited(fixture: &Path, id: &str, value: Option<&Value>) -> Option<tempfile::TempDir> {
    let (file, path) = split(id);
    let dir = copy_without_weights(fixture);
    if file == "file" {
        let f = dir.path().join(path.join("."));
        std::fs::remove_file(f).ok()?;
        return Some(dir);
    }
    let text = std::fs::read_to_string(dir.path().join(file)).ok()?;
    let mut root: Value = serde_json::from_str(&text).unwrap();
    let (last, parents) = path.split_last().unwrap();
    let mut obj = &mut root;
    for p in parents {
        obj = obj.get_mut(*p)?;
    }
    let obj = obj.as_object_mut()?;
    match value {
        None => {
            obj.remove(*last)?;
        }
        Some(v) => {
            obj.insert(last.to_string(), v.clone());
        }
    }
    std::fs::write(dir.path().join(file), root.to_string()).unwrap();
    Some(dir)
}

fn model_type(fixture: &Path) -> String {
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("config.json")).unwrap())
            .unwrap();
    cfg["model_type"].as_str().unwrap_or("llava").to_string()
}

/// The key ids some varied fixture of a family that reads them sets away from the default.
fn varied_keys(read: &[(String, Vec<&'static str>)]) -> BTreeSet<String> {
    let mut varied = BTreeSet::new();
    for name in VARIED {
        let fixture = support::models_dir().join(name);
        let family = model_type(&fixture);
        let base = resolve(&fixture);
        assert!(
            !base.contains("refused") && !base.contains("Err("),
            "{name} does not load as it is: {base}"
        );
        let ids = read
            .iter()
            .filter(|(_, fams)| fams.contains(&family.as_str()))
            .map(|(id, _)| id.as_str())
            .chain(
                ALIASES
                    .iter()
                    .map(|(_, a)| *a)
                    .filter(|a| a.starts_with("file:")),
            );
        for id in ids {
            if let Some(dir) = edited(&fixture, id, None) {
                if resolve(dir.path()) != base {
                    varied.insert(id.to_string());
                }
            }
        }
    }
    varied
}

#[test]
fn every_key_the_loader_reads_is_varied_by_a_fixture() {
    // Every key, with the families that read it (a key that holds a nested section, such as
    // rope_parameters, is one too: removing it removes the whole section).
    let sections = read_sections();
    let mut read: Vec<(String, Vec<&'static str>)> = Vec::new();
    for s in &sections {
        for key in s.keys {
            let id = key_id(s.file, s.path, key);
            match read.iter_mut().find(|(k, _)| *k == id) {
                Some((_, fams)) => fams.extend(s.families),
                None => read.push((id, s.families.to_vec())),
            }
        }
    }
    assert!(read.len() > 60, "only {} keys found", read.len());
    // The lists below name keys the loader reads (so they cannot rot).
    let known: BTreeSet<&str> = read.iter().map(|(k, _)| k.as_str()).collect();
    for (k, alias) in ALIASES {
        assert!(
            known.contains(k),
            "ALIASES names {k}, which no section reads"
        );
        assert!(
            alias.starts_with("file:") || known.contains(alias),
            "ALIASES names {alias}, which no section reads"
        );
    }
    let refused = refused();
    for (k, fixture, value) in &refused {
        assert!(
            known.contains(k),
            "REFUSED names {k}, which no section reads"
        );
        let dir = edited(&support::models_dir().join(fixture), k, Some(value))
            .unwrap_or_else(|| panic!("{fixture} has no place for {k}"));
        let got = resolve(dir.path());
        assert!(
            got.contains("refused") || got.contains("Err("),
            "{fixture} with {k} = {value} was accepted: {got}"
        );
    }

    let varied = varied_keys(&read);
    let refused_keys: BTreeSet<&str> = refused.iter().map(|(k, _, _)| *k).collect();
    let uncovered: Vec<&str> = read
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| {
            !varied.contains(*k)
                && !refused_keys.contains(k)
                && !ALIASES
                    .iter()
                    .any(|(a, target)| a == k && varied.contains(*target))
        })
        .collect();
    println!(
        "{} keys read, {} varied by a fixture",
        read.len(),
        varied.len()
    );
    assert!(
        uncovered.is_empty(),
        "keys the loader reads that no varied fixture sets away from its default: {uncovered:#?}"
    );
}
