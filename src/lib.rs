//! # florence2-rs
//!
//! Microsoft's Florence-2 vision-language model ("Florence-2: Advancing a Unified Representation for a
//! Variety of Vision Tasks", Xiao et al., 2023, arXiv:2311.06242) on candle, written to give the same
//! answers as transformers' `Florence2ForConditionalGeneration` and `Florence2Processor`.
//!
//! Data flow: [`processor`] turns images and task prompts into `pixel_values` and `input_ids`;
//! [`model::Florence2ForConditionalGeneration`] runs the DaViT vision tower ([`vision`]), the multimodal
//! projector ([`projector`]) and the BART encoder/decoder ([`language`]); [`generation`] drives the decoder;
//! the processor decodes and post-processes the ids. Both released checkpoint layouts (HF-native and
//! Microsoft's original) load through [`weights`].

pub mod bf16_linear;
pub mod config;
mod cpu_attention;
mod dense;
pub mod depthwise;
pub mod error;
pub mod generation;
pub mod hub;
mod im2col;
pub mod language;
pub mod limits;
pub mod model;
mod nn;
pub mod processor;
pub mod projector;
pub mod quantize;
pub mod skinny;
pub mod vision;
mod vision_attention;
pub mod weights;

#[cfg(feature = "python")]
mod python;

pub use error::{Error, Result};
