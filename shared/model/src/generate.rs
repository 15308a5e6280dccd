//! The token loop shared by the in-process pipeline and the decoder service.

use candle_core::Tensor;

use crate::decoder::{Decoder, KvCache};
use crate::error::{ModelError, Result};
use crate::monitor::LayerStats;
use crate::prompt::{PromptBuilder, TextStreamer};
use crate::sampling::{Sampler, SamplingParams};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced an end-of-sequence token.
    Eos,
    /// `max_tokens` reached.
    Length,
    /// A stop string appeared in the text.
    StopString,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Eos => "eos",
            FinishReason::Length => "length",
            FinishReason::StopString => "stop",
        }
    }
}

/// One generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent {
    pub id: u32,
    /// Index among generated tokens (resumed tokens included), i.e. the sampling step.
    pub index: usize,
    /// Text that became final with this token (may be empty while text is held back).
    pub text: String,
    /// Set on the last token.
    pub finish: Option<FinishReason>,
}

/// A running generation: prefill happens in [`Generation::start`], then each
/// [`Generation::next_token`] samples one token and (unless it is the last) runs it through the model.
pub struct Generation<'a> {
    decoder: &'a Decoder,
    cache: KvCache,
    sampler: Sampler,
    streamer: TextStreamer<'a>,
    eos: &'a [u32],
    logits: Option<Tensor>,
    generated: Vec<u32>,
    max_tokens: usize,
    prompt_tokens: usize,
    finished: Option<FinishReason>,
}

impl<'a> Generation<'a> {
    /// Prefills `prompt_embeds [T, hidden]` (plus `resume` tokens already delivered by an earlier
    /// replica) and returns a generation ready to produce the next token.
    pub fn start(
        decoder: &'a Decoder,
        prompt: &'a PromptBuilder,
        prompt_embeds: &Tensor,
        params: &SamplingParams,
        resume: &[u32],
    ) -> Result<Self> {
        Self::start_monitored(decoder, prompt, prompt_embeds, params, resume, None)
    }

    /// [`Self::start`], also pushing per-layer statistics of the prefill to `monitor`.
    pub fn start_monitored(
        decoder: &'a Decoder,
        prompt: &'a PromptBuilder,
        prompt_embeds: &Tensor,
        params: &SamplingParams,
        resume: &[u32],
        monitor: Option<&mut Vec<LayerStats>>,
    ) -> Result<Self> {
        params.validate()?;
        let prompt_tokens = prompt_embeds.dim(0)?;
        let max_tokens = params.max_tokens as usize;
        let needed = prompt_tokens + max_tokens;
        if needed > decoder.max_positions() {
            return Err(ModelError::InvalidParams(format!(
                "prompt ({prompt_tokens} tokens incl. image rows) + max_tokens ({max_tokens}) = {needed} exceeds the model's context of {} tokens",
                decoder.max_positions()
            )));
        }
        if resume.len() >= max_tokens {
            return Err(ModelError::InvalidParams(format!(
                "{} resumed tokens leave nothing to generate with max_tokens {max_tokens}",
                resume.len()
            )));
        }
        if resume.iter().any(|t| prompt.eos_ids().contains(t)) {
            return Err(ModelError::InvalidParams(
                "resumed tokens contain end-of-sequence".into(),
            ));
        }
        let mut streamer = TextStreamer::new(prompt, params.stop.clone());
        streamer.preload(resume)?;
        let mut cache = decoder.new_cache();
        let embeds = if resume.is_empty() {
            prompt_embeds.clone()
        } else {
            Tensor::cat(
                &[
                    &prompt_embeds.to_dtype(decoder.dtype())?,
                    &decoder.embed_tokens(resume)?,
                ],
                0,
            )?
        };
        let logits = decoder.forward_embeds_monitored(&embeds, &mut cache, monitor)?;
        Ok(Generation {
            decoder,
            cache,
            sampler: Sampler::new(params.clone()),
            streamer,
            eos: prompt.eos_ids(),
            logits: Some(logits),
            generated: resume.to_vec(),
            max_tokens,
            prompt_tokens,
            finished: None,
        })
    }

    pub fn prompt_tokens(&self) -> usize {
        self.prompt_tokens
    }

    /// All generated ids so far (resumed ones first).
    pub fn token_ids(&self) -> &[u32] {
        &self.generated
    }

    pub fn text(&self) -> &str {
        self.streamer.text()
    }

    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finished
    }

    /// Samples the next token; `None` once finished.
    pub fn next_token(&mut self) -> Result<Option<TokenEvent>> {
        if self.finished.is_some() {
            return Ok(None);
        }
        let logits = self
            .logits
            .take()
            .expect("logits are present until finished");
        let step = self.generated.len();
        let id = self.sampler.sample(&logits.to_vec1::<f32>()?, step as u64);
        self.generated.push(id);
        let mut finish = None;
        let mut text = String::new();
        if self.eos.contains(&id) {
            finish = Some(FinishReason::Eos);
        } else {
            let s = self.streamer.push(id)?;
            text = s.delta;
            if s.stopped {
                finish = Some(FinishReason::StopString);
            }
        }
        if finish.is_none() && self.generated.len() >= self.max_tokens {
            finish = Some(FinishReason::Length);
        }
        match finish {
            Some(reason) => {
                if reason != FinishReason::StopString {
                    text.push_str(&self.streamer.flush()?);
                }
                self.finished = Some(reason);
            }
            None => {
                let emb = self.decoder.embed_tokens(&[id])?;
                self.logits = Some(self.decoder.forward_embeds(&emb, &mut self.cache)?);
            }
        }
        Ok(Some(TokenEvent {
            id,
            index: step,
            text,
            finish,
        }))
    }
}
