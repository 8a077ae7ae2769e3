//! Weight-only quantization (`quantize="int8"|"int4"`): the model loads, its logits stay close to the
//! dense f32 ones, and generation runs. Agreement on full-size checkpoints is in docs/performance.md.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{fixture, load, reference_tensors};
use florence2_rs::interrupt::Uninterrupted;
use florence2_rs::layers::linear::Quantization;
use florence2_rs::model::Florence2ForConditionalGeneration;

fn logits(
    model: &Florence2ForConditionalGeneration,
    refs: &std::collections::HashMap<String, Tensor>,
) -> Tensor {
    let features = model
        .get_image_features(refs["pixel_values"].clone(), &Uninterrupted)
        .expect("image features");
    let encoder = model
        .encode(
            &refs["input_ids"],
            Some(&refs["attention_mask"]),
            Some(&features),
            &Uninterrupted,
        )
        .expect("encode");
    model
        .decoder_logits(&refs["decoder_input_ids"], &encoder)
        .expect("logits")
}

#[test]
fn quantized_models_load_and_stay_close_to_f32() {
    let refs = reference_tensors("tiny");
    let dir = fixture("tiny").join("hf");
    let dense = load("tiny", "hf", DType::F32);
    let want = logits(&dense, &refs);
    let scale = want
        .abs()
        .expect("abs")
        .max_all()
        .expect("max")
        .to_scalar::<f32>()
        .expect("scalar");
    // Q8_0 keeps ~8 bits per weight, Q4_0 ~4: bounds on the largest logit error relative to the largest logit.
    for (q, bound) in [(Quantization::Int8, 0.05f32), (Quantization::Int4, 0.5)] {
        let model = Florence2ForConditionalGeneration::from_dir_quantized(
            &dir,
            DType::F32,
            &Device::Cpu,
            Some(q),
        )
        .expect("quantized load");
        let got = logits(&model, &refs);
        let err = (&got - &want)
            .expect("diff")
            .abs()
            .expect("abs")
            .max_all()
            .expect("max");
        let err = err.to_scalar::<f32>().expect("scalar") / scale;
        assert!(
            err > 0.0 && err < bound,
            "{q:?}: relative logit error {err}"
        );
    }
}

#[test]
fn unknown_quantization_is_an_error() {
    assert!(Quantization::parse("int3").is_err());
    assert_eq!(
        Quantization::parse("int4").expect("int4"),
        Quantization::Int4
    );
}
