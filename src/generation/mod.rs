//! Text generation for the BART decoder: transformers' `GenerationMixin` rules (greedy, beam search,
//! sampling, logits processors, stopping), driven through the [`DecoderSession`] trait so that the
//! loop does not depend on the model's internals.
//!
//! Reference: transformers 5.23.0 `generation/utils.py` (`generate`, `_sample`, `_beam_search`),
//! `generation/logits_process.py`, `generation/stopping_criteria.py`, `generation/configuration_utils.py`.
//! tests/generation_reference.rs replays logits recorded from transformers' own `generate` and checks that
//! this loop returns the same ids, scores and beam indices.
//!
//! Usage: build a [`GenerationConfig`] ([`GenerationConfig::from_checkpoint`], then [`GenerationConfig::set`]
//! for each `generate()` keyword argument), open a session with `batch_size * cfg.expand_factor()` rows
//! (each item repeated consecutively, as transformers' `_expand_inputs_for_generation` does), and call
//! [`generate`].
//!
//! Sampling (`do_sample=True`) draws from the same distribution as transformers but with its own RNG
//! (ChaCha8, seeded by the `seed` setting, else from the OS): sampled ids are reproducible for a seed but
//! cannot equal torch's.

mod beam;
mod config;
mod processors;
mod sample;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

pub use config::{EarlyStopping, GenerationConfig};

use crate::interrupt::Interrupt;
use crate::{Error, Result};

/// One running decoder: the model side of a generation loop.
///
/// Rows are the expanded batch (batch * num_beams, or batch * num_return_sequences when sampling),
/// in the order transformers' `_expand_inputs_for_generation` makes them (each item repeated
/// consecutively).
pub trait DecoderSession {
    /// Number of rows this session decodes in parallel.
    fn rows(&self) -> usize;
    /// Feeds one new token per row (the decoder start token on the first call) and returns the
    /// next-token logits as f32, one `Vec` of `vocab_size` values per row.
    fn next_logits(&mut self, last_tokens: &[u32]) -> Result<Vec<Vec<f32>>>;
    /// Reorders (and possibly duplicates) the cached rows: row `i` of the new cache is row
    /// `order[i]` of the old one. Used by beam search.
    fn reorder(&mut self, order: &[usize]) -> Result<()>;
}

/// What `generate` returns: transformers' `sequences` and, for `return_dict_in_generate=True`, its
/// `sequences_scores`, `scores` and `beam_indices`; plus `token_scores` for per-token confidences.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerateOutput {
    /// `batch_size * num_return_sequences` rows of equal length, each starting with decoder_start_token_id
    /// and padded after its end with pad_token_id (transformers' padding rules).
    pub sequences: Vec<Vec<u32>>,
    /// Beam search only: the length-penalized sum of log-probabilities of each returned sequence.
    pub sequences_scores: Option<Vec<f32>>,
    /// When `output_scores` is set: per step, the processed scores of every row (`rows x vocab`). Greedy and
    /// sampling: the logits after the processors. Beam search: log_softmax, then the processors.
    pub scores: Option<Vec<Vec<Vec<f32>>>>,
    /// Beam search only: for each returned sequence and generated token, the row it came from
    /// (batch offset included), -1 after the sequence ended.
    pub beam_indices: Option<Vec<Vec<i64>>>,
    /// For each returned sequence and each generated token (`sequences[i][1..]`), the log-probability the
    /// decoder gave that token, 0.0 after the sequence ended. Beam search: the processed log-softmax, i.e.
    /// transformers' `compute_transition_scores(sequences, scores, beam_indices)`; greedy and sampling: the
    /// log-softmax of the processed scores, i.e. `compute_transition_scores(..., normalize_logits=True)`.
    /// Forced tokens (forced BOS/EOS) get 0.0. The mean (or min) over a box's four location tokens is a
    /// natural detection confidence.
    pub token_scores: Vec<Vec<f32>>,
}

/// Runs generation on `session` for `batch_size` items with the settings of `cfg`, as transformers'
/// `generate` does after encoding: greedy when `num_beams == 1` and not sampling, sampling when
/// `do_sample`, beam search (or beam sampling) when `num_beams > 1`.
///
/// The session must hold `batch_size * cfg.expand_factor()` rows; its first `next_logits` call receives the
/// decoder start token for every row. `interrupt` is checked before each decoder call; its error ends the
/// generation.
pub fn generate(
    session: &mut dyn DecoderSession,
    cfg: &GenerationConfig,
    batch_size: usize,
    interrupt: &dyn Interrupt,
) -> Result<GenerateOutput> {
    let plan = cfg.plan()?;
    if batch_size == 0 {
        return Err(Error::invalid("generate needs at least one batch item"));
    }
    let expected = batch_size * cfg.expand_factor();
    if session.rows() != expected {
        return Err(Error::invalid(format!(
            "the decoder session holds {} rows, but {batch_size} items x {} (max(num_beams, num_return_sequences)) \
             = {expected} are needed",
            session.rows(),
            cfg.expand_factor()
        )));
    }
    let processors = processors::LogitsProcessors::new(cfg, &plan)?;
    let mut rng = match plan.seed {
        Some(seed) => ChaCha8Rng::seed_from_u64(seed),
        None => ChaCha8Rng::from_os_rng(),
    };
    if plan.num_beams > 1 {
        beam::run(session, &plan, &processors, batch_size, &mut rng, interrupt)
    } else {
        sample::run(session, &plan, &processors, &mut rng, interrupt)
    }
}

/// One decoder call with the checks the loop relies on: one row of logits per row, all of the same
/// non-zero width; `interrupt` is asked first, as every decoding loop steps through here.
fn logits_step(
    session: &mut dyn DecoderSession,
    interrupt: &dyn Interrupt,
    last: &[u32],
) -> Result<Vec<Vec<f32>>> {
    interrupt.check()?;
    let logits = session.next_logits(last)?;
    let vocab = logits.first().map_or(0, Vec::len);
    if logits.len() != last.len() || vocab == 0 || logits.iter().any(|r| r.len() != vocab) {
        return Err(Error::invalid(format!(
            "the decoder returned {} rows of logits for {} rows (or rows of unequal or zero width)",
            logits.len(),
            last.len()
        )));
    }
    Ok(logits)
}
