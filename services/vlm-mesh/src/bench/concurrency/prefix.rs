//! Prefix reuse: time to first token of a long prompt sent cold, then again (warm).

use std::time::Instant;

use vlm_proto::GetModelInfoRequest;

use super::streams::{generate, Expect};
use super::{Client, ConcurrencyBenchArgs};
use crate::bench::{print_ratio, print_rows, Spread};

/// Time to first token with a long prompt, sent cold and then again (warm).
#[derive(serde::Serialize, Debug)]
pub(super) struct PrefixReport {
    /// Text tokens asked for (`--prefix-tokens`)…
    prefix_tokens_asked: u32,
    /// …and aimed at: the same, or less where the model's context is too short for it (with the
    /// image's rows and the answer).
    prefix_tokens: u32,
    /// `usage.prompt_tokens` of the measured requests (text and image rows), smallest and largest.
    prompt_tokens_min: u32,
    prompt_tokens_max: u32,
    /// Rows one image expands to in the prompt (from GetModelInfo).
    image_tokens: u32,
    /// The model's context length (from GetModelInfo).
    context_length: u32,
    /// Cold/warm pairs measured.
    rounds: usize,
    ttft_cold_ms: Spread,
    ttft_warm_ms: Spread,
    /// Warm p50 / cold p50.
    warm_over_cold_p50: f64,
    /// The decoder's own prefill time, as the final message's timings report it.
    prefill_cold_ms: Spread,
    prefill_warm_ms: Spread,
    /// `usage.cached_prompt_tokens` of each round's cold and warm request.
    cached_prompt_tokens_cold: Vec<u32>,
    cached_prompt_tokens_warm: Vec<u32>,
}

impl PrefixReport {
    pub(super) fn print(&self) {
        let p = self;
        println!(
            "\nprefix reuse: {} text tokens ({} asked), prompt_tokens {}..{} (image {} rows, context {}), {} cold/warm pairs",
            p.prefix_tokens,
            p.prefix_tokens_asked,
            p.prompt_tokens_min,
            p.prompt_tokens_max,
            p.image_tokens,
            p.context_length,
            p.rounds
        );
        print_rows(
            "ms",
            &[
                ("TTFT, cold (new prompt)".to_string(), p.ttft_cold_ms),
                ("TTFT, warm (same prompt again)".to_string(), p.ttft_warm_ms),
                ("decoder prefill, cold".to_string(), p.prefill_cold_ms),
                ("decoder prefill, warm".to_string(), p.prefill_warm_ms),
            ],
        );
        print_ratio("TTFT warm / cold (p50)", p.warm_over_cold_p50);
        println!(
            "{:<44} cold {:?}  warm {:?}",
            "cached_prompt_tokens", p.cached_prompt_tokens_cold, p.cached_prompt_tokens_warm
        );
    }
}

/// Words the long prompt is made of (cycled), ordinary English so a byte-level BPE tokenizer
/// splits it as it would real text.
const FILLER: &str = "The museum keeps a careful record of every painting, sculpture and drawing \
    it holds, noting where each piece came from, who restored it and when, which rooms it has hung \
    in, how the light falls on it through the seasons, and what visitors most often ask about it. \
    Guides read these notes before each tour so that their answers stay accurate and consistent.";

/// The long prompt: a per-round marker at the very start, `words` filler words, then the image
/// and the question.
fn long_prompt(marker: usize, words: usize) -> String {
    let filler: Vec<&str> = FILLER.split_whitespace().cycle().take(words).collect();
    format!(
        "Session {marker}. {}\nUSER: <image>\nWhat is shown in this image? ASSISTANT:",
        filler.join(" ")
    )
}

/// Text tokens (usage.prompt_tokens minus the image's rows) of [`long_prompt`] with `words` words.
async fn text_tokens(
    client: &Client,
    image: &[u8],
    marker: usize,
    words: usize,
    image_tokens: u32,
) -> anyhow::Result<i64> {
    let s = generate(
        client.clone(),
        image.to_vec(),
        long_prompt(marker, words),
        1,
        Instant::now(),
        Expect::Hit,
    )
    .await?;
    Ok(s.usage.prompt_tokens as i64 - image_tokens as i64)
}

/// The number of filler words whose prompt has about `target` text tokens, found by asking the
/// mesh (each probe with its own marker, so probes warm nothing the measurement uses).
async fn calibrate(
    client: &Client,
    image: &[u8],
    target: u32,
    image_tokens: u32,
    marker: &mut usize,
) -> anyhow::Result<usize> {
    let target = target as i64;
    let mut probe = |words: usize| {
        *marker += 1;
        text_tokens(client, image, *marker, words, image_tokens)
    };
    let base = probe(0).await?;
    anyhow::ensure!(
        base < target,
        "--prefix-tokens {target} is below the {base} tokens the prompt has without filler"
    );
    let (mut words, mut got) = (16usize, probe(16).await?);
    let tolerance = (target / 50).max(2);
    for _ in 0..6 {
        if (got - target).abs() <= tolerance {
            break;
        }
        let per_word = (got - base).max(1) as f64 / words as f64;
        words = (((target - base) as f64 / per_word).round() as usize).max(1);
        got = probe(words).await?;
    }
    Ok(words)
}

pub(super) async fn prefix_bench(
    client: &Client,
    image: &[u8],
    args: &ConcurrencyBenchArgs,
) -> anyhow::Result<PrefixReport> {
    let info = client
        .clone()
        .get_model_info(GetModelInfoRequest {})
        .await?
        .into_inner();
    // Room for the text, the image rows and the answer (2 tokens here), plus a little slack for
    // the marker's length varying with the round number.
    let fits = info
        .context_length
        .saturating_sub(info.image_tokens + 2 + 8);
    anyhow::ensure!(
        fits >= 50,
        "the model's context ({} tokens) leaves no room for a long prompt beside an image of {} rows",
        info.context_length,
        info.image_tokens
    );
    let target = args.prefix_tokens.min(fits);
    if target < args.prefix_tokens {
        eprintln!(
            "warning: --prefix-tokens {} does not fit the model's context of {} tokens with the \
             image's {} rows; measuring {target} instead",
            args.prefix_tokens, info.context_length, info.image_tokens
        );
    }
    // Markers well away from the throughput requests' numbers.
    let mut marker = 1_000_000;
    let words = calibrate(client, image, target, info.image_tokens, &mut marker).await?;
    let (mut cold, mut warm, mut pre_cold, mut pre_warm) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut cached_cold, mut cached_warm, mut prompt_tokens) =
        (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.rounds {
        marker += 1;
        let prompt = long_prompt(marker, words);
        // Only the first token matters here; 2 so that an answer is more than its prefill.
        let clock = Instant::now();
        let c = generate(
            client.clone(),
            image.to_vec(),
            prompt.clone(),
            2,
            clock,
            Expect::Hit,
        )
        .await?;
        let w = generate(
            client.clone(),
            image.to_vec(),
            prompt,
            2,
            clock,
            Expect::Hit,
        )
        .await?;
        anyhow::ensure!(
            c.usage.prompt_tokens == w.usage.prompt_tokens,
            "the same prompt counted {} and then {} tokens",
            c.usage.prompt_tokens,
            w.usage.prompt_tokens
        );
        cold.push(c.ttft() * 1e3);
        warm.push(w.ttft() * 1e3);
        pre_cold.push(c.prefill_ms);
        pre_warm.push(w.prefill_ms);
        cached_cold.push(c.usage.cached_prompt_tokens);
        cached_warm.push(w.usage.cached_prompt_tokens);
        prompt_tokens.push(c.usage.prompt_tokens);
    }
    let (ttft_cold_ms, ttft_warm_ms) = (Spread::of(&mut cold)?, Spread::of(&mut warm)?);
    Ok(PrefixReport {
        prefix_tokens_asked: args.prefix_tokens,
        prefix_tokens: target,
        prompt_tokens_min: prompt_tokens.iter().copied().min().unwrap_or(0),
        prompt_tokens_max: prompt_tokens.iter().copied().max().unwrap_or(0),
        image_tokens: info.image_tokens,
        context_length: info.context_length,
        rounds: args.rounds,
        warm_over_cold_p50: ttft_warm_ms.p50 / ttft_cold_ms.p50,
        ttft_cold_ms,
        ttft_warm_ms,
        prefill_cold_ms: Spread::of(&mut pre_cold)?,
        prefill_warm_ms: Spread::of(&mut pre_warm)?,
        cached_prompt_tokens_cold: cached_cold,
        cached_prompt_tokens_warm: cached_warm,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_prompt_grows_with_words_and_differs_at_its_start() {
        let (a, b) = (long_prompt(1, 10), long_prompt(2, 10));
        assert_ne!(a.split_whitespace().nth(1), b.split_whitespace().nth(1));
        assert!(long_prompt(1, 500).len() > long_prompt(1, 100).len() * 4);
        assert!(a.contains("<image>") && a.ends_with("ASSISTANT:"));
    }
}
