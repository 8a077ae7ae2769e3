//! A direct 3×3 depthwise convolution (stride 1, padding 1) for the CPU.
//!
//! DaViT runs four of these per block. candle's grouped `conv2d` lowers them to im2col + one small matmul per
//! channel, which was measured at 91 ms for 512×48×48 and 213 ms for 128×192×192 on this project's 2-core
//! machines (ARCHITECTURE.md); computing each output plane straight from its input plane touches every
//! value a handful of times and takes about a millisecond. Other devices keep candle's `conv2d`.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// The op: input `[B, C, H, W]`, weight `[C, 1, 3, 3]`, bias `[C]`, all f32 and contiguous.
struct Depthwise3x3;

impl CustomOp3 for Depthwise3x3 {
    fn name(&self) -> &'static str {
        "depthwise-conv3x3"
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
        let (CpuStorage::F32(xs), CpuStorage::F32(w), CpuStorage::F32(b)) = (xs, w, b) else {
            candle_core::bail!("depthwise-conv3x3 takes f32 tensors");
        };
        let (Some((xo, _)), Some((wo, _)), Some((bo, _))) = (
            xs_l.contiguous_offsets(),
            w_l.contiguous_offsets(),
            b_l.contiguous_offsets(),
        ) else {
            candle_core::bail!("depthwise-conv3x3 takes contiguous tensors");
        };
        let (batch, channels, height, width) = xs_l.shape().dims4()?;
        let plane = height * width;
        let xs = &xs[xo..xo + batch * channels * plane];
        let w = &w[wo..wo + channels * 9];
        let b = &b[bo..bo + channels];

        let mut out = vec![0f32; batch * channels * plane];
        out.par_chunks_mut(plane)
            .enumerate()
            .for_each(|(i, out_plane)| {
                let c = i % channels;
                conv_plane(
                    &xs[i * plane..(i + 1) * plane],
                    &w[c * 9..c * 9 + 9],
                    b[c],
                    height,
                    width,
                    out_plane,
                );
            });
        Ok((CpuStorage::F32(out), xs_l.shape().clone()))
    }
}

/// One channel: `out = bias + Σ w[dy][dx] · in[y+dy-1][x+dx-1]`, zero outside the plane. Rows are processed
/// as three shifted row sums so the inner loops are straight slices the compiler vectorizes.
fn conv_plane(input: &[f32], w: &[f32], bias: f32, height: usize, width: usize, out: &mut [f32]) {
    out.fill(bias);
    for y in 0..height {
        let out_row = &mut out[y * width..(y + 1) * width];
        for dy in 0..3 {
            let src_y = y as isize + dy as isize - 1;
            if src_y < 0 || src_y >= height as isize {
                continue;
            }
            let row = &input[src_y as usize * width..(src_y as usize + 1) * width];
            let (w0, w1, w2) = (w[dy * 3], w[dy * 3 + 1], w[dy * 3 + 2]);
            // Centre tap over the whole row, then the left/right taps over the shifted ranges.
            for (o, &v) in out_row.iter_mut().zip(row) {
                *o += w1 * v;
            }
            if width > 1 {
                for (o, &v) in out_row[1..].iter_mut().zip(&row[..width - 1]) {
                    *o += w0 * v;
                }
                for (o, &v) in out_row[..width - 1].iter_mut().zip(&row[1..]) {
                    *o += w2 * v;
                }
            }
        }
    }
}

/// `conv2d(xs, weight, bias, padding=1, groups=C)` for `xs` `[B, C, H, W]` on the CPU, in `xs`'s dtype
/// (computed in f32).
pub fn depthwise_conv3x3(xs: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let dtype = xs.dtype();
    let f32c = |t: &Tensor| -> Result<Tensor> { t.to_dtype(DType::F32)?.contiguous() };
    let out = f32c(xs)?.apply_op3_no_bwd(&f32c(weight)?, &f32c(bias)?, &Depthwise3x3)?;
    out.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module};

    #[test]
    fn matches_candle_grouped_conv() {
        let dev = Device::Cpu;
        for (c, h, w) in [(3, 5, 7), (4, 1, 1), (2, 1, 6), (5, 6, 1), (8, 12, 12)] {
            let xs = Tensor::randn(0f32, 1., (2, c, h, w), &dev).unwrap();
            let weight = Tensor::randn(0f32, 1., (c, 1, 3, 3), &dev).unwrap();
            let bias = Tensor::randn(0f32, 1., c, &dev).unwrap();
            let cfg = candle_nn::Conv2dConfig {
                padding: 1,
                groups: c,
                ..Default::default()
            };
            let expected = candle_nn::Conv2d::new(weight.clone(), Some(bias.clone()), cfg)
                .forward(&xs)
                .unwrap();
            let got = depthwise_conv3x3(&xs, &weight, &bias).unwrap();
            let err = (got - expected)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap();
            assert!(err.to_scalar::<f32>().unwrap() < 1e-5, "{c}x{h}x{w}");
        }
    }
}
