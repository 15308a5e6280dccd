//! `resize_torchvision` against torchvision's `resize(uint8, BICUBIC | BILINEAR, antialias=True)` on the
//! random images `models/make_torchvision_resize_fixtures.py` wrote (down- and upscaling, each
//! axis alone and both): identical bytes. PIL's resampler on the same cases differs by a level
//! here and there (22-bit instead of int16 weights), which this also shows.

mod support;

use candle_core::Device;
use vlm_model::resize::{resize, resize_torchvision, Filter};

#[test]
fn resize_torchvision_equals_torchvision_bit_for_bit() {
    let path = support::models_dir().join("glm4v/torchvision_resize.safetensors");
    let t = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let mut cases = 0;
    let mut pil_differs = 0;
    while let Some(input) = t.get(&format!("input_{cases}")) {
        let output = &t[&format!("output_{cases}")];
        let (h, w, _) = input.dims3().unwrap();
        let (oh, ow, _) = output.dims3().unwrap();
        let raw = input.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        let src = image::RgbImage::from_raw(w as u32, h as u32, raw).unwrap();
        let want = output.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        let got = resize_torchvision(&src, ow as u32, oh as u32, Filter::Bicubic).unwrap();
        assert!(
            got.as_raw() == &want,
            "case {cases}: {w}x{h} -> {ow}x{oh} differs from torchvision"
        );
        let bilinear = t[&format!("bilinear_output_{cases}")]
            .flatten_all()
            .unwrap()
            .to_vec1::<u8>()
            .unwrap();
        let got = resize_torchvision(&src, ow as u32, oh as u32, Filter::Bilinear).unwrap();
        assert!(
            got.as_raw() == &bilinear,
            "case {cases}: {w}x{h} -> {ow}x{oh} bilinear differs from torchvision"
        );
        assert_ne!(bilinear, want, "case {cases}: bilinear equals bicubic");
        let pil = resize(&src, ow as u32, oh as u32, Filter::Bicubic).unwrap();
        pil_differs += usize::from(pil.as_raw() != &want);
        cases += 1;
    }
    assert_eq!(cases, 10);
    assert!(
        pil_differs > 0,
        "PIL's weights would have done: the test proves nothing"
    );
}
