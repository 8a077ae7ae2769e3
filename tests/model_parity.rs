//! The model against transformers: the committed fixtures in tests/fixtures (made by make_fixtures.py with
//! transformers 5.23.0) hold random-weight checkpoints in both layouts and transformers' outputs on them.

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::{fixture, load, n_image_tokens, read_json, reference_tensors, skip_columns};
use florence2_rs::interrupt::Uninterrupted;
use florence2_rs::model::Florence2ForConditionalGeneration;
use florence2_rs::Error;

const SPECS: [&str; 2] = ["tiny", "tiny_uneven"];

struct Reference {
    tensors: std::collections::HashMap<String, Tensor>,
}

impl Reference {
    fn load(spec: &str) -> Self {
        Self {
            tensors: reference_tensors(spec),
        }
    }
    fn get(&self, name: &str) -> &Tensor {
        &self.tensors[name]
    }
    /// The text part of input_ids/attention_mask: what the original layout's processor produces.
    fn text_only(&self, name: &str) -> Tensor {
        skip_columns(self.get(name), n_image_tokens(&self.tensors))
    }
}

/// max |a - b| / max |b|: the error relative to the reference's scale.
fn max_rel_error(ours: &Tensor, reference: &Tensor) -> f32 {
    assert_eq!(ours.dims(), reference.dims(), "shapes differ");
    let ours = ours.to_dtype(DType::F32).unwrap();
    let reference = reference.to_dtype(DType::F32).unwrap();
    let diff = (ours - &reference)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap();
    let scale = reference
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap();
    diff.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap()
}

/// Runs the whole model as transformers' forward does and returns (vision, image features, encoder, logits).
fn run(
    model: &Florence2ForConditionalGeneration,
    reference: &Reference,
    layout: &str,
) -> [Tensor; 4] {
    let pixels = reference.get("pixel_values");
    let vision = model
        .vision_features(pixels.clone(), &Uninterrupted)
        .unwrap();
    let features = model
        .get_image_features(pixels.clone(), &Uninterrupted)
        .unwrap();
    let (ids, mask) = if layout == "hf" {
        (
            reference.get("input_ids").clone(),
            reference.get("attention_mask").clone(),
        )
    } else {
        (
            reference.text_only("input_ids"),
            reference.text_only("attention_mask"),
        )
    };
    let encoder = model
        .encode(&ids, Some(&mask), Some(&features), &Uninterrupted)
        .unwrap();
    let logits = model
        .decoder_logits(reference.get("decoder_input_ids"), &encoder)
        .unwrap();
    [vision, features, encoder.hidden_states, logits]
}

fn check_parity(dtype: DType, tolerance: f32) {
    for spec in SPECS {
        let reference = Reference::load(spec);
        for layout in ["hf", "original"] {
            let model = load(spec, layout, dtype);
            let [vision, features, encoder, logits] = run(&model, &reference, layout);
            let ref_logits = reference.get("logits");
            // The original layout has no `<image>` row: compare the vocabulary both share.
            let vocab = logits.dim(2).unwrap();
            let ref_logits = ref_logits.narrow(2, 0, vocab).unwrap();
            for (name, ours, theirs) in [
                ("vision_out", &vision, reference.get("vision_out")),
                ("image_features", &features, reference.get("image_features")),
                ("encoder_out", &encoder, reference.get("encoder_out")),
                ("logits", &logits, &ref_logits),
            ] {
                let err = max_rel_error(ours, theirs);
                assert!(
                    err <= tolerance,
                    "{spec}/{layout} {dtype:?} {name}: max relative error {err} > {tolerance}"
                );
            }
        }
    }
}

#[test]
fn f32_matches_transformers() {
    check_parity(DType::F32, 1e-4);
}

// Half precision: the weights and activations are rounded to 8 (bf16) or 11 (f16) mantissa bits while the
// reference is f32, so the bound is the rounding error carried through a dozen layers, not float noise.
#[test]
fn bf16_is_close_to_transformers_f32() {
    check_parity(DType::BF16, 6e-2);
}

#[test]
fn f16_is_close_to_transformers_f32() {
    check_parity(DType::F16, 1e-2);
}

#[test]
fn both_layouts_give_the_same_logits() {
    for spec in SPECS {
        let reference = Reference::load(spec);
        let [.., hf] = run(&load(spec, "hf", DType::F32), &reference, "hf");
        let [.., original] = run(&load(spec, "original", DType::F32), &reference, "original");
        let vocab = original.dim(2).unwrap();
        let err = max_rel_error(&original, &hf.narrow(2, 0, vocab).unwrap());
        assert!(err <= 1e-6, "{spec}: layouts differ by {err}");
    }
}

#[test]
fn cached_decoding_matches_the_full_forward() {
    let reference = Reference::load("tiny");
    let model = load("tiny", "hf", DType::F32);
    let [.., full] = run(&model, &reference, "hf");
    let features = model
        .get_image_features(reference.get("pixel_values").clone(), &Uninterrupted)
        .unwrap();
    let encoder = model
        .encode(
            reference.get("input_ids"),
            Some(reference.get("attention_mask")),
            Some(&features),
            &Uninterrupted,
        )
        .unwrap();
    let mut state = model.start_decoding(&encoder).unwrap();
    let ids = reference.get("decoder_input_ids");
    for t in 0..ids.dim(1).unwrap() {
        let step = state.step(&ids.narrow(1, t, 1).unwrap()).unwrap();
        let err = max_rel_error(&step, &full.narrow(1, t, 1).unwrap());
        assert!(err <= 1e-5, "step {t}: {err}");
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

fn load_err(dir: &Path) -> String {
    match Florence2ForConditionalGeneration::from_dir(dir, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_folder_and_files_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope");
    assert!(matches!(
        Florence2ForConditionalGeneration::from_dir(&missing, DType::F32, &Device::Cpu),
        Err(Error::NotFound { .. })
    ));
    let dir = tmp.path().join("no_weights");
    copy_dir(&fixture("tiny").join("hf"), &dir);
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    assert!(load_err(&dir).contains("model.safetensors"));
    std::fs::remove_file(dir.join("config.json")).unwrap();
    assert!(load_err(&dir).contains("config.json"));
}

#[test]
fn truncated_and_corrupt_weights_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    for layout in ["hf", "original"] {
        let dir = tmp.path().join(layout);
        copy_dir(&fixture("tiny").join(layout), &dir);
        let weights = dir.join("model.safetensors");
        let bytes = std::fs::read(&weights).unwrap();
        std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
        let msg = load_err(&dir);
        assert!(
            msg.contains("model.safetensors") && msg.contains("truncated or corrupt"),
            "{msg}"
        );
        std::fs::write(&weights, b"this is not a safetensors file").unwrap();
        assert!(load_err(&dir).contains("model.safetensors"));
        std::fs::write(&weights, b"").unwrap();
        assert!(load_err(&dir).contains("model.safetensors"));
    }
}

#[test]
fn config_that_contradicts_the_weights_names_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    for (layout, key) in [
        ("hf", "model.language_model.encoder.layers.2"),
        ("original", "language_model.model.encoder.layers.2"),
    ] {
        let dir = tmp.path().join(layout);
        copy_dir(&fixture("tiny").join(layout), &dir);
        let config_path = dir.join("config.json");
        let mut config = read_json(&config_path);
        config["text_config"]["encoder_layers"] = 3.into();
        std::fs::write(&config_path, config.to_string()).unwrap();
        let msg = load_err(&dir);
        assert!(msg.contains(key), "{msg}");

        config["text_config"]["encoder_layers"] = 2.into();
        config["text_config"]["encoder_ffn_dim"] = 65.into();
        std::fs::write(&config_path, config.to_string()).unwrap();
        let msg = load_err(&dir);
        assert!(msg.contains("fc1") && msg.contains("shape"), "{msg}");
    }
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let model = load("tiny", "hf", DType::F32);
    let reference = Reference::load("tiny");
    let pixels = reference.get("pixel_values");
    let features = model
        .get_image_features(pixels.clone(), &Uninterrupted)
        .unwrap();
    // Too few placeholders for the features.
    let ids = reference.text_only("input_ids");
    assert!(model
        .encode(&ids, None, Some(&features), &Uninterrupted)
        .is_err());
    // An id outside the vocabulary.
    let ids = Tensor::new(&[[0u32, 5000, 2]], &Device::Cpu).unwrap();
    assert!(model.encode(&ids, None, None, &Uninterrupted).is_err());
    // Wrong pixel shapes.
    assert!(model
        .vision_features(
            Tensor::zeros((1, 4, 64, 64), DType::F32, &Device::Cpu).unwrap(),
            &Uninterrupted
        )
        .is_err());
    assert!(model
        .vision_features(
            Tensor::zeros((3, 64, 64), DType::F32, &Device::Cpu).unwrap(),
            &Uninterrupted
        )
        .is_err());
    // An image too large for the position embedding.
    let big = Tensor::zeros((1, 3, 1024, 1024), DType::F32, &Device::Cpu).unwrap();
    assert!(model.get_image_features(big, &Uninterrupted).is_err());
}
