//! End to end on the tiny random Florence-2 checkpoints: the model's decoder session driven by the
//! generation loop gives transformers' `generate` ids (tests/fixtures/generation/make_e2e_reference.py),
//! in both checkpoint layouts, batched and one item at a time, from pixels and from cached image features.

mod common;

use candle_core::{DType, IndexOp, Tensor};
use common::{
    fixture, fixtures, generation_config, load, n_image_tokens, read_json, reference_tensors,
    skip_columns,
};
use florence2_rs::generation::{generate, GenerationConfig};
use florence2_rs::interrupt::Uninterrupted;
use florence2_rs::model::Florence2ForConditionalGeneration;

fn run(
    model: &Florence2ForConditionalGeneration,
    cfg: &GenerationConfig,
    ids: &Tensor,
    mask: &Tensor,
    features: &Tensor,
) -> Vec<Vec<u32>> {
    let encoder = model
        .encode(ids, Some(mask), Some(features), &Uninterrupted)
        .unwrap();
    let encoder = encoder.expand(cfg.expand_factor()).unwrap();
    let mut session = model.start_decoding(&encoder).unwrap();
    generate(&mut session, cfg, ids.dim(0).unwrap(), &Uninterrupted)
        .unwrap()
        .sequences
}

#[test]
fn tiny_checkpoints_generate_like_transformers() {
    let expected = read_json(&fixtures().join("generation/e2e_reference.json"));
    for (spec, cases) in expected.as_object().unwrap() {
        let refs = reference_tensors(spec);
        let n_image = n_image_tokens(&refs);
        let pixels = &refs["pixel_values"];
        for layout in ["hf", "original"] {
            let model = load(spec, layout, DType::F32);
            // The original layout's processor puts no <image> tokens in input_ids.
            let skip = if layout == "hf" { 0 } else { n_image };
            let ids = skip_columns(&refs["input_ids"], skip);
            let mask = skip_columns(&refs["attention_mask"], skip);
            let features = model
                .get_image_features(pixels.clone(), &Uninterrupted)
                .unwrap();
            for case in cases.as_array().unwrap() {
                let cfg = generation_config(&fixture(spec).join("hf"), &case["kwargs"]);
                let want: Vec<Vec<u32>> =
                    serde_json::from_value(case["sequences"].clone()).unwrap();
                let what = format!("{spec}/{layout} {}", case["kwargs"]);
                assert_eq!(
                    run(&model, &cfg, &ids, &mask, &features),
                    want,
                    "{what}: batched"
                );

                // One item at a time, without its padding, gives the same ids.
                let per_item = want.len() / 2;
                let lengths = mask.sum(1).unwrap().to_vec1::<i64>().unwrap();
                for (item, &len) in lengths.iter().enumerate() {
                    let one = |t: &Tensor| {
                        t.i((item..item + 1, ..len as usize))
                            .unwrap()
                            .contiguous()
                            .unwrap()
                    };
                    let f = features.i(item..item + 1).unwrap().contiguous().unwrap();
                    let got = run(&model, &cfg, &one(&ids), &one(&mask), &f);
                    let want_item = &want[item * per_item..(item + 1) * per_item];
                    // Batched rows are padded to the longest item; compare up to this item's own length.
                    for (g, w) in got.iter().zip(want_item) {
                        assert_eq!(g[..], w[..g.len()], "{what}: item {item} alone");
                        assert!(
                            w[g.len()..].iter().all(|&t| t == 1),
                            "{what}: item {item} padding"
                        );
                    }
                }
            }
        }
    }
}
