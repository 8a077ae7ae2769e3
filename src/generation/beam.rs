//! Beam search (and beam sampling): transformers 5's vectorized `GenerationMixin._beam_search`, written per
//! batch item. The arithmetic follows it step by step in f32 — log_softmax, then the processors, then adding
//! the running beam score; `-1e9` penalties added where transformers adds them; length penalties computed in
//! f64 as Python does and applied to f32 scores — so that the same candidates win.
//!
//! Per batch item there are `num_beams` running hypotheses and `num_beams` finished slots. Each step keeps
//! the `beams_to_keep = max(2, 1 + #eos) * num_beams` best continuations over all running beams; the best
//! `num_beams` of those that did not just stop run on, and those among the first `num_beams` that stopped
//! (EOS or max_length) compete, length-penalized, for the finished slots.

use rand::Rng;
use rayon::prelude::*;

use super::config::{EarlyStopping, GenerationConfig, Plan};
use super::processors::{log_softmax, softmax, top_k, top_k_of, LogitsProcessors};
use super::{logits_step, sample::sample, DecoderSession, GenerateOutput};
use crate::interrupt::Interrupt;
use crate::Result;

/// transformers' stand-in for minus infinity in beam bookkeeping (exact in f32).
const NEG: f32 = -1.0e9;

/// One hypothesis: its ids (decoder start included), for each generated token the row it was extended
/// from (with the batch offset, transformers' `beam_indices`) and that token's processed log-probability.
#[derive(Clone, Debug)]
struct Hypothesis {
    ids: Vec<u32>,
    beam_indices: Vec<i64>,
    token_scores: Vec<f32>,
}

impl Hypothesis {
    fn extended(&self, token: u32, row: usize, token_score: f32) -> Self {
        let mut h = self.clone();
        h.ids.push(token);
        h.beam_indices.push(row as i64);
        h.token_scores.push(token_score);
        h
    }
}

struct Finished {
    hyp: Hypothesis,
    score: f32,
    done: bool,
}

struct Item {
    running: Vec<Hypothesis>,
    running_scores: Vec<f32>,
    finished: Vec<Finished>,
    /// transformers' `is_early_stop_heuristic_unsatisfied`: the running beams may still beat a finished one.
    can_improve: bool,
}

/// Python's `int ** float` as the f32 divisor torch uses.
fn length_norm(len: usize, length_penalty: f64) -> f32 {
    (len as f64).powf(length_penalty) as f32
}

pub(crate) fn run(
    session: &mut dyn DecoderSession,
    plan: &Plan,
    processors: &LogitsProcessors,
    batch_size: usize,
    rng: &mut impl Rng,
    interrupt: &dyn Interrupt,
) -> Result<GenerateOutput> {
    let nb = plan.num_beams;
    let prompt = GenerationConfig::DECODER_PROMPT_LEN;
    let beams_to_keep = 2usize.max(1 + plan.eos.len()) * nb;
    let start = Hypothesis {
        ids: vec![plan.decoder_start],
        beam_indices: Vec::new(),
        token_scores: Vec::new(),
    };
    let mut items: Vec<Item> = (0..batch_size)
        .map(|_| Item {
            running: vec![start.clone(); nb],
            // Only the first beam is live at the start, so the beams do not all pick the same tokens.
            running_scores: (0..nb).map(|j| if j == 0 { 0.0 } else { NEG }).collect(),
            finished: (0..nb)
                .map(|_| Finished {
                    hyp: start.clone(),
                    score: NEG,
                    done: false,
                })
                .collect(),
            can_improve: true,
        })
        .collect();
    let mut all_scores = plan.output_scores.then(Vec::new);
    let mut cur_len = prompt;

    loop {
        // Its self time is the search's own work in the step: all but the decoder's.
        let _span = crate::profile::span("search");
        let last: Vec<u32> = items
            .iter()
            .flat_map(|it| it.running.iter().map(|h| h.ids[h.ids.len() - 1]))
            .collect();
        let mut log_probs = logits_step(session, interrupt, &last)?;
        let vocab = log_probs[0].len();
        // Rows and items are independent until the cache is reordered: the passes over the vocabulary run on
        // all threads (sampling draws from one generator, in order).
        log_probs
            .par_iter_mut()
            .enumerate()
            .try_for_each(|(row, lp)| {
                log_softmax(lp);
                processors.apply(&items[row / nb].running[row % nb].ids, lp)
            })?;
        // c. top-K continuations over all beams of each item, scored by accumulated log-probability.
        let rows = |b: usize| &log_probs[b * nb..][..nb];
        let picks: Vec<Vec<(f32, usize)>> = if plan.do_sample {
            let draw = |(b, item): (usize, &Item)| {
                let acc: Vec<f32> = accumulated(rows(b), &item.running_scores).collect();
                sample_without_replacement(&acc, beams_to_keep, rng)
            };
            items.iter().enumerate().map(draw).collect()
        } else {
            let best = |(b, item): (usize, &Item)| {
                top_k_of(accumulated(rows(b), &item.running_scores), beams_to_keep)
            };
            items.par_iter().enumerate().map(best).collect()
        };

        let mut all_hit = true;
        for ((b, item), picks) in items.iter_mut().enumerate().zip(picks) {
            let candidates: Vec<(f32, Hypothesis, bool)> = picks
                .into_iter()
                .map(|(score, idx)| {
                    let (j, token) = (idx / vocab, idx % vocab);
                    let row = b * nb + j;
                    let hyp = item.running[j].extended(token as u32, row, log_probs[row][token]);
                    // d. stopping criteria on the extended sequence: max_length, then EOS.
                    let hit = cur_len + 1 >= plan.max_length || plan.eos.contains(&(token as u32));
                    (score, hyp, hit)
                })
                .collect();
            all_hit &= candidates.iter().all(|c| c.2);

            // e. the best `num_beams` continuations that did not stop keep running.
            let penalized: Vec<f32> = candidates
                .iter()
                .map(|(s, _, hit)| if *hit { s + NEG } else { *s })
                .collect();
            let keep = top_k(&penalized, nb);
            item.running = keep.iter().map(|&(_, k)| candidates[k].1.clone()).collect();
            item.running_scores = keep.iter().map(|&(s, _)| s).collect();

            // f. stopped candidates among the first `num_beams` compete for the finished slots.
            let norm = length_norm(cur_len + 1 - prompt, plan.length_penalty);
            let item_full =
                item.finished.iter().all(|f| f.done) && plan.early_stopping == EarlyStopping::True;
            let mut merged: Vec<Finished> = std::mem::take(&mut item.finished);
            for (k, (score, hyp, hit)) in candidates.into_iter().enumerate() {
                let just_finished = hit && k < nb;
                let mut s = score / norm;
                for penalty in [item_full, !item.can_improve, !just_finished] {
                    if penalty {
                        s += NEG;
                    }
                }
                merged.push(Finished {
                    hyp,
                    score: s,
                    done: just_finished,
                });
            }
            let merged_scores: Vec<f32> = merged.iter().map(|f| f.score).collect();
            let best = top_k(&merged_scores, nb);
            let mut slots: Vec<Option<Finished>> = merged.into_iter().map(Some).collect();
            item.finished = best.iter().filter_map(|&(_, k)| slots[k].take()).collect();
        }

        if let Some(all) = all_scores.as_mut() {
            all.push(log_probs);
        }
        cur_len += 1;

        // g. stopping: can any item still improve, is any slot open (early_stopping=True), can any beam continue?
        for item in items.iter_mut() {
            let hypothetical =
                if plan.early_stopping == EarlyStopping::Never && plan.length_penalty > 0.0 {
                    plan.max_length - prompt
                } else {
                    cur_len - prompt
                };
            let best_possible =
                item.running_scores[0] / length_norm(hypothetical, plan.length_penalty);
            let min_finished = item
                .finished
                .iter()
                .map(|f| f.score)
                .fold(f32::INFINITY, f32::min);
            let beats_a_slot = item
                .finished
                .iter()
                .any(|f| best_possible > if f.done { min_finished } else { NEG });
            item.can_improve &= beats_a_slot;
        }
        let improvement_possible = items.iter().any(|it| it.can_improve);
        let all_full = items.iter().all(|it| it.finished.iter().all(|f| f.done));
        let open_beam = !(all_full && plan.early_stopping == EarlyStopping::True);
        if !(improvement_possible && open_beam && !all_hit) {
            break;
        }
        let order: Vec<usize> = items
            .iter()
            .flat_map(|it| {
                it.running
                    .iter()
                    .map(|h| h.beam_indices.last().copied().unwrap_or(0) as usize)
            })
            .collect();
        if order.iter().enumerate().any(|(i, &o)| i != o) {
            session.reorder(&order)?;
        }
    }

    Ok(output(items, plan, all_scores))
}

/// transformers' step 5: the best `num_return_sequences` finished slots per item, cropped to the longest
/// and padded (transformers fills with pad_token_id, or eos when pad is 0 or unset).
fn output(items: Vec<Item>, plan: &Plan, scores: Option<Vec<Vec<Vec<f32>>>>) -> GenerateOutput {
    let fill = match (plan.eos.first(), plan.pad) {
        (Some(&eos), None | Some(0)) => eos,
        (_, pad) => pad.unwrap_or(0),
    };
    let returned: Vec<Finished> = items
        .into_iter()
        .flat_map(|it| it.finished.into_iter().take(plan.num_return_sequences))
        .collect();
    let generated = returned
        .iter()
        .map(|f| f.hyp.beam_indices.len())
        .max()
        .unwrap_or(0);
    let len = GenerationConfig::DECODER_PROMPT_LEN + generated;
    let mut out = GenerateOutput {
        sequences: Vec::new(),
        sequences_scores: Some(Vec::new()),
        scores,
        beam_indices: Some(Vec::new()),
        token_scores: Vec::new(),
    };
    for f in returned {
        let mut ids = f.hyp.ids;
        ids.resize(len, fill);
        let mut beam_indices = f.hyp.beam_indices;
        beam_indices.resize(generated, -1);
        let mut token_scores = f.hyp.token_scores;
        token_scores.resize(generated, 0.0);
        out.sequences.push(ids);
        out.sequences_scores
            .get_or_insert_with(Vec::new)
            .push(f.score);
        out.beam_indices
            .get_or_insert_with(Vec::new)
            .push(beam_indices);
        out.token_scores.push(token_scores);
    }
    out
}

/// An item's continuations in the order of its rows and tokens: each token's log-probability plus the
/// running score of the beam it extends.
fn accumulated<'a>(
    log_probs: &'a [Vec<f32>],
    running_scores: &'a [f32],
) -> impl Iterator<Item = f32> + 'a {
    log_probs
        .iter()
        .zip(running_scores)
        .flat_map(|(row, &running_score)| row.iter().map(move |&x| x + running_score))
}

/// `torch.multinomial(softmax(scores), k)` without replacement, returning (score, index) in draw order.
fn sample_without_replacement(scores: &[f32], k: usize, rng: &mut impl Rng) -> Vec<(f32, usize)> {
    let mut probs = softmax(scores);
    let mut picks = Vec::with_capacity(k);
    for _ in 0..k.min(scores.len()) {
        let i = sample(&probs, rng);
        picks.push((scores[i], i));
        probs[i] = 0.0;
    }
    picks
}
