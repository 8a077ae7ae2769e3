//! Florence-2's BART tokenizer: loads tokenizer.json with the `tokenizers` crate, adds the 1024
//! Florence-2 tokens when the file lacks them, and pads/truncates batches like transformers.

use std::collections::HashSet;
use std::path::Path;

use tokenizers::{AddedToken, Decoder, Tokenizer};

use crate::{Error, Result};

/// The image placeholder of HF-native checkpoints (id 51289 in the released vocabulary).
pub const IMAGE_TOKEN: &str = "<image>";

/// Tokens after `<loc_999>` in the order Microsoft's processor adds them.
const TRAILING_TOKENS: [&str; 20] = [
    "<cap>",
    "</cap>",
    "<ncap>",
    "</ncap>",
    "<dcap>",
    "</dcap>",
    "<grounding>",
    "</grounding>",
    "<seg>",
    "</seg>",
    "<sep>",
    "<region_cap>",
    "</region_cap>",
    "<region_to_desciption>",
    "</region_to_desciption>",
    "<proposal>",
    "</proposal>",
    "<poly>",
    "</poly>",
    "<and>",
];

/// The 1024 tokens Microsoft's original processor adds to BART's vocabulary, in its order, so that
/// `<od>` gets 50265 and `<loc_0>` 50269 as in the released tokenizer files.
pub fn florence2_extra_tokens() -> Vec<String> {
    ["<od>", "</od>", "<ocr>", "</ocr>"]
        .iter()
        .map(|s| s.to_string())
        .chain((0..super::postprocess::LOCATION_BINS).map(|i| format!("<loc_{i}>")))
        .chain(TRAILING_TOKENS.iter().map(|s| s.to_string()))
        .collect()
}

/// How a batch is padded, as transformers' `padding` argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// `False` / `"do_not_pad"`.
    None,
    /// `True` / `"longest"`.
    Longest,
    /// `"max_length"`: to `max_length` (or the tokenizer's `model_max_length`).
    MaxLength,
}

/// Padding and truncation settings of one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncodeOptions {
    pub padding: Padding,
    /// `Some(true)` / `Some(false)` as given; `None` when the caller left it out (transformers then
    /// truncates if `max_length` is given without padding).
    pub truncation: Option<bool>,
    pub max_length: Option<usize>,
    pub pad_to_multiple_of: Option<usize>,
    /// Truncation drops the first text tokens instead of the last (the tokenizer's
    /// `truncation_side = "left"`); the special tokens stay.
    pub truncate_left: bool,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        Self {
            padding: Padding::None,
            truncation: None,
            max_length: None,
            pad_to_multiple_of: None,
            truncate_left: false,
        }
    }
}

/// Token ids and attention masks of a batch (ragged unless padded).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BatchEncoding {
    pub input_ids: Vec<Vec<u32>>,
    pub attention_mask: Vec<Vec<u32>>,
}

/// transformers' tokenizers above this `model_max_length` count as unbounded.
const LARGE_INTEGER: usize = 1_000_000_000_000_000;

/// Tokens the post-processor adds to one sequence: BART's `<s>` before and `</s>` after, the
/// template of every Florence-2 tokenizer file.
const SPECIAL_TOKENS_PER_SEQUENCE: usize = 2;

/// The tokenizer with the ids the processor needs.
#[derive(Clone)]
pub struct Florence2Tokenizer {
    inner: Tokenizer,
    special_ids: HashSet<u32>,
    pub bos_token_id: u32,
    pub eos_token_id: u32,
    pub pad_token_id: u32,
    /// `<image>`, present in HF-native tokenizers only.
    pub image_token_id: Option<u32>,
    /// From tokenizer_config.json; the default length for `truncation=True` / `padding="max_length"`.
    pub model_max_length: usize,
}

impl std::fmt::Debug for Florence2Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Florence2Tokenizer")
            .field("vocab_size", &self.inner.get_vocab_size(true))
            .field("image_token_id", &self.image_token_id)
            .finish()
    }
}

impl Florence2Tokenizer {
    /// Loads `tokenizer.json`, and `tokenizer_config.json` beside it when present.
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::NotFound {
                path: path.to_path_buf(),
                hint: "a Florence-2 checkpoint folder holds tokenizer.json".into(),
            });
        }
        // A file that does not load, or loads without the tokens Florence-2 needs, is a broken checkpoint.
        let broken = |msg: String| {
            Error::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("not a usable tokenizer file ({msg}); the file may be truncated or corrupt, download it again"),
            ),
        }
        };
        let inner = Tokenizer::from_file(path).map_err(|e| broken(e.to_string()))?;
        let config_path = path.with_file_name("tokenizer_config.json");
        let model_max_length = if config_path.is_file() {
            let text = std::fs::read_to_string(&config_path).map_err(|source| Error::Io {
                path: config_path.clone(),
                source,
            })?;
            let value: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::Config {
                    path: config_path.clone(),
                    msg: e.to_string(),
                })?;
            model_max_length_of(&value)
        } else {
            LARGE_INTEGER + 1
        };
        Self::new(inner, model_max_length).map_err(|e| broken(e.to_string()))
    }

    /// Wraps a loaded tokenizer, adding Florence-2's tokens if `<loc_0>` is missing.
    pub fn new(mut inner: Tokenizer, model_max_length: usize) -> Result<Self> {
        // The truncation and padding a tokenizer.json may hold (transformers writes the last call's) are
        // not settings: each call sets its own, as transformers does (`pad_batch`).
        inner
            .with_truncation(None)
            .map_err(|e| Error::Tokenizer(e.to_string()))?
            .with_padding(None);
        if inner.token_to_id("<loc_0>").is_none() {
            let tokens: Vec<AddedToken> = florence2_extra_tokens()
                .into_iter()
                .map(|t| AddedToken::from(t, true).normalized(false))
                .collect();
            inner.add_special_tokens(&tokens);
        }
        let id = |token: &str| {
            inner
                .token_to_id(token)
                .ok_or_else(|| Error::Tokenizer(format!("the vocabulary has no {token} token")))
        };
        let (bos_token_id, eos_token_id, pad_token_id) = (id("<s>")?, id("</s>")?, id("<pad>")?);
        let image_token_id = inner.token_to_id(IMAGE_TOKEN);
        let special_ids = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        Ok(Self {
            inner,
            special_ids,
            bos_token_id,
            eos_token_id,
            pad_token_id,
            image_token_id,
            model_max_length,
        })
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// Number of tokens including the added ones (`len(tokenizer)` in transformers).
    pub fn len(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Whether the vocabulary is empty (never, for a loaded tokenizer).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Whether `id` is an added token flagged special (dropped by `skip_special_tokens`).
    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.contains(&id)
    }

    /// Ids of one text.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of one sequence. `clean_up_tokenization_spaces` is not taken: transformers 5 ignores it
    /// for BPE tokenizers such as this one.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// transformers' `Florence2PostProcessor.decode_with_spans` text: special tokens verbatim, every
    /// other token decoded on its own (so a split UTF-8 character becomes U+FFFD per token).
    pub fn decode_tokens_separately(&self, ids: &[u32]) -> Result<String> {
        let mut text = String::new();
        for &id in ids {
            let Some(token) = self.inner.id_to_token(id) else {
                continue;
            };
            if self.is_special(id) {
                text.push_str(&token);
            } else {
                match self.inner.get_decoder() {
                    Some(decoder) => text.push_str(
                        &decoder
                            .decode(vec![token])
                            .map_err(|e| Error::Tokenizer(e.to_string()))?,
                    ),
                    None => text.push_str(&token),
                }
            }
        }
        Ok(text)
    }

    /// Truncates, wraps and pads already-encoded sequences the way transformers' tokenizer `__call__`
    /// does: each sequence is the text's ids without special tokens; with `add_special_tokens` the
    /// post-processor's `<s>` ... `</s>` wrap it after truncation, and truncation keeps room for them
    /// (a `max_length` below their count leaves the sequence untruncated, as the `tokenizers` library
    /// does). Right side truncation and padding, `<pad>` id, attention mask 1 on tokens and 0 on padding.
    ///
    /// Args:
    ///     sequences: the ids of each text, without special tokens.
    ///     add_special_tokens: whether `<s>` / `</s>` wrap each sequence.
    ///     opts: padding and truncation settings.
    ///
    /// Returns:
    ///     the ids and attention masks (ragged unless padded).
    ///
    /// Raises:
    ///     `Error::InvalidInput` when truncation and padding are both on and `max_length` is not a
    ///     multiple of `pad_to_multiple_of`.
    pub fn pad_batch(
        &self,
        sequences: Vec<Vec<u32>>,
        add_special_tokens: bool,
        opts: &EncodeOptions,
    ) -> Result<BatchEncoding> {
        let mut padding = opts.padding;
        let mut max_length = opts.max_length;
        // transformers: max_length without padding and without an explicit truncation truncates.
        let mut truncate = opts
            .truncation
            .unwrap_or(opts.max_length.is_some() && padding == Padding::None);
        let bounded = self.model_max_length <= LARGE_INTEGER;
        if max_length.is_none() {
            if padding == Padding::MaxLength {
                if bounded {
                    max_length = Some(self.model_max_length);
                } else {
                    padding = Padding::None;
                }
            }
            if truncate {
                if bounded {
                    max_length = Some(self.model_max_length);
                } else {
                    truncate = false;
                }
            }
        }
        if let (true, Some(m), Some(k)) = (
            truncate && padding != Padding::None,
            max_length,
            opts.pad_to_multiple_of,
        ) {
            if k != 0 && m % k != 0 {
                return Err(Error::invalid(format!(
                    "Truncation and padding are both activated but truncation length ({m}) is not a multiple of pad_to_multiple_of ({k})."
                )));
            }
        }
        let n_special = if add_special_tokens {
            SPECIAL_TOKENS_PER_SEQUENCE
        } else {
            0
        };
        // The room left for the text once the special tokens are in; none fits when max_length is
        // below their count, and then the text stays whole.
        let text_length = match (truncate, max_length) {
            (true, Some(m)) => m.checked_sub(n_special),
            _ => None,
        };
        let mut input_ids: Vec<Vec<u32>> = sequences
            .into_iter()
            .map(|mut ids| {
                match text_length {
                    Some(m) if opts.truncate_left && ids.len() > m => {
                        ids.drain(..ids.len() - m);
                    }
                    Some(m) => ids.truncate(m),
                    None => {}
                }
                if add_special_tokens {
                    let mut wrapped = Vec::with_capacity(ids.len() + n_special);
                    wrapped.push(self.bos_token_id);
                    wrapped.extend(ids);
                    wrapped.push(self.eos_token_id);
                    wrapped
                } else {
                    ids
                }
            })
            .collect();
        let target = match padding {
            Padding::None => None,
            Padding::Longest => input_ids.iter().map(Vec::len).max(),
            Padding::MaxLength => max_length,
        };
        let target = target.map(|t| match opts.pad_to_multiple_of {
            Some(k) if k > 0 && t % k != 0 => (t / k + 1) * k,
            _ => t,
        });
        let mut attention_mask = Vec::with_capacity(input_ids.len());
        for ids in input_ids.iter_mut() {
            let mut mask = vec![1u32; ids.len()];
            if let Some(t) = target {
                if ids.len() < t {
                    mask.resize(t, 0);
                    ids.resize(t, self.pad_token_id);
                }
            }
            attention_mask.push(mask);
        }
        Ok(BatchEncoding {
            input_ids,
            attention_mask,
        })
    }
}

/// `model_max_length` of a tokenizer_config.json; transformers' "unbounded" when absent.
fn model_max_length_of(config: &serde_json::Value) -> usize {
    config
        .get("model_max_length")
        .and_then(|v| {
            v.as_u64().or_else(|| {
                v.as_f64()
                    .filter(|f| *f >= 0.0)
                    .map(|f| f.min(u64::MAX as f64) as u64)
            })
        })
        .map_or(LARGE_INTEGER + 1, |v| {
            usize::try_from(v).unwrap_or(usize::MAX)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_tokens_are_in_the_original_order() {
        let t = florence2_extra_tokens();
        assert_eq!(t.len(), 1024);
        assert_eq!(t[4], "<loc_0>");
        assert_eq!(t[1003], "<loc_999>");
        assert_eq!(t[1023], "<and>");
    }

    /// A tokenizer whose ids 0, 1, 2 are `<s>`, `<pad>`, `</s>` as in BART's vocabulary.
    fn bart_ids_tokenizer() -> Florence2Tokenizer {
        let vocab = ["<s>", "<pad>", "</s>", "<unk>"]
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let model = tokenizers::models::wordlevel::WordLevel::builder()
            .vocab(vocab)
            .unk_token("<unk>".into())
            .build()
            .unwrap();
        Florence2Tokenizer::new(Tokenizer::new(model), 1024).unwrap()
    }

    fn truncated(ids: Vec<u32>, add_special_tokens: bool, max_length: usize) -> Vec<u32> {
        truncated_on(ids, add_special_tokens, max_length, false)
    }

    fn truncated_on(
        ids: Vec<u32>,
        add_special_tokens: bool,
        max_length: usize,
        truncate_left: bool,
    ) -> Vec<u32> {
        let opts = EncodeOptions {
            truncation: Some(true),
            max_length: Some(max_length),
            truncate_left,
            ..EncodeOptions::default()
        };
        let batch = bart_ids_tokenizer()
            .pad_batch(vec![ids], add_special_tokens, &opts)
            .unwrap();
        batch.input_ids.into_iter().next().unwrap()
    }

    #[test]
    fn truncation_keeps_room_for_special_tokens() {
        // transformers 5.23 on the released tokenizer (tests/python/test_tokenizer_truncation.py):
        // max_length 3 keeps one text token and `</s>`; below 2 nothing fits and the text stays whole.
        assert_eq!(truncated(vec![7, 8, 9], true, 3), [0, 7, 2]);
        assert_eq!(truncated(vec![7, 8, 9], true, 2), [0, 2]);
        assert_eq!(truncated(vec![7, 8, 9], true, 1), [0, 7, 8, 9, 2]);
        assert_eq!(truncated(vec![7, 8, 9], true, 0), [0, 7, 8, 9, 2]);
        assert_eq!(truncated(vec![7, 8, 9], false, 1), [7]);
        assert_eq!(truncated(vec![7, 8, 9], false, 0), Vec::<u32>::new());
    }

    #[test]
    fn left_truncation_drops_the_first_text_tokens() {
        // transformers 5.23 with truncation_side="left" (tests/python/test_tokenizer_truncation.py).
        assert_eq!(truncated_on(vec![7, 8, 9], true, 3, true), [0, 9, 2]);
        assert_eq!(truncated_on(vec![7, 8, 9], true, 1, true), [0, 7, 8, 9, 2]);
        assert_eq!(truncated_on(vec![7, 8, 9], false, 2, true), [8, 9]);
        assert_eq!(truncated_on(vec![7, 8], false, 3, true), [7, 8]);
    }

    #[test]
    fn max_length_reads_numbers_only() {
        assert_eq!(
            model_max_length_of(&serde_json::json!({"model_max_length": 1024})),
            1024
        );
        assert!(model_max_length_of(&serde_json::json!({})) > LARGE_INTEGER);
        assert!(
            model_max_length_of(&serde_json::json!({"model_max_length": 1e30})) > LARGE_INTEGER
        );
    }
}
