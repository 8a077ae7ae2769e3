//! Florence-2 itself, named as transformers names it: the configuration ([`config`]), the DaViT vision tower
//! ([`vision`]), the multimodal projector ([`projector`]), the BART encoder-decoder ([`bart`]), the whole
//! model with its generation entry points ([`florence2`]), and how it is built from a checkpoint
//! ([`loading`]).

pub mod bart;
pub mod config;
pub mod florence2;
pub mod loading;
pub mod projector;
pub mod vision;

pub use config::Florence2Config;
pub use florence2::{DecoderState, EncoderOutput, Florence2ForConditionalGeneration};
pub use loading::LoadOptions;
