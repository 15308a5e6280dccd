//! Random and mutated input for every surface a stage parses, mapped to the statuses the stages
//! answer with: never a panic, and never a status outside the documented set (INVALID_ARGUMENT,
//! RESOURCE_EXHAUSTED). Images (PNG bytes mutated, headers forged), prompts with image-row
//! counts a peer claims, token grids, sampling parameters, and tensor-chunk streams.

use std::path::PathBuf;

use proptest::prelude::*;
use tonic::Code;
use vlm_model::config::{ImageProcessorConfig, ResizeTarget};
use vlm_model::{Device, ImageLimits, PreparedPrompt, Preprocessor, PromptBuilder, RopePositions};
use vlm_proto::{TensorChunk, TensorHeader};
use vlm_serving::{model_status, params_from_proto};
use vlm_tensor::{TensorCollector, TensorLimits};

const DOCUMENTED: [Code; 2] = [Code::InvalidArgument, Code::ResourceExhausted];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn preprocessor() -> Preprocessor {
    let cfg = ImageProcessorConfig {
        image_grid_pinpoints: None,
        native: None,
        do_convert_rgb: true,
        do_resize: true,
        size: ResizeTarget::ShortestEdge(30),
        resample: 3,
        do_center_crop: true,
        crop_size: (30, 30),
        do_rescale: true,
        rescale_factor: 1.0 / 255.0,
        do_normalize: true,
        image_mean: [0.5; 3],
        image_std: [0.5; 3],
    };
    Preprocessor::new(cfg, ImageLimits::default()).unwrap()
}

fn prompts() -> PromptBuilder {
    let path = repo().join("models/tiny-llava/tokenizer.json");
    PromptBuilder::new(tokenizers::Tokenizer::from_file(path).unwrap(), 4, vec![]).unwrap()
}

fn png() -> Vec<u8> {
    std::fs::read(repo().join("models/images/shapes-48x48.png")).unwrap()
}

/// One edit of a byte string: flip, overwrite, truncate, insert or duplicate a range.
#[derive(Debug, Clone)]
enum Edit {
    Flip(usize, u8),
    Set(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    Repeat(usize, usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(i, b)| Edit::Flip(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Set(i, b)),
        any::<usize>().prop_map(Edit::Truncate),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..64))
            .prop_map(|(i, v)| Edit::Insert(i, v)),
        (any::<usize>(), 1usize..512).prop_map(|(i, n)| Edit::Repeat(i, n)),
    ]
}

fn apply(bytes: &mut Vec<u8>, e: &Edit) {
    if bytes.is_empty() {
        return;
    }
    let at = |i: usize| i % bytes.len();
    match e {
        Edit::Flip(i, b) => {
            let i = at(*i);
            bytes[i] ^= b;
        }
        Edit::Set(i, b) => {
            let i = at(*i);
            bytes[i] = *b;
        }
        Edit::Truncate(i) => bytes.truncate(at(*i)),
        Edit::Insert(i, v) => {
            let i = at(*i);
            bytes.splice(i..i, v.iter().copied());
        }
        Edit::Repeat(i, n) => {
            let i = at(*i);
            let end = (i + n).min(bytes.len());
            let copy = bytes[i..end].to_vec();
            bytes.splice(end..end, copy);
        }
    }
}

/// A PNG whose IHDR declares `w`×`h` (CRC fixed up), pixel data unchanged.
fn forge_dims(mut png: Vec<u8>, w: u32, h: u32) -> Vec<u8> {
    png[16..20].copy_from_slice(&w.to_be_bytes());
    png[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32fast::hash(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

fn image_outcome(bytes: &[u8]) -> Result<(), TestCaseError> {
    match preprocessor().preprocess(bytes, &Device::Cpu) {
        Ok(t) => prop_assert_eq!(t.dims(), &[1, 3, 30, 30]),
        Err(e) => {
            let s = model_status(e);
            prop_assert!(DOCUMENTED.contains(&s.code()), "{:?}", s);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn mutated_images_get_a_documented_status(edits in prop::collection::vec(edit(), 1..6)) {
        let mut bytes = png();
        for e in &edits {
            apply(&mut bytes, e);
        }
        image_outcome(&bytes)?;
    }

    #[test]
    fn forged_image_dimensions_get_a_documented_status(w in any::<u32>(), h in any::<u32>()) {
        image_outcome(&forge_dims(png(), w, h))?;
    }

    #[test]
    fn random_bytes_as_images_get_a_documented_status(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        image_outcome(&bytes)?;
    }

    #[test]
    fn prompts_and_claimed_rows_get_a_documented_status(
        prompt in ".{0,400}",
        images in prop::collection::vec(prop_oneof![Just(0u32), 1u32..600, any::<u32>()], 0..4),
        context in 1usize..4096,
    ) {
        let placeholders = "<image>".repeat(images.len());
        let prompt = format!("USER: {placeholders}{prompt} ASSISTANT:");
        let rows: Vec<usize> = images.iter().map(|&r| if r == 0 { 16 } else { r as usize }).collect();
        match prompts().prepare_within(&prompt, &rows, context) {
            Ok(p) => prop_assert!(p.ids.len() <= context),
            Err(e) => {
                let s = model_status(e);
                prop_assert!(DOCUMENTED.contains(&s.code()), "{:?}", s);
            }
        }
    }

    /// A token grid a peer claims (ImageSlot / ImageLayout token_rows x token_cols), and the 3-D
    /// positions of a prompt whose image span it may or may not cover: bounded sides, positions
    /// or INVALID_ARGUMENT, never a panic.
    #[test]
    fn token_grids_get_a_documented_status(
        rows in prop_oneof![any::<u32>(), 0u32..80, Just(4096), Just(4097)],
        cols in prop_oneof![any::<u32>(), 0u32..80, Just(256)],
        span in 1usize..7000,
    ) {
        match vlm_serving::token_grid_from_proto(rows, cols) {
            Err(s) => prop_assert_eq!(s.code(), Code::InvalidArgument),
            Ok(None) => prop_assert_eq!((rows, cols), (0, 0)),
            Ok(Some(g)) => {
                prop_assert!(g.rows <= 4096 && g.cols <= 4096);
                prop_assert!(g.rows as u64 * g.cols as u64 <= 1 << 20);
                let prompt = PreparedPrompt { ids: vec![1; span + 2], image_spans: vec![(1, span)] };
                match RopePositions::for_prompt(&prompt, &[g]) {
                    Ok(r) => {
                        prop_assert_eq!((g.rows * g.cols) as usize, span);
                        prop_assert_eq!(r.len(), span + 2);
                    }
                    Err(e) => prop_assert_eq!(model_status(e).code(), Code::InvalidArgument),
                }
            }
        }
    }

    #[test]
    fn sampling_parameters_get_a_documented_status(
        max_tokens in prop::option::of(any::<u32>()),
        temperature in prop_oneof![any::<f32>(), Just(f32::NAN), Just(f32::INFINITY), -2f32..3.0],
        top_p in prop_oneof![any::<f32>(), Just(f32::NAN), 0f32..=1.0],
        top_k in any::<u32>(),
        seed in prop::option::of(any::<u64>()),
        stop in prop::collection::vec(prop_oneof![Just(0usize), 1usize..300, Just(100_000)], 0..20),
        frequency_penalty in prop_oneof![any::<f32>(), Just(f32::NAN), -3f32..3.0],
        presence_penalty in prop_oneof![any::<f32>(), Just(f32::INFINITY), -3f32..3.0],
        bias in prop::collection::hash_map(any::<u32>(), prop_oneof![-150f32..150.0, Just(f32::NAN), Just(f32::NEG_INFINITY)], 0..4),
        many_biases in any::<bool>(),
    ) {
        let mut logit_bias = bias.clone();
        if many_biases {
            logit_bias.extend((0..1025u32).map(|t| (t, 1.0)));
        }
        let p = vlm_proto::SamplingParams {
            max_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            stop: stop.iter().map(|&n| "x".repeat(n)).collect(),
            frequency_penalty,
            presence_penalty,
            logit_bias,
            format: None,
        };
        // The documented rules (README, "Sampling"), spelled out here rather than taken from
        // the code under test: 0 top_p is proto3's "unset".
        let valid = max_tokens != Some(0)
            && temperature.is_finite()
            && temperature >= 0.0
            && (top_p == 0.0 || (top_p > 0.0 && top_p <= 1.0))
            && (-2.0..=2.0).contains(&frequency_penalty)
            && (-2.0..=2.0).contains(&presence_penalty)
            && p.stop.len() <= 16
            && p.stop.iter().all(|s| (1..=256).contains(&s.len()))
            && p.logit_bias.len() <= 1024
            && p.logit_bias.values().all(|v| (-100.0..=100.0).contains(v));
        match params_from_proto(Some(&p), 64) {
            Ok(_) => prop_assert!(valid, "accepted {:?}", p),
            Err(s) => {
                prop_assert!(!valid, "refused valid parameters {:?}: {:?}", p, s);
                prop_assert_eq!(s.code(), Code::InvalidArgument, "{:?}", s);
                prop_assert!(s.message().len() < 1024, "the message echoes input: {} bytes", s.message().len());
            }
        }
    }

    #[test]
    fn random_chunk_streams_get_a_documented_status(
        chunks in prop::collection::vec(
            (
                any::<u64>(),
                prop::collection::vec(any::<u8>(), 0..256),
                // None: the data's own checksum.
                prop::option::of(any::<u32>()),
                prop::option::of((
                    0i32..6,
                    prop::collection::vec(prop_oneof![0u64..8, any::<u64>()], 0..5),
                    prop_oneof![0u64..512, any::<u64>()],
                    any::<u32>(),
                )),
            ),
            1..6,
        ),
    ) {
        let mut collector = TensorCollector::new(TensorLimits::default());
        let mut result = Ok(());
        // Whether a chunk that was pushed broke the stream's integrity rules (a checksum that is
        // not its data's, a seq out of order): such a stream must be refused.
        let mut broken = false;
        for (i, (seq, data, crc32c, header)) in chunks.into_iter().enumerate() {
            let actual = crc32c::crc32c(&data);
            let crc32c = crc32c.unwrap_or(actual);
            broken |= crc32c != actual || seq != i as u64;
            let chunk = TensorChunk {
                seq,
                data: data.into(),
                crc32c,
                header: header.map(|(dtype, shape, total_bytes, chunk_rows)| TensorHeader {
                    layout: None,
                    dtype,
                    shape,
                    total_bytes,
                    chunk_rows,
                }),
            };
            if let Err(e) = collector.push(&chunk) {
                result = Err(e);
                break;
            }
            if collector.is_complete() {
                break;
            }
        }
        let result = result.and_then(|()| collector.finish().map(|_| ()));
        match result {
            Ok(()) => prop_assert!(!broken, "a stream with a bad checksum or seq was accepted"),
            Err(e) => {
                let s: tonic::Status = e.into();
                prop_assert!(DOCUMENTED.contains(&s.code()), "{:?}", s);
            }
        }
    }
}
