//! `grid_sample_bicubic` against torch's `F.grid_sample(mode="bicubic", align_corners=False,
//! padding_mode="border")` on the cases `models/make_grid_sample_fixtures.py` wrote: random maps
//! and points (inside, on and beyond the border) and the grids GLM-4.1V builds to resample its
//! position table to a patch grid. Within 1e-5.

mod support;

use candle_core::{Device, Tensor};
use vlm_model::grid_sample::grid_sample_bicubic;

#[test]
fn bicubic_grid_sample_equals_torch() {
    let path = support::models_dir().join("glm4v/grid_sample.safetensors");
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let mut cases = 0;
    let mut worst = 0.0f32;
    while let Some(input) = tensors.get(&format!("input_{cases}")) {
        let grid = &tensors[&format!("grid_{cases}")];
        let want = &tensors[&format!("output_{cases}")];
        let (c, h, w) = input.dims3().unwrap();
        let points: Vec<(f32, f32)> = grid
            .to_vec2::<f32>()
            .unwrap()
            .into_iter()
            .map(|p| (p[0], p[1]))
            .collect();
        let flat = input.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let got = grid_sample_bicubic(&flat, c, h, w, &points);
        let got = Tensor::from_vec(got, (points.len(), c), &Device::Cpu).unwrap();
        let diff = support::max_abs_diff(&got, want);
        assert!(
            diff <= 1e-5,
            "case {cases} ({c}x{h}x{w}, {} points): {diff}",
            points.len()
        );
        worst = worst.max(diff);
        cases += 1;
    }
    assert_eq!(cases, 8, "every case of the fixture");
    eprintln!("worst difference from torch: {worst:e}");
}
