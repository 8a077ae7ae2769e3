//! Reading checkpoints: the two released layouts ([`layout`]) and their tensor names ([`names`]), the files
//! that hold the weights ([`shards`]) read in place (`files`: safetensors; [`pytorch`]: PyTorch archives),
//! the tensor source the model loads from ([`checkpoint`]), PEFT LoRA adapters merged as the weights load
//! ([`adapter`]), writing the weights back ([`save`]), the JSON settings files ([`json`]), and downloads from
//! the Hugging Face Hub ([`hub`]).
//!
//! Dependencies point one way: `checkpoint` → `adapter` → `names`, `pytorch`; `checkpoint` → `shards` →
//! `pytorch` → `files`; `save` → `checkpoint`; `hub` → `shards`. No module imports one that imports it back.

pub mod adapter;
pub mod checkpoint;
mod files;
pub mod hub;
pub mod json;
pub mod layout;
pub mod names;
pub mod pytorch;
pub mod save;
pub mod shards;

pub use layout::Layout;
