//! Parity of GLM-4.1V's vision tower and merger with transformers' `Glm4vVisionModel`, on the tiny
//! random checkpoint that transformers itself wrote (models/make_glm4v_fixtures.py). The
//! references are committed; this test never runs Python.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use vlm_model::glm4v::{Glm4vMerger, Glm4vVision};
use vlm_model::{Checkpoint, LlavaConfig, ModelError, QuantPlan};

mod support;
use support::{max_abs_diff, models_dir};

const TOLERANCE: f32 = 1e-4;
const CASES: [&str; 5] = ["wide", "tall", "small", "large", "two"];

struct Fixture {
    cfg: LlavaConfig,
    vision: Glm4vVision,
    merger: Glm4vMerger,
    refs: HashMap<String, Tensor>,
}

fn fixture() -> Fixture {
    let dir = models_dir().join("tiny-glm4v");
    let ckpt = Checkpoint::open(&dir).unwrap();
    let cfg = ckpt.config().clone();
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    let visual = vb.pp("model").pp("visual");
    let vision = Glm4vVision::new(&cfg, visual.clone(), &QuantPlan::none()).unwrap();
    let merger = Glm4vMerger::new(&cfg, visual.pp("merger"), &QuantPlan::none()).unwrap();
    let refs =
        candle_core::safetensors::load(dir.join("reference/reference.safetensors"), &Device::Cpu)
            .unwrap();
    Fixture {
        cfg,
        vision,
        merger,
        refs,
    }
}

/// The `[1, 3, gh·p, gw·p]` image behind one image's patch rows `[gh·gw, 3·T·p·p]` (transformers'
/// order: patches by (block_row, block_col, r, c), each patch by (channel, temporal, ph, pw)).
fn unpatchify(rows: &Tensor, cfg: &LlavaConfig, gh: usize, gw: usize) -> Tensor {
    let g = cfg.glm4v.as_ref().unwrap();
    let (p, m, t) = (
        cfg.vision.patch_size,
        g.spatial_merge_size,
        g.temporal_patch_size,
    );
    let patches = rows
        .reshape(vec![gh / m, gw / m, m, m, 3, t, p, p])
        .unwrap();
    // A still image repeats the same frame over the temporal patch.
    for k in 1..t {
        let diff = max_abs_diff(
            &patches.narrow(5, 0, 1).unwrap(),
            &patches.narrow(5, k, 1).unwrap(),
        );
        assert_eq!(diff, 0.0, "temporal slice {k} differs from slice 0");
    }
    patches
        .narrow(5, 0, 1)
        .unwrap()
        .squeeze(5)
        .unwrap()
        .permute([4, 0, 2, 5, 1, 3, 6])
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((1, 3, gh * p, gw * p))
        .unwrap()
}

/// `(gh, gw)` of every image of a case.
fn grids(f: &Fixture, case: &str) -> Vec<(usize, usize)> {
    f.refs[&format!("{case}.image_grid_thw")]
        .to_vec2::<i64>()
        .unwrap()
        .iter()
        .map(|thw| {
            assert_eq!(thw[0], 1, "a still image has one temporal patch");
            (thw[1] as usize, thw[2] as usize)
        })
        .collect()
}

#[test]
fn tower_and_merger_match_transformers() {
    let f = fixture();
    let m = f.cfg.glm4v.as_ref().unwrap().spatial_merge_size;
    let mut report = Vec::new();
    for case in CASES {
        let pixels = &f.refs[&format!("{case}.pixel_values")];
        let features = &f.refs[&format!("{case}.features")];
        let merged = &f.refs[&format!("{case}.merged")];
        let (mut patch_at, mut row_at) = (0, 0);
        for (i, (gh, gw)) in grids(&f, case).into_iter().enumerate() {
            let (patches, rows) = (gh * gw, gh * gw / (m * m));
            let image = unpatchify(
                &pixels.narrow(0, patch_at, patches).unwrap(),
                &f.cfg,
                gh,
                gw,
            );
            let ours = f.vision.forward(&image).unwrap();
            assert_eq!(ours.dims(), &[rows, f.vision.out_dim()]);
            let feat_diff = max_abs_diff(&ours, &features.narrow(0, row_at, rows).unwrap());
            let ours_merged = f.merger.forward(&ours).unwrap();
            let merged_diff = max_abs_diff(&ours_merged, &merged.narrow(0, row_at, rows).unwrap());
            println!(
                "{case}[{i}] grid {gh}x{gw}: features {feat_diff:.3e}, merged {merged_diff:.3e}"
            );
            report.push((format!("{case}[{i}]"), feat_diff, merged_diff));
            patch_at += patches;
            row_at += rows;
        }
        assert_eq!(
            patch_at,
            pixels.dim(0).unwrap(),
            "{case}: patches left over"
        );
        assert_eq!(row_at, features.dim(0).unwrap(), "{case}: rows left over");
    }
    for (name, feat, merged) in &report {
        assert!(*feat <= TOLERANCE, "{name}: features differ by {feat}");
        assert!(
            *merged <= TOLERANCE,
            "{name}: merged rows differ by {merged}"
        );
    }
}

#[test]
fn batch_of_equal_images_concatenates_rows() {
    let f = fixture();
    let (gh, gw) = grids(&f, "wide")[0];
    let image = unpatchify(&f.refs["wide.pixel_values"], &f.cfg, gh, gw);
    let one = f.vision.forward(&image).unwrap();
    let two = f
        .vision
        .forward(&Tensor::cat(&[&image, &image], 0).unwrap())
        .unwrap();
    assert_eq!(
        max_abs_diff(&Tensor::cat(&[&one, &one], 0).unwrap(), &two),
        0.0
    );
    let mut stats = Vec::new();
    let monitored = f
        .vision
        .forward_monitored(&image, Some(&mut stats), &vlm_model::Cancel::never())
        .unwrap();
    assert_eq!(max_abs_diff(&monitored, &one), 0.0);
    assert_eq!(stats.len(), f.cfg.vision.num_hidden_layers);
    // A cancelled request stops before the first block.
    let cancel = vlm_model::Cancel::never();
    cancel.cancel();
    let mut stats = Vec::new();
    let err = f
        .vision
        .forward_monitored(&image, Some(&mut stats), &cancel)
        .unwrap_err();
    assert!(matches!(err, vlm_model::ModelError::Cancelled), "{err}");
    assert!(stats.is_empty());
}

#[test]
fn malformed_inputs_are_errors_not_panics() {
    let f = fixture();
    let dev = Device::Cpu;
    let bad_shapes: [&[usize]; 6] = [
        &[1, 3, 30, 28], // H not a multiple of 28
        &[1, 3, 28, 42], // W not a multiple of 28
        &[1, 3, 0, 28],  // empty
        &[1, 4, 28, 28], // channels
        &[3, 28, 28],    // rank
        &[0, 3, 28, 28], // no image
    ];
    for dims in bad_shapes {
        let x = Tensor::zeros(dims, DType::F32, &dev).unwrap();
        match f.vision.forward(&x) {
            Err(ModelError::InvalidInput(msg)) => println!("{dims:?}: {msg}"),
            other => panic!("{dims:?}: expected InvalidInput, got {other:?}"),
        }
    }
    let rows = Tensor::zeros((2, f.merger.dim() + 1), DType::F32, &dev).unwrap();
    assert!(matches!(
        f.merger.forward(&rows),
        Err(ModelError::InvalidInput(_))
    ));
}
