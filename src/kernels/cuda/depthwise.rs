//! The CUDA side of the depthwise 3x3 convolution plus residual (`kernels::cpu::depthwise`): one thread per
//! output element, the nine taps of its channel in the same order as the CPU kernel's `conv_row`. Its PTX is
//! compiled by NVRTC once per process and loaded once per device by candle's module cache.

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
    .map_err(|err| candle_core::Error::Msg(format!("NVRTC could not compile {FUNCTION}: {err}")))
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
