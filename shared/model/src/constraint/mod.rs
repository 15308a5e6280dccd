//! Constrained decoding: a sequence's output held to a JSON schema, a regular expression or a Lark
//! grammar, on [llguidance](https://github.com/guidance-ai/llguidance) over the tokenizer's
//! vocabulary.
//!
//! [`Grammars`] is built once per tokenizer and compiles an [`OutputFormat`] into a
//! [`Constraint`] (compiled grammars are cached by content, so the second request with the same
//! schema costs a copy). A [`Constraint`] is one sequence's parser state: at every step it answers
//! the set of tokens the format allows next ([`Constraint::mask`]) and then advances by the sampled
//! token. [`MaskAhead`] computes the next step's mask on a thread of its own while the forward pass
//! runs, since the mask depends only on the tokens so far.
//!
//! Hostile formats are bounded before and while they are compiled: the source's size
//! ([`MAX_FORMAT_BYTES`]), a JSON schema's nesting ([`MAX_SCHEMA_DEPTH`]), llguidance's own fuel
//! limits on the lexer and parser (compile and per step), and a wall-clock bound on compiling
//! ([`COMPILE_TIMEOUT`]).

mod ahead;
mod tokenizer;

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::toktrie::{SimpleVob, TokEnv};
use llguidance::{Matcher, ParserFactory};

use crate::error::{ModelError, Result};

pub use ahead::MaskAhead;

/// Largest format source (schema, regex or grammar text) accepted.
pub const MAX_FORMAT_BYTES: usize = 256 << 10;
/// Deepest nesting of arrays and objects accepted in a JSON schema's text.
pub const MAX_SCHEMA_DEPTH: usize = 64;
/// Longest a format may take to compile; longer is refused (llguidance's fuel limits bound the
/// work well below this on any input; this is the last line).
pub const COMPILE_TIMEOUT: Duration = Duration::from_secs(5);
/// Compiled formats kept for reuse.
const CACHE_ENTRIES: usize = 128;

/// What a sequence's output must match.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum OutputFormat {
    /// A JSON value valid under this JSON schema (its text).
    JsonSchema(String),
    /// Any JSON object.
    JsonObject,
    /// Text matching this regular expression (Rust `regex` syntax), whole.
    Regex(String),
    /// Text matching this Lark grammar (llguidance's Lark dialect).
    Lark(String),
}

impl OutputFormat {
    /// The request field that carries it, for error messages.
    pub fn field(&self) -> &'static str {
        match self {
            OutputFormat::JsonSchema(_) => "format.json_schema",
            OutputFormat::JsonObject => "format.json_object",
            OutputFormat::Regex(_) => "format.regex",
            OutputFormat::Lark(_) => "format.lark",
        }
    }

    fn source(&self) -> &str {
        match self {
            OutputFormat::JsonSchema(s) | OutputFormat::Regex(s) | OutputFormat::Lark(s) => s,
            OutputFormat::JsonObject => "",
        }
    }

    fn bad(&self, why: impl std::fmt::Display) -> ModelError {
        ModelError::InvalidFormat(format!("{}: {why}", self.field()))
    }

    /// Checks what can be checked without a tokenizer: size, emptiness, JSON syntax and depth.
    pub fn validate(&self) -> Result<()> {
        let src = self.source();
        if src.len() > MAX_FORMAT_BYTES {
            return Err(self.bad(format!(
                "{} bytes, more than the limit of {MAX_FORMAT_BYTES}",
                src.len()
            )));
        }
        match self {
            OutputFormat::JsonObject => Ok(()),
            _ if src.trim().is_empty() => Err(self.bad("empty")),
            OutputFormat::JsonSchema(s) => {
                let depth = json_depth(s);
                if depth > MAX_SCHEMA_DEPTH {
                    return Err(self.bad(format!(
                        "nested {depth} levels deep, more than the limit of {MAX_SCHEMA_DEPTH}"
                    )));
                }
                let v: serde_json::Value = serde_json::from_str(s)
                    .map_err(|e| self.bad(format!("not valid JSON: {e}")))?;
                if !(v.is_object() || v.is_boolean()) {
                    return Err(self.bad("a JSON schema is an object (or true/false)"));
                }
                Ok(())
            }
            OutputFormat::Regex(_) | OutputFormat::Lark(_) => Ok(()),
        }
    }

    /// The llguidance grammar. JSON output is compact (no free whitespace between tokens, as
    /// OpenAI's structured outputs), unless the schema's own `x-guidance` options say otherwise.
    fn grammar(&self) -> Result<TopLevelGrammar> {
        Ok(match self {
            OutputFormat::JsonSchema(s) => {
                let mut v: serde_json::Value = serde_json::from_str(s)
                    .map_err(|e| self.bad(format!("not valid JSON: {e}")))?;
                if let Some(obj) = v.as_object_mut() {
                    obj.entry("x-guidance")
                        .or_insert_with(|| serde_json::json!({"whitespace_flexible": false}));
                }
                TopLevelGrammar::from_json_schema(v)
            }
            OutputFormat::JsonObject => TopLevelGrammar::from_json_schema(serde_json::json!({
                "type": "object",
                "x-guidance": {"whitespace_flexible": false}
            })),
            OutputFormat::Regex(r) => TopLevelGrammar::from_regex(r),
            OutputFormat::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
        })
    }
}

/// Nesting depth of `[`/`{` in JSON text, outside strings (a scan before any parse, so a deep
/// schema costs no recursion).
fn json_depth(s: &str) -> usize {
    let (mut depth, mut max, mut in_str, mut escaped) = (0usize, 0usize, false, false);
    for b in s.bytes() {
        if in_str {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// Compiles formats for one tokenizer; see the module docs.
pub struct Grammars {
    factory: Arc<ParserFactory>,
    cache: Mutex<lru::LruCache<blake3::Hash, Matcher>>,
    /// Tokens the tokenizer knows (the logits may be longer; the rest is never allowed).
    vocab: usize,
    eos: Arc<[u32]>,
}

impl Grammars {
    /// Builds the token trie of `tokenizer` (every token's bytes) and the parser factory.
    /// `eos` are the ids that end a sequence: allowed exactly where the format is complete.
    pub fn new(tokenizer: &tokenizers::Tokenizer, eos: &[u32]) -> Result<Self> {
        let env: TokEnv = Arc::new(tokenizer::HfTokEnv::new(tokenizer, eos)?);
        let vocab = env.tok_trie().vocab_size();
        let mut factory = ParserFactory::new_simple(&env)
            .map_err(|e| ModelError::Tokenizer(format!("constrained decoding: {e}")))?;
        factory.quiet();
        *factory.limits_mut() = ParserLimits {
            verbose_errors: false,
            ..ParserLimits::default()
        };
        Ok(Grammars {
            factory: Arc::new(factory),
            cache: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(CACHE_ENTRIES).expect("non-zero"),
            )),
            vocab,
            eos: eos.into(),
        })
    }

    /// The constraint for `format`, compiled or from the cache. Compiling can take milliseconds
    /// to seconds on a large schema: call it off async threads.
    pub fn compile(&self, format: &OutputFormat) -> Result<Constraint> {
        format.validate()?;
        let key = {
            let mut h = blake3::Hasher::new();
            h.update(format.field().as_bytes());
            h.update(&[0]);
            h.update(format.source().as_bytes());
            h.finalize()
        };
        let cached = self.cache.lock().expect("grammar cache").get(&key).cloned();
        let matcher = match cached {
            Some(m) => m,
            None => {
                let m = self.compile_uncached(format)?;
                self.cache
                    .lock()
                    .expect("grammar cache")
                    .put(key, m.deep_clone());
                m
            }
        };
        Ok(Constraint {
            matcher: Box::new(matcher.deep_clone()),
            field: format.field(),
            vocab: self.vocab,
            eos: self.eos.clone(),
        })
    }

    fn compile_uncached(&self, format: &OutputFormat) -> Result<Matcher> {
        let grammar = format.grammar()?;
        let factory = self.factory.clone();
        // On a thread of its own, so that a compile past the bound is abandoned (it finishes
        // within llguidance's fuel limits and its result is dropped).
        let (tx, rx) = std::sync::mpsc::channel();
        let started = Instant::now();
        std::thread::Builder::new()
            .name("vlm-grammar".into())
            .spawn(move || {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let mut m = Matcher::new(factory.create_parser(grammar));
                    // The first mask proves the vocabulary can start the format, and warms the
                    // lexer's caches that every copy of the compiled grammar shares.
                    let first = m.compute_mask();
                    (m, first)
                }));
                let _ = tx.send(r);
            })
            .map_err(|e| format.bad(format!("could not start its compiler: {e}")))?;
        let (m, first) = match rx.recv_timeout(COMPILE_TIMEOUT) {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => return Err(format.bad("the grammar compiler failed on it")),
            Err(_) => {
                return Err(format.bad(format!(
                    "took longer than {} s to compile",
                    COMPILE_TIMEOUT.as_secs()
                )))
            }
        };
        if let Some(e) = m.get_error() {
            return Err(format.bad(first_line(&e)));
        }
        let first = first.map_err(|e| format.bad(first_line(&e.to_string())))?;
        if first.is_zero() {
            return Err(format.bad("no token of the model's vocabulary can start it"));
        }
        tracing::debug!(
            field = format.field(),
            ms = started.elapsed().as_secs_f64() * 1e3,
            "format compiled"
        );
        Ok(m)
    }
}

/// llguidance's messages can carry the whole grammar; the first line says what is wrong.
fn first_line(s: &str) -> String {
    let line = s.lines().next().unwrap_or(s);
    line.chars().take(300).collect()
}

/// One sequence's place in its format; see the module docs. A clone shares the compiled
/// grammar's caches (behind llguidance's own lock) and goes on independently.
#[derive(Clone)]
pub struct Constraint {
    /// Boxed: a parser's state is large, and requests carrying a constraint move around.
    matcher: Box<Matcher>,
    field: &'static str,
    vocab: usize,
    eos: Arc<[u32]>,
}

impl Constraint {
    /// The tokens allowed next. End-of-sequence ids are allowed exactly where the format is
    /// complete.
    pub fn mask(&mut self) -> Result<TokenMask> {
        let mut allowed = self
            .matcher
            .compute_mask()
            .map_err(|e| self.failed(&e.to_string()))?;
        let eos_ok = self.matcher.is_accepting().unwrap_or(false);
        // Normalised here, on the mask thread, so the step only reads bits: tokens the
        // tokenizer does not know are never allowed, end-of-sequence ids exactly when complete.
        if allowed.len() > self.vocab {
            let known = allowed.len();
            for t in self.vocab..known {
                allowed.set(t, false);
            }
        }
        for &e in self.eos.iter() {
            if (e as usize) < allowed.len() {
                allowed.set(e as usize, eos_ok);
            }
        }
        Ok(TokenMask {
            allowed,
            eos: self.eos.clone(),
            eos_ok,
        })
    }

    /// Advances by `token` (not an end-of-sequence id).
    pub fn advance(&mut self, token: u32) -> Result<()> {
        self.matcher
            .consume_token(token)
            .map_err(|e| self.failed(&e.to_string()))
    }

    /// Nothing more can follow: the format is complete.
    pub fn is_complete(&self) -> bool {
        self.matcher.is_stopped() && self.matcher.get_error().is_none()
    }

    fn failed(&self, e: &str) -> ModelError {
        ModelError::InvalidFormat(format!(
            "{}: the output could not follow it: {}",
            self.field,
            first_line(e)
        ))
    }
}

/// The tokens a format allows at one step (end-of-sequence ids included exactly when the format
/// is complete; ids past the tokenizer's vocabulary never).
pub struct TokenMask {
    allowed: SimpleVob,
    /// End-of-sequence ids past the mask's own length (a model whose EOS id lies outside the
    /// tokenizer's vocabulary).
    eos: Arc<[u32]>,
    eos_ok: bool,
}

impl TokenMask {
    pub fn allows(&self, token: u32) -> bool {
        if (token as usize) < self.allowed.len() {
            self.allowed.is_allowed(token)
        } else {
            self.eos_ok && self.eos.contains(&token)
        }
    }

    /// Some token may follow (a word-wise scan, stopping at the first set bit).
    pub fn any(&self) -> bool {
        !self.allowed.is_zero()
            || (self.eos_ok && self.eos.iter().any(|&e| e as usize >= self.allowed.len()))
    }

    /// Sets every disallowed logit to −∞ (word by word: a word of 32 allowed tokens costs one
    /// comparison).
    pub fn apply(&self, logits: &mut [f32]) {
        let len = self.allowed.len();
        // End-of-sequence ids past the mask keep their score when the format is complete.
        let kept: Vec<(usize, f32)> = if self.eos_ok {
            self.eos
                .iter()
                .map(|&e| e as usize)
                .filter(|&e| e >= len && e < logits.len())
                .map(|e| (e, logits[e]))
                .collect()
        } else {
            Vec::new()
        };
        let words = self.allowed.as_slice();
        for (w, chunk) in logits.chunks_mut(32).enumerate() {
            let bits = words.get(w).copied().unwrap_or(0);
            if bits == u32::MAX {
                continue;
            }
            for (i, l) in chunk.iter_mut().enumerate() {
                if bits & (1 << i) == 0 {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        for (e, v) in kept {
            logits[e] = v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(bits: &[usize], eos: &[u32], eos_ok: bool) -> TokenMask {
        let mut allowed = SimpleVob::alloc(40);
        for &b in bits {
            allowed.set(b, true);
        }
        TokenMask {
            allowed,
            eos: eos.into(),
            eos_ok,
        }
    }

    fn finite(m: &TokenMask) -> Vec<usize> {
        let mut logits = vec![0.5f32; 50];
        m.apply(&mut logits);
        (0..50).filter(|&t| logits[t].is_finite()).collect()
    }

    #[test]
    fn mask_applies_word_by_word_and_keeps_eos_past_the_vocabulary() {
        let m = mask(&[1, 2, 33], &[2, 45], true);
        assert_eq!(finite(&m), vec![1, 2, 33, 45]);
        assert!(m.allows(45) && m.allows(33) && !m.allows(34) && !m.allows(46));
        let m = mask(&[1, 33], &[2, 45], false);
        assert_eq!(finite(&m), vec![1, 33]);
        assert!(!m.allows(45));
        assert!(mask(&[], &[2, 45], true).any());
        assert!(!mask(&[], &[2, 45], false).any());
        assert!(mask(&[39], &[], false).any());
    }

    #[test]
    fn depth_counts_brackets_outside_strings() {
        assert_eq!(json_depth(r#"{"a": [1, {"b": "[[[{{{"}]}"#), 3);
        assert_eq!(json_depth(r#""\"[""#), 0);
        assert_eq!(json_depth(&"[".repeat(100)), 100);
    }

    #[test]
    fn validate_names_the_field() {
        let deep = format!("{}{}", "[".repeat(65), "]".repeat(65));
        let e = OutputFormat::JsonSchema(deep).validate().unwrap_err();
        assert!(e.to_string().contains("format.json_schema"), "{e}");
        assert!(e.to_string().contains("65 levels"), "{e}");
        let e = OutputFormat::Regex(" ".into()).validate().unwrap_err();
        assert!(e.to_string().contains("format.regex: empty"), "{e}");
        let big = "a".repeat(MAX_FORMAT_BYTES + 1);
        let e = OutputFormat::Lark(big).validate().unwrap_err();
        assert!(e.to_string().contains("format.lark"), "{e}");
        let e = OutputFormat::JsonSchema("[1]".into())
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("is an object"), "{e}");
    }
}
