//! Workloads (b) image-heavy and (c) long generation of `bench scale`: one replica per stage,
//! sampling the encoder's and the decoder's `vlm_saturation` while the load runs.

use std::time::{Duration, Instant};

use super::{answer, greedy_request, stage_sum, BenchMesh, ScaleBenchArgs, Signals};

/// Long side of workload (b)'s images: a phone screenshot's order of size. Every request then
/// costs the encoder a screenshot's decode and resize, while the decoder's share (the model's
/// image rows and 2 tokens) stays what it is for any image: the encoder is the bottleneck by
/// construction, on a fast machine or a slow one, in a long run or a short one.
const HEAVY_SIDE: u32 = 1280;

/// Workload (b) or (c) on one replica per stage, sampling the stages' `vlm_saturation`.
pub(super) async fn signals(
    a: &ScaleBenchArgs,
    base: &image::RgbImage,
    workload: &'static str,
) -> anyhow::Result<Signals> {
    let bm = BenchMesh::start_replicas(&a.input.model, vec![], [1, 1, 1]).await?;
    let result = async {
        let (clients, tokens) = match workload {
            "image-heavy" => (8, 2),
            _ => (16, a.long_tokens),
        };
        let heavy =
            (workload == "image-heavy").then(|| std::sync::Arc::new(screenshot_sized(base)));
        // The first two rounds of images are ready before the clock starts, so the run opens
        // with every client's image at the encoder at once; later ones are made off the async
        // threads (the clients share one task).
        let ready: Vec<Vec<u8>> = match &heavy {
            Some(big) => {
                let made = (0..2 * clients).map(|i| {
                    let big = big.clone();
                    tokio::task::spawn_blocking(move || fast_png_variant(&big, i + 1))
                });
                futures::future::try_join_all(made)
                    .await?
                    .into_iter()
                    .collect::<anyhow::Result<_>>()?
            }
            None => {
                // One image for every request: put in the cache first, so that the run's
                // requests never encode it (sixteen first misses at once would be an image
                // burst, not a long-generation load).
                let prompt = "USER: <image>\nWhat is shown in this image? ASSISTANT:";
                let warm = greedy_request(crate::bench::cache::variant(base, 0)?, prompt.into(), 1);
                answer(&bm, warm).await?;
                vec![]
            }
        };
        let next = std::sync::atomic::AtomicUsize::new(0);
        let done = std::sync::atomic::AtomicBool::new(false);
        let started = Instant::now();
        let until = started + Duration::from_secs_f64(a.seconds);
        let load = async {
            let workers = (0..clients).map(|_| async {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if Instant::now() >= until {
                        return Ok::<_, anyhow::Error>(());
                    }
                    let image = match &heavy {
                        Some(_) if i < ready.len() => ready[i].clone(),
                        Some(big) => {
                            let big = big.clone();
                            tokio::task::spawn_blocking(move || fast_png_variant(&big, i + 1))
                                .await??
                        }
                        None => crate::bench::cache::variant(base, 0)?,
                    };
                    let prompt = "USER: <image>\nWhat is shown in this image? ASSISTANT:";
                    let req = greedy_request(image, prompt.into(), tokens);
                    answer(&bm, req).await?;
                }
            });
            let r = futures::future::try_join_all(workers).await;
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            r
        };
        let sample = async {
            let (mut enc, mut dec) = (vec![], vec![]);
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                enc.push(stage_sum(&bm, "encoder", "vlm_saturation").await?);
                dec.push(stage_sum(&bm, "decoder", "vlm_saturation").await?);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok::<_, anyhow::Error>((enc, dec))
        };
        let (loaded, sampled) = tokio::join!(load, sample);
        loaded?;
        let (enc, dec) = sampled?;
        let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        Ok::<_, anyhow::Error>(Signals {
            workload,
            encoder_max: max(&enc),
            encoder_mean: mean(&enc),
            decoder_max: max(&dec),
            decoder_mean: mean(&dec),
            seconds: started.elapsed().as_secs_f64(),
        })
    }
    .await;
    bm.mesh.shutdown().await;
    result
}

/// `base` scaled to [`HEAVY_SIDE`] on its long side.
fn screenshot_sized(base: &image::RgbImage) -> image::RgbImage {
    let (w, h) = base.dimensions();
    let scale = f64::from(HEAVY_SIDE) / f64::from(w.max(h).max(1));
    let (w, h) = (
        ((f64::from(w) * scale).round() as u32).max(1),
        ((f64::from(h) * scale).round() as u32).max(1),
    );
    image::imageops::resize(base, w, h, image::imageops::FilterType::Triangle)
}

/// `img` with its first pixel marking `round` (a distinct image, so never a cache hit), as a PNG
/// written with fast compression (the client's cost stays small next to the encoder's).
fn fast_png_variant(img: &image::RgbImage, round: usize) -> anyhow::Result<Vec<u8>> {
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    use image::ImageEncoder;
    let mut img = img.clone();
    img.get_pixel_mut(0, 0).0 = [(round % 256) as u8, (round / 256 % 256) as u8, 77];
    let mut out = Vec::new();
    PngEncoder::new_with_quality(&mut out, CompressionType::Fast, FilterType::NoFilter)
        .write_image(
            img.as_raw(),
            img.width(),
            img.height(),
            image::ExtendedColorType::Rgb8,
        )?;
    Ok(out)
}
