//! Continuous batching and prefix reuse: a sequence decoded in a batch (joining and leaving at
//! any step, beside a chunked prefill, or starting from a shared prefix) gives the same tokens as
//! decoded alone, and the batched forward's logits match the single-sequence reference path.
//! Runs on every checkpoint family the repository ships (all written by transformers).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use vlm_model::kv::KvPool;
use vlm_model::{
    Admission, BatchSeq, Engine, EngineConfig, Generation, ImageLimits, ModelError, Pipeline,
    SamplingParams, SeqRequest, StepEvent,
};

const FIXTURES: &[&str] = &[
    "tiny-llava",
    "tiny-llava-gqa",
    "tiny-llava-glm",
    "tiny-llava-glm4",
    "tiny-llava-lnproj",
    "shapes-llava",
];

fn models() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models")
}

fn pipeline(name: &str) -> Pipeline {
    Pipeline::load(
        models().join(name),
        DType::F32,
        &Device::Cpu,
        ImageLimits::default(),
    )
    .unwrap()
}

fn image(name: &str) -> Vec<u8> {
    std::fs::read(models().join("images").join(name)).unwrap()
}

/// A request for `prompt` (one `<image>`) about `img`.
fn request(p: &Pipeline, prompt: &str, img: &str, params: SamplingParams) -> SeqRequest {
    let pv = p
        .preprocessor
        .preprocess(&image(img), &Device::Cpu)
        .unwrap();
    let feats = p.vision.forward(&pv).unwrap().squeeze(0).unwrap();
    let proj = p.projector.forward(&feats).unwrap();
    let prepared = p
        .prompt
        .prepare(prompt, &[p.vision.num_features()])
        .unwrap();
    SeqRequest {
        embeds: prepared
            .embeddings(&p.decoder, std::slice::from_ref(&proj))
            .unwrap(),
        keys: prepared.position_keys(&[proj], None).unwrap(),
        params,
        resume: Vec::new(),
        monitor: false,
        rope: None,
        constraint: None,
    }
}

fn greedy(max_tokens: u32) -> SamplingParams {
    SamplingParams {
        max_tokens,
        ..SamplingParams::default()
    }
}

fn sampled(max_tokens: u32, seed: u64) -> SamplingParams {
    SamplingParams {
        max_tokens,
        temperature: 0.9,
        top_p: 0.95,
        top_k: 40,
        seed,
        ..SamplingParams::default()
    }
}

fn alone(p: &Pipeline, req: &SeqRequest) -> Vec<u32> {
    let mut g = Generation::start(&p.decoder, &p.prompt, &req.embeds, &req.params, &[]).unwrap();
    while g.next_token().unwrap().is_some() {}
    g.token_ids().to_vec()
}

/// Runs the engine until every sequence is done, admitting `joins[i]` before step `i`; returns
/// each sequence's tokens and the largest batch seen.
fn run_batch(
    engine: &mut Engine,
    mut joins: Vec<Vec<(u64, SeqRequest)>>,
) -> (HashMap<u64, Vec<u32>>, usize) {
    let mut out: HashMap<u64, Vec<u32>> = HashMap::new();
    let mut biggest = 0;
    let mut step = 0;
    joins.reverse();
    while !joins.is_empty() || !engine.is_idle() {
        if let Some(batch) = joins.pop() {
            for (id, req) in batch {
                match engine.try_admit(id, req).unwrap() {
                    Admission::Admitted { .. } => {}
                    Admission::Wait(_) => panic!("sequence {id} did not fit"),
                }
            }
        }
        for ev in engine.step().unwrap() {
            match ev {
                StepEvent::Token { id, token, batch } => {
                    biggest = biggest.max(batch);
                    out.entry(id).or_default().push(token.id);
                }
                StepEvent::Failed { id, error } => panic!("sequence {id} failed: {error}"),
                StepEvent::Prefilled { .. } => {}
            }
        }
        step += 1;
        assert!(step < 10_000, "the engine never finished");
    }
    (out, biggest)
}

fn config(blocks: usize, prefill_chunk: usize) -> EngineConfig {
    EngineConfig {
        block_size: 16,
        blocks,
        max_batch: 8,
        prefill_chunk,
    }
}

/// Eight sequences (different prompts, images, lengths, greedy and seeded sampling) joining over
/// the first steps and leaving at different steps: each one's tokens equal its run alone.
#[test]
fn sequences_in_a_changing_batch_get_exactly_their_alone_tokens_on_every_fixture() {
    let prompts = [
        "USER: <image>\nWhat is shown in this image? ASSISTANT:",
        "USER: <image>\nDescribe the picture. ASSISTANT:",
        "USER: <image>\nwhat colour is the shape? ASSISTANT:",
        "USER: <image>\nhow many shapes? ASSISTANT:",
    ];
    let mut largest = 0;
    for name in FIXTURES {
        let p = pipeline(name);
        let reqs: Vec<SeqRequest> = (0..8)
            .map(|i| {
                let img = ["shapes-48x48.png", "shapes-64x40.png"][i % 2];
                let max = 3 + 2 * i as u32;
                let params = if i % 3 == 2 {
                    sampled(max, 7 + i as u64)
                } else {
                    greedy(max)
                };
                request(&p, prompts[i % 4], img, params)
            })
            .collect();
        let want: Vec<Vec<u32>> = reqs.iter().map(|r| alone(&p, r)).collect();
        let mut engine = Engine::new(&p.decoder, &p.prompt, config(256, 256));
        // Two join at step 0, then one per step: joins happen while others decode.
        let mut joins: Vec<Vec<(u64, SeqRequest)>> = vec![Vec::new(); 7];
        for (i, r) in reqs.iter().enumerate() {
            joins[i.saturating_sub(1)].push((i as u64, r.clone()));
        }
        let (got, biggest) = run_batch(&mut engine, joins);
        // (Sequences that meet end-of-sequence early leave early: shapes-llava answers in a few
        // tokens, the random models run to max_tokens.)
        assert!(
            biggest >= 2,
            "{name}: batches never grew (largest {biggest})"
        );
        largest = largest.max(biggest);
        for (i, w) in want.iter().enumerate() {
            assert_eq!(&got[&(i as u64)], w, "{name}: sequence {i}");
        }
        let u = engine.usage();
        assert_eq!(u.blocks_used, 0, "{name}: blocks leaked: {u:?}");
    }
    assert!(
        largest >= 6,
        "no fixture ran a batch of 6 or more (largest {largest})"
    );
}

/// A long prompt prefilled in small chunks interleaves with running sequences: those keep getting
/// a token every step, and everyone's tokens equal their runs alone with the same chunking.
#[test]
fn a_chunked_prefill_does_not_freeze_running_streams_or_change_tokens() {
    let p = pipeline("tiny-llava");
    let short = request(
        &p,
        "USER: <image>\nhi ASSISTANT:",
        "shapes-48x48.png",
        greedy(60),
    );
    let long_prompt = format!(
        "USER: <image>\n{} ASSISTANT:",
        "describe every shape and colour you see in detail ".repeat(3)
    );
    let long = request(&p, &long_prompt, "shapes-64x40.png", greedy(5));
    let chunk = 8;
    let alone_chunked = |req: &SeqRequest| {
        let mut e = Engine::new(&p.decoder, &p.prompt, config(64, chunk));
        run_batch(&mut e, vec![vec![(0, req.clone())]]).0[&0].clone()
    };
    let (want_short, want_long) = (alone_chunked(&short), alone_chunked(&long));
    // Chunking is a schedule, not a different computation: the same greedy tokens as one piece.
    assert_eq!(want_long, alone(&p, &long));

    let mut engine = Engine::new(&p.decoder, &p.prompt, config(64, chunk));
    assert!(matches!(
        engine.try_admit(0, short.clone()).unwrap(),
        Admission::Admitted { .. }
    ));
    let mut short_tokens = Vec::new();
    let mut long_tokens = Vec::new();
    let mut steps_during_long_prefill = 0;
    let mut short_tokens_during_long_prefill = 0;
    let mut long_prefilling = false;
    let mut long_tokens_admitted = false;
    let mut step = 0;
    while !engine.is_idle() {
        // The long prompt arrives once the short one is decoding.
        if step > 0 && short_tokens.len() == 2 && !long_tokens_admitted {
            long_tokens_admitted = true;
            assert!(matches!(
                engine.try_admit(1, long.clone()).unwrap(),
                Admission::Admitted { .. }
            ));
            long_prefilling = true;
        }
        let events = engine.step().unwrap();
        let short_running = short_tokens.len() < want_short.len();
        let during = long_prefilling;
        if during && short_running {
            steps_during_long_prefill += 1;
        }
        for ev in events {
            match ev {
                StepEvent::Token { id: 0, token, .. } => {
                    short_tokens.push(token.id);
                    if during {
                        short_tokens_during_long_prefill += 1;
                    }
                }
                StepEvent::Token { id: 1, token, .. } => long_tokens.push(token.id),
                StepEvent::Prefilled { id: 1, .. } => long_prefilling = false,
                StepEvent::Failed { error, .. } => panic!("{error}"),
                _ => {}
            }
        }
        step += 1;
    }
    assert!(
        steps_during_long_prefill >= 4,
        "the short stream ran beside only {steps_during_long_prefill} prefill chunks"
    );
    assert_eq!(
        short_tokens_during_long_prefill, steps_during_long_prefill,
        "the running stream missed steps while the long prompt prefilled"
    );
    assert_eq!(short_tokens, want_short);
    assert_eq!(long_tokens, want_long);
}

/// The batched forward (shared weights pass, per-sequence paged attention) against the plain
/// single-sequence path with its own growing cache: logits within 1e-4 over prefill and 6 steps.
#[test]
fn batched_logits_match_the_single_sequence_reference_within_1e_4() {
    for name in FIXTURES {
        let p = pipeline(name);
        let d = &p.decoder;
        let prompts: Vec<Vec<u32>> = vec![
            (1..20).collect(),
            (5..40).map(|i| i * 3 % 50 + 1).collect(),
            vec![2, 9, 4],
        ];
        let bs = 16;
        let mut pool = KvPool::new(d.kv_shape(bs), 16);
        pool.reserve(16);
        let mut blocks: Vec<Vec<u32>> = prompts
            .iter()
            .map(|pr| {
                (0..(pr.len() + 8).div_ceil(bs))
                    .map(|_| pool.allocate())
                    .collect()
            })
            .collect();
        let mut caches: Vec<_> = prompts.iter().map(|_| d.new_cache()).collect();
        let mut max_diff = 0f32;
        let mut diff = |a: &Tensor, b: &Tensor| {
            let m = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            max_diff = max_diff.max(m);
        };
        let mut next = Vec::new();
        for (i, pr) in prompts.iter().enumerate() {
            let e = d.embed_tokens(pr).unwrap();
            let seq = BatchSeq {
                blocks: &blocks[i],
                pos: 0,
                rows: pr.len(),
                rope: None,
            };
            let ours = d.forward_batch(&e, &[seq], &mut pool, None).unwrap();
            let reference = d.forward_embeds(&e, &mut caches[i]).unwrap();
            diff(&ours.squeeze(0).unwrap(), &reference);
            next.push(vlm_model::Decoder::argmax(&reference).unwrap());
        }
        for step in 0..6 {
            let x = d.embed_tokens(&next).unwrap();
            let seqs: Vec<BatchSeq> = prompts
                .iter()
                .enumerate()
                .map(|(i, pr)| BatchSeq {
                    blocks: &blocks[i],
                    pos: pr.len() + step,
                    rows: 1,
                    rope: None,
                })
                .collect();
            let ours = d.forward_batch(&x, &seqs, &mut pool, None).unwrap();
            for i in 0..prompts.len() {
                let e = d.embed_tokens(&next[i..i + 1]).unwrap();
                let reference = d.forward_embeds(&e, &mut caches[i]).unwrap();
                diff(&ours.get(i).unwrap(), &reference);
                next[i] = vlm_model::Decoder::argmax(&reference).unwrap();
            }
        }
        blocks.clear();
        assert!(max_diff < 1e-4, "{name}: max |logit diff| {max_diff}");
    }
}

/// A second request with the same prompt and image reuses the first one's blocks (all full
/// prompt blocks but the one holding the last position) and gets the same tokens as cold; another
/// image shares nothing.
#[test]
fn a_repeated_prefix_is_served_from_cache_with_the_same_tokens() {
    let p = pipeline("tiny-llava");
    let prompt = format!(
        "USER: <image>\n{} ASSISTANT:",
        "the same long system prompt and history ".repeat(3)
    );
    let req = request(&p, &prompt, "shapes-48x48.png", greedy(6));
    let cold = alone(&p, &req);
    let positions = req.embeds.dim(0).unwrap();
    let mut engine = Engine::new(&p.decoder, &p.prompt, config(64, 256));
    let run = |engine: &mut Engine, id, r: &SeqRequest| {
        let cached = match engine.try_admit(id, r.clone()).unwrap() {
            Admission::Admitted { cached_tokens } => cached_tokens,
            Admission::Wait(_) => panic!("did not fit"),
        };
        let mut tokens = Vec::new();
        while !engine.is_idle() {
            for ev in engine.step().unwrap() {
                match ev {
                    StepEvent::Prefilled { cached_tokens, .. } => assert_eq!(cached_tokens, cached),
                    StepEvent::Token { token, .. } => tokens.push(token.id),
                    StepEvent::Failed { error, .. } => panic!("{error}"),
                }
            }
        }
        (cached, tokens)
    };
    let (first_cached, first) = run(&mut engine, 0, &req);
    assert_eq!(first_cached, 0);
    assert_eq!(first, cold);
    let (cached, second) = run(&mut engine, 1, &req);
    assert_eq!(
        cached,
        (positions - 1) / 16 * 16,
        "{positions} prompt positions"
    );
    assert!(cached >= 32, "only {cached} positions reused");
    assert_eq!(
        second, cold,
        "tokens changed when the prefix came from cache"
    );
    let other = request(&p, &prompt, "shapes-64x40.png", greedy(6));
    let (cached, _) = run(&mut engine, 2, &other);
    // The image's rows start inside the first block, so no block of another image can match.
    assert_eq!(cached, 0, "another image's prefix must not match");
}

/// Admission by memory: a request that fits only after another finishes waits, then runs with
/// its alone tokens; one that could never fit is refused with a message naming the budget.
#[test]
fn kv_budget_queues_what_does_not_fit_now_and_refuses_what_never_fits() {
    let p = pipeline("tiny-llava");
    let req = request(
        &p,
        "USER: <image>\nWhat is shown in this image? ASSISTANT:",
        "shapes-48x48.png",
        greedy(10),
    );
    let positions = req.embeds.dim(0).unwrap() + 10;
    let blocks = positions.div_ceil(16);
    // Room for one such sequence and a half.
    let mut engine = Engine::new(&p.decoder, &p.prompt, config(blocks + blocks / 2, 256));
    let want = alone(&p, &req);
    assert!(matches!(
        engine.try_admit(0, req.clone()).unwrap(),
        Admission::Admitted { .. }
    ));
    let mut waiting = Some(req.clone());
    let mut tokens: HashMap<u64, Vec<u32>> = HashMap::new();
    let mut waited_steps = 0;
    while !engine.is_idle() || waiting.is_some() {
        if let Some(r) = waiting.take() {
            match engine.try_admit(1, r).unwrap() {
                Admission::Admitted { .. } => {}
                Admission::Wait(r) => {
                    waited_steps += 1;
                    waiting = Some(r);
                }
            }
        }
        for ev in engine.step().unwrap() {
            if let StepEvent::Token { id, token, .. } = ev {
                tokens.entry(id).or_default().push(token.id);
            }
        }
    }
    assert!(waited_steps > 0, "the second request never had to wait");
    assert_eq!(tokens[&0], want);
    assert_eq!(tokens[&1], want);

    // Within the model's context, beyond the budget.
    let mut huge = req.clone();
    huge.params.max_tokens = (p.decoder.max_positions() - req.embeds.dim(0).unwrap()) as u32;
    assert!(positions.div_ceil(16) < huge.params.max_tokens as usize / 16);
    let mut small = Engine::new(&p.decoder, &p.prompt, config(blocks, 256));
    let err = match small.try_admit(2, huge) {
        Err(e) => e,
        Ok(_) => panic!("a request larger than the whole budget was not refused"),
    };
    assert!(matches!(err, ModelError::InvalidParams(_)), "{err}");
    assert!(err.to_string().contains("budget"), "{err}");
}

/// Logits of `prompt` prefilled, then of `tokens` fed one decode step each (`replay` false) or
/// all in one forward as one-row sequences sharing the blocks (`replay` true, as the engine
/// replays a resumed stream's tokens): one logits row per token, as bits.
fn decode_logits(
    d: &vlm_model::Decoder,
    prompt: &[u32],
    tokens: &[u32],
    replay: bool,
) -> Vec<Vec<u32>> {
    let bs = 16;
    let total = prompt.len() + tokens.len();
    let mut pool = KvPool::new(d.kv_shape(bs), total.div_ceil(bs));
    pool.reserve(total.div_ceil(bs));
    let blocks: Vec<u32> = (0..total.div_ceil(bs)).map(|_| pool.allocate()).collect();
    let seq = |pos, rows| BatchSeq {
        blocks: &blocks,
        pos,
        rows,
        rope: None,
    };
    let e = d.embed_tokens(prompt).unwrap();
    d.forward_batch(&e, &[seq(0, prompt.len())], &mut pool, None)
        .unwrap();
    let bits = |t: Tensor| -> Vec<Vec<u32>> {
        t.to_vec2::<f32>()
            .unwrap()
            .into_iter()
            .map(|r| r.into_iter().map(f32::to_bits).collect())
            .collect()
    };
    let x = d.embed_tokens(tokens).unwrap();
    if replay {
        let seqs: Vec<BatchSeq> = (0..tokens.len())
            .map(|i| seq(prompt.len() + i, 1))
            .collect();
        bits(d.forward_batch(&x, &seqs, &mut pool, None).unwrap())
    } else {
        (0..tokens.len())
            .flat_map(|i| {
                let row = x.narrow(0, i, 1).unwrap();
                let logits = d
                    .forward_batch(&row, &[seq(prompt.len() + i, 1)], &mut pool, None)
                    .unwrap();
                bits(logits)
            })
            .collect()
    }
}

/// A resumed stream's tokens replayed in one forward (one-row sequences over the shared blocks,
/// as the engine does after a failover) give the very bits the uninterrupted run's decode steps
/// gave, on every fixture, f32 and q8_0 (whose activation rounding would turn the smallest
/// difference between a prefill and a decode path into a visible one): the resumed stream's next
/// token is the uninterrupted run's, greedy or sampled, whatever kernels prefill runs on.
#[test]
fn replayed_tokens_give_exactly_the_decode_steps_logits() {
    let prompt: Vec<u32> = (0..40).map(|i| i * 7 % 45 + 1).collect();
    let tokens: Vec<u32> = (0..20).map(|i| i * 5 % 37 + 2).collect();
    let mut pipelines: Vec<(String, Pipeline)> = FIXTURES
        .iter()
        .map(|n| (n.to_string(), pipeline(n)))
        .collect();
    pipelines.push((
        "tiny-llava q8_0".into(),
        Pipeline::load_quantized(
            models().join("tiny-llava"),
            DType::F32,
            &Device::Cpu,
            ImageLimits::default(),
            vlm_model::Quantization::Q8_0,
        )
        .unwrap(),
    ));
    for (name, p) in &pipelines {
        let stepped = decode_logits(&p.decoder, &prompt, &tokens, false);
        let replayed = decode_logits(&p.decoder, &prompt, &tokens, true);
        assert_eq!(stepped.len(), tokens.len());
        for (i, (a, b)) in stepped.iter().zip(&replayed).enumerate() {
            assert!(
                a == b,
                "{name}: token {i}'s logits differ between decode and replay"
            );
        }
    }
}
