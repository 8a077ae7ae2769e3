//! Reading checkpoints: the two released layouts and their tensor names, safetensors files and shards
//! ([`checkpoint`]), and downloads from the Hugging Face Hub ([`hub`]).

pub mod checkpoint;
pub mod hub;
pub mod json;
pub mod layout;

pub use layout::Layout;
