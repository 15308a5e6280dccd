//! Constrained decoding on random-weight checkpoints (written by transformers): output held to a
//! JSON schema, a regular expression or a Lark grammar is valid where the same model's free text
//! is not; a constrained sequence decodes the same tokens alone and in a batch of 8 beside others
//! (constrained and not); a resumed stream continues exactly; formats that cannot be followed are
//! refused naming their field; hostile formats are refused or compiled within the bound.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use vlm_model::constraint::COMPILE_TIMEOUT;
use vlm_model::{
    Admission, Engine, EngineConfig, FinishReason, Generation, ImageLimits, ModelError,
    OutputFormat, Pipeline, SamplingParams, SeqRequest, StepEvent,
};

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

const PROMPT: &str = "USER: <image>\nDescribe the image as JSON. ASSISTANT:";

fn request(p: &Pipeline, params: SamplingParams) -> SeqRequest {
    let img = std::fs::read(models().join("images/shapes-48x48.png")).unwrap();
    let pv = p.preprocessor.preprocess(&img, &Device::Cpu).unwrap();
    let feats = p.vision.forward(&pv).unwrap().squeeze(0).unwrap();
    let proj = p.projector.forward(&feats).unwrap();
    let prepared = p
        .prompt
        .prepare(PROMPT, &[p.vision.num_features()])
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

/// Decodes `req` alone: its token ids, text and finish reason.
fn alone(p: &Pipeline, req: &SeqRequest) -> (Vec<u32>, String, FinishReason) {
    let mut g =
        Generation::start(&p.decoder, &p.prompt, &req.embeds, &req.params, &req.resume).unwrap();
    let mut text = String::new();
    let mut finish = None;
    while let Some(t) = g.next_token().unwrap() {
        text.push_str(&t.text);
        finish = t.finish;
    }
    (g.token_ids().to_vec(), text, finish.unwrap())
}

const SCHEMA: &str = r#"{
  "type": "object",
  "properties": {
    "color": {"enum": ["red", "green", "blue"]},
    "count": {"type": "integer", "minimum": 0, "maximum": 99},
    "round": {"type": "boolean"}
  },
  "required": ["color", "count", "round"],
  "additionalProperties": false
}"#;

/// The schema's rules, spelled out here (not by the code under test).
fn valid_under_schema(text: &str) -> bool {
    let Ok(serde_json::Value::Object(o)) = serde_json::from_str::<serde_json::Value>(text) else {
        return false;
    };
    o.len() == 3
        && matches!(
            o.get("color").and_then(|c| c.as_str()),
            Some("red" | "green" | "blue")
        )
        && o.get("count")
            .and_then(|c| c.as_u64())
            .is_some_and(|c| c <= 99)
        && o.get("round").is_some_and(|r| r.is_boolean())
}

fn greedy(max_tokens: u32, format: Option<OutputFormat>) -> SamplingParams {
    SamplingParams {
        max_tokens,
        format,
        ..Default::default()
    }
}

#[test]
fn json_schema_output_validates_where_free_text_does_not() {
    for name in ["tiny-llava", "shapes-llava", "tiny-llava-glm4"] {
        let p = pipeline(name);
        let (_, free, _) = alone(&p, &request(&p, greedy(60, None)));
        assert!(!valid_under_schema(&free), "{name}: free text {free:?}");
        let json = OutputFormat::JsonSchema(SCHEMA.into());
        let (_, text, finish) = alone(&p, &request(&p, greedy(60, Some(json))));
        assert!(valid_under_schema(&text), "{name}: {text:?}");
        assert_eq!(finish, FinishReason::FormatComplete, "{name}: {text:?}");
        for temperature in [0.7, 1.3] {
            for seed in 0..3 {
                let params = SamplingParams {
                    temperature,
                    seed,
                    ..greedy(60, Some(OutputFormat::JsonSchema(SCHEMA.into())))
                };
                let (_, text, _) = alone(&p, &request(&p, params));
                assert!(
                    valid_under_schema(&text),
                    "{name} t={temperature} seed={seed}: {text:?}"
                );
            }
        }
        // Any object: a random model's keys are long strings, so what is checked is that the
        // output is an object's beginning, and a whole object once `}` is favoured.
        let (_, obj, _) = alone(&p, &request(&p, greedy(20, Some(OutputFormat::JsonObject))));
        assert!(obj.starts_with('{'), "{name}: {obj:?}");
        let close = p.prompt.tokenizer().token_to_id("}").expect("} token");
        let params = SamplingParams {
            logit_bias: vec![(close, 20.0)],
            ..greedy(20, Some(OutputFormat::JsonObject))
        };
        let (_, obj, finish) = alone(&p, &request(&p, params));
        let v: serde_json::Value =
            serde_json::from_str(&obj).unwrap_or_else(|e| panic!("{name}: {obj:?}: {e}"));
        assert!(v.is_object(), "{name}: {obj:?}");
        assert_eq!(finish, FinishReason::FormatComplete, "{name}: {obj:?}");
    }
}

#[test]
fn regex_and_lark_outputs_match() {
    let p = pipeline("tiny-llava");
    let re = OutputFormat::Regex("[a-z]{3}-[0-9]{2}".into());
    let (_, text, finish) = alone(&p, &request(&p, greedy(30, Some(re))));
    let b = text.as_bytes();
    assert!(
        b.len() == 6
            && b[..3].iter().all(u8::is_ascii_lowercase)
            && b[3] == b'-'
            && b[4..].iter().all(u8::is_ascii_digit),
        "{text:?}"
    );
    assert_eq!(finish, FinishReason::FormatComplete);
    let lark = OutputFormat::Lark(
        "start: answer \" because \" reason\nanswer: \"yes\" | \"no\"\nreason: /[a-z ]{1,12}/"
            .into(),
    );
    let (_, text, _) = alone(&p, &request(&p, greedy(40, Some(lark))));
    let (answer, reason) = text
        .split_once(" because ")
        .unwrap_or_else(|| panic!("{text:?}"));
    assert!(matches!(answer, "yes" | "no"), "{text:?}");
    assert!(
        (1..=12).contains(&reason.len())
            && reason.bytes().all(|c| c == b' ' || c.is_ascii_lowercase()),
        "{text:?}"
    );
}

/// A constrained sequence decodes the same tokens in a batch of 8 (three constrained, five not,
/// greedy and sampled, admitted at different steps) as alone, and so does every other one.
#[test]
fn batched_constrained_sequences_equal_alone() {
    let p = pipeline("tiny-llava");
    let formats = [
        Some(OutputFormat::JsonSchema(SCHEMA.into())),
        Some(OutputFormat::Regex("(ab|cd)+[0-9]".into())),
        Some(OutputFormat::Lark("start: \"<\" /[a-z]+/ \">\"".into())),
        None,
    ];
    let reqs: Vec<SeqRequest> = (0..8)
        .map(|i| {
            let params = SamplingParams {
                temperature: if i % 2 == 1 { 0.9 } else { 0.0 },
                seed: 5 + i as u64,
                ..greedy(24, formats[i % formats.len()].clone())
            };
            request(&p, params)
        })
        .collect();
    let expected: Vec<Vec<u32>> = reqs.iter().map(|r| alone(&p, r).0).collect();
    let cfg = EngineConfig {
        max_batch: 8,
        ..EngineConfig::with_budget(&p.decoder, 64 << 20, 8, 256)
    };
    let mut engine = Engine::new(&p.decoder, &p.prompt, cfg);
    let mut got: HashMap<u64, Vec<u32>> = HashMap::new();
    let mut waiting: Vec<(u64, SeqRequest)> = reqs
        .into_iter()
        .enumerate()
        .map(|(i, r)| (i as u64, r))
        .collect();
    let mut step = 0;
    while !waiting.is_empty() || !engine.is_idle() {
        // One more joins every other step.
        if step % 2 == 0 && !waiting.is_empty() {
            let (id, r) = waiting.remove(0);
            match engine.try_admit(id, r).unwrap() {
                Admission::Admitted { .. } => {}
                Admission::Wait(r) => waiting.insert(0, (id, r)),
            }
        }
        for ev in engine.step().unwrap() {
            match ev {
                StepEvent::Token { id, token, .. } => got.entry(id).or_default().push(token.id),
                StepEvent::Failed { id, error } => panic!("sequence {id}: {error}"),
                StepEvent::Prefilled { .. } => {}
            }
        }
        step += 1;
    }
    for (i, want) in expected.iter().enumerate() {
        assert_eq!(&got[&(i as u64)], want, "sequence {i}");
    }
}

/// A stream resumed after k tokens (its constraint replayed over them) gives exactly the
/// uninterrupted run's remaining tokens.
#[test]
fn resumed_constrained_stream_continues_exactly() {
    let p = pipeline("shapes-llava");
    let params = SamplingParams {
        temperature: 0.8,
        seed: 9,
        ..greedy(60, Some(OutputFormat::JsonSchema(SCHEMA.into())))
    };
    let (full, text, _) = alone(&p, &request(&p, params.clone()));
    assert!(full.len() > 4, "{text:?}");
    for k in [1, full.len() / 2, full.len() - 1] {
        let mut req = request(&p, params.clone());
        req.resume = full[..k].to_vec();
        let (ids, _, _) = alone(&p, &req);
        assert_eq!(ids, full, "resumed after {k}");
    }
    // Tokens the format could not have produced are refused.
    let mut req = request(&p, params);
    req.resume = p
        .prompt
        .tokenizer()
        .encode("hello", false)
        .unwrap()
        .get_ids()
        .to_vec();
    let e = Generation::start(&p.decoder, &p.prompt, &req.embeds, &req.params, &req.resume)
        .err()
        .expect("refused");
    assert!(
        e.to_string()
            .contains("does not follow the request's format"),
        "{e}"
    );
}

fn refused(p: &Pipeline, f: OutputFormat) -> String {
    let field = f.field();
    match p.prompt.grammars().unwrap().compile(&f) {
        Ok(_) => panic!("{field}: compiled"),
        Err(e @ ModelError::InvalidFormat(_)) => {
            let m = e.to_string();
            assert!(m.contains(field), "{m}");
            assert!(e.is_invalid_input());
            m
        }
        Err(e) => panic!("{field}: {e}"),
    }
}

#[test]
fn formats_that_cannot_be_followed_are_refused_naming_the_field() {
    let p = pipeline("tiny-llava");
    let js = |s: &str| OutputFormat::JsonSchema(s.into());
    refused(&p, js("{not json"));
    refused(&p, js("[1, 2]"));
    refused(&p, js(r#"{"type": "florp"}"#));
    refused(&p, js(r#"{"type": "integer", "minimum": 5, "maximum": 1}"#));
    refused(&p, OutputFormat::Regex("(unclosed".into()));
    refused(&p, OutputFormat::Regex("".into()));
    refused(&p, OutputFormat::Lark("start: undefined_rule".into()));
    refused(&p, OutputFormat::Lark("this is not lark".into()));
    // A language with no string at all: no token can start it.
    let m = refused(&p, OutputFormat::Regex("[a&&b]".into()));
    eprintln!("empty language: {m}");
}

/// Hostile formats within the size limit: each is compiled or refused within the compile bound
/// (plus the time to notice), and the model still decodes afterwards.
#[test]
fn hostile_formats_are_bounded() {
    let p = pipeline("tiny-llava");
    let nested = |n: usize| {
        let mut s = String::from(r#"{"type":"integer"}"#);
        for _ in 0..n {
            s = format!(r#"{{"type":"object","properties":{{"a":{s}}},"required":["a"]}}"#);
        }
        s
    };
    let big_enum = format!(
        r#"{{"enum":[{}]}}"#,
        (0..20_000)
            .map(|i| format!("\"v{i}\""))
            .collect::<Vec<_>>()
            .join(",")
    );
    let many_props = format!(
        r#"{{"type":"object","properties":{{{}}},"required":[{}]}}"#,
        (0..3000)
            .map(|i| format!("\"p{i}\":{{\"type\":\"string\",\"pattern\":\"^[a-z]{{{i}}}$\"}}"))
            .collect::<Vec<_>>()
            .join(","),
        (0..3000)
            .map(|i| format!("\"p{i}\""))
            .collect::<Vec<_>>()
            .join(",")
    );
    let cases = [
        ("deep schema", OutputFormat::JsonSchema(nested(30))),
        ("too deep schema", OutputFormat::JsonSchema(nested(70))),
        ("20k enum", OutputFormat::JsonSchema(big_enum)),
        ("3k properties", OutputFormat::JsonSchema(many_props)),
        (
            "nested repeats",
            OutputFormat::Regex("((a{1,100}){1,100}){1,100}".into()),
        ),
        (
            "exponential",
            OutputFormat::Regex("(a|aa)*(b|bb)*(a|b){40}c".into()),
        ),
        (
            "counted",
            OutputFormat::Regex("[a-z]{1000}[0-9]{1000}".into()),
        ),
        (
            "ambiguous lark",
            OutputFormat::Lark("start: x\nx: x x | x x x | \"a\" | \"\"".into()),
        ),
        (
            "too large",
            OutputFormat::Regex("a".repeat(vlm_model::constraint::MAX_FORMAT_BYTES + 1)),
        ),
    ];
    let grammars = p.prompt.grammars().unwrap();
    for (what, f) in cases {
        let t = Instant::now();
        let r = grammars.compile(&f);
        let took = t.elapsed();
        eprintln!(
            "{what}: {} in {took:?}",
            match &r {
                Ok(_) => "compiled".to_string(),
                Err(e) => e.to_string().chars().take(160).collect(),
            }
        );
        assert!(
            took < COMPILE_TIMEOUT + Duration::from_secs(1),
            "{what}: {took:?}"
        );
        if let Err(e) = r {
            assert!(matches!(e, ModelError::InvalidFormat(_)), "{what}: {e}");
        }
    }
    let (_, text, _) = alone(
        &p,
        &request(
            &p,
            greedy(60, Some(OutputFormat::JsonSchema(SCHEMA.into()))),
        ),
    );
    assert!(valid_under_schema(&text), "{text:?}");
}

/// logit_bias: +100 on one token makes greedy decoding pick it at every step; ids outside the
/// vocabulary and values outside [-100, 100] are refused naming the field.
#[test]
fn logit_bias_moves_the_sampler_and_is_checked() {
    let p = pipeline("tiny-llava");
    let target = p.prompt.tokenizer().token_to_id("a").expect("a token");
    let params = SamplingParams {
        logit_bias: vec![(target, 100.0)],
        ..greedy(5, None)
    };
    let (ids, _, _) = alone(&p, &request(&p, params));
    assert_eq!(ids, vec![target; 5]);
    // A bias of -100 on the unbiased run's first token moves the first token.
    let (plain, _, _) = alone(&p, &request(&p, greedy(3, None)));
    let params = SamplingParams {
        logit_bias: vec![(plain[0], -100.0)],
        ..greedy(3, None)
    };
    let (moved, _, _) = alone(&p, &request(&p, params));
    assert_ne!(moved[0], plain[0]);
    let vocab = p.prompt.tokenizer().get_vocab_size(true) as u32;
    for (bias, needle) in [
        (vec![(vocab, 1.0)], "not in the vocabulary"),
        (vec![(0, 101.0)], "[-100, 100]"),
        (vec![(0, f32::NAN)], "[-100, 100]"),
    ] {
        let req = request(
            &p,
            SamplingParams {
                logit_bias: bias,
                ..greedy(3, None)
            },
        );
        let e = Generation::start(&p.decoder, &p.prompt, &req.embeds, &req.params, &[])
            .err()
            .expect("refused");
        assert!(
            e.to_string().contains("logit_bias") && e.to_string().contains(needle),
            "{e}"
        );
    }
}
