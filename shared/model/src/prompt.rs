//! Tokenizer, `<image>` expansion and incremental detokenisation.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use candle_core::{DType, Tensor};
use tokenizers::Tokenizer;

use crate::anyres::TileGrid;
use crate::config::{read_json, token_id_list, LlavaConfig};
use crate::constraint::Grammars;
use crate::decoder::Decoder;
use crate::error::{ModelError, Result};
use crate::kv::PosKey;

/// Tokenises prompts and splices image rows in, as transformers' `LlavaProcessor` does.
#[derive(Clone)]
pub struct PromptBuilder {
    tokenizer: Tokenizer,
    image_token_id: u32,
    image_token: String,
    eos_ids: Vec<u32>,
    /// Bytes of the longest vocabulary entry (added tokens included): no token covers more of
    /// the prompt, so a prompt of `n` bytes has at least `n / longest_token_bytes` tokens.
    longest_token_bytes: usize,
    /// Compiler of output formats over this vocabulary, built on first use (the token trie
    /// costs tens of milliseconds and memory that a model never asked for a format needn't pay).
    grammars: Arc<OnceLock<std::result::Result<Arc<Grammars>, String>>>,
}

/// A tokenised prompt whose `<image>` tokens are expanded to one id per image feature row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedPrompt {
    pub ids: Vec<u32>,
    /// (start, rows) of each image in `ids`, in prompt order.
    pub image_spans: Vec<(usize, usize)>,
}

/// The keys of `generation_config.json` that are read: generation stops at these ids too.
#[derive(serde::Deserialize)]
struct RawGeneration {
    eos_token_id: Option<serde_json::Value>,
}

pub(crate) fn generation_keys() -> &'static [&'static str] {
    crate::config::keys::keys_of::<RawGeneration>()
}

impl PromptBuilder {
    /// Loads `tokenizer.json`; end-of-sequence ids come from the text config and
    /// `generation_config.json` (either may list several).
    pub fn from_dir(dir: &Path, cfg: &LlavaConfig) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(ModelError::checkpoint(dir, "no tokenizer.json"));
        }
        let tokenizer = Tokenizer::from_file(&path)
            .map_err(|e| ModelError::checkpoint(&path, format!("cannot load tokenizer: {e}")))?;
        let mut eos_ids = cfg.text.eos_token_ids.clone();
        let gen = dir.join("generation_config.json");
        if gen.exists() {
            let raw: RawGeneration = serde_json::from_value(read_json(&gen)?)
                .map_err(|e| ModelError::checkpoint(&gen, format!("invalid: {e}")))?;
            if let Some(v) = &raw.eos_token_id {
                let ids = token_id_list(v).map_err(|m| ModelError::checkpoint(&gen, m))?;
                for id in ids {
                    if !eos_ids.contains(&id) {
                        eos_ids.push(id);
                    }
                }
            }
        }
        Self::new(tokenizer, cfg.image_token_id, eos_ids)
    }

    pub fn new(tokenizer: Tokenizer, image_token_id: u32, eos_ids: Vec<u32>) -> Result<Self> {
        let image_token = tokenizer.id_to_token(image_token_id).ok_or_else(|| {
            ModelError::checkpoint(
                "tokenizer.json",
                format!("image_token_index {image_token_id} is not in the tokenizer's vocabulary"),
            )
        })?;
        // Vocabulary strings spell bytes with at least one byte each (byte-level BPE maps a byte
        // to a 1-2 byte character, SentencePiece a space to "▁", byte fallback to "<0x0A>").
        let longest_token_bytes = tokenizer
            .get_vocab(true)
            .keys()
            .map(String::len)
            .max()
            .unwrap_or(1)
            .max(1);
        Ok(PromptBuilder {
            tokenizer,
            image_token_id,
            image_token,
            eos_ids,
            longest_token_bytes,
            grammars: Arc::default(),
        })
    }

    /// The output-format compiler for this tokenizer ([`crate::constraint`]).
    pub fn grammars(&self) -> Result<Arc<Grammars>> {
        self.grammars
            .get_or_init(|| {
                Grammars::new(&self.tokenizer, &self.eos_ids)
                    .map(Arc::new)
                    .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(ModelError::Tokenizer)
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn image_token(&self) -> &str {
        &self.image_token
    }

    pub fn image_token_id(&self) -> u32 {
        self.image_token_id
    }

    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// Tokenises `prompt` (with the tokenizer's special tokens, e.g. BOS) and expands the i-th image
    /// token to `image_rows[i]` ids. The number of `<image>` placeholders must equal the number of images.
    pub fn prepare(&self, prompt: &str, image_rows: &[usize]) -> Result<PreparedPrompt> {
        self.prepare_within(prompt, image_rows, usize::MAX)
    }

    /// [`Self::prepare`] for a model whose context holds `context` positions: prompts and image
    /// rows that cannot fit are refused before anything is allocated for them: the image rows
    /// (any count a peer claims) first, then the prompt by its size in bytes (it has at least
    /// `bytes / longest token` tokens) before it is tokenised, then the tokenised total before the
    /// rows are expanded.
    pub fn prepare_within(
        &self,
        prompt: &str,
        image_rows: &[usize],
        context: usize,
    ) -> Result<PreparedPrompt> {
        if prompt.trim().is_empty() {
            return Err(ModelError::InvalidPrompt("prompt is empty".into()));
        }
        let rows = image_rows
            .iter()
            .try_fold(0usize, |a, &r| a.checked_add(r))
            .filter(|&r| r <= context)
            .ok_or_else(|| {
                ModelError::InvalidPrompt(format!(
                    "{} image(s) with {} feature rows do not fit the context of {context} positions",
                    image_rows.len(),
                    image_rows.iter().map(|&r| r as u128).sum::<u128>()
                ))
            })?;
        let min_tokens = prompt.len().div_ceil(self.longest_token_bytes);
        if min_tokens.saturating_add(rows) > context {
            return Err(ModelError::InvalidPrompt(format!(
                "a prompt of {} bytes is at least {min_tokens} tokens (no token is longer than {} \
                 bytes); with {rows} image rows it cannot fit the context of {context} positions",
                prompt.len(),
                self.longest_token_bytes
            )));
        }
        let enc = self
            .tokenizer
            .encode(prompt, true)
            .map_err(|e| ModelError::InvalidPrompt(format!("cannot tokenise prompt: {e}")))?;
        let raw = enc.get_ids();
        let placeholders = raw.iter().filter(|&&i| i == self.image_token_id).count();
        if placeholders != image_rows.len() {
            let tok = &self.image_token;
            // Not an example prompt: the chat format is the model's own (LLaVA's `USER: …
            // ASSISTANT:` would mislead a GLM user); a plain question gets it from the template.
            let hint = format!(
                "put one {tok} where each image belongs, in the model's chat format, or send plain \
                 text as a question (`question`, --question), which the model's chat template \
                 renders with the placeholders"
            );
            return Err(ModelError::InvalidPrompt(
                match (placeholders, image_rows.len()) {
                    (0, n) => format!(
                        "the prompt has no {tok} placeholder but {n} image(s) were given; {hint}"
                    ),
                    (p, 0) => {
                        format!("the prompt has {p} {tok} placeholder(s) but no image was given")
                    }
                    (p, n) => format!(
                        "the prompt has {p} {tok} placeholders but {n} image(s) were given; {hint}"
                    ),
                },
            ));
        }
        let total = raw.len() - placeholders + rows;
        if total > context {
            return Err(ModelError::InvalidPrompt(format!(
                "the prompt is {} tokens and its images {rows} rows: {total} positions do not fit \
                 the context of {context}",
                raw.len() - placeholders
            )));
        }
        let mut ids = Vec::with_capacity(total);
        let mut image_spans = Vec::with_capacity(image_rows.len());
        let mut next_image = 0;
        for &id in raw {
            if id == self.image_token_id {
                let rows = image_rows[next_image];
                next_image += 1;
                image_spans.push((ids.len(), rows));
                ids.extend(std::iter::repeat_n(id, rows));
            } else {
                ids.push(id);
            }
        }
        Ok(PreparedPrompt { ids, image_spans })
    }

    /// Decodes ids to text without special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }
}

impl PreparedPrompt {
    /// Prompt embeddings `[T, hidden]`: token embeddings with each image span replaced by that image's
    /// projected rows (`images[i]` is `[rows_i, hidden]`).
    pub fn embeddings(&self, decoder: &Decoder, images: &[Tensor]) -> Result<Tensor> {
        if images.len() != self.image_spans.len() {
            return Err(ModelError::InvalidInput(format!(
                "{} image embeddings for {} image slots",
                images.len(),
                self.image_spans.len()
            )));
        }
        let mut parts = Vec::with_capacity(2 * images.len() + 1);
        let mut at = 0;
        for (&(start, rows), img) in self.image_spans.iter().zip(images) {
            let (r, h) = img.dims2()?;
            if r != rows || h != decoder.hidden_size() {
                return Err(ModelError::InvalidInput(format!(
                    "image embeddings are [{r}, {h}], the prompt slot expects [{rows}, {}]",
                    decoder.hidden_size()
                )));
            }
            if start > at {
                parts.push(decoder.embed_tokens(&self.ids[at..start])?);
            }
            parts.push(img.to_dtype(decoder.dtype())?);
            at = start + rows;
        }
        if at < self.ids.len() {
            parts.push(decoder.embed_tokens(&self.ids[at..])?);
        }
        Ok(Tensor::cat(&parts, 0)?)
    }
}

impl PreparedPrompt {
    /// What each position is, for prefix sharing in the KV cache: text tokens by id, image rows by
    /// a digest of that image's embeddings (`images[i]`, as spliced in), its token grid when the
    /// model places images by grid (M-RoPE: `grids[i]`, which moves every later position) and the
    /// row index, so equal prompts with equal images get equal keys and nothing else does.
    pub fn position_keys(
        &self,
        images: &[Tensor],
        grids: Option<&[TileGrid]>,
    ) -> Result<Vec<PosKey>> {
        let mut keys: Vec<PosKey> = self.ids.iter().map(|&id| PosKey::Token(id)).collect();
        for (i, (&(start, rows), img)) in self.image_spans.iter().zip(images).enumerate() {
            let values = img.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let mut h = blake3::Hasher::new();
            if let Some(g) = grids.and_then(|g| g.get(i)) {
                h.update(b"grid");
                h.update(&g.rows.to_le_bytes());
                h.update(&g.cols.to_le_bytes());
            }
            h.update(&(img.dims().len() as u32).to_le_bytes());
            for d in img.dims() {
                h.update(&(*d as u64).to_le_bytes());
            }
            for v in values {
                h.update(&v.to_le_bytes());
            }
            let digest = *h.finalize().as_bytes();
            for (r, key) in keys[start..start + rows].iter_mut().enumerate() {
                *key = PosKey::Image {
                    digest,
                    row: r as u32,
                };
            }
        }
        Ok(keys)
    }
}

/// Turns generated ids into text deltas, holding back what could still become a stop string or an
/// incomplete UTF-8 sequence, so a client never sees text that is later retracted.
pub struct TextStreamer<'a> {
    prompt: &'a PromptBuilder,
    ids: Vec<u32>,
    emitted: String,
    stop: Vec<String>,
}

/// What one pushed token produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextStep {
    pub delta: String,
    /// A stop string appeared; the text ends before it.
    pub stopped: bool,
}

impl<'a> TextStreamer<'a> {
    pub fn new(prompt: &'a PromptBuilder, stop: Vec<String>) -> Self {
        TextStreamer {
            prompt,
            ids: Vec::new(),
            emitted: String::new(),
            stop,
        }
    }

    /// Text emitted so far.
    pub fn text(&self) -> &str {
        &self.emitted
    }

    /// Adds ids whose text was already delivered (a resumed stream) without emitting it again.
    pub fn preload(&mut self, ids: &[u32]) -> Result<()> {
        self.ids.extend_from_slice(ids);
        let text = self.answer_text()?;
        self.emitted = text.trim_end_matches('\u{FFFD}').to_string();
        Ok(())
    }

    pub fn push(&mut self, id: u32) -> Result<TextStep> {
        self.ids.push(id);
        let text = self.answer_text()?;
        let scan_from = self
            .emitted
            .len()
            .saturating_sub(crate::sampling::MAX_STOP_LEN);
        let scan_from = floor_char_boundary(&text, scan_from);
        if let Some(cut) = self
            .stop
            .iter()
            .filter_map(|s| text[scan_from..].find(s.as_str()).map(|i| scan_from + i))
            .min()
        {
            let delta = self.delta_to(&text[..cut]);
            return Ok(TextStep {
                delta,
                stopped: true,
            });
        }
        // Hold back an incomplete UTF-8 tail and any suffix that is a prefix of a stop string.
        let settled = text.trim_end_matches('\u{FFFD}');
        let hold = self
            .stop
            .iter()
            .map(|s| longest_suffix_prefix(settled, s))
            .max()
            .unwrap_or(0);
        let safe = &settled[..settled.len() - hold];
        Ok(TextStep {
            delta: self.delta_to(safe),
            stopped: false,
        })
    }

    /// Releases held-back text at the end of generation (a stop-string prefix that never completed).
    pub fn flush(&mut self) -> Result<String> {
        let text = self.answer_text()?;
        Ok(self.delta_to(&text))
    }

    /// The answer so far: the generated ids decoded, without the one space that separates the
    /// answer from a prompt ending in `ASSISTANT:` (a byte-level BPE's `Ġa`, or a SentencePiece
    /// `▁a` whose tokenizer does not strip it), as transformers' decode does for SentencePiece
    /// models. Token ids are unchanged; stop strings match against this text.
    fn answer_text(&self) -> Result<String> {
        let text = self.prompt.decode(&self.ids)?;
        Ok(match text.strip_prefix(' ') {
            Some(rest) => rest.to_string(),
            None => text,
        })
    }

    fn delta_to(&mut self, target: &str) -> String {
        match target.strip_prefix(self.emitted.as_str()) {
            Some(rest) => {
                let d = rest.to_string();
                self.emitted.push_str(&d);
                d
            }
            // Tokenizers whose decoding of a longer sequence rewrites earlier characters are rare;
            // never retract text, just wait until the target extends what was sent.
            None => String::new(),
        }
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    let max = stop.len().saturating_sub(1).min(text.len());
    (1..=max)
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n) && stop.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An image's keys follow its embeddings and, where given, its token grid: the same rows on
    /// another grid (other M-RoPE positions) share no key with them.
    #[test]
    fn image_keys_follow_embeddings_and_grid() {
        let p = PreparedPrompt {
            ids: vec![5, 0, 0, 0, 0, 0, 0, 6],
            image_spans: vec![(1, 6)],
        };
        let img = Tensor::arange(0f32, 12.0, &candle_core::Device::Cpu)
            .unwrap()
            .reshape((6, 2))
            .unwrap();
        let other = (&img + 1.0).unwrap();
        let grid = |rows, cols| [TileGrid { rows, cols }];
        let keys = |img: &Tensor, g: Option<&[TileGrid]>| {
            p.position_keys(std::slice::from_ref(img), g).unwrap()
        };
        let a = keys(&img, Some(&grid(2, 3)));
        assert_eq!(a[0], PosKey::Token(5));
        assert_eq!(a[7], PosKey::Token(6));
        assert!(matches!(a[3], PosKey::Image { row: 2, .. }));
        assert_eq!(a, keys(&img, Some(&grid(2, 3))));
        for b in [
            keys(&img, Some(&grid(3, 2))),
            keys(&img, None),
            keys(&other, Some(&grid(2, 3))),
        ] {
            assert_eq!((&b[0], &b[7]), (&a[0], &a[7]));
            assert!((1..7).all(|i| a[i] != b[i]), "{a:?} vs {b:?}");
        }
    }
}
