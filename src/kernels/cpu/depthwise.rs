//! A direct 3×3 depthwise convolution (stride 1, padding 1) plus its input, on channels-last maps, for the CPU.
//!
//! DaViT runs four of these per block (conditional position encodings, `x + conv(x)`). candle's grouped
//! `conv2d` lowers them to im2col + one small matmul per channel, many times slower than the direct
//! convolution (benches/kernels.rs measures both). The vision tower keeps its
//! activations as tokens (`[B, H, W, C]`, channels last) inside a stage, so the kernel works on that layout:
//! each output pixel is nine multiply-adds over a contiguous run of channels, which the compiler vectorizes,
//! and the residual is added in the same pass. No transposes to NCHW and back are needed.
//!
//! The op is one candle op for both devices: on CUDA it runs as one small kernel
//! (`kernels::cuda::depthwise`), compiled with NVRTC at first use (candle's grouped `conv2d` runs one
//! convolution per channel there too, thousands of kernel launches per conv).

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::storage::{contiguous, contiguous_f32, Element};

/// The op: input `[B, H, W, C]` (f32, or bf16 on the CPU), taps `[9, C]` (row-major 3×3, channel last) and
/// bias `[C]` in f32, all contiguous. Output: `input + conv(input)` in the input's dtype, computed in f32 and
/// rounded once.
struct DepthwiseResidual3x3;

impl CustomOp3 for DepthwiseResidual3x3 {
    fn name(&self) -> &'static str {
        "depthwise-conv3x3-residual-nhwc"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_l: &Layout,
        w: &CpuStorage,
        w_l: &Layout,
        b: &CpuStorage,
        b_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (batch, height, width, channels) = xs_l.shape().dims4()?;
        let taps = contiguous_f32(w, w_l, self.name())?;
        let bias = contiguous_f32(b, b_l, self.name())?;
        if taps.len() != 9 * channels || bias.len() != channels {
            candle_core::bail!(
                "{}: taps or bias do not have {channels} channels",
                self.name()
            );
        }
        let geometry = (batch, height, width);
        let out = match xs {
            CpuStorage::BF16(xs) => {
                CpuStorage::BF16(convolve(contiguous(xs, xs_l)?, taps, bias, geometry))
            }
            _ => CpuStorage::F32(convolve(
                contiguous_f32(xs, xs_l, self.name())?,
                taps,
                bias,
                geometry,
            )),
        };
        Ok((out, xs_l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xs_l: &Layout,
        w: &candle_core::CudaStorage,
        w_l: &Layout,
        b: &candle_core::CudaStorage,
        b_l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::kernels::cuda::depthwise::forward((xs, xs_l), (w, w_l), (b, b_l))
    }
}

/// The convolution of `batch` images `[height, width, C]`, one output row per task.
fn convolve<T: Element>(
    xs: &[T],
    taps: &[f32],
    bias: &[f32],
    (batch, height, width): (usize, usize, usize),
) -> Vec<T> {
    let row = width * bias.len();
    let mut out = vec![T::default(); batch * height * row];
    if out.is_empty() {
        return out;
    }
    out.par_chunks_mut(row).enumerate().for_each_init(
        || vec![0f32; bias.len()],
        |sums, (i, out_row)| {
            let (image, y) = (i / height, i % height);
            let plane = Plane {
                values: &xs[image * height * row..(image + 1) * height * row],
                taps,
                bias,
                height,
                width,
            };
            conv_row_wide(&plane, y, out_row, sums);
        },
    );
    out
}

/// One image `[H, W, C]` (channels last) with the convolution's taps `[9, C]` and bias `[C]`.
struct Plane<'a, T> {
    values: &'a [T],
    taps: &'a [f32],
    bias: &'a [f32],
    height: usize,
    width: usize,
}

super::features::wide_fn! {
    /// [`conv_row`] for the widest SIMD the CPU has.
    fn conv_row_wide[T: Element](plane: &Plane<T>, y: usize, out_row: &mut [T], sums: &mut [f32]) = conv_row;
}

/// Channels summed together in registers by [`conv_row`] (the nine taps' multiply-adds for a block, then the
/// next block): two AVX-512 vectors.
const CHANNEL_BLOCK: usize = 32;

/// Output row `y` of one image: `out[x][c] = in[y][x][c] + bias[c] + Σ taps[dy*3+dx][c] · in[y+dy-1][x+dx-1][c]`,
/// zero outside the map; each pixel's sums in f32, in that order (dy, then dx), rounded once. Whole blocks of
/// [`CHANNEL_BLOCK`] channels are summed in registers over the nine taps; the channels after the last whole
/// block in `sums` (`C` values), tap by tap: the same operations in the same order.
#[inline(always)]
fn conv_row<T: Element>(plane: &Plane<T>, y: usize, out_row: &mut [T], sums: &mut [f32]) {
    let Plane {
        values: plane,
        taps,
        bias,
        height,
        width,
    } = *plane;
    let channels = bias.len();
    let row = width * channels;
    let blocked = channels / CHANNEL_BLOCK * CHANNEL_BLOCK;
    for x in 0..width {
        // The taps inside the map, in order, with the first value of their input pixel.
        let mut inputs = [(0usize, 0usize); 9];
        let mut count = 0;
        for dy in 0..3 {
            let Some(src_y) = (y + dy).checked_sub(1).filter(|&s| s < height) else {
                continue;
            };
            for dx in 0..3 {
                let Some(src_x) = (x + dx).checked_sub(1).filter(|&s| s < width) else {
                    continue;
                };
                inputs[count] = (dy * 3 + dx, src_y * row + src_x * channels);
                count += 1;
            }
        }
        let inputs = &inputs[..count];
        let centre = y * row + x * channels;
        let out = &mut out_row[x * channels..(x + 1) * channels];
        for c in (0..blocked).step_by(CHANNEL_BLOCK) {
            let mut block = [0f32; CHANNEL_BLOCK];
            let (input, b) = (
                &plane[centre + c..][..CHANNEL_BLOCK],
                &bias[c..][..CHANNEL_BLOCK],
            );
            for ((s, &v), &bv) in block.iter_mut().zip(input).zip(b) {
                *s = v.to_f32() + bv;
            }
            for &(tap, start) in inputs {
                let input = &plane[start + c..][..CHANNEL_BLOCK];
                let tap = &taps[tap * channels + c..][..CHANNEL_BLOCK];
                for ((s, &v), &t) in block.iter_mut().zip(input).zip(tap) {
                    *s += t * v.to_f32();
                }
            }
            for (o, &s) in out[c..][..CHANNEL_BLOCK].iter_mut().zip(&block) {
                *o = T::from_f32(s);
            }
        }
        if blocked == channels {
            continue;
        }
        let sums = &mut sums[blocked..];
        let rest = blocked..channels;
        for ((s, &v), &bv) in sums
            .iter_mut()
            .zip(&plane[centre..][rest.clone()])
            .zip(&bias[rest.clone()])
        {
            *s = v.to_f32() + bv;
        }
        for &(tap, start) in inputs {
            let input = &plane[start..][rest.clone()];
            let tap = &taps[tap * channels..][rest.clone()];
            for ((s, &v), &t) in sums.iter_mut().zip(input).zip(tap) {
                *s += t * v.to_f32();
            }
        }
        for (o, &s) in out[blocked..].iter_mut().zip(sums.iter()) {
            *o = T::from_f32(s);
        }
    }
}

/// The taps of a `[C, 1, 3, 3]` depthwise weight as `[9, C]` f32, the layout the kernel reads.
pub fn channels_last_taps(weight: &Tensor) -> Result<Tensor> {
    weight
        .to_dtype(DType::F32)?
        .flatten_from(1)?
        .t()?
        .contiguous()
}

/// `xs + conv2d(xs, weight, bias, padding=1, groups=C)` for channels-last `xs` `[B, H, W, C]`, f32 or (on the
/// CPU) bf16, on the CPU or a CUDA device; `taps` comes from [`channels_last_taps`], `bias` is f32 `[C]`.
pub fn depthwise_conv3x3_residual(xs: &Tensor, taps: &Tensor, bias: &Tensor) -> Result<Tensor> {
    xs.contiguous()?
        .apply_op3_no_bwd(taps, &bias.contiguous()?, &DepthwiseResidual3x3)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module};

    #[test]
    fn matches_candle_grouped_conv_plus_input() {
        let dev = Device::Cpu;
        for (c, h, w) in [
            (3, 5, 7),
            (4, 1, 1),
            (2, 1, 6),
            (5, 6, 1),
            (8, 12, 12),
            (17, 9, 4),
            (32, 3, 5),
            (71, 4, 3),
        ] {
            let nchw = Tensor::randn(0f32, 1., (2, c, h, w), &dev).unwrap();
            let weight = Tensor::randn(0f32, 1., (c, 1, 3, 3), &dev).unwrap();
            let bias = Tensor::randn(0f32, 1., c, &dev).unwrap();
            let cfg = candle_nn::Conv2dConfig {
                padding: 1,
                groups: c,
                ..Default::default()
            };
            let expected = (candle_nn::Conv2d::new(weight.clone(), Some(bias.clone()), cfg)
                .forward(&nchw)
                .unwrap()
                + &nchw)
                .unwrap();
            let nhwc = nchw.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap();
            let taps = channels_last_taps(&weight).unwrap();
            let got = depthwise_conv3x3_residual(&nhwc, &taps, &bias)
                .unwrap()
                .permute((0, 3, 1, 2))
                .unwrap();
            let err = (got - expected)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap();
            assert!(err.to_scalar::<f32>().unwrap() < 1e-5, "{c}x{h}x{w}");

            // bf16 in and out: the f32 computation on the same values, rounded once.
            let nhwc = nhwc.to_dtype(DType::BF16).unwrap();
            let got = depthwise_conv3x3_residual(&nhwc, &taps, &bias).unwrap();
            assert_eq!(got.dtype(), DType::BF16);
            let want =
                depthwise_conv3x3_residual(&nhwc.to_dtype(DType::F32).unwrap(), &taps, &bias)
                    .unwrap()
                    .to_dtype(DType::BF16)
                    .unwrap();
            let bits = |t: &Tensor| -> Vec<u16> {
                t.flatten_all()
                    .unwrap()
                    .to_vec1::<half::bf16>()
                    .unwrap()
                    .into_iter()
                    .map(half::bf16::to_bits)
                    .collect()
            };
            assert_eq!(bits(&got), bits(&want), "bf16 {c}x{h}x{w}");
        }
    }

    /// Every channel, in a whole block or after the last one, gets the bits of its sum in the documented order:
    /// input + bias, then each tap inside the map (dy, then dx), multiplied then added.
    #[test]
    fn each_channel_is_summed_in_tap_order() {
        let dev = Device::Cpu;
        let (c, h, w) = (2 * CHANNEL_BLOCK + 7, 4, 5);
        let nhwc = Tensor::randn(0f32, 1., (1, h, w, c), &dev).unwrap();
        let taps = Tensor::randn(0f32, 1., (9, c), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1., c, &dev).unwrap();
        let got: Vec<f32> = depthwise_conv3x3_residual(&nhwc, &taps, &bias)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let x: Vec<f32> = nhwc.flatten_all().unwrap().to_vec1().unwrap();
        let (taps, bias): (Vec<f32>, Vec<f32>) = (
            taps.flatten_all().unwrap().to_vec1().unwrap(),
            bias.to_vec1().unwrap(),
        );
        let at = |y: usize, x_: usize, ch: usize| x[(y * w + x_) * c + ch];
        for (i, got) in got.iter().enumerate() {
            let (y, xx, ch) = (i / (w * c), i / c % w, i % c);
            let mut sum = at(y, xx, ch) + bias[ch];
            for dy in 0..3 {
                for dx in 0..3 {
                    let (sy, sx) = ((y + dy).wrapping_sub(1), (xx + dx).wrapping_sub(1));
                    if sy < h && sx < w {
                        sum += taps[(dy * 3 + dx) * c + ch] * at(sy, sx, ch);
                    }
                }
            }
            assert_eq!(got.to_bits(), sum.to_bits(), "({y}, {xx}, {ch})");
        }
    }
}
