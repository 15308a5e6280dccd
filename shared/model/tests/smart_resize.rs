//! `smart_resize` against transformers' GLM-4.1V `smart_resize` on the 615 cases
//! `models/make_smart_resize_fixtures.py` wrote (defaults, random sizes up to 9000 px, small and
//! large pixel budgets, another factor): the same size for each, and a refusal where it refuses.

mod support;

use vlm_model::smart_resize::{smart_resize, SmartResize};

#[test]
fn smart_resize_equals_transformers() {
    let path = support::models_dir().join("glm4v/smart_resize.json");
    let cases: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let n = |c: &serde_json::Value, k: &str| c[k].as_u64().unwrap();
    let mut refused = 0;
    for c in &cases {
        let s = SmartResize {
            temporal_factor: n(c, "temporal_factor") as u32,
            factor: n(c, "factor") as u32,
            min_pixels: n(c, "min_pixels"),
            max_pixels: n(c, "max_pixels"),
        };
        let got = smart_resize(
            n(c, "frames") as u32,
            n(c, "height") as u32,
            n(c, "width") as u32,
            &s,
        );
        match (&got, c.get("resized")) {
            (Ok((h, w)), Some(want)) => {
                assert_eq!(serde_json::json!([h, w]), *want, "{c}");
            }
            (Err(_), None) => refused += 1,
            _ => panic!("{c}: got {got:?}"),
        }
    }
    assert_eq!(cases.len(), 615);
    assert_eq!(
        refused, 3,
        "the cases transformers refuses (aspect ratio over 200)"
    );
}
