//! Greedy search and multinomial sampling: transformers' `GenerationMixin._sample`. One token per row per
//! step; rows that finished get `pad_token_id` until every row is done or `max_length` is reached.

use rand::Rng;
use rayon::prelude::*;

use super::config::Plan;
use super::processors::{argmax, log_softmax_at, softmax, LogitsProcessors};
use super::{logits_step, DecoderSession, GenerateOutput};
use crate::interrupt::Interrupt;
use crate::Result;

pub(crate) fn run(
    session: &mut dyn DecoderSession,
    plan: &Plan,
    processors: &LogitsProcessors,
    rng: &mut impl Rng,
    interrupt: &dyn Interrupt,
) -> Result<GenerateOutput> {
    let rows = session.rows();
    let mut ids: Vec<Vec<u32>> = vec![vec![plan.decoder_start]; rows];
    let mut unfinished = vec![true; rows];
    let mut token_scores: Vec<Vec<f32>> = vec![Vec::new(); rows];
    let mut all_scores = plan.output_scores.then(Vec::new);
    let has_eos = !plan.eos.is_empty();

    loop {
        // Its self time is the search's own work in the step: all but the decoder's.
        let _span = crate::profile::span("search");
        let last: Vec<u32> = ids.iter().map(|r| r[r.len() - 1]).collect();
        let mut scores = logits_step(session, interrupt, &last)?;
        // The rows are independent: their passes over the vocabulary run on all threads, except the draws,
        // which take one generator in order.
        scores
            .par_iter_mut()
            .enumerate()
            .try_for_each(|(row, s)| processors.apply(&ids[row], s))?;
        let tokens: Vec<usize> = if plan.do_sample {
            scores.iter().map(|s| sample(&softmax(s), rng)).collect()
        } else {
            scores.par_iter().map(|s| argmax(s)).collect()
        };
        // The confidence kept per token is the log-probability under the processed scores, i.e.
        // transformers' compute_transition_scores(..., normalize_logits=True).
        let chosen: Vec<f32> = scores
            .par_iter()
            .zip(&tokens)
            .map(|(s, &token)| log_softmax_at(s, token))
            .collect();
        let mut next = Vec::with_capacity(rows);
        for (row, (&token, &logp)) in tokens.iter().zip(&chosen).enumerate() {
            let finished_pad = (has_eos && !unfinished[row]).then_some(plan.pad).flatten();
            match finished_pad {
                Some(pad) => {
                    next.push(pad);
                    token_scores[row].push(0.0);
                }
                None => {
                    next.push(token as u32);
                    token_scores[row].push(logp);
                }
            }
        }
        if let Some(all) = all_scores.as_mut() {
            all.push(scores);
        }
        for (row, &t) in next.iter().enumerate() {
            ids[row].push(t);
            let done = ids[row].len() >= plan.max_length || plan.eos.contains(&t);
            unfinished[row] &= !done;
        }
        if !unfinished.iter().any(|u| *u) {
            break;
        }
    }

    Ok(GenerateOutput {
        sequences: ids,
        sequences_scores: None,
        scores: all_scores,
        beam_indices: None,
        token_scores,
    })
}

/// One draw from a categorical distribution (torch.multinomial with one sample). A row whose probabilities
/// are all zero or NaN (every token banned) falls back to its most likely token.
pub(crate) fn sample(probs: &[f32], rng: &mut impl Rng) -> usize {
    let total: f64 = probs
        .iter()
        .filter(|p| p.is_finite())
        .map(|&p| f64::from(p))
        .sum();
    if total <= 0.0 || !total.is_finite() {
        return argmax(probs);
    }
    let target = rng.random::<f64>() * total;
    let mut cum = 0.0;
    let mut last_positive = 0;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 && p.is_finite() {
            cum += f64::from(p);
            last_positive = i;
            if target < cum {
                return i;
            }
        }
    }
    last_positive
}
