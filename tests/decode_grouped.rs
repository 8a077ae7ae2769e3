//! The grouped decoder cache (the beams of one item share one copy of its cross-attention keys/values,
//! `start_decoding_grouped`, what `model.generate` uses) against the expanded one (`encoder.expand(n)`, one
//! copy per beam): transformers' ids from `model.generate`, the same logits step by step, and beam reorders
//! that would leave an item's group refused.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{fixture, fixtures, generation_config, load, read_json, reference_tensors};
use florence2_rs::generation::DecoderSession;
use florence2_rs::interrupt::Uninterrupted;
use florence2_rs::model::{DecoderState, EncoderOutput, Florence2ForConditionalGeneration};

/// The tiny HF-native checkpoint, its reference inputs and image features.
fn tiny(spec: &str) -> (Florence2ForConditionalGeneration, Tensor, Tensor, Tensor) {
    let refs = reference_tensors(spec);
    let model = load(spec, "hf", DType::F32);
    let features = model
        .get_image_features(refs["pixel_values"].clone(), &Uninterrupted)
        .expect("image features");
    (
        model,
        refs["input_ids"].clone(),
        refs["attention_mask"].clone(),
        features,
    )
}

#[test]
fn model_generate_gives_transformers_ids() {
    let expected = read_json(&fixtures().join("generation/e2e_reference.json"));
    for (spec, cases) in expected.as_object().expect("specs") {
        let (model, ids, mask, features) = tiny(spec);
        let dir = fixture(spec).join("hf");
        for case in cases.as_array().expect("cases") {
            let cfg = generation_config(&dir, &case["kwargs"]);
            let want: Vec<Vec<u32>> =
                serde_json::from_value(case["sequences"].clone()).expect("ids");
            let got = model
                .generate(&ids, Some(&mask), Some(&features), &cfg, &Uninterrupted)
                .expect("generate")
                .sequences;
            assert_eq!(got, want, "{spec} {}", case["kwargs"]);
        }
    }
}

#[test]
fn grouped_and_expanded_caches_agree() {
    let (model, ids, mask, features) = tiny("tiny");
    let encoder = model
        .encode(&ids, Some(&mask), Some(&features), &Uninterrupted)
        .expect("encode");
    let beams = 3;
    let mut grouped = model
        .start_decoding_grouped(&encoder, beams)
        .expect("grouped");
    let mut expanded = model
        .start_decoding(&encoder.expand(beams).expect("expand"))
        .expect("expanded");
    assert_eq!(grouped.rows(), expanded.rows());
    let rows = grouped.rows();
    let mut tokens: Vec<u32> = vec![2; rows];
    // Reorders within each item's beams, as beam search does: duplicate beam 2, drop beam 0, rotate.
    let orders: [Vec<usize>; 2] = [vec![2, 2, 1, 5, 4, 4], vec![1, 2, 0, 4, 5, 3]];
    for step in 0..4 {
        let a = grouped.next_logits(&tokens).expect("grouped step");
        let b = expanded.next_logits(&tokens).expect("expanded step");
        for (ra, rb) in a.iter().zip(&b) {
            let diff = ra
                .iter()
                .zip(rb)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-5, "step {step}: logits differ by {diff}");
        }
        let order = &orders[step % 2];
        grouped.reorder(order).expect("grouped reorder");
        expanded.reorder(order).expect("expanded reorder");
        tokens = (0..rows as u32).map(|r| 3 + r + step as u32).collect();
    }
    // A row may not take the beam of another item: their encoder states differ.
    assert!(grouped.reorder(&[3, 1, 2, 0, 4, 5]).is_err());
}

/// Past the decoder cache's first growth (its self-attention buffers grow by 128 positions) and through
/// reorders of every kind (a beam copied over others, swaps, rotations, none), each row's decoder states are
/// those of a fresh session fed that row's own tokens in order, with no reorder, bit for bit; and, within float
/// tolerance, those of one pass over the whole history (whose buffers never grow). The cache holds exactly
/// each beam's history. The trained `shapes` model (1,024 positions; `tiny` has 96), random encoder states;
/// decoder states rather than logits, which cost a 51,289-row LM head per step (slow under emulation).
#[test]
fn reordered_cache_holds_each_beams_history() {
    let dev = Device::Cpu;
    let model = Florence2ForConditionalGeneration::from_dir(
        &fixture("shapes").join("hf"),
        DType::F32,
        &dev,
    )
    .expect("model");
    let d_model = model.config().text.d_model;
    let encoder = EncoderOutput {
        hidden_states: Tensor::randn(0f32, 1., (2, 40, d_model), &dev).expect("states"),
        attention_mask: Tensor::ones((2, 40), DType::F32, &dev).expect("mask"),
    };
    let (beams, rows, steps) = (3, 6, 150);
    let orders: [[usize; 6]; 4] = [
        [0, 0, 1, 3, 3, 4],
        [1, 0, 2, 4, 5, 3],
        [2, 2, 2, 5, 4, 3],
        [0, 1, 2, 3, 4, 5],
    ];
    let states = |tokens: &[u32], session: &mut DecoderState| {
        let ids = Tensor::from_slice(tokens, (rows, 1), &dev).expect("ids");
        let hidden = session.hidden_step(&ids).expect("step");
        hidden
            .squeeze(1)
            .and_then(|t| t.to_vec2::<f32>())
            .expect("states")
    };
    let mut session = model
        .start_decoding_grouped(&encoder, beams)
        .expect("session");
    let mut histories: Vec<Vec<u32>> = vec![Vec::new(); rows];
    let mut got = Vec::new();
    for step in 0..steps {
        let tokens: Vec<u32> = (0..rows)
            .map(|r| ((step * 7 + r * 13) % 1000 + 4) as u32)
            .collect();
        for (history, &token) in histories.iter_mut().zip(&tokens) {
            history.push(token);
        }
        got = states(&tokens, &mut session);
        let order = &orders[step % orders.len()];
        session.reorder(order).expect("reorder");
        histories = order.iter().map(|&o| histories[o].clone()).collect();
        got = order.iter().map(|&o| got[o].clone()).collect();
    }
    let mut fresh = model
        .start_decoding_grouped(&encoder, beams)
        .expect("fresh session");
    let mut want = Vec::new();
    for step in 0..steps {
        let tokens: Vec<u32> = histories.iter().map(|h| h[step]).collect();
        want = states(&tokens, &mut fresh);
    }
    assert_eq!(got, want);
    let mut one_pass = model
        .start_decoding_grouped(&encoder, beams)
        .expect("one-pass session");
    let ids = Tensor::from_vec(histories.concat(), (rows, steps), &dev).expect("ids");
    let last: Vec<Vec<f32>> = one_pass
        .hidden_step(&ids)
        .expect("one pass")
        .narrow(1, steps - 1, 1)
        .and_then(|t| t.squeeze(1))
        .and_then(|t| t.to_vec2())
        .expect("one pass");
    let diff = last
        .iter()
        .flatten()
        .zip(got.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-4, "one pass and step by step differ by {diff}");
}
