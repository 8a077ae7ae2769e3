//! Replays next-token logits recorded from transformers' own `generate` (tests/fixtures/generation/
//! make_reference.py, transformers 5.23.0, a tiny random BART) through a fake decoder session and checks
//! that florence2_rs's loop returns the same ids, beam indices and scores; and that its logits processors
//! give transformers' values on fixed score tensors.

mod common;

use std::collections::HashMap;

use common::{fixtures, read_json};
use florence2_rs::generation::{generate, DecoderSession, GenerationConfig};
use florence2_rs::interrupt::Uninterrupted;
use florence2_rs::Result;
use serde_json::Value;

fn reference() -> Value {
    read_json(&fixtures().join("generation/reference.json"))
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| match x {
            Value::String(s) if s == "-inf" => f32::NEG_INFINITY,
            Value::String(s) if s == "inf" => f32::INFINITY,
            Value::String(_) => f32::NAN,
            x => x.as_f64().expect("number") as f32,
        })
        .collect()
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// A decoder whose logits are those transformers computed for the same (batch item, prefix).
struct Replay {
    expand: usize,
    prefixes: Vec<Vec<u32>>,
    logits: HashMap<(usize, Vec<u32>), Vec<f32>>,
}

impl DecoderSession for Replay {
    fn rows(&self) -> usize {
        self.prefixes.len()
    }
    fn next_logits(&mut self, last_tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::new();
        for (row, &t) in last_tokens.iter().enumerate() {
            self.prefixes[row].push(t);
            let key = (row / self.expand, self.prefixes[row].clone());
            // Rows that transformers never fed (finished greedy rows padded, junk beams) get flat logits.
            out.push(
                self.logits
                    .get(&key)
                    .cloned()
                    .unwrap_or_else(|| vec![0.0; 48]),
            );
        }
        Ok(out)
    }
    fn reorder(&mut self, order: &[usize]) -> Result<()> {
        self.prefixes = order.iter().map(|&o| self.prefixes[o].clone()).collect();
        Ok(())
    }
}

fn close(a: f32, b: f32) -> bool {
    a == b || (a - b).abs() <= 1e-4 * (1.0 + b.abs())
}

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(close(*g, *w), "{what}[{i}]: got {g}, transformers {w}");
    }
}

#[test]
fn generate_matches_transformers() {
    let data = reference();
    let cases = data["generate"].as_array().expect("cases");
    assert!(!cases.is_empty());
    for case in cases {
        let name = case["name"].as_str().expect("name");
        let batch = case["batch_size"].as_u64().expect("batch") as usize;
        let mut cfg = GenerationConfig::from_json(&case["generation_config"]).expect("config");
        for (k, v) in case["kwargs"].as_object().expect("kwargs") {
            cfg.set(k, v.clone())
                .unwrap_or_else(|e| panic!("{name}: {k}: {e}"));
        }
        cfg.set("output_scores", Value::Bool(true))
            .expect("output_scores");
        let expand = cfg.expand_factor();
        assert_eq!(
            expand as u64,
            case["expand"].as_u64().expect("expand"),
            "{name}: expand factor"
        );
        let logits = case["records"]
            .as_array()
            .expect("records")
            .iter()
            .map(|r| {
                (
                    (
                        r["item"].as_u64().expect("item") as usize,
                        u32s(&r["prefix"]),
                    ),
                    f32s(&r["logits"]),
                )
            })
            .collect();
        let mut session = Replay {
            expand,
            prefixes: vec![Vec::new(); batch * expand],
            logits,
        };
        let out = generate(&mut session, &cfg, batch, &Uninterrupted)
            .unwrap_or_else(|e| panic!("{name}: {e}"));

        let expected = &case["expected"];
        let want: Vec<Vec<u32>> = expected["sequences"]
            .as_array()
            .expect("seqs")
            .iter()
            .map(u32s)
            .collect();
        assert_eq!(out.sequences, want, "{name}: sequences");
        if let Some(scores) = expected.get("sequences_scores") {
            assert_close(
                &format!("{name}: sequences_scores"),
                out.sequences_scores.as_ref().expect("beam"),
                &f32s(scores),
            );
        }
        if let Some(bi) = expected.get("beam_indices") {
            let want: Vec<Vec<i64>> = bi
                .as_array()
                .expect("bi")
                .iter()
                .map(|r| {
                    r.as_array()
                        .expect("row")
                        .iter()
                        .map(|x| x.as_i64().expect("i"))
                        .collect()
                })
                .collect();
            assert_eq!(
                out.beam_indices.as_ref().expect("beam"),
                &want,
                "{name}: beam_indices"
            );
        }
        for (i, (got, want)) in out
            .token_scores
            .iter()
            .zip(expected["transition_scores"].as_array().expect("ts"))
            .enumerate()
        {
            let mut want = f32s(want);
            // transformers scores the pad tokens of finished greedy rows; this loop reports 0.0 there.
            for (j, w) in want.iter_mut().enumerate() {
                if got[j] == 0.0 && out.sequences[i][j + 1] == 1 {
                    *w = 0.0;
                }
            }
            assert_close(&format!("{name}: token_scores[{i}]"), got, &want);
        }
        if let Some(steps) = expected.get("scores") {
            let got = out.scores.as_ref().expect("scores");
            let steps = steps.as_array().expect("steps");
            assert_eq!(got.len(), steps.len(), "{name}: number of score steps");
            for (s, (g, w)) in got.iter().zip(steps).enumerate() {
                for (r, (gr, wr)) in g.iter().zip(w.as_array().expect("rows")).enumerate() {
                    assert_close(&format!("{name}: scores[{s}][{r}]"), gr, &f32s(wr));
                }
            }
        }
    }
}
