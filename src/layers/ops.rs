//! Tensor helpers the layers and the model share: dtype conversion and sums that take the CPU kernels where
//! they apply, layout changes between feature maps and tokens, and the row chunking that bounds memory.

use candle_core::{DType, Result, Tensor};

use crate::kernels::cpu::{elementwise, grouped};

/// `xs.to_dtype(dtype)`: between f32 and bf16 on the CPU in parallel, vectorized (candle's CPU conversion is
/// one sequential scalar loop, and the bf16 tower widens its attention's operands to f32 and back).
pub fn to_dtype(xs: &Tensor, dtype: DType) -> Result<Tensor> {
    if xs.dtype() == dtype {
        return Ok(xs.clone());
    }
    let _span = crate::profile::span("dtype conversion");
    let pair = (xs.dtype(), dtype);
    if xs.device().is_cpu() && matches!(pair, (DType::F32, DType::BF16) | (DType::BF16, DType::F32))
    {
        elementwise::convert_f32_bf16(xs)
    } else {
        xs.to_dtype(dtype)
    }
}

/// `a + b` for tensors of one shape; on the CPU in f32 or bf16 in parallel (bf16 summed in f32 and rounded
/// once to nearest even, as torch does and candle does on x86; candle's aarch64 kernel truncates), elsewhere
/// candle's.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let _span = crate::profile::span("residual add");
    let cpu = a.device().is_cpu() && b.device().is_cpu();
    if cpu
        && a.dtype() == b.dtype()
        && a.dims() == b.dims()
        && matches!(a.dtype(), DType::F32 | DType::BF16)
    {
        elementwise::add(a, b)
    } else {
        a + b
    }
}

/// `a + b` broadcast to their common shape. A bf16 sum on the CPU is the f32 sum rounded to nearest even on
/// every target, as torch rounds it: candle's broadcast add does so on x86-64 but truncates on aarch64 (its
/// NEON kernel keeps the high half of each f32 sum), so elsewhere the operands are broadcast here for [`add`].
pub fn broadcast_add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let portable = cfg!(not(target_arch = "x86_64"));
    if portable && a.device().is_cpu() && a.dtype() == DType::BF16 && b.dtype() == DType::BF16 {
        let shape = a
            .shape()
            .broadcast_shape_binary_op(b.shape(), "broadcast_add")?;
        return add(&a.broadcast_as(&shape)?, &b.broadcast_as(&shape)?);
    }
    a.broadcast_add(b)
}

/// `x` `[R, G*d]` times `w` `[G, d, e]` group by group → `[R, G*e]` in `x`'s dtype: output group `g` of a row
/// is its input group `g` times `w[g]`, computed in `w`'s dtype. On the CPU (f32 `w`, f32 or bf16 `x`) the
/// kernel reads the rows in place; elsewhere the groups are transposed out for one batched matmul and back.
pub fn grouped_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu()
        && w.dtype() == DType::F32
        && matches!(x.dtype(), DType::F32 | DType::BF16)
    {
        return grouped::grouped_matmul(x, w);
    }
    let (rows, width) = x.dims2()?;
    let groups = w.dim(0)?;
    let by_group = to_dtype(x, w.dtype())?
        .reshape((rows, groups, width / groups))?
        .transpose(0, 1)?
        .contiguous()?;
    let out = by_group.matmul(w)?.transpose(0, 1)?.reshape((rows, ()))?;
    to_dtype(&out, x.dtype())
}

/// For `x` `[R, 2*G*d]` whose halves are `q` and `k` in `groups` groups of `d`: the f32 sums over the rows
/// `Σ_r q[r, g]ᵀ k[r, g]` → `[G, d, d]` (whatever `x`'s dtype: summed in f32). On the CPU (f32 or bf16) the
/// kernel reads the rows in place; elsewhere the halves are transposed out by group for one batched matmul.
pub fn grouped_outer_sums(x: &Tensor, groups: usize) -> Result<Tensor> {
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::BF16) {
        return grouped::grouped_outer_sums(x, groups);
    }
    let (rows, width) = x.dims2()?;
    let c = width / 2;
    let half = |i: usize| -> Result<Tensor> {
        to_dtype(&x.narrow(1, i * c, c)?, DType::F32)?
            .reshape((rows, groups, c / groups))?
            .transpose(0, 1)?
            .contiguous()
    };
    half(0)?.transpose(1, 2)?.contiguous()?.matmul(&half(1)?)
}

/// `f` applied to consecutive slices of at most `rows` along dim 0 of `xs`, the results concatenated: the
/// one way the model bounds the memory of row-local work (an MLP, window attention) over a large feature map.
/// Its intermediates then stay a few MiB: small enough to stay in cache and to be reused by the allocator
/// instead of being mapped fresh (and page-faulted and zeroed) on every call. `f` must treat rows
/// independently, so that the result equals `f(xs)`.
pub fn map_row_chunks(
    xs: &Tensor,
    rows: usize,
    f: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let total = xs.dim(0)?;
    if total <= rows.max(1) {
        return f(xs);
    }
    concat_row_chunks(total, rows, |start, len| f(&xs.narrow(0, start, len)?))
}

/// The rows `0..total` of a result made `rows` at a time by `part(start, len)`, which returns `len` rows.
/// Each part is copied into the output as soon as it is made, rather than all of them kept for one
/// concatenation, which held a second full-size copy at the peak.
pub fn concat_row_chunks(
    total: usize,
    rows: usize,
    part: impl Fn(usize, usize) -> Result<Tensor>,
) -> Result<Tensor> {
    // Its self time is the copying of the parts into the output.
    let _span = crate::profile::span("chunk copy");
    let rows = rows.max(1);
    let mut out: Option<Tensor> = None;
    for start in (0..total).step_by(rows) {
        let len = rows.min(total - start);
        let piece = part(start, len)?.contiguous()?;
        if piece.dim(0)? != len {
            candle_core::bail!("row chunks: {len} rows asked, {} made", piece.dim(0)?);
        }
        let out = match &out {
            Some(out) => out,
            None if len == total => return Ok(piece),
            None => {
                let mut dims = piece.dims().to_vec();
                dims[0] = total;
                out.insert(Tensor::zeros(dims, piece.dtype(), piece.device())?)
            }
        };
        out.slice_set(&piece, 0, start)?;
    }
    out.ok_or_else(|| candle_core::Error::Msg("row chunks: no rows".into()))
}

/// Per-image results `[N, C]` as a batch `[B, N, C]`; one image without a copy.
pub fn stack(images: Vec<Tensor>) -> Result<Tensor> {
    let _span = crate::profile::span("chunk copy");
    match <[Tensor; 1]>::try_from(images) {
        Ok([image]) => image.unsqueeze(0),
        Err(images) => Tensor::stack(&images, 0),
    }
}

/// `x + f(norm(x))` over dim 0 of `xs`, computed `rows` at a time through [`map_row_chunks`]: the pre-norm
/// residual of a transformer block whose `f` is row-local. Neither the normed input nor `f`'s output then
/// exists whole, only the input and the result.
pub fn pre_norm_residual(
    xs: &Tensor,
    norm: &super::LayerNorm,
    rows: usize,
    f: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    map_row_chunks(xs, rows, |x| add(x, &f(&x.apply(norm)?)?))
}

/// `[B, C, H, W]` → `[B, H*W, C]`.
pub fn nchw_to_tokens(xs: &Tensor) -> Result<Tensor> {
    let _span = crate::profile::span("layout change");
    xs.flatten_from(2)?.transpose(1, 2)?.contiguous()
}

/// `[B, H*W, C]` → `[B, C, H, W]`.
pub fn tokens_to_nchw(xs: &Tensor, height: usize, width: usize) -> Result<Tensor> {
    let _span = crate::profile::span("layout change");
    let (b, _, c) = xs.dims3()?;
    xs.transpose(1, 2)?
        .contiguous()?
        .reshape((b, c, height, width))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use half::bf16;

    #[test]
    fn conversions_match_candle() {
        let xs = Tensor::randn(0f32, 10., 100_003, &Device::Cpu).unwrap();
        let specials = Tensor::new(
            &[f32::NAN, f32::INFINITY, -0.0, 1e-40, 3.4e38],
            &Device::Cpu,
        )
        .unwrap();
        let xs = Tensor::cat(&[&xs, &specials], 0).unwrap();
        let want: Vec<bf16> = xs.to_dtype(DType::BF16).unwrap().to_vec1().unwrap();
        let got = to_dtype(&xs, DType::BF16).unwrap();
        let bits = |v: Vec<bf16>| v.into_iter().map(bf16::to_bits).collect::<Vec<_>>();
        assert_eq!(bits(got.to_vec1().unwrap()), bits(want));
        let back: Vec<f32> = to_dtype(&got, DType::F32).unwrap().to_vec1().unwrap();
        let want_back: Vec<f32> = got.to_dtype(DType::F32).unwrap().to_vec1().unwrap();
        let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
        assert_eq!(bits(back), bits(want_back));
    }

    /// f32: candle's sum. bf16: the f32 sum rounded to nearest, ties to even, as torch rounds (candle's own
    /// bf16 add truncates on aarch64, where its NEON kernel keeps the high half of each f32 sum).
    #[test]
    fn parallel_add_is_the_f32_sum_rounded_to_nearest_even() {
        let a = Tensor::randn(0f32, 1., (3, 40_000), &Device::Cpu).unwrap();
        let b = Tensor::randn(0f32, 1., (3, 40_000), &Device::Cpu).unwrap();
        let want = (&a + &b).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(add(&a, &b).unwrap().to_vec2::<f32>().unwrap(), want);

        let [a, b] = [&a, &b].map(|t| t.to_dtype(DType::BF16).unwrap());
        let got = add(&a, &b).unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        assert_eq!(bf16_bits(&got), bf16_sums(&a, &b));
    }

    /// Rows plus a broadcast row, and a broadcast column plus rows, as the bias and position adds are.
    #[test]
    fn broadcast_add_rounds_bf16_sums_to_nearest_even() {
        let rows = Tensor::randn(0f32, 1., (3, 5_000), &Device::Cpu).unwrap();
        let row = Tensor::randn(0f32, 1., 5_000, &Device::Cpu).unwrap();
        let column = Tensor::randn(0f32, 1., (3, 1), &Device::Cpu).unwrap();
        let [rows, row, column] = [&rows, &row, &column].map(|t| t.to_dtype(DType::BF16).unwrap());
        for (a, b) in [(&rows, &row), (&column, &rows)] {
            let got = broadcast_add(a, b).unwrap();
            assert_eq!(got.dims(), [3, 5_000]);
            let [a, b] = [a, b].map(|t| t.broadcast_as((3, 5_000)).unwrap());
            assert_eq!(bf16_bits(&got), bf16_sums(&a, &b));
        }
    }

    fn bf16_bits(t: &Tensor) -> Vec<u16> {
        let values: Vec<bf16> = t.flatten_all().unwrap().to_vec1().unwrap();
        values.into_iter().map(bf16::to_bits).collect()
    }

    /// The bf16 sums of `a` and `b` (one shape) computed apart from candle: each f32 sum rounded to nearest,
    /// ties to even.
    fn bf16_sums(a: &Tensor, b: &Tensor) -> Vec<u16> {
        let widen = |t: &Tensor| -> Vec<f32> {
            let t = t.contiguous().unwrap();
            bf16_bits(&t)
                .into_iter()
                .map(|h| f32::from_bits(u32::from(h) << 16))
                .collect()
        };
        let nearest_even = |sum: f32| -> u16 {
            let bits = sum.to_bits();
            ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
        };
        widen(a)
            .into_iter()
            .zip(widen(b))
            .map(|(x, y)| nearest_even(x + y))
            .collect()
    }

    #[test]
    fn row_chunks_equal_one_call() {
        let xs = Tensor::randn(0f32, 1., (10, 3), &Device::Cpu).unwrap();
        let f = |t: &Tensor| t.sqr()?.sum_keepdim(1);
        let whole: Vec<Vec<f32>> = f(&xs).unwrap().to_vec2().unwrap();
        for rows in [1, 3, 4, 10, 11] {
            let chunked: Vec<Vec<f32>> = map_row_chunks(&xs, rows, f).unwrap().to_vec2().unwrap();
            assert_eq!(chunked, whole, "{rows} rows a chunk");
        }
    }
}
