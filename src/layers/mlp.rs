//! The two-layer feed-forward network of transformer blocks: `fc2(act(fc1(x)))`.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Activation, VarBuilder};

use super::{Linear, Quantization};

/// `fc2(act(fc1(x)))` from `dim` to `hidden` features and back, with biases (BART's `fc1`/`fc2`, DaViT's
/// `Florence2VisionMLP`).
pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
    act: Activation,
    hidden: usize,
}

impl Mlp {
    /// `fc1` and `fc2` from `vb`, quantized when `q` says so.
    pub fn load(
        dim: usize,
        hidden: usize,
        act: Activation,
        vb: &VarBuilder,
        q: Option<Quantization>,
    ) -> Result<Self> {
        Ok(Self {
            fc1: Linear::load(dim, hidden, true, vb.pp("fc1"), q)?,
            fc2: Linear::load(hidden, dim, true, vb.pp("fc2"), q)?,
            act,
            hidden,
        })
    }

    /// The width of the hidden layer.
    pub fn hidden(&self) -> usize {
        self.hidden
    }
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.fc1.forward_activated(xs, self.act)?.apply(&self.fc2)
    }
}
