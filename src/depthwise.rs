//! A direct 3×3 depthwise convolution (stride 1, padding 1) plus its input, on channels-last maps, for the CPU.
//!
//! DaViT runs four of these per block (conditional position encodings, `x + conv(x)`). candle's grouped
//! `conv2d` lowers them to im2col + one small matmul per channel, which was measured at 91 ms for 512×48×48
//! and 213 ms for 128×192×192 on this project's 2-core machines (ARCHITECTURE.md). The vision tower keeps its
//! activations as tokens (`[B, H, W, C]`, channels last) inside a stage, so the kernel works on that layout:
//! each output pixel is nine multiply-adds over a contiguous run of channels, which the compiler vectorizes,
//! and the residual is added in the same pass. No transposes to NCHW and back are needed.
//!
//! On CUDA the same op runs as one small kernel ([`cuda`]), compiled with NVRTC at first use: candle's grouped
//! `conv2d` runs one convolution per channel there too, thousands of kernel launches per conv.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::nn::to_dtype;

/// The op: input `[B, H, W, C]`, taps `[9, C]` (row-major 3×3, channel last), bias `[C]`, all f32 and
/// contiguous. Output: `input + conv(input)`.
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
        let (batch, height, width, channels) = xs_l.shape().dims4()?;
        let row = width * channels;
        let xs = &xs[xo..xo + batch * height * row];
        let taps = &w[wo..wo + 9 * channels];
        let bias = &b[bo..bo + channels];

        let mut out = vec![0f32; batch * height * row];
        out.par_chunks_mut(row)
            .enumerate()
            .for_each(|(i, out_row)| {
                let (image, y) = (i / height, i % height);
                let plane = Plane {
                    values: &xs[image * height * row..(image + 1) * height * row],
                    taps,
                    bias,
                    height,
                    width,
                };
                conv_row_wide(&plane, y, out_row);
            });
        Ok((CpuStorage::F32(out), xs_l.shape().clone()))
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
        cuda::forward((xs, xs_l), (w, w_l), (b, b_l))
    }
}

/// One image `[H, W, C]` (channels last) with the convolution's taps `[9, C]` and bias `[C]`.
struct Plane<'a> {
    values: &'a [f32],
    taps: &'a [f32],
    bias: &'a [f32],
    height: usize,
    width: usize,
}

crate::nn::wide_fn! {
    /// [`conv_row`] for the widest SIMD the CPU has.
    fn conv_row_wide(plane: &Plane, y: usize, out_row: &mut [f32]) = conv_row;
}

/// Output row `y` of one image: `out[x][c] = in[y][x][c] + bias[c] + Σ taps[dy*3+dx][c] · in[y+dy-1][x+dx-1][c]`,
/// zero outside the map.
#[inline(always)]
fn conv_row(plane: &Plane, y: usize, out_row: &mut [f32]) {
    let Plane {
        values: plane,
        taps,
        bias,
        height,
        width,
    } = *plane;
    let channels = bias.len();
    let row = width * channels;
    for x in 0..width {
        let out = &mut out_row[x * channels..(x + 1) * channels];
        let centre = &plane[y * row + x * channels..y * row + (x + 1) * channels];
        for ((o, &v), &bv) in out.iter_mut().zip(centre).zip(bias) {
            *o = v + bv;
        }
        for dy in 0..3 {
            let Some(src_y) = (y + dy).checked_sub(1).filter(|&s| s < height) else {
                continue;
            };
            for dx in 0..3 {
                let Some(src_x) = (x + dx).checked_sub(1).filter(|&s| s < width) else {
                    continue;
                };
                let start = src_y * row + src_x * channels;
                let input = &plane[start..start + channels];
                let tap = &taps[(dy * 3 + dx) * channels..(dy * 3 + dx + 1) * channels];
                for ((o, &v), &t) in out.iter_mut().zip(input).zip(tap) {
                    *o += t * v;
                }
            }
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

/// `xs + conv2d(xs, weight, bias, padding=1, groups=C)` for channels-last `xs` `[B, H, W, C]` on the CPU or a
/// CUDA device, in `xs`'s dtype (computed in f32). `taps` comes from [`channels_last_taps`].
pub fn depthwise_conv3x3_residual(xs: &Tensor, taps: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let dtype = xs.dtype();
    let f32c = |t: &Tensor| -> Result<Tensor> { to_dtype(t, DType::F32)?.contiguous() };
    let out = f32c(xs)?.apply_op3_no_bwd(taps, &f32c(bias)?, &DepthwiseResidual3x3)?;
    to_dtype(&out, dtype)
}

/// The CUDA side: one thread per output element, the nine taps of its channel in the same order as
/// [`conv_row`]. Its PTX is compiled by NVRTC once per process (no build-time nvcc step of our own) and
/// loaded once per device by candle's module cache.
#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::OnceLock;

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaView, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::cudarc::nvrtc;
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaStorage, Layout, Result, Shape};

    const SOURCE: &str = r#"
extern "C" __global__ void depthwise3x3_residual_nhwc(
    const float* xs, const float* taps, const float* bias, float* out,
    const int height, const int width, const int channels, const long long total)
{
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const int c = (int)(i % channels);
        const long long pixel = i / channels;
        const int x = (int)(pixel % width);
        const long long row = pixel / width;
        const int y = (int)(row % height);
        const long long image = row / height;
        float acc = xs[i] + bias[c];
        for (int dy = 0; dy < 3; ++dy) {
            const int sy = y + dy - 1;
            if (sy < 0 || sy >= height) continue;
            for (int dx = 0; dx < 3; ++dx) {
                const int sx = x + dx - 1;
                if (sx < 0 || sx >= width) continue;
                acc += taps[(dy * 3 + dx) * channels + c] * xs[((image * height + sy) * width + sx) * channels + c];
            }
        }
        out[i] = acc;
    }
}
"#;
    const FUNCTION: &str = "depthwise3x3_residual_nhwc";

    fn ptx() -> Result<&'static str> {
        static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
        PTX.get_or_init(|| {
            nvrtc::compile_ptx(SOURCE)
                .map(|ptx| ptx.to_src())
                .map_err(|err| err.to_string())
        })
        .as_deref()
        .map_err(|err| {
            candle_core::Error::Msg(format!("NVRTC could not compile {FUNCTION}: {err}"))
        })
    }

    type Operand<'a> = (&'a CudaStorage, &'a Layout);

    /// An f32 operand's elements, checked to be contiguous and `len` long.
    fn view<'a>((storage, layout): Operand<'a>, len: usize) -> Result<CudaView<'a, f32>> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("{FUNCTION} takes contiguous tensors");
        };
        if end - start != len {
            candle_core::bail!(
                "{FUNCTION}: an operand has {} elements, not {len}",
                end - start
            );
        }
        Ok(storage.as_cuda_slice::<f32>()?.slice(start..end))
    }

    pub fn forward(xs: Operand, taps: Operand, bias: Operand) -> Result<(CudaStorage, Shape)> {
        let dev = xs.0.device().clone();
        let (batch, height, width, channels) = xs.1.shape().dims4()?;
        let total = batch * height * width * channels;
        let (x, t, b) = (
            view(xs, total)?,
            view(taps, 9 * channels)?,
            view(bias, channels)?,
        );
        let func = dev.get_or_load_custom_func(FUNCTION, "florence2_depthwise", ptx()?)?;
        // SAFETY: every element is written by the kernel below before the storage is read.
        let out = unsafe { dev.alloc::<f32>(total)? };
        if total > 0 {
            let mut builder = func.builder();
            let (h, w, c, n) = (height as i32, width as i32, channels as i32, total as i64);
            builder
                .arg(&x)
                .arg(&t)
                .arg(&b)
                .arg(&out)
                .arg(&h)
                .arg(&w)
                .arg(&c)
                .arg(&n);
            // Grid-stride loop: the grid is capped and each thread covers several elements on big maps.
            let blocks = total.div_ceil(256).min(65_535) as u32;
            let cfg = LaunchConfig {
                grid_dim: (blocks, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the argument types and count match the kernel's signature; the slices hold `total`,
            // `9 * channels` and `channels` floats, which bound every index the kernel forms.
            unsafe { builder.launch(cfg) }.w()?;
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev), xs.1.shape().clone()))
    }
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
        }
    }
}
