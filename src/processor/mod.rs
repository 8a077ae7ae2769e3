//! The Florence-2 processor: image preprocessing, tokenization with the task prompts, decoding and
//! post-processing of generated text.
