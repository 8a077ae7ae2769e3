//! transformers' logits processors and warpers (generation/logits_process.py), in the order
//! `GenerationMixin._get_logits_processor` builds them, with the same f32 arithmetic so that argmax and
//! top-k see the same values. Every processor here looks at one row at a time (its ids and its scores).

use super::config::{GenerationConfig, Plan};
use crate::{Error, Result};

#[derive(Clone, Debug)]
enum Processor {
    RepetitionPenalty(f32),
    NoRepeatNGram(usize),
    /// Sequences to forbid: a single id is always banned, a longer one bans its last id after its prefix.
    BadWords(Vec<Vec<u32>>),
    /// Bans EOS while the row (decoder start included) is shorter than this.
    MinLength(usize, Vec<u32>),
    /// Bans EOS while fewer than this many tokens were generated.
    MinNewTokens(usize, Vec<u32>),
    ForcedBos(u32),
    /// Forces EOS at length `max_length - 1`.
    ForcedEos(usize, Vec<u32>),
    Suppress(Vec<u32>),
    /// Suppresses the tokens when the row has exactly this length.
    BeginSuppress(usize, Vec<u32>),
    Temperature(f32),
    TopK(usize),
    /// top_p (kept in f64: transformers computes `1 - top_p` in Python) and the tokens always kept.
    TopP(f64, usize),
}

/// The processors of one `generate` call.
#[derive(Clone, Debug)]
pub(crate) struct LogitsProcessors(Vec<Processor>);

impl LogitsProcessors {
    /// transformers' `_get_logits_processor` for an encoder-decoder model whose decoder prompt is one token.
    pub(crate) fn new(cfg: &GenerationConfig, plan: &Plan) -> Result<Self> {
        let mut list = Vec::new();
        let eos = &plan.eos;
        if let Some(p) = cfg.repetition_penalty.filter(|p| *p != 1.0) {
            list.push(Processor::RepetitionPenalty(p as f32));
        }
        if let Some(n) = cfg.no_repeat_ngram_size.filter(|n| *n > 0) {
            list.push(Processor::NoRepeatNGram(n));
        }
        if let Some(bad) = &cfg.bad_words_ids {
            // A bad word equal to a single EOS token is dropped, as transformers does.
            let kept = bad
                .iter()
                .filter(|seq| !(seq.len() == 1 && eos.contains(&seq[0])))
                .cloned()
                .collect();
            list.push(Processor::BadWords(kept));
        }
        if plan.min_length > 0 && cfg.eos_token_id.is_some() {
            list.push(Processor::MinLength(plan.min_length, eos.clone()));
        }
        if let Some(n) = plan
            .min_new_tokens
            .filter(|n| *n > 0 && cfg.eos_token_id.is_some())
        {
            list.push(Processor::MinNewTokens(n, eos.clone()));
        }
        if let Some(bos) = cfg.forced_bos_token_id {
            list.push(Processor::ForcedBos(bos));
        }
        if let Some(forced) = &cfg.forced_eos_token_id {
            list.push(Processor::ForcedEos(plan.max_length, forced.clone()));
        }
        if let Some(tokens) = &cfg.suppress_tokens {
            list.push(Processor::Suppress(tokens.clone()));
        }
        if let Some(tokens) = &cfg.begin_suppress_tokens {
            let prompt = GenerationConfig::DECODER_PROMPT_LEN;
            // transformers moves the start past the forced BOS when the prompt is a single token.
            let begin = if prompt > 1 || cfg.forced_bos_token_id.is_none() {
                prompt
            } else {
                prompt + 1
            };
            list.push(Processor::BeginSuppress(begin, tokens.clone()));
        }
        if plan.do_sample {
            // Beam sampling keeps one more candidate than there are EOS tokens so that a beam can continue.
            let keep = if plan.num_beams > 1 { eos.len() + 1 } else { 1 };
            if let Some(t) = cfg.temperature.filter(|t| *t != 1.0) {
                list.push(Processor::Temperature(t as f32));
            }
            // transformers' default top_k is 50 (applied whenever sampling).
            let top_k = cfg.top_k.unwrap_or(50);
            if top_k != 0 {
                list.push(Processor::TopK(top_k.max(keep)));
            }
            if let Some(p) = cfg.top_p.filter(|p| *p < 1.0) {
                list.push(Processor::TopP(p, keep));
            }
        }
        Ok(Self(list))
    }

    /// Applies every processor in order to one row's scores, given that row's ids so far.
    pub(crate) fn apply(&self, ids: &[u32], scores: &mut [f32]) -> Result<()> {
        for p in &self.0 {
            p.apply(ids, scores)?;
        }
        Ok(())
    }
}

fn ban(scores: &mut [f32], tokens: &[u32]) {
    for &t in tokens {
        if let Some(s) = scores.get_mut(t as usize) {
            *s = f32::NEG_INFINITY;
        }
    }
}

/// All scores to -inf but `tokens`, which get 0; an id outside the vocabulary is an error (torch would fail).
fn force(scores: &mut [f32], tokens: &[u32], what: &str) -> Result<()> {
    let vocab = scores.len();
    if let Some(t) = tokens.iter().find(|t| **t as usize >= vocab) {
        return Err(Error::invalid(format!(
            "`{what}` {t} is outside the vocabulary ({vocab} tokens)"
        )));
    }
    scores.fill(f32::NEG_INFINITY);
    for &t in tokens {
        scores[t as usize] = 0.0;
    }
    Ok(())
}

impl Processor {
    fn apply(&self, ids: &[u32], scores: &mut [f32]) -> Result<()> {
        let len = ids.len();
        match self {
            Processor::RepetitionPenalty(p) => {
                let mut seen = vec![false; scores.len()];
                for &t in ids {
                    let t = t as usize;
                    if t < scores.len() && !seen[t] {
                        seen[t] = true;
                        let s = scores[t];
                        scores[t] = if s < 0.0 { s * p } else { s / p };
                    }
                }
            }
            Processor::NoRepeatNGram(n) => {
                let n = *n;
                if len >= n {
                    // Any earlier n-gram whose first n-1 ids equal the last n-1 ids would be repeated by its last id.
                    let prefix = &ids[len + 1 - n..];
                    let banned: Vec<u32> = ids
                        .windows(n)
                        .filter(|w| &w[..n - 1] == prefix)
                        .map(|w| w[n - 1])
                        .collect();
                    ban(scores, &banned);
                }
            }
            Processor::BadWords(seqs) => {
                let vocab = scores.len();
                for seq in seqs {
                    if let Some(t) = seq.iter().find(|t| **t as usize >= vocab) {
                        return Err(Error::invalid(format!(
                            "The model vocabulary size is {vocab}, but `bad_words_ids` holds token {t}"
                        )));
                    }
                    let (last, prefix) = seq
                        .split_last()
                        .ok_or_else(|| Error::invalid("empty bad word"))?;
                    if prefix.len() <= len && ids.ends_with(prefix) {
                        scores[*last as usize] = f32::NEG_INFINITY;
                    }
                }
            }
            Processor::MinLength(min, eos) => {
                if len < *min {
                    ban(scores, eos);
                }
            }
            Processor::MinNewTokens(min, eos) => {
                if len - GenerationConfig::DECODER_PROMPT_LEN < *min {
                    ban(scores, eos);
                }
            }
            Processor::ForcedBos(bos) => {
                if len == 1 {
                    force(scores, &[*bos], "forced_bos_token_id")?;
                }
            }
            Processor::ForcedEos(max_length, eos) => {
                if len + 1 == *max_length {
                    force(scores, eos, "forced_eos_token_id")?;
                }
            }
            Processor::Suppress(tokens) => ban(scores, tokens),
            Processor::BeginSuppress(begin, tokens) => {
                if len == *begin {
                    ban(scores, tokens);
                }
            }
            Processor::Temperature(t) => scores.iter_mut().for_each(|s| *s /= t),
            Processor::TopK(k) => {
                let k = (*k).min(scores.len());
                if k > 0 {
                    let mut sorted = scores.to_vec();
                    sorted.sort_unstable_by(|a, b| b.total_cmp(a));
                    let threshold = sorted[k - 1];
                    scores
                        .iter_mut()
                        .filter(|s| **s < threshold)
                        .for_each(|s| *s = f32::NEG_INFINITY);
                }
            }
            Processor::TopP(p, keep) => top_p(scores, *p, *keep),
        }
        Ok(())
    }
}

/// transformers' `TopPLogitsWarper`: sort ascending, drop the tokens whose cumulative probability stays at or
/// below `1 - top_p`, always keeping the `keep` most likely.
fn top_p(scores: &mut [f32], p: f64, keep: usize) {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let sorted: Vec<f32> = order.iter().map(|&i| scores[i]).collect();
    let probs = softmax(&sorted);
    let threshold = (1.0 - p) as f32;
    let removable = order.len().saturating_sub(keep);
    // torch's CPU cumsum accumulates in double and rounds each partial sum to float.
    let mut cum = 0.0f64;
    let mut remove = Vec::new();
    for (j, &i) in order.iter().enumerate().take(removable) {
        cum += f64::from(probs[j]);
        if (cum as f32) <= threshold {
            remove.push(i);
        }
    }
    for i in remove {
        scores[i] = f32::NEG_INFINITY;
    }
}

/// `log_softmax` over one row, as torch computes it in f32: `x - max - log(sum(exp(x - max)))`.
pub(crate) fn log_softmax(row: &mut [f32]) {
    if let Some((max, log_sum)) = normalizer(row) {
        row.iter_mut().for_each(|x| *x = *x - max - log_sum);
    }
}

/// [`log_softmax`] of `row` at `index` alone (the same value, without writing the row).
pub(crate) fn log_softmax_at(row: &[f32], index: usize) -> f32 {
    match normalizer(row) {
        Some((max, log_sum)) => row[index] - max - log_sum,
        None => row[index],
    }
}

/// `(max, log(sum(exp(x - max))))` of a row (the sum in f64), or None for an all -inf row, which
/// [`log_softmax`] leaves as it is.
fn normalizer(row: &[f32]) -> Option<(f32, f32)> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return None;
    }
    let sum: f64 = row.iter().map(|&x| f64::from((x - max).exp())).sum();
    Some((max, sum.ln() as f32))
}

/// Softmax over one row in f32 (sums in f64); an all -inf row gives NaN like torch.
pub(crate) fn softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = row.iter().map(|&x| (x - max).exp()).collect();
    let sum: f64 = exps.iter().map(|&e| f64::from(e)).sum();
    let sum = sum as f32;
    exps.into_iter().map(|e| e / sum).collect()
}

/// Index of the first maximum, like `torch.argmax` (NaN counts as the maximum, as in torch).
pub(crate) fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x.is_nan() {
            return i;
        }
        if x > row[best] {
            best = i;
        }
    }
    best
}

/// The `k` largest values with their indices, largest first; equal values keep index order. (torch's CPU
/// topk orders exact ties by libstdc++'s heap order instead; with real scores exact ties are very rare.)
pub(crate) fn top_k(values: &[f32], k: usize) -> Vec<(f32, usize)> {
    if k <= SCAN_MAX_K {
        return scan(values.iter().copied(), k);
    }
    let mut idx: Vec<usize> = (0..values.len()).collect();
    let desc = |a: &usize, b: &usize| values[*b].total_cmp(&values[*a]).then(a.cmp(b));
    if k < idx.len() {
        idx.select_nth_unstable_by(k, desc);
        idx.truncate(k);
    }
    idx.sort_by(desc);
    idx.into_iter().map(|i| (values[i], i)).collect()
}

/// [`top_k`] of a stream of values (the same values, indices and order): beam search's few candidates out of
/// every beam's whole vocabulary, in one pass without gathering them where `k` is small enough.
pub(crate) fn top_k_of(values: impl Iterator<Item = f32>, k: usize) -> Vec<(f32, usize)> {
    if k <= SCAN_MAX_K {
        scan(values, k)
    } else {
        top_k(&values.collect::<Vec<f32>>(), k)
    }
}

/// Up to this many, [`scan`] finds the largest values in one pass (a value enters the kept list only when it
/// beats the last kept one, which is rare after the first few); beyond it the insertions would cost more than
/// [`top_k`]'s selection.
const SCAN_MAX_K: usize = 64;

/// [`top_k`] in one pass, keeping the best `k` seen so far.
fn scan(values: impl Iterator<Item = f32>, k: usize) -> Vec<(f32, usize)> {
    use std::cmp::Ordering;
    let mut best: Vec<(f32, usize)> = Vec::with_capacity(k + 1);
    if k == 0 {
        return best;
    }
    for (i, v) in values.enumerate() {
        // A value equal to the last kept one comes later, so it ranks below it.
        if best.len() == k && v.total_cmp(&best[k - 1].0) != Ordering::Greater {
            continue;
        }
        let at = best.partition_point(|(kept, _)| kept.total_cmp(&v) != Ordering::Less);
        best.insert(at, (v, i));
        best.truncate(k);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_orders_ties_by_index() {
        let v = [1.0, 3.0, 3.0, 2.0, f32::NEG_INFINITY];
        assert_eq!(top_k(&v, 3), vec![(3.0, 1), (3.0, 2), (2.0, 3)]);
        assert_eq!(top_k(&v, 9).len(), 5);
    }

    /// The one-pass scan, the selection and the stream form give the same values, indices and order, ties and
    /// non-finite values included, for every k from none to more than there are values.
    #[test]
    fn scan_and_selection_agree() {
        let mut state = 7u32;
        let values: Vec<f32> = (0..500)
            .map(|i| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                match i % 50 {
                    0 => f32::NEG_INFINITY,
                    1 => f32::INFINITY,
                    2 => f32::NAN,
                    // Few distinct values, so that ties are common.
                    _ => (state >> 28) as f32 - 8.0,
                }
            })
            .collect();
        let selected = |k: usize| {
            let mut idx: Vec<usize> = (0..values.len()).collect();
            idx.sort_by(|a, b| values[*b].total_cmp(&values[*a]).then(a.cmp(b)));
            idx.truncate(k);
            idx.into_iter()
                .map(|i| (values[i].to_bits(), i))
                .collect::<Vec<_>>()
        };
        for k in [0, 1, 2, 6, 64, 65, 499, 500, 600] {
            let bits = |picks: Vec<(f32, usize)>| -> Vec<(u32, usize)> {
                picks.into_iter().map(|(v, i)| (v.to_bits(), i)).collect()
            };
            assert_eq!(
                bits(top_k_of(values.iter().copied(), k)),
                selected(k),
                "scan, k = {k}"
            );
            assert_eq!(bits(top_k(&values, k)), selected(k), "top_k, k = {k}");
        }
    }

    #[test]
    fn argmax_takes_first_max() {
        assert_eq!(argmax(&[0.0, 5.0, 5.0, 1.0]), 1);
    }

    /// transformers' processors on fixed scores (tests/fixtures/generation/make_reference.py).
    #[test]
    fn processors_match_transformers() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/generation/reference.json"
        );
        let data: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("json");
        let f32s = |v: &serde_json::Value| -> Vec<f32> {
            let a = v.as_array().expect("array");
            a.iter()
                .map(|x| x.as_f64().map_or(f32::NEG_INFINITY, |f| f as f32))
                .collect()
        };
        let cases = data["processors"].as_array().expect("cases");
        for case in cases {
            let name = case["name"].as_str().expect("name");
            let ids: Vec<Vec<u32>> = case["input_ids"]
                .as_array()
                .expect("ids")
                .iter()
                .map(|r| {
                    r.as_array()
                        .expect("row")
                        .iter()
                        .map(|x| x.as_u64().expect("id") as u32)
                        .collect()
                })
                .collect();
            let bad = |row: usize, col: usize| ids[row][col];
            let p = match name {
                "repetition_penalty_1.5" => Processor::RepetitionPenalty(1.5),
                "repetition_penalty_0.7" => Processor::RepetitionPenalty(0.7),
                "no_repeat_ngram_2" => Processor::NoRepeatNGram(2),
                "no_repeat_ngram_3" => Processor::NoRepeatNGram(3),
                "temperature_0.7" => Processor::Temperature(0.7),
                "top_k_5" => Processor::TopK(5),
                "top_k_1_keep_2" => Processor::TopK(2),
                "top_p_0.8" => Processor::TopP(0.8, 1),
                "top_p_0.3" => Processor::TopP(0.3, 1),
                "top_p_0.0_keep_2" => Processor::TopP(0.0, 2),
                "bad_words" => {
                    Processor::BadWords(vec![vec![bad(0, 5)], vec![bad(1, 5), 9], vec![3, 4, 5]])
                }
                other => panic!("unknown processor case {other}"),
            };
            let scores = case["scores"].as_array().expect("scores");
            let expected = case["expected"].as_array().expect("expected");
            for (row, (s, e)) in scores.iter().zip(expected).enumerate() {
                let mut got = f32s(s);
                p.apply(&ids[row], &mut got).expect("apply");
                assert_eq!(got, f32s(e), "{name} row {row}");
            }
        }
    }

    #[test]
    fn log_softmax_of_forced_row() {
        let mut r = [f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY];
        log_softmax(&mut r);
        assert_eq!(r[1], 0.0);
    }
}
