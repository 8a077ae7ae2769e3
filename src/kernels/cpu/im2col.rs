//! Channels-last patch extraction (im2col) for the vision tower's strided patch-embedding convolutions, so that
//! each convolution is one GEMM over the tokens of a stage. candle's conv2d takes NCHW, which means a transpose of
//! the feature map on each side of every patch embedding and a slower convolution; as a GEMM they run at the
//! speed of the linear layers.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::storage::contiguous_f32;

/// The geometry of a square convolution over a `height` x `width` map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    pub height: usize,
    pub width: usize,
}

impl ConvGeometry {
    /// Output height and width (PyTorch's formula, dilation 1).
    pub fn output(&self) -> (usize, usize) {
        let side = |n: usize| (n + 2 * self.padding).saturating_sub(self.kernel) / self.stride + 1;
        (side(self.height), side(self.width))
    }
}

/// Rows `first..first + rows` (output pixels in raster order) of the patch matrix of `tokens` `[H*W, C]`
/// (one image, channels last): row `(oy, ox)` holds the input pixels under the kernel at that output position,
/// ordered `(ky, kx, c)`, zeros where the kernel hangs over the padding. Shape `[rows, kernel² * C]`; with the
/// weight `[out, C, k, k]` permuted to `[out, k, k, C]` and flattened, `patches @ wᵀ` is the convolution.
/// CPU, f32 or bf16.
pub fn patches(
    tokens: &Tensor,
    geometry: ConvGeometry,
    first: usize,
    rows: usize,
) -> Result<Tensor> {
    if !tokens.device().is_cpu() || !matches!(tokens.dtype(), DType::F32 | DType::BF16) {
        candle_core::bail!("im2col patches take an f32 or bf16 CPU tensor");
    }
    let (n, _) = tokens.dims2()?;
    let (oh, ow) = geometry.output();
    if n != geometry.height * geometry.width || first + rows > oh * ow {
        candle_core::bail!(
            "im2col: {n} tokens for a {}x{} map, rows {first}..{} of {}",
            geometry.height,
            geometry.width,
            first + rows,
            oh * ow
        );
    }
    tokens.contiguous()?.apply_op1_no_bwd(&Patches {
        geometry,
        first,
        rows,
    })
}

struct Patches {
    geometry: ConvGeometry,
    first: usize,
    rows: usize,
}

impl CustomOp1 for Patches {
    fn name(&self) -> &'static str {
        "im2col-nhwc"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, c) = layout.shape().dims2()?;
        let row_len = self.geometry.kernel * self.geometry.kernel * c;
        let out = match (storage, layout.contiguous_offsets()) {
            (CpuStorage::BF16(data), Some((start, end))) => {
                CpuStorage::BF16(self.extract(&data[start..end], c))
            }
            _ => CpuStorage::F32(self.extract(contiguous_f32(storage, layout, self.name())?, c)),
        };
        Ok((out, Shape::from((self.rows, row_len))))
    }
}

impl Patches {
    /// The patch rows from the `c`-channel tokens `src`.
    fn extract<T: Copy + Default + Send + Sync>(&self, src: &[T], c: usize) -> Vec<T> {
        let ConvGeometry {
            kernel,
            stride,
            padding,
            height,
            width,
        } = self.geometry;
        let (_, ow) = self.geometry.output();
        let row_len = kernel * kernel * c;
        let mut out = vec![T::default(); self.rows * row_len];
        out.par_chunks_mut(row_len)
            .enumerate()
            .for_each(|(i, row)| {
                let (oy, ox) = ((self.first + i) / ow, (self.first + i) % ow);
                for ky in 0..kernel {
                    let Some(iy) = (oy * stride + ky)
                        .checked_sub(padding)
                        .filter(|&y| y < height)
                    else {
                        continue; // stays zero: padding
                    };
                    for kx in 0..kernel {
                        let Some(ix) = (ox * stride + kx)
                            .checked_sub(padding)
                            .filter(|&x| x < width)
                        else {
                            continue;
                        };
                        let from = (iy * width + ix) * c;
                        let to = (ky * kernel + kx) * c;
                        row[to..to + c].copy_from_slice(&src[from..from + c]);
                    }
                }
            });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::{Conv2d, Conv2dConfig, Module};

    #[test]
    fn patches_times_weight_is_the_convolution() {
        let dev = Device::Cpu;
        // The stage geometries of the released configs (7/4/3 on the image, 3/2/1 after) on odd map sizes.
        for (kernel, stride, padding, height, width, c) in [
            (7, 4, 3, 13, 10, 3),
            (3, 2, 1, 9, 7, 5),
            (3, 2, 1, 6, 6, 4),
            (2, 2, 0, 5, 4, 2),
        ] {
            let geometry = ConvGeometry {
                kernel,
                stride,
                padding,
                height,
                width,
            };
            let out_c = 6;
            let nchw = Tensor::randn(0f32, 1., (1, c, height, width), &dev).unwrap();
            let weight = Tensor::randn(0f32, 1., (out_c, c, kernel, kernel), &dev).unwrap();
            let cfg = Conv2dConfig {
                padding,
                stride,
                ..Default::default()
            };
            let expected = Conv2d::new(weight.clone(), None, cfg)
                .forward(&nchw)
                .unwrap();
            let (_, _, oh, ow) = expected.dims4().unwrap();
            assert_eq!(geometry.output(), (oh, ow));
            let expected: Vec<f32> = expected
                .flatten_from(2)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .t()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();

            let tokens = nchw
                .squeeze(0)
                .unwrap()
                .flatten_from(1)
                .unwrap()
                .t()
                .unwrap();
            let flat_w = weight
                .permute((0, 2, 3, 1))
                .unwrap()
                .flatten_from(1)
                .unwrap();
            // In two pieces, as the tower runs it in chunks of output rows.
            let split = oh * ow / 2;
            let parts = [(0, split), (split, oh * ow - split)]
                .map(|(first, rows)| patches(&tokens, geometry, first, rows).unwrap());
            let got = Tensor::cat(&parts, 0)
                .unwrap()
                .matmul(&flat_w.t().unwrap())
                .unwrap();
            let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(got.len(), expected.len());
            for (g, e) in got.iter().zip(&expected) {
                assert!(
                    (g - e).abs() <= 1e-4 * (1.0 + e.abs()),
                    "k{kernel} s{stride}: {g} vs {e}"
                );
            }
        }
    }
}
