//! LLaVA-NeXT (anyres) and regions of interest through a real mesh (`vlm-mesh up`: four processes,
//! mTLS): tiled images give transformers' tokens, tiles are cached one by one, regions equal their
//! crops sent as images, bad boxes are refused, and a cache shared by two tilings never mixes them.

use std::path::{Path, PathBuf};

mod common;
use common::{ask_json, generate_json, repo, MeshProc, RedisProc};

const PROMPT: &str = "USER: <image>\nWhat is shown in this image? ASSISTANT:";

fn fixture(name: &str) -> PathBuf {
    repo().join("models").join(name)
}

fn cases(model: &Path) -> Vec<serde_json::Value> {
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model.join("reference/reference.json")).unwrap())
            .unwrap();
    meta["cases"].as_array().unwrap().clone()
}

fn ids(v: &serde_json::Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

/// The one slot report of a one-image answer.
fn report(answer: &serde_json::Value, slot: usize) -> &serde_json::Value {
    &answer["timings"]["images"][slot]
}

/// Every whole-image case of both pinpoint sets: transformers' greedy ids, its image token count
/// and grid, through the mesh.
#[test]
fn tiled_images_through_the_mesh_equal_transformers() {
    for name in ["tiny-llava-next", "tiny-llava-next-b"] {
        let model = fixture(name);
        let mesh = MeshProc::start_with(&model, &[], &[]);
        let mut checked = 0;
        for c in cases(&model).iter().filter(|c| c["region"].is_null()) {
            let image = model.join(c["image"].as_str().unwrap());
            let out = ask_json(mesh.state.path(), &image, PROMPT, &["--max-tokens", "8"]);
            let case = c["name"].as_str().unwrap();
            assert_eq!(
                ids(&out["token_ids"]),
                ids(&c["greedy_ids"]),
                "{name}/{case}: greedy ids differ from transformers"
            );
            let r = report(&out, 0);
            assert_eq!(
                r["rows"], c["num_image_tokens"],
                "{name}/{case}: image rows"
            );
            assert_eq!(r["grid"], c["grid"], "{name}/{case}: grid");
            assert_eq!(r["views"], c["num_views"], "{name}/{case}: views");
            checked += 1;
        }
        assert_eq!(checked, 4, "{name}: tall, wide, square and small");
    }
}

/// Writes `region` of `image` as a PNG (the crop `generate`/the encoder take, PIL-equal).
fn crop_png(image: &Path, region: [u32; 4], out: &Path) {
    let img = image::open(image).unwrap().to_rgb8();
    let r = vlm_model::Region::new(region[0], region[1], region[2], region[3]).unwrap();
    r.crop(&img).unwrap().save(out).unwrap();
}

/// A region request equals the same crop sent as a second image, through the mesh and in process;
/// the region slot reports its own grid and rows.
#[test]
fn a_region_through_the_mesh_equals_its_crop_sent_as_an_image() {
    let model = fixture("tiny-llava-next-b");
    let mesh = MeshProc::start_with(&model, &[], &[]);
    let dir = tempfile::tempdir().unwrap();
    for c in cases(&model).iter().filter(|c| !c["region"].is_null()) {
        let case = c["name"].as_str().unwrap();
        let image = model.join(c["image"].as_str().unwrap());
        let b: Vec<u32> = ids(&c["region"]).iter().map(|&v| v as u32).collect();
        let region = format!("{},{},{},{}", b[0], b[1], b[2], b[3]);
        let with_region = ask_json(
            mesh.state.path(),
            &image,
            PROMPT,
            &["--max-tokens", "8", "--region", &region],
        );
        let crop = dir.path().join(format!("{case}.png"));
        crop_png(&image, [b[0], b[1], b[2], b[3]], &crop);
        let two = common::run_json(&[
            "ask",
            "--state-dir",
            mesh.state.path().to_str().unwrap(),
            "--image",
            image.to_str().unwrap(),
            "--image",
            crop.to_str().unwrap(),
            "--prompt",
            &PROMPT.replace("<image>", "<image><image>"),
            "--max-tokens",
            "8",
            "--json",
        ]);
        assert_eq!(with_region["token_ids"], two["token_ids"], "{case}");
        assert_eq!(with_region["prompt_tokens"], two["prompt_tokens"], "{case}");
        let r = report(&with_region, 1);
        assert_eq!(r["region"], serde_json::json!(b), "{case}");
        assert_eq!(r["rows"], c["num_image_tokens"], "{case}: region rows");
        assert_eq!(r["grid"], c["grid"], "{case}: region grid");
        // The crop alone is transformers' reference case.
        let alone = ask_json(mesh.state.path(), &crop, PROMPT, &["--max-tokens", "8"]);
        assert_eq!(ids(&alone["token_ids"]), ids(&c["greedy_ids"]), "{case}");
        // And in process, with the same flag.
        let local = generate_json(
            &model,
            &image,
            PROMPT,
            &["--max-tokens", "8", "--region", &region],
        );
        assert_eq!(local["token_ids"], with_region["token_ids"], "{case}");
    }
}

/// Bad boxes and too many regions: INVALID_ARGUMENT naming the box, before any stage is called.
#[tokio::test]
async fn bad_regions_are_refused_naming_the_box() {
    let model = fixture("tiny-llava-next");
    // `up` hands its environment to the services it starts.
    let mesh = MeshProc::start_with(&model, &[], &[("VLM_MAX_REGIONS", "2")]);
    let mut client = mesh.client().await;
    let png = std::fs::read(model.join("../images/next-wide-100x40.png")).unwrap();
    let region = |x0, y0, x1, y1| vlm_proto::Region { x0, y0, x1, y1 };
    for (regions, needle) in [
        (vec![region(500, 0, 400, 10)], "(500,0,400,10) is empty"),
        (vec![region(0, 0, 1001, 10)], "(0,0,1001,10) lies outside"),
        (vec![region(0, 0, 10, 10); 3], "at most 2"),
    ] {
        let req = vlm_proto::GenerateRequest {
            image_inputs: vec![vlm_proto::ImageInput {
                data: png.clone().into(),
                regions,
            }],
            prompt: PROMPT.into(),
            ..Default::default()
        };
        let status = client.generate(req).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(needle), "{}", status.message());
    }
    // A box too thin for the aspect-ratio limit is refused by the encoder, naming it.
    let req = vlm_proto::GenerateRequest {
        image_inputs: vec![vlm_proto::ImageInput {
            data: png.into(),
            regions: vec![region(0, 0, 1000, 1)],
        }],
        prompt: PROMPT.into(),
        ..Default::default()
    };
    drop(mesh);
    let mesh = MeshProc::start_with(&model, &[], &[("VLM_MAX_IMAGE_ASPECT_RATIO", "50")]);
    let status = mesh.client().await.generate(req).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("(0,0,1000,1)"),
        "{}",
        status.message()
    );
}

/// Paints a block into the middle tile of the wide image (grid 1x3 under pinpoints A) and leaves
/// the rest of the file's pixels alone.
fn change_middle_tile(src: &Path, out: &Path) {
    let mut img = image::open(src).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (100, 40));
    for y in 12..28 {
        for x in 42..58 {
            img.put_pixel(x, y, image::Rgb([255, 255, 0]));
        }
    }
    img.save(out).unwrap();
}

/// A repeat costs the encoder nothing; an image changed inside one tile costs it that tile and
/// the base view (which sees the whole image), and the answer equals a fresh in-process run.
#[test]
fn a_change_inside_one_tile_re_encodes_only_that_tile_and_the_base_view() {
    let model = fixture("tiny-llava-next");
    let mesh = MeshProc::start_with(&model, &[], &[]);
    let wide = model.join("../images/next-wide-100x40.png");
    let first = ask_json(mesh.state.path(), &wide, PROMPT, &["--max-tokens", "8"]);
    assert_eq!(report(&first, 0)["grid"], serde_json::json!([1, 3]));
    assert_eq!(
        report(&first, 0)["encoded_views"],
        serde_json::json!([0, 1, 2, 3])
    );
    let again = ask_json(mesh.state.path(), &wide, PROMPT, &["--max-tokens", "8"]);
    assert_eq!(report(&again, 0)["encoded_views"], serde_json::json!([]));
    assert_eq!(again["timings"]["cache"], serde_json::json!(["hit"]));
    assert_eq!(again["token_ids"], first["token_ids"]);

    let dir = tempfile::tempdir().unwrap();
    let changed = dir.path().join("changed.png");
    change_middle_tile(&wide, &changed);
    let third = ask_json(mesh.state.path(), &changed, PROMPT, &["--max-tokens", "8"]);
    assert_eq!(
        report(&third, 0)["encoded_views"],
        serde_json::json!([0, 2]),
        "only the base view and the middle tile (view 2) are encoded again"
    );
    let local = generate_json(&model, &changed, PROMPT, &["--max-tokens", "8"]);
    assert_eq!(third["token_ids"], local["token_ids"]);
}

/// Copies a checkpoint with other `image_grid_pinpoints` (same weights, so the same encoder
/// fingerprint): only the tiling differs.
fn retiled_copy(src: &Path, dst: &Path, pins: serde_json::Value) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
    for (file, path) in [
        ("config.json", vec![]),
        ("processor_config.json", vec!["image_processor"]),
    ] {
        let p = dst.join(file);
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        let mut at = &mut v;
        for k in path {
            at = &mut at[k];
        }
        at["image_grid_pinpoints"] = pins.clone();
        std::fs::write(&p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    }
}

/// The same bytes under two tilings of the same weights, through one Redis: the second mesh
/// finds nothing of the first's (every view encoded again) and answers as its own tiling does.
#[test]
fn a_shared_cache_never_mixes_grids() {
    let redis = RedisProc::start();
    let a = fixture("tiny-llava-next");
    let dir = tempfile::tempdir().unwrap();
    let b = dir.path().join("tiny-llava-next-retiled");
    retiled_copy(&a, &b, serde_json::json!([[72, 72], [48, 96], [96, 48]]));
    let square = a.join("../images/next-square-60x60.png");
    let args = ["--redis", &redis.url()];

    let mesh = MeshProc::start_with(&a, &args, &[]);
    let first = ask_json(mesh.state.path(), &square, PROMPT, &["--max-tokens", "8"]);
    assert_eq!(report(&first, 0)["grid"], serde_json::json!([2, 2]));
    let again = ask_json(mesh.state.path(), &square, PROMPT, &["--max-tokens", "8"]);
    assert_eq!(again["timings"]["cache"], serde_json::json!(["hit"]));
    drop(mesh);

    let mesh = MeshProc::start_with(&b, &args, &[]);
    let other = ask_json(mesh.state.path(), &square, PROMPT, &["--max-tokens", "8"]);
    assert_eq!(report(&other, 0)["grid"], serde_json::json!([3, 3]));
    assert_eq!(other["timings"]["cache"], serde_json::json!(["miss"]));
    assert_eq!(
        report(&other, 0)["encoded_views"].as_array().unwrap().len(),
        10
    );
    let local = generate_json(&b, &square, PROMPT, &["--max-tokens", "8"]);
    assert_eq!(other["token_ids"], local["token_ids"]);
    assert_eq!(other["prompt_tokens"], local["prompt_tokens"]);
}

/// A tiled image's encoder call is bounded by the adaptive timeout like a single view's: with one
/// of two encoder replicas all but stuck, every request is answered (right) in seconds, by the
/// other replica, including those whose first attempt went to the stuck one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_encoder_replica_is_left_for_the_other_on_the_tiled_path() {
    let model = fixture("tiny-llava-next");
    let mesh = MeshProc::start_with(
        &model,
        &["--replicas", "encoder=2", "--no-cache"],
        &[
            ("VLM_FAULT_ENCODE_DELAY_MS", "0,60000"),
            ("VLM_TIMEOUT_MIN_MS", "50"),
            ("VLM_TIMEOUT_MAX_MS", "2000"),
        ],
    );
    let stuck = common::replicas(&mesh, "encoder")[1].1.clone();
    let square = model.join("../images/next-square-60x60.png");
    let local = generate_json(&model, &square, PROMPT, &["--max-tokens", "4"]);
    // Until the stuck replica has been tried (the balancer picks among both at first).
    let mut tried_stuck = 0;
    for _ in 0..16 {
        let started = std::time::Instant::now();
        let out = ask_json(
            mesh.state.path(),
            &square,
            PROMPT,
            &["--max-tokens", "4", "--timeout", "30"],
        );
        assert_eq!(out["token_ids"], local["token_ids"]);
        assert!(
            started.elapsed() < std::time::Duration::from_secs(15),
            "{:?}",
            started.elapsed()
        );
        tried_stuck = encoder_requests(&mesh, &stuck).await;
        eprintln!(
            "took {:?}; stuck replica calls {tried_stuck}",
            started.elapsed()
        );
        if tried_stuck > 0 {
            break;
        }
    }
    assert!(tried_stuck > 0, "the stuck replica was never tried");
}

/// Encode calls a replica has accepted (its `Info`).
async fn encoder_requests(mesh: &MeshProc, addr: &str) -> u64 {
    let ch = mesh.stage_channel(addr, "gateway").await;
    vlm_proto::encoder_client::EncoderClient::new(ch)
        .info(vlm_proto::EncoderInfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .requests_total
}

/// The stages themselves, called as the gateway calls them: `Plan` gives transformers' grid and
/// image token count, `Encode` of every view then `Project` with the layout gives transformers'
/// packed features within 1e-4, for every case of both pinpoint sets (regions included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_encoder_and_projector_services_pack_like_transformers() {
    use vlm_proto::encode_response::Kind;
    for name in ["tiny-llava-next", "tiny-llava-next-b"] {
        let model = fixture(name);
        let refs = candle_core::safetensors::load(
            model.join("reference/reference.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let mesh = MeshProc::start_with(&model, &[], &[]);
        let enc = mesh
            .stage_channel(&mesh.service_addr("encoder"), "gateway")
            .await;
        let proj = mesh
            .stage_channel(&mesh.service_addr("projector"), "gateway")
            .await;
        let mut encoder = vlm_proto::encoder_client::EncoderClient::new(enc);
        let mut projector = vlm_proto::projector_client::ProjectorClient::new(proj);
        for c in cases(&model) {
            let case = c["name"].as_str().unwrap();
            let region = c["region"].as_array().map(|b| vlm_proto::Region {
                x0: b[0].as_u64().unwrap() as u32,
                y0: b[1].as_u64().unwrap() as u32,
                x1: b[2].as_u64().unwrap() as u32,
                y1: b[3].as_u64().unwrap() as u32,
            });
            let req = vlm_proto::EncodeRequest {
                image: std::fs::read(model.join(c["image"].as_str().unwrap()))
                    .unwrap()
                    .into(),
                options: None,
                region,
                views: vec![],
                layout_only: false,
            };
            let plan = encoder.plan(req.clone()).await.unwrap().into_inner();
            // From the header alone: the same layout and rows, no digests, nothing decoded.
            let header_only = vlm_proto::EncodeRequest {
                layout_only: true,
                ..req.clone()
            };
            let quick = encoder
                .plan(header_only.clone())
                .await
                .unwrap()
                .into_inner();
            assert_eq!(
                (quick.layout, quick.packed_rows, quick.rows_per_view),
                (plan.layout, plan.packed_rows, plan.rows_per_view),
                "{name}/{case}: the header-only plan"
            );
            assert!(quick.view_digests.is_empty());
            let refused = encoder.encode(header_only).await.map(|_| ()).unwrap_err();
            assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
            let layout = plan.layout.unwrap();
            assert_eq!(
                serde_json::json!([layout.grid_rows, layout.grid_cols]),
                c["grid"],
                "{name}/{case}"
            );
            assert_eq!(
                plan.packed_rows as u64,
                c["num_image_tokens"].as_u64().unwrap()
            );
            assert_eq!(
                plan.view_digests.len() as u64,
                c["num_views"].as_u64().unwrap()
            );
            let mut stream = encoder.encode(req).await.unwrap().into_inner();
            let mut chunks = Vec::new();
            while let Some(m) = stream.message().await.unwrap() {
                if let Some(Kind::Chunk(ch)) = m.kind {
                    chunks.push(ch);
                }
            }
            assert_eq!(
                chunks[0].header.as_ref().unwrap().layout,
                Some(layout),
                "{name}/{case}: the encoder's header names the layout"
            );
            let out = projector
                .project(tokio_stream::iter(chunks))
                .await
                .unwrap()
                .into_inner();
            let packed = vlm_tensor::collect_stream(out, &vlm_tensor::TensorLimits::default())
                .await
                .unwrap();
            let want = &refs[&format!("{case}.packed")];
            assert_eq!(packed.shape, want.dims(), "{name}/{case}");
            let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
            let diff = packed
                .values
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                diff <= 1e-4,
                "{name}/{case}: packed features differ by {diff}"
            );
        }
    }
}
