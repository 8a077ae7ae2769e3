//! The token embedding `[vocab, d_model]`: packed for the CPU kernels where one runs (dense f32 or bf16, or
//! quantized where the linear layers are quantized by [`quantized_gemm`](crate::kernels::cpu::quantized_gemm)),
//! else as loaded. A packed table is the LM head's weight too when the two are tied (one copy of the
//! largest matrix of the model, multiplied at the packed kernels' speed), and a lookup reads its rows back.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::linear::{Linear, PackedTable, Quantization};

pub enum TokenEmbedding {
    Dense(candle_nn::Embedding),
    Packed {
        table: PackedTable,
        /// The model's dtype, which lookups return.
        dtype: DType,
        device: Device,
    },
}

impl TokenEmbedding {
    /// Loads `weight` `[vocab, d_model]` from `vb`, packed (quantized when asked) where a kernel runs here.
    pub fn load(
        vocab: usize,
        d_model: usize,
        vb: VarBuilder,
        quantize: Option<Quantization>,
    ) -> Result<Self> {
        let weight = vb.get((vocab, d_model), "weight")?;
        Ok(match PackedTable::pack(&weight, quantize)? {
            Some(table) => Self::Packed {
                table,
                dtype: weight.dtype(),
                device: weight.device().clone(),
            },
            None => Self::Dense(candle_nn::Embedding::new(weight, d_model)),
        })
    }

    /// The embeddings of `ids` (any shape), with a trailing `d_model` dim.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (table, dtype, device) = match self {
            Self::Dense(embedding) => return embedding.forward(ids),
            Self::Packed {
                table,
                dtype,
                device,
            } => (table, *dtype, device),
        };
        let (vocab, d_model) = table.dims();
        let flat: Vec<u32> = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1()?;
        let mut values = vec![0f32; flat.len() * d_model];
        for (&id, row) in flat.iter().zip(values.chunks_mut(d_model)) {
            if id as usize >= vocab {
                candle_core::bail!("token id {id} is outside the vocabulary of {vocab}");
            }
            table.row(id as usize, row);
        }
        let mut dims = ids.dims().to_vec();
        dims.push(d_model);
        Tensor::from_vec(values, dims, device)?.to_dtype(dtype)
    }

    /// The LM head tied to this embedding: the same weights, no bias.
    pub fn tied_head(&self) -> Result<Linear> {
        match self {
            Self::Dense(embedding) => Ok(Linear::Float(candle_nn::Linear::new(
                embedding.embeddings().clone(),
                None,
            ))),
            Self::Packed { table, .. } => table.linear(None),
        }
    }
}
