//! Text generation for the BART decoder: transformers' `GenerationMixin` rules (greedy, beam search,
//! sampling, logits processors, stopping), driven through the [`DecoderSession`] trait so that the
//! loop does not depend on the model's internals.

use crate::Result;

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
