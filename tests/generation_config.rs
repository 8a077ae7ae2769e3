//! GenerationConfig: loading like transformers (generation_config.json, else config.json + text_config),
//! keyword overrides, and transformers' validation errors.

mod common;

use common::{read_json, release};
use florence2_rs::generation::{generate, DecoderSession, EarlyStopping, GenerationConfig};
use florence2_rs::interrupt::Uninterrupted;
use florence2_rs::io::Layout;
use florence2_rs::{Error, Result};
use serde_json::{json, Value};

/// The generation-relevant part of Florence-2's released config.json (text_config holds the settings).
fn florence_config_json() -> Value {
    json!({
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "vocab_size": 51289, "is_encoder_decoder": true,
        "text_config": {
            "bos_token_id": 0, "decoder_start_token_id": 2, "early_stopping": true, "eos_token_id": 2,
            "forced_bos_token_id": 0, "forced_eos_token_id": 2, "no_repeat_ngram_size": 3, "num_beams": 3,
            "pad_token_id": 1, "max_position_embeddings": 1024, "label2id": {"LABEL_0": 0}
        }
    })
}

fn assert_florence_defaults(cfg: &GenerationConfig) {
    assert_eq!(cfg.num_beams, Some(3));
    assert_eq!(cfg.no_repeat_ngram_size, Some(3));
    assert_eq!(cfg.early_stopping, Some(EarlyStopping::True));
    assert_eq!(cfg.forced_bos_token_id, Some(0));
    assert_eq!(cfg.forced_eos_token_id, Some(vec![2]));
    assert_eq!(cfg.decoder_start_token_id, Some(2));
    assert_eq!((cfg.bos_token_id, cfg.pad_token_id), (Some(0), Some(1)));
    assert_eq!(cfg.eos_token_id, Some(vec![2]));
    assert_eq!(
        cfg.max_length, None,
        "no max_length: transformers' default of 20 new tokens applies"
    );
    assert_eq!(cfg.expand_factor(), 3);
}

#[test]
fn model_config_text_config_fallback() {
    let cfg = GenerationConfig::from_checkpoint(None, &florence_config_json()).unwrap();
    assert_florence_defaults(&cfg);
}

#[test]
fn released_config_files() {
    let large = release("microsoft_Florence-2-large").join("config.json");
    let cfg = GenerationConfig::from_checkpoint(None, &read_json(&large)).unwrap();
    assert_florence_defaults(&cfg);
    // large-ft carries a generation_config.json, which replaces the model config's settings entirely.
    let ft = release("microsoft_Florence-2-large-ft");
    let cfg = GenerationConfig::from_checkpoint(
        Some(&read_json(&ft.join("generation_config.json"))),
        &read_json(&ft.join("config.json")),
    )
    .unwrap();
    assert_eq!(cfg.num_beams, Some(3));
    assert_eq!(cfg.early_stopping, Some(EarlyStopping::False));
    assert_eq!(cfg.no_repeat_ngram_size, None);
    let onnx = release("onnx-community_Florence-2-base-ft").join("generation_config.json");
    let cfg = GenerationConfig::from_json(&read_json(&onnx)).unwrap();
    assert_florence_defaults(&cfg);
}

#[test]
fn original_layout_uses_text_config_not_generation_config_json() {
    // Microsoft's remote code generates with the language model's config (text_config); large-ft's bare
    // generation_config.json sits beside it and is not read.
    let ft = release("microsoft_Florence-2-large-ft");
    assert!(ft.join("generation_config.json").is_file());
    let cfg = GenerationConfig::from_dir(&ft, Layout::Original).unwrap();
    assert_florence_defaults(&cfg);
    assert_eq!((cfg.bos_token_id, cfg.pad_token_id), (Some(0), Some(1)));
    // Microsoft's Florence2LanguageConfig defaults where text_config leaves a key out.
    let bare = json!({"text_config": {"num_beams": 2}});
    let cfg = GenerationConfig::from_original_config(&bare).unwrap();
    assert_eq!(cfg.num_beams, Some(2));
    assert_eq!(cfg.decoder_start_token_id, Some(2));
    assert_eq!(cfg.forced_eos_token_id, Some(vec![2]));
    assert_eq!(cfg.forced_bos_token_id, None);
    assert_eq!(cfg.no_repeat_ngram_size, None);
    // The HF-native layout reads the same folder's generation_config.json, as transformers does.
    let cfg = GenerationConfig::from_dir(&ft, Layout::HfNative).unwrap();
    assert_eq!(cfg.early_stopping, Some(EarlyStopping::False));
    assert_eq!(cfg.no_repeat_ngram_size, None);
}

#[test]
fn generation_config_objects_are_merged_leniently() {
    let mut cfg = GenerationConfig::default();
    let settings = json!({"num_beams": 2, "num_assistant_tokens": 20, "typical_p": 0.5, "transformers_version": "5"});
    let ignored = cfg.merge_lenient(settings.as_object().unwrap()).unwrap();
    assert_eq!(cfg.num_beams, Some(2));
    assert_eq!(
        ignored,
        vec!["num_assistant_tokens".to_string(), "typical_p".to_string()]
    );
    let wrong_type = json!({"num_beams": "two"});
    assert!(cfg.merge_lenient(wrong_type.as_object().unwrap()).is_err());
    assert_eq!(cfg.to_json(), json!({"num_beams": 2}));
}

#[test]
fn kwargs_override_and_unset() {
    let mut cfg = GenerationConfig::from_model_config(&florence_config_json()).unwrap();
    cfg.set("num_beams", json!(5)).unwrap();
    cfg.set("early_stopping", json!("never")).unwrap();
    cfg.set("no_repeat_ngram_size", Value::Null).unwrap();
    cfg.set("eos_token_id", json!([2, 7])).unwrap();
    cfg.set("length_penalty", json!(2)).unwrap();
    cfg.set("use_cache", json!(false)).unwrap();
    assert_eq!(cfg.num_beams, Some(5));
    assert_eq!(cfg.early_stopping, Some(EarlyStopping::Never));
    assert_eq!(cfg.no_repeat_ngram_size, None);
    assert_eq!(cfg.eos_token_id, Some(vec![2, 7]));
    assert_eq!(cfg.length_penalty, Some(2.0));
}

fn invalid(r: Result<()>) -> String {
    match r {
        Err(Error::InvalidInput(msg)) => msg,
        other => panic!("expected InvalidInput, got {other:?}"),
    }
}

#[test]
fn bad_kwargs_are_rejected() {
    let mut cfg = GenerationConfig::default();
    assert!(invalid(cfg.set("num_beam", json!(3))).contains("not a generation setting"));
    assert!(invalid(cfg.set("max_new_tokens", json!(0))).contains("greater than 0"));
    assert!(invalid(cfg.set("max_new_tokens", json!(-3))).contains("greater than 0"));
    assert!(invalid(cfg.set("num_beams", json!("3"))).contains("num_beams"));
    assert!(invalid(cfg.set("early_stopping", json!("sometimes"))).contains("'never'"));
    assert!(invalid(cfg.set("temperature", json!(0.0))).contains("strictly positive"));
    assert!(invalid(cfg.set("top_p", json!(1.5))).contains("top_p"));
    assert!(invalid(cfg.set("repetition_penalty", json!(-1.0))).contains("penalty"));
    assert!(invalid(cfg.set("bad_words_ids", json!([]))).contains("bad_words_ids"));
    assert!(invalid(cfg.set("bad_words_ids", json!([[1, -2]]))).contains("bad_words_ids"));
    assert!(invalid(cfg.set("do_sample", json!(1))).contains("boolean"));
    assert!(invalid(cfg.set("typical_p", json!(0.5))).contains("not supported"));
    cfg.set("typical_p", json!(1.0)).unwrap();
    assert_eq!(
        cfg,
        GenerationConfig::default(),
        "failed sets leave the config unchanged"
    );
}

#[test]
fn combination_errors_like_transformers() {
    let mut cfg = GenerationConfig::from_model_config(&florence_config_json()).unwrap();
    cfg.set("num_return_sequences", json!(4)).unwrap();
    assert!(invalid(cfg.validate()).contains("smaller or equal to `num_beams`"));
    cfg.set("num_beams", json!(1)).unwrap();
    assert!(invalid(cfg.validate()).contains("Greedy methods"));
    cfg.set("do_sample", json!(true)).unwrap();
    cfg.validate().unwrap();
    assert_eq!(cfg.expand_factor(), 4);
    cfg.set("suppress_tokens", json!([2, 5])).unwrap();
    assert!(invalid(cfg.validate()).contains("forced_eos_token_id"));
}

/// Counts decoder calls; always prefers token 5 (never EOS).
struct Constant {
    rows: usize,
    calls: usize,
    first: Vec<u32>,
}

impl DecoderSession for Constant {
    fn rows(&self) -> usize {
        self.rows
    }
    fn next_logits(&mut self, last: &[u32]) -> Result<Vec<Vec<f32>>> {
        if self.calls == 0 {
            self.first = last.to_vec();
        }
        self.calls += 1;
        Ok(last
            .iter()
            .map(|_| (0..10).map(|t| if t == 5 { 1.0 } else { 0.0 }).collect())
            .collect())
    }
    fn reorder(&mut self, _: &[usize]) -> Result<()> {
        Ok(())
    }
}

#[test]
fn lengths_follow_transformers() {
    let base = json!({"decoder_start_token_id": 2, "eos_token_id": 2, "pad_token_id": 1});
    let run = |kwargs: Value| {
        let mut cfg = GenerationConfig::from_json(&base).unwrap();
        for (k, v) in kwargs.as_object().unwrap() {
            cfg.set(k, v.clone()).unwrap();
        }
        let mut s = Constant {
            rows: 1,
            calls: 0,
            first: vec![],
        };
        let out = generate(&mut s, &cfg, 1, &Uninterrupted).unwrap();
        assert_eq!(
            s.first,
            vec![2],
            "the first call feeds decoder_start_token_id"
        );
        (out.sequences[0].len(), s.calls)
    };
    assert_eq!(
        run(json!({})),
        (21, 20),
        "default: max_length 20 + the decoder prompt"
    );
    assert_eq!(run(json!({"max_length": 7})), (7, 6));
    assert_eq!(
        run(json!({"max_length": 7, "max_new_tokens": 3})),
        (4, 3),
        "max_new_tokens wins"
    );
    let mut cfg = GenerationConfig::from_json(&base).unwrap();
    cfg.set("max_length", json!(1)).unwrap();
    let mut s = Constant {
        rows: 1,
        calls: 0,
        first: vec![],
    };
    assert!(
        generate(&mut s, &cfg, 1, &Uninterrupted).is_err(),
        "max_length must exceed the decoder prompt"
    );
}

#[test]
fn session_shape_errors() {
    let mut cfg = GenerationConfig::from_model_config(&florence_config_json()).unwrap();
    cfg.set("max_new_tokens", json!(4)).unwrap();
    let mut s = Constant {
        rows: 2,
        calls: 0,
        first: vec![],
    };
    let err = generate(&mut s, &cfg, 1, &Uninterrupted).unwrap_err();
    assert!(err.to_string().contains("3 are needed"), "{err}");
    let mut s = Constant {
        rows: 3,
        calls: 0,
        first: vec![],
    };
    assert!(generate(&mut s, &cfg, 0, &Uninterrupted).is_err());
    let mut cfg = GenerationConfig::default();
    cfg.set("max_new_tokens", json!(4)).unwrap();
    let mut s = Constant {
        rows: 1,
        calls: 0,
        first: vec![],
    };
    let err = generate(&mut s, &cfg, 1, &Uninterrupted).unwrap_err();
    assert!(err.to_string().contains("decoder_start_token_id"), "{err}");
}
