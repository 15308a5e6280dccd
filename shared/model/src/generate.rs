//! Per-sequence output (sampling, text, stop conditions) and the in-process generation loop.

use std::collections::VecDeque;

use candle_core::Tensor;

use crate::constraint::{Constraint, MaskAhead};
use crate::decoder::Decoder;
use crate::engine::{Admission, Engine, EngineConfig, SeqId, SeqRequest, StepEvent};
use crate::error::{ModelError, Result};
use crate::kv::PosKey;
use crate::monitor::LayerStats;
use crate::mrope::RopePositions;
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
    /// The output completed its format (nothing more could follow).
    FormatComplete,
}

impl FinishReason {
    /// The public spelling (OpenAI's, as everywhere users see it): `stop` for an end-of-sequence
    /// token or a stop string, `length` for `max_tokens`.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Eos | FinishReason::StopString | FinishReason::FormatComplete => "stop",
            FinishReason::Length => "length",
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

/// What one sequence has produced so far and how it stops: sampling state, incremental text
/// (stop strings), end-of-sequence and `max_tokens`. The batched [`crate::engine::Engine`] keeps
/// one per running sequence and feeds it that sequence's logits row after every forward.
pub struct Completion<'a> {
    sampler: Sampler,
    streamer: TextStreamer<'a>,
    eos: &'a [u32],
    generated: Vec<u32>,
    max_tokens: usize,
    finished: Option<FinishReason>,
    /// The format the output must match, its next mask computed ahead.
    format: Option<MaskAhead>,
}

impl<'a> Completion<'a> {
    /// Checks `params` and `resume` (tokens an earlier replica already delivered, replayed as if
    /// sampled here) for a prompt of `prompt_tokens` positions on a model of `context` positions.
    /// `constraint` is `params.format` compiled (compiled here when `None` and a format is set).
    pub fn new(
        prompt: &'a PromptBuilder,
        params: &SamplingParams,
        resume: &[u32],
        prompt_tokens: usize,
        context: usize,
        constraint: Option<Constraint>,
    ) -> Result<Self> {
        params.validate()?;
        let vocab = prompt.tokenizer().get_vocab_size(true);
        if let Some((t, _)) = params.logit_bias.iter().find(|(t, _)| *t as usize >= vocab) {
            return Err(ModelError::InvalidParams(format!(
                "logit_bias: token {t} is not in the vocabulary of {vocab} tokens"
            )));
        }
        let max_tokens = params.max_tokens as usize;
        let needed = prompt_tokens + max_tokens;
        if needed > context {
            return Err(ModelError::InvalidParams(format!(
                "prompt ({prompt_tokens} tokens incl. image rows) + max_tokens ({max_tokens}) = {needed} exceeds the model's context of {context} tokens"
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
        let constraint = match (constraint, &params.format) {
            (Some(c), _) => Some(c),
            (None, Some(f)) => Some(prompt.grammars()?.compile(f)?),
            (None, None) => None,
        };
        let format = constraint
            .map(|c| MaskAhead::start(c, resume))
            .transpose()?;
        let mut streamer = TextStreamer::new(prompt, params.stop.clone());
        streamer.preload(resume)?;
        Ok(Completion {
            sampler: Sampler::new(params.clone()),
            streamer,
            eos: prompt.eos_ids(),
            generated: resume.to_vec(),
            max_tokens,
            finished: None,
            format,
        })
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

    /// Samples the next token from `logits` (the vocabulary's scores at the last position); the
    /// draw depends only on (seed, step) and the tokens generated so far (penalties). The event's `finish` is set on the last token.
    pub fn accept(&mut self, logits: &[f32]) -> Result<TokenEvent> {
        debug_assert!(self.finished.is_none(), "accept after the last token");
        let step = self.generated.len();
        let mask = self.format.as_mut().map(|f| f.take_mask()).transpose()?;
        if let Some(m) = &mask {
            if !m.any() {
                return Err(ModelError::InvalidFormat(
                    "format: no token of the vocabulary can continue the output".into(),
                ));
            }
        }
        let id = self
            .sampler
            .sample_masked(logits, step as u64, &self.generated, mask.as_ref());
        self.generated.push(id);
        let mut finish = None;
        let mut text = String::new();
        if self.eos.contains(&id) {
            finish = Some(FinishReason::Eos);
        } else {
            if let Some(f) = self.format.as_mut() {
                if f.advance(id)? {
                    finish = Some(FinishReason::FormatComplete);
                }
            }
            let s = self.streamer.push(id)?;
            text = s.delta;
            if s.stopped && finish.is_none() {
                finish = Some(FinishReason::StopString);
            }
        }
        if finish.is_none() && self.generated.len() >= self.max_tokens {
            finish = Some(FinishReason::Length);
        }
        if finish.is_none() {
            if let Some(f) = self.format.as_mut() {
                f.compute_next();
            }
        }
        if let Some(reason) = finish {
            if reason != FinishReason::StopString {
                text.push_str(&self.streamer.flush()?);
            }
            self.finished = Some(reason);
        }
        Ok(TokenEvent {
            id,
            index: step,
            text,
            finish,
        })
    }
}

/// One generation in process: the [`Engine`] with a single sequence (the same step code the
/// decoder service batches, so in-process output is the mesh's reference). Prefill happens in
/// [`Generation::start`], then each [`Generation::next_token`] yields one token.
pub struct Generation<'a> {
    engine: Engine<'a>,
    pending: VecDeque<TokenEvent>,
    generated: Vec<u32>,
    prompt_tokens: usize,
    finished: Option<FinishReason>,
}

const SEQ: SeqId = 0;

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
        Self::start_monitored(decoder, prompt, prompt_embeds, None, params, resume, None)
    }

    /// [`Self::start`] with the prompt's 3-D rotary positions (M-RoPE models; `None` otherwise),
    /// also pushing per-layer statistics of the prefill to `monitor`.
    pub fn start_monitored(
        decoder: &'a Decoder,
        prompt: &'a PromptBuilder,
        prompt_embeds: &Tensor,
        rope: Option<RopePositions>,
        params: &SamplingParams,
        resume: &[u32],
        monitor: Option<&mut Vec<LayerStats>>,
    ) -> Result<Self> {
        let prompt_tokens = prompt_embeds.dim(0)?;
        // Exactly the blocks this one sequence can use; no prefix is shared in process.
        // (Capped at the context: a longer request is refused by the engine's own check.)
        let positions = prompt_tokens.saturating_add(params.max_tokens as usize);
        let cfg = EngineConfig::for_one(positions.min(decoder.max_positions()));
        let mut engine = Engine::new(decoder, prompt, cfg);
        // A fresh pool per generation shares nothing, so the keys need only be distinct.
        let keys = (0..prompt_tokens as u32).map(PosKey::Token).collect();
        let req = SeqRequest {
            embeds: prompt_embeds.clone(),
            keys,
            params: params.clone(),
            resume: resume.to_vec(),
            monitor: monitor.is_some(),
            rope,
            constraint: None,
        };
        match engine.try_admit(SEQ, req)? {
            Admission::Admitted { .. } => {}
            Admission::Wait(_) => {
                return Err(ModelError::InvalidParams(
                    "the sequence does not fit its own KV cache".into(),
                ))
            }
        }
        let mut gen = Generation {
            engine,
            pending: VecDeque::new(),
            generated: resume.to_vec(),
            prompt_tokens,
            finished: None,
        };
        let mut monitor = monitor;
        while gen.pending.is_empty() && gen.finished.is_none() {
            for ev in gen.engine.step()? {
                match ev {
                    StepEvent::Prefilled { layers, .. } => {
                        if let Some(m) = monitor.as_deref_mut() {
                            m.extend(layers);
                        }
                    }
                    other => gen.take(other)?,
                }
            }
        }
        Ok(gen)
    }

    fn take(&mut self, ev: StepEvent) -> Result<()> {
        match ev {
            StepEvent::Token { token, .. } => {
                self.generated.push(token.id);
                self.finished = token.finish;
                self.pending.push_back(token);
                Ok(())
            }
            StepEvent::Failed { error, .. } => Err(error),
            StepEvent::Prefilled { .. } => Ok(()),
        }
    }

    pub fn prompt_tokens(&self) -> usize {
        self.prompt_tokens
    }

    /// All generated ids so far (resumed ones first).
    pub fn token_ids(&self) -> &[u32] {
        &self.generated
    }

    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finished
    }

    /// The next token; `None` once finished.
    pub fn next_token(&mut self) -> Result<Option<TokenEvent>> {
        while self.pending.is_empty() && self.finished.is_none() {
            for ev in self.engine.step()? {
                self.take(ev)?;
            }
        }
        Ok(self.pending.pop_front())
    }
}
