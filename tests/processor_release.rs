//! The processor against the released tokenizer files (tests/fixtures/release), and a
//! property test that the parsers and the prompt builder never panic.

mod common;

use common::release;
use florence2_rs::processor::{
    postprocess, prompts, EncodeOptions, Florence2Processor, PostProcessorConfig,
};
use proptest::prelude::*;

#[test]
fn microsoft_tokenizer_gets_florence_tokens_in_the_released_order() {
    let msft = release("microsoft_Florence-2-base");
    let onnx = release("onnx-community_Florence-2-base");
    let ours = Florence2Processor::from_dir(&msft).unwrap();
    let released = Florence2Processor::from_dir(&onnx).unwrap();
    assert_eq!(ours.image_token_id, None);
    for token in ["<od>", "<loc_0>", "<loc_999>", "<poly>", "<and>"] {
        assert_eq!(
            ours.tokenizer.token_to_id(token),
            released.tokenizer.token_to_id(token),
            "{token}"
        );
    }
    assert_eq!(ours.tokenizer.token_to_id("<loc_0>"), Some(50269));
    let batch = ours
        .encode_texts(&["<OD>"], true, false, &EncodeOptions::default())
        .unwrap();
    let ids = &batch.input_ids[0];
    assert_eq!((ids[0], *ids.last().unwrap()), (0, 2));
    let text = ours.batch_decode(std::slice::from_ref(ids), true).unwrap();
    assert_eq!(
        text,
        vec!["Locate the objects with category name in the image.".to_string()]
    );
}

proptest! {
    #[test]
    fn parsers_and_prompts_never_panic(text in "(<loc_[0-9]{1,4}>|<poly>|</poly>|<sep>|<s>|</s>|\\PC{0,3}|\n|<OD>){0,30}",
                                       w in 0.0f64..10000.0, h in 0.0f64..10000.0) {
        let _ = prompts::construct_prompt(&text);
        let cfg = PostProcessorConfig::default();
        for task in prompts::TASKS.iter().map(|t| t.token) {
            let _ = postprocess::post_process_generation(&cfg, &text, task, Some((w, h)));
            let _ = postprocess::post_process_generation(&cfg, &text, task, None);
        }
    }
}
