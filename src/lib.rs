//! # florence2-rs
//!
//! Microsoft's Florence-2 vision-language model ("Florence-2: Advancing a Unified Representation for a
//! Variety of Vision Tasks", Xiao et al., 2023, arXiv:2311.06242) on candle, written to give the same
//! answers as transformers' `Florence2ForConditionalGeneration` and `Florence2Processor`.
//!
//! Data flow: [`processor`] turns images and task prompts into `pixel_values` and `input_ids`;
//! [`model::Florence2ForConditionalGeneration`] runs the DaViT vision tower ([`model::vision`]), the
//! multimodal projector ([`model::projector`]) and the BART encoder/decoder ([`model::bart`]);
//! [`generation`] drives the decoder; the processor decodes and post-processes the ids. Both released
//! checkpoint layouts (HF-native and Microsoft's original) load through [`io::checkpoint`].
//!
//! Dependencies point one way: the Python bindings (`bindings`) → [`model`] → [`layers`] → [`kernels`];
//! the model also drives [`generation`]; [`processor`] and [`generation`] stand beside it and use only
//! [`io`] (checkpoint files and layouts) and [`limits`]. docs/architecture.md describes the layout.

pub mod dtype;
pub mod error;
pub mod generation;
pub mod interrupt;
pub mod io;
/// The compute kernels. Not part of the API: public so that benches/kernels.rs can measure them alone.
#[doc(hidden)]
pub mod kernels;
pub mod layers;
pub mod limits;
pub mod model;
pub mod processor;
pub mod profile;

#[cfg(feature = "python")]
mod bindings;

pub use error::{Error, Result};
