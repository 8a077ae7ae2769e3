//! The grouped decoder cache (the beams of one item share one copy of its cross-attention keys/values,
//! `start_decoding_grouped`, what `model.generate` uses) against the expanded one (`encoder.expand(n)`, one
//! copy per beam): transformers' ids from `model.generate`, the same logits step by step, and beam reorders
//! that would leave an item's group refused.

mod common;

use candle_core::{DType, Tensor};
use common::{fixture, fixtures, generation_config, load, read_json, reference_tensors};
use florence2_rs::generation::DecoderSession;
use florence2_rs::interrupt::Uninterrupted;
use florence2_rs::model::Florence2ForConditionalGeneration;

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
