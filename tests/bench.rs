//! `vlm-mesh bench … --quick` smoke runs: the report is produced and well formed. No timing
//! assertions (CI machines are noisy); only that each measure is a real, ordered spread and the
//! ratios are what the medians say.

mod common;

use serde_json::Value;

fn spread(v: &Value, what: &str) -> (f64, f64, f64, f64) {
    let get = |k: &str| {
        v[k].as_f64()
            .unwrap_or_else(|| panic!("{what}.{k} missing or not a number: {v}"))
    };
    let (p50, p90, min, max) = (get("p50"), get("p90"), get("min"), get("max"));
    assert!(min.is_finite() && max.is_finite(), "{what}: {v}");
    assert!(
        0.0 <= min && min <= p50 && p50 <= p90 && p90 <= max,
        "{what} is not an ordered spread: {v}"
    );
    (p50, p90, min, max)
}

#[test]
fn bench_mesh_quick_reports_well_formed_json() {
    let model = common::model();
    let report = common::run_json(&[
        "bench",
        "mesh",
        "--quick",
        "--json",
        "--model",
        model.to_str().unwrap(),
    ]);
    assert_eq!(report["bench"], "mesh", "{report}");
    assert_eq!(report["cache"], "off", "{report}");
    assert_eq!(report["rounds"], 3, "--quick runs 3 rounds: {report}");
    assert_eq!(report["max_tokens"], 4, "{report}");
    let tokens = report["tokens"].as_u64().expect("tokens");
    assert!((1..=4).contains(&tokens), "{report}");
    assert!(report["cores"].as_u64().expect("cores") >= 1, "{report}");
    for row in ["ttft_ms", "itl_ms"] {
        let r = &report[row];
        let (a, ..) = spread(&r["in_process"], &format!("{row}.in_process"));
        let (b, ..) = spread(&r["mesh"], &format!("{row}.mesh"));
        if row == "ttft_ms" || tokens > 1 {
            let ratio = r["ratio_p50"].as_f64().expect("ratio_p50");
            assert!(a > 0.0 && b > 0.0, "{row}: {report}");
            assert!(
                (ratio - b / a).abs() <= 1e-9 * ratio.abs(),
                "{row}.ratio_p50 {ratio} is not mesh/in-process = {}",
                b / a
            );
        }
    }
    // The first token cannot come before the request was sent, in either setup.
    assert!(report["ttft_ms"]["mesh"]["min"].as_f64().unwrap() > 0.0);
}
