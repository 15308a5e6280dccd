//! A prompt and image rows that cannot fit the context are refused before anything is allocated
//! for them: a peer once claimed 4,294,967,295 rows for one image (17 GB before the context check)
//! and a 1 MiB prompt was tokenised before anyone asked whether it could fit.

use std::path::PathBuf;

use vlm_model::{ModelError, PromptBuilder};

const CONTEXT: usize = 256;
const PROMPT: &str = "USER: <image>\nWhat is shown in this image? ASSISTANT:";

fn builder() -> PromptBuilder {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-llava/tokenizer.json");
    let tokenizer = tokenizers::Tokenizer::from_file(path).unwrap();
    PromptBuilder::new(tokenizer, 4, vec![]).unwrap()
}

fn refused(r: Result<vlm_model::PreparedPrompt, ModelError>) -> String {
    match r {
        Err(e @ ModelError::InvalidPrompt(_)) => e.to_string(),
        other => panic!("expected InvalidPrompt, got {other:?}"),
    }
}

#[test]
fn image_rows_beyond_the_context_are_refused_before_expansion() {
    let b = builder();
    for rows in [
        vec![u32::MAX as usize],
        vec![250_000_000],
        vec![usize::MAX, 2],
        vec![CONTEXT + 1],
    ] {
        let msg = refused(b.prepare_within(PROMPT, &rows, CONTEXT));
        assert!(
            msg.contains("do not fit the context of 256"),
            "{rows:?}: {msg}"
        );
    }
    // Rows that fit alone, but not with the prompt's own tokens: by its bytes (53 bytes are at
    // least 5 tokens), or once tokenised.
    let msg = refused(b.prepare_within(PROMPT, &[CONTEXT - 2], CONTEXT));
    assert!(msg.contains("a prompt of 53 bytes"), "{msg}");
    let msg = refused(b.prepare_within(PROMPT, &[CONTEXT - 6], CONTEXT));
    assert!(msg.contains("positions do not fit"), "{msg}");
    // What fits is expanded as before.
    let p = b.prepare_within(PROMPT, &[16], CONTEXT).unwrap();
    assert_eq!(p, b.prepare(PROMPT, &[16]).unwrap());
    assert_eq!(p.image_spans.len(), 1);
    assert_eq!(p.image_spans[0].1, 16);
}

#[test]
fn a_prompt_too_long_in_bytes_is_refused_without_tokenising() {
    let b = builder();
    let huge = format!("USER: <image>\n{} ASSISTANT:", "describe ".repeat(117_000));
    assert!(huge.len() > 1 << 20);
    let msg = refused(b.prepare_within(&huge, &[16], CONTEXT));
    assert!(
        msg.contains(&format!("a prompt of {} bytes", huge.len())),
        "{msg}"
    );
    // Without a context bound the same prompt tokenises, to far more than the context.
    let p = b.prepare(&huge, &[16]).unwrap();
    assert!(p.ids.len() > 10 * CONTEXT, "{}", p.ids.len());
}
