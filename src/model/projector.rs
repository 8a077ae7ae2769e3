//! The multimodal projector: vision features `[B, C, H, W]` → image tokens `[B, 1 + H*W, d_model]` for the
//! language encoder. Reference: transformers' `Florence2MultiModalProjector`.
//!
//! A learned 2D position embedding (column half, then row half of the channels) and the first row of a
//! cosine temporal embedding (a single frame) are added; then the tokens are pooled two ways, as Florence-2's
//! `image_feature_source = [spatial_avg_pool, temporal_avg_pool]` says: the spatial mean (one token) followed
//! by the temporal mean over the one frame (the H*W tokens themselves); then a bias-free projection and a
//! LayerNorm.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};

use crate::layers::ops::{broadcast_add, nchw_to_tokens};
use crate::layers::{layer_norm, LayerNorm, LAYER_NORM_EPS};
use crate::layers::{Linear, Quantization};
use crate::model::config::VisionConfig;

/// transformers' `Florence2MultiModalProjector`.
pub struct Florence2MultiModalProjector {
    image_projection: Linear,
    image_proj_norm: LayerNorm,
    row_embeddings: Embedding,
    column_embeddings: Embedding,
    /// `[max_temporal_embeddings, C]`; only row 0 is used for a single image.
    pos_idx_to_embed: Tensor,
    max_positions: usize,
}

impl Florence2MultiModalProjector {
    /// Loads from `vb` at `model.multi_modal_projector`.
    pub fn new(cfg: &VisionConfig, vb: VarBuilder, q: Option<Quantization>) -> Result<Self> {
        let dim = *cfg
            .embed_dim
            .last()
            .ok_or_else(|| candle_core::Error::Msg("empty embed_dim".into()))?;
        let max_positions = cfg.max_position_embeddings;
        let pos = vb.pp("image_position_embed");
        Ok(Self {
            image_projection: Linear::load(
                dim,
                cfg.projection_dim,
                false,
                vb.pp("image_projection"),
                q,
            )?,
            image_proj_norm: layer_norm(
                cfg.projection_dim,
                LAYER_NORM_EPS,
                vb.pp("image_proj_norm"),
            )?,
            row_embeddings: candle_nn::embedding(max_positions, dim / 2, pos.pp("row_embeddings"))?,
            column_embeddings: candle_nn::embedding(
                max_positions,
                dim - dim / 2,
                pos.pp("column_embeddings"),
            )?,
            pos_idx_to_embed: vb
                .pp("visual_temporal_embed")
                .get((cfg.max_temporal_embeddings, dim), "pos_idx_to_embed")?,
            max_positions,
        })
    }

    /// `features`: the vision tower's output `[B, C, H, W]`.
    pub fn forward(&self, features: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = features.dims4()?;
        if h > self.max_positions || w > self.max_positions {
            candle_core::bail!(
                "the image gives a {h}x{w} feature map but the position embedding covers at most {0}x{0}; \
                 use the image size the checkpoint was trained for (see its preprocessor config)",
                self.max_positions
            );
        }
        let device = features.device();
        let cols = self
            .column_embeddings
            .forward(&Tensor::arange(0u32, w as u32, device)?)?; // [W, C - C/2]
        let rows = self
            .row_embeddings
            .forward(&Tensor::arange(0u32, h as u32, device)?)?; // [H, C/2]
        let cols = cols.unsqueeze(0)?.broadcast_as((h, w, c - c / 2))?;
        let rows = rows.unsqueeze(1)?.broadcast_as((h, w, c / 2))?;
        let position = Tensor::cat(&[cols, rows], 2)?.reshape((h * w, c))?;

        let tokens = broadcast_add(&nchw_to_tokens(features)?, &position)?;
        let tokens = broadcast_add(&tokens, &self.pos_idx_to_embed.get(0)?)?;
        let spatial = mean_over_tokens(&tokens)?;
        Tensor::cat(&[spatial, tokens], 1)?
            .apply(&self.image_projection)?
            .apply(&self.image_proj_norm)
    }
}

/// Mean over dim 1 keeping it, accumulated in f32 like torch does for half-precision means.
fn mean_over_tokens(tokens: &Tensor) -> Result<Tensor> {
    let dtype = tokens.dtype();
    tokens
        .to_dtype(DType::F32)?
        .mean_keepdim(1)?
        .to_dtype(dtype)
}
