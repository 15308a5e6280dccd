//! The tokenizer as llguidance sees it: every token's bytes in a trie, special tokens marked so
//! that a text grammar never produces them.
//!
//! Only masks are asked of llguidance (no forced tokens), so it never needs the tokenizer's own
//! split of a text: the trie's greedy split answers, and the environment says it is not canonical.
//! (A sentencepiece tokenizer's `encode` would add its prefix space to a fragment, which is the
//! wrong answer for text in the middle of an output.)

use llguidance::toktrie::{TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use crate::error::{ModelError, Result};

pub(super) struct HfTokEnv {
    trie: TokTrie,
}

impl HfTokEnv {
    pub(super) fn new(tokenizer: &tokenizers::Tokenizer, eos: &[u32]) -> Result<Self> {
        let bad = |e: String| ModelError::Tokenizer(format!("constrained decoding: {e}"));
        let json = tokenizer.to_string(false).map_err(|e| bad(e.to_string()))?;
        let json: serde_json::Value =
            serde_json::from_str(&json).map_err(|e| bad(e.to_string()))?;
        let words =
            llguidance::token_bytes_from_tokenizer_json(&json).map_err(|e| bad(e.to_string()))?;
        let first = *eos
            .first()
            .ok_or_else(|| bad("the model has no end-of-sequence token".into()))?;
        let info = TokRxInfo::new(words.len() as u32, first);
        let eos: Vec<u32> = eos
            .iter()
            .copied()
            .filter(|&t| (t as usize) < words.len())
            .collect();
        let trie = TokTrie::from(&info, &words).with_eos_tokens(&eos);
        Ok(HfTokEnv { trie })
    }
}

impl TokenizerEnv for HfTokEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.greedy_tokenize(s)
    }

    fn tokenize_is_canonical(&self) -> bool {
        false
    }
}
