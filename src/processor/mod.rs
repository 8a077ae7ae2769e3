//! The Florence-2 processor: image preprocessing, tokenization with the task prompts, decoding and
//! post-processing of generated text.
//!
//! [`Florence2Processor`] ties the parts together the way transformers' `Florence2Processor` does:
//! [`prompts`] turns task tokens into prompts, [`tokenizer`] encodes them (with `<image>` placeholders
//! first for HF-native checkpoints), [`image`] makes `pixel_values`, and [`postprocess`] parses the
//! generated text.

pub mod image;
pub mod postprocess;
pub mod prompts;
mod pytext;
pub mod tokenizer;

use std::collections::HashMap;
use std::path::Path;

pub use image::{ImageInput, ImageProcessorConfig, PixelData, PixelValues, RgbImage, Size};
pub use postprocess::{Answer, PostProcessorConfig};
pub use tokenizer::{BatchEncoding, EncodeOptions, Florence2Tokenizer, Padding};

use crate::io::json::read_json_if_present;
use crate::io::Layout;
use crate::{Error, Result};

const PROCESSOR_CONFIG: &str = "processor_config.json";
const PREPROCESSOR_CONFIG: &str = "preprocessor_config.json";

/// A setting the checkpoint gets wrong is an error of that file, named as such.
fn in_file(path: &Path) -> impl FnOnce(Error) -> Error {
    let path = path.to_path_buf();
    move |err: Error| Error::Config {
        path,
        msg: err.to_string(),
    }
}

/// The image settings of a checkpoint folder, where transformers looks for them: processor_config.json's
/// `image_processor` (`processor_config`, already read), else preprocessor_config.json; None where neither
/// holds them.
fn image_config_of(
    dir: &Path,
    processor_config: Option<&serde_json::Value>,
) -> Result<Option<ImageProcessorConfig>> {
    let (json, path) = match processor_config.and_then(|p| p.get("image_processor")) {
        Some(v) => (v.clone(), dir.join(PROCESSOR_CONFIG)),
        None => {
            let path = dir.join(PREPROCESSOR_CONFIG);
            match read_json_if_present(&path)? {
                Some(v) => (v, path),
                None => return Ok(None),
            }
        }
    };
    ImageProcessorConfig::from_json(&json)
        .map(Some)
        .map_err(in_file(&path))
}

/// The image settings of a checkpoint folder (see [`Florence2Processor::from_dir`]) read alone: the one
/// reader of those files for the processor and for the model, which checks its vision tower against
/// the image size the processor makes. None where neither file holds them.
pub fn read_image_config(dir: &Path) -> Result<Option<ImageProcessorConfig>> {
    let processor_config = read_json_if_present(&dir.join(PROCESSOR_CONFIG))?;
    image_config_of(dir, processor_config.as_ref())
}

/// Everything needed to turn (text, images) into model inputs and generated ids back into answers.
#[derive(Debug, Clone)]
pub struct Florence2Processor {
    pub tokenizer: Florence2Tokenizer,
    pub image_config: ImageProcessorConfig,
    pub post_config: PostProcessorConfig,
    /// `<image>`'s id where the prompt starts with `image_seq_length` image placeholders (transformers'
    /// HF-native layout; the model puts the image features in their place); `None` in Microsoft's layout, whose
    /// model prepends the image features itself. Either way the text is `<s>` prompt `</s>`.
    pub image_token_id: Option<u32>,
}

impl Florence2Processor {
    /// Loads a checkpoint folder: tokenizer.json (+ tokenizer_config.json), the image settings from
    /// processor_config.json's `image_processor` or else preprocessor_config.json, `post_processor_config`
    /// from processor_config.json, and the layout from config.json and the vocabulary.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tokenizer = Florence2Tokenizer::from_file(&dir.join("tokenizer.json"))?;
        let processor_path = dir.join(PROCESSOR_CONFIG);
        let processor_config = read_json_if_present(&processor_path)?;
        let image_config =
            image_config_of(dir, processor_config.as_ref())?.ok_or_else(|| Error::NotFound {
                path: dir.join(PREPROCESSOR_CONFIG),
                hint: "the image settings are in preprocessor_config.json or processor_config.json"
                    .into(),
            })?;
        let post_config = PostProcessorConfig::from_json(
            processor_config
                .as_ref()
                .and_then(|p| p.get("post_processor_config")),
        )
        .map_err(in_file(&processor_path))?;
        let layout = read_json_if_present(&dir.join("config.json"))?
            .map_or(Layout::HfNative, |config| Layout::of_config(&config));
        let image_token_id = tokenizer
            .image_token_id
            .filter(|_| layout == Layout::HfNative);
        Ok(Self {
            tokenizer,
            image_config,
            post_config,
            image_token_id,
        })
    }

    /// The prompts for a batch of texts (task tokens replaced).
    pub fn build_prompts<S: AsRef<str>>(&self, texts: &[S]) -> Result<Vec<String>> {
        texts
            .iter()
            .map(|t| prompts::construct_prompt(t.as_ref()))
            .collect()
    }

    /// Token ids of a batch of texts, laid out as the model expects: with images, `<image>`
    /// placeholders (HF-native) then `<s>` prompt `</s>`; without images the HF-native processor
    /// tokenizes the bare prompt, the original one always adds `<s>` / `</s>`.
    /// `add_special_tokens` (transformers' processor passes False) wraps each sequence in one more
    /// `<s>` ... `</s>`, as the tokenizer's post-processor does.
    pub fn encode_texts<S: AsRef<str>>(
        &self,
        texts: &[S],
        with_images: bool,
        add_special_tokens: bool,
        opts: &EncodeOptions,
    ) -> Result<BatchEncoding> {
        let prompts = self.build_prompts(texts)?;
        let mut sequences = Vec::with_capacity(prompts.len());
        let mut image_counts = Vec::with_capacity(prompts.len());
        // Microsoft's remote code has the tokenizer add `<s>` / `</s>` around the prompt, so
        // truncation keeps them; the extra pair of add_special_tokens then wraps `<s>` prompt `</s>`.
        let wrap = add_special_tokens || self.image_token_id.is_none();
        for prompt in &prompts {
            let ids = match (self.image_token_id, with_images) {
                (Some(image_token_id), true) => {
                    let mut ids = vec![image_token_id; self.image_config.image_seq_length];
                    ids.extend(self.tokenizer.encode(&format!("<s>{prompt}</s>"), false)?);
                    ids
                }
                (Some(_), false) => self.tokenizer.encode(prompt, false)?,
                (None, _) if add_special_tokens => {
                    self.tokenizer.encode(&format!("<s>{prompt}</s>"), false)?
                }
                (None, _) => self.tokenizer.encode(prompt, false)?,
            };
            image_counts.push(self.count_image_tokens(&ids));
            sequences.push(ids);
        }
        let batch = self.tokenizer.pad_batch(sequences, wrap, opts)?;
        let after: Vec<usize> = batch
            .input_ids
            .iter()
            .map(|ids| self.count_image_tokens(ids))
            .collect();
        if after != image_counts {
            return Err(Error::invalid(format!(
                "Mismatch in `image` token count between text and `input_ids`. Got ids={after:?} and text={image_counts:?}. \
                 Likely due to `truncation='max_length'`. Please disable truncation or increase `max_length`."
            )));
        }
        Ok(batch)
    }

    fn count_image_tokens(&self, ids: &[u32]) -> usize {
        match self.image_token_id {
            Some(image_token_id) => ids.iter().filter(|&&i| i == image_token_id).count(),
            None => 0,
        }
    }

    /// `pixel_values` for a batch of images, one `[3, H, W]` array each, with the checkpoint's settings or
    /// with `config` (the checkpoint's, overridden by a processor call).
    pub fn preprocess_images(
        &self,
        images: &[ImageInput],
        config: Option<&ImageProcessorConfig>,
    ) -> Result<Vec<PixelValues>> {
        image::preprocess(config.unwrap_or(&self.image_config), images)
    }

    /// Decodes each sequence of a batch.
    pub fn batch_decode<S: AsRef<[u32]>>(
        &self,
        sequences: &[S],
        skip_special_tokens: bool,
    ) -> Result<Vec<String>> {
        sequences
            .iter()
            .map(|ids| self.tokenizer.decode(ids.as_ref(), skip_special_tokens))
            .collect()
    }

    /// transformers' `post_process_generation`: exactly one of `text` and `sequence` (generated ids,
    /// a leading `<s>` dropped) is given; `image_size` is (width, height).
    pub fn post_process_generation(
        &self,
        text: Option<&str>,
        sequence: Option<&[u32]>,
        task: &str,
        image_size: Option<(f64, f64)>,
    ) -> Result<Answer> {
        let text = match (text, sequence) {
            (Some(t), None) => t.to_string(),
            (None, Some(seq)) => {
                let seq = match seq.split_first() {
                    Some((&first, rest)) if first == self.tokenizer.bos_token_id => rest,
                    Some(_) => seq,
                    None => return Err(Error::invalid("sequence is empty")),
                };
                self.tokenizer.decode_tokens_separately(seq)?
            }
            _ => {
                return Err(Error::invalid(
                    "Exactly one of 'text' or 'sequence' must be provided.",
                ))
            }
        };
        postprocess::post_process_generation(&self.post_config, &text, task, image_size)
    }

    /// The answer of `post_process_generation(batch_decode([sequence], skip_special_tokens=False)[0])`
    /// (generated ids as `generate` returns them), and for each of its boxes (`bboxes`, or `quad_boxes`
    /// for OCR, in order) the indices in `sequence` of the location tokens holding its coordinates;
    /// `None` for a box whose coordinates no location token of `sequence` wrote (text that spells out
    /// `<loc_N>` in ordinary tokens).
    pub fn post_process_sequence(
        &self,
        sequence: &[u32],
        task: &str,
        image_size: Option<(f64, f64)>,
    ) -> Result<(Answer, Vec<Option<Vec<usize>>>)> {
        let text = self.tokenizer.decode(sequence, false)?;
        let (answer, locations) =
            postprocess::post_process_with_locations(&self.post_config, &text, task, image_size)?;
        let written = self.location_tokens_in(sequence, &text)?;
        let spans = locations
            .iter()
            .map(|at| {
                at.iter()
                    .map(|offset| written.get(offset).copied())
                    .collect()
            })
            .collect();
        Ok((answer, spans))
    }

    /// Byte offset in `text` (the decoded `sequence`) → index in `sequence`, for each location token.
    ///
    /// A location token is an added token, decoded verbatim, so the text is rebuilt in runs: the tokens
    /// between two location tokens decoded together, each location token as its own text. Where that
    /// rebuilt text is not `text` (a decoder that changes location tokens), no token is placed.
    fn location_tokens_in(&self, sequence: &[u32], text: &str) -> Result<HashMap<usize, usize>> {
        let mut placed = HashMap::new();
        let mut rebuilt = String::with_capacity(text.len());
        let mut run_start = 0;
        for (index, &id) in sequence.iter().enumerate() {
            let Some(token) = self.tokenizer.id_to_token(id) else {
                continue;
            };
            if !postprocess::is_location_token(&token) {
                continue;
            }
            rebuilt.push_str(&self.tokenizer.decode(&sequence[run_start..index], false)?);
            placed.insert(rebuilt.len(), index);
            rebuilt.push_str(&token);
            run_start = index + 1;
        }
        rebuilt.push_str(&self.tokenizer.decode(&sequence[run_start..], false)?);
        if rebuilt != text {
            placed.clear();
        }
        Ok(placed)
    }
}
