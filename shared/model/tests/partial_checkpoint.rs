//! A stage's pod may hold only the shards of its own tensors (the chart's per-stage download):
//! each part loads from the shards it needs, and a part whose shard is missing is refused naming
//! the shard and the part.

use candle_core::{DType, Device};
use vlm_model::{Checkpoint, Decoder, VisionEncoder};

mod support;

/// `tiny-llava-gqa` (five shards: 00005 holds only vision-tower tensors, 00001 only language
/// model ones) copied without `drop`.
fn without(drop: &str) -> tempfile::TempDir {
    let src = support::models_dir().join("tiny-llava-gqa");
    let dir = tempfile::tempdir().unwrap();
    let mut copied = 0;
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() && entry.file_name() != drop {
            std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
            copied += 1;
        }
    }
    assert!(copied > 5, "the fixture's files were not copied");
    dir
}

#[test]
fn each_part_loads_from_its_own_shards_and_a_missing_one_is_named() {
    let dev = Device::Cpu;
    // The vision tower's last shard missing: the decoder still loads (a decoder pod's download).
    let dir = without("model-00005-of-00005.safetensors");
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    Decoder::load(&ckpt, DType::F32, &dev).unwrap();
    let err = VisionEncoder::load(&ckpt, DType::F32, &dev)
        .err()
        .expect("the vision tower loaded without its shard")
        .to_string();
    assert!(
        err.contains("model-00005-of-00005.safetensors") && err.contains("vision_tower"),
        "{err}"
    );
    // A language-model shard missing: the encoder loads (an encoder pod's download), the
    // decoder is refused.
    let dir = without("model-00001-of-00005.safetensors");
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    VisionEncoder::load(&ckpt, DType::F32, &dev).unwrap();
    let err = Decoder::load(&ckpt, DType::F32, &dev)
        .err()
        .expect("the decoder loaded without its shard")
        .to_string();
    assert!(
        err.contains("model-00001-of-00005.safetensors") && err.contains("language_model"),
        "{err}"
    );
}
