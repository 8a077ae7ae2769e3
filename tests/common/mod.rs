//! What the integration tests share: the paths of the committed fixtures (tests/fixtures, made by
//! make_fixtures.py and the generation scripts beside it), their JSON files, transformers' reference tensors,
//! the tiny checkpoints loaded, and a checkpoint's generation settings with a test case's keyword arguments.

// Each test file compiles this module as its own (`mod common;`) and uses a part of it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};
use florence2_rs::generation::GenerationConfig;
use florence2_rs::model::Florence2ForConditionalGeneration;
use serde_json::Value;

/// tests/fixtures.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The fixture checkpoint `spec` ("tiny", "tiny_uneven"): its `hf` and `original` layouts and the reference.
pub fn fixture(spec: &str) -> PathBuf {
    fixtures().join(spec)
}

/// The released files of the repository `name` (tests/fixtures/release, with their sources).
pub fn release(name: &str) -> PathBuf {
    fixtures().join("release").join(name)
}

pub fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).expect("json file")).expect("valid json")
}

/// transformers' inputs and outputs on the fixture checkpoint `spec` (its reference.safetensors).
pub fn reference_tensors(spec: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(spec).join("reference.safetensors"), &Device::Cpu)
        .expect("reference tensors")
}

/// How many `<image>` placeholders the reference's HF-native `input_ids` start with.
pub fn n_image_tokens(refs: &HashMap<String, Tensor>) -> usize {
    refs["n_image_tokens"].to_vec1::<i64>().unwrap()[0] as usize
}

/// The fixture checkpoint `spec` in `layout` ("hf" or "original"), on the CPU.
pub fn load(spec: &str, layout: &str, dtype: DType) -> Florence2ForConditionalGeneration {
    Florence2ForConditionalGeneration::from_dir(&fixture(spec).join(layout), dtype, &Device::Cpu)
        .expect("model loads")
}

/// The columns of `t` (`input_ids` or `attention_mask` `[B, L]`) after the first `skip`: without the `<image>`
/// placeholders, what the original layout's processor produces.
pub fn skip_columns(t: &Tensor, skip: usize) -> Tensor {
    t.i((.., skip..)).unwrap().contiguous().unwrap()
}

/// The generation settings of the checkpoint in `dir` (its generation_config.json, else its config.json), with
/// `kwargs` set over them.
pub fn generation_config(dir: &Path, kwargs: &Value) -> GenerationConfig {
    let gen = dir.join("generation_config.json");
    let gen = gen.exists().then(|| read_json(&gen));
    let mut cfg =
        GenerationConfig::from_checkpoint(gen.as_ref(), &read_json(&dir.join("config.json")))
            .unwrap();
    for (k, v) in kwargs.as_object().unwrap() {
        cfg.set(k, v.clone()).unwrap();
    }
    cfg
}
