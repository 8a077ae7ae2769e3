//! Reading checkpoints: the two released layouts and their tensor names ([`layout`]), safetensors files and
//! shards or PyTorch archives ([`checkpoint`], [`pytorch`]), PEFT LoRA adapters merged as the weights load
//! ([`adapter`]), the JSON settings files ([`json`]), and downloads from the Hugging Face Hub ([`hub`]).

pub mod adapter;
pub mod checkpoint;
pub mod hub;
pub mod json;
pub mod layout;
pub mod pytorch;
pub mod save;

pub use layout::Layout;
