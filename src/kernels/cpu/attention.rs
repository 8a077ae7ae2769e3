//! Attention on the CPU in f32 as one fused kernel: each task takes one (item, head, block of query rows),
//! computes its scores with a GEMM that reads q and k in place through strides (the gemm crate takes any
//! strides), adds the mask, applies a vectorized softmax in a per-thread buffer that stays in cache, and
//! multiplies by v straight into the output. With tensor ops, candle makes the whole `[B, H, T, S]` score
//! tensor and passes over it four times (product, scale, mask, softmax), in fresh memory for every layer.
//! The pieces ([`Mat`], [`matmul`], [`softmax_rows`]) are shared with the vision tower's window attention
//! ([`super::window_attention`]).

use candle_core::{DType, Result, Storage, Tensor, WithDType};
use gemm::Parallelism;
use rayon::prelude::*;

use super::features::wide_fn;
use super::math::{dot, exp, lane_max, lane_sum};
use super::parallel::TaskPtr;
use super::storage::{narrow_into, widen_rows, Element};

/// Query rows per task: 64 rows of scores over ~600 keys stay in L2.
const QUERY_BLOCK: usize = 64;

/// Up to this many rows of `lhs`, [`matmul`] computes its outputs as dot products or row sums in place
/// (a decode step has one query row per task), where a gemm call's packing and dispatch cost more than the
/// product.
const DIRECT_ROWS: usize = 4;

/// `softmax(q kᵀ * scale + mask) v` for CPU tensors `q` `[B, H, T, D]`, `k` and `v` `[B, H, S, D]`, all f32 or
/// all bf16, and an additive f32 `mask` broadcastable to `[B, H, T, S]`; `None` where this kernel does not
/// apply (another device or dtype), for the tensor ops. bf16 is computed in f32, each task widening its own
/// rows of q, k and v in a buffer that stays in cache (widening whole tensors first streams them through
/// memory twice, at every decode step for the encoder's keys and values), or, for up to [`DIRECT_ROWS`]
/// queries, reading k and v as stored in the direct products; its output rounded once.
pub fn fused_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let dtype = q.dtype();
    let cpu = |t: &Tensor, dtype: DType| t.device().is_cpu() && t.dtype() == dtype;
    let operands = cpu(q, dtype) && cpu(k, dtype) && cpu(v, dtype);
    if !(matches!(dtype, DType::F32 | DType::BF16)
        && operands
        && mask.is_none_or(|m| cpu(m, DType::F32)))
    {
        return Ok(None);
    }
    let (b, h, t, d) = q.dims4()?;
    let (kb, kh, s, kd) = k.dims4()?;
    if (kb, kh, kd) != (b, h, d) || v.dims() != k.dims() {
        candle_core::bail!(
            "attention: q {:?}, k {:?} and v {:?} do not fit",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if b * h * t * s * d == 0 {
        return Ok(None); // nothing to compute: the tensor ops handle empty shapes
    }
    // k and v are read through their strides where each position's head_dim values are contiguous and the
    // two share a layout (a decoder cache's buffers); otherwise from contiguous copies. Not for a head_dim of
    // 1, whose positions' stride decides between the direct products' two summation orders.
    let rows_in_place = |x: &Tensor| d > 1 && x.stride()[3] == 1 && x.stride() == k.stride();
    let (k, v) = if rows_in_place(k) && rows_in_place(v) {
        (k.clone(), v.clone())
    } else {
        (k.contiguous()?, v.contiguous()?)
    };
    let q = q.contiguous()?;
    let kv_stride = k.stride();
    let kv_rows = Rows {
        item: kv_stride[0],
        head: kv_stride[1],
        row: kv_stride[2],
    };
    // The mask is read through its strides: a broadcast dim has stride 0.
    let mask = mask.map(|m| m.broadcast_as((b, h, t, s))).transpose()?;
    let (q_store, q_layout) = q.storage_and_layout();
    let (k_store, k_layout) = k.storage_and_layout();
    let (v_store, v_layout) = v.storage_and_layout();
    let mask_parts = mask.as_ref().map(|m| m.storage_and_layout());
    let mask = match &mask_parts {
        Some((store, layout)) => {
            let stride = layout.stride();
            Some(Mask {
                values: &cpu_slice::<f32>(store)?[layout.start_offset()..],
                stride: [stride[0], stride[1], stride[2], stride[3]],
            })
        }
        None => None,
    };
    let shape = Dims { b, h, t, s, d };
    let operands = [
        (&*q_store, q_layout.start_offset()),
        (&*k_store, k_layout.start_offset()),
        (&*v_store, v_layout.start_offset()),
    ];
    let dims = (b, h, t, d);
    let out = match dtype {
        DType::BF16 => Tensor::from_vec(
            attend::<half::bf16>(values(operands)?, kv_rows, mask, shape, scale as f32),
            dims,
            q.device(),
        )?,
        _ => Tensor::from_vec(
            attend::<f32>(values(operands)?, kv_rows, mask, shape, scale as f32),
            dims,
            q.device(),
        )?,
    };
    Ok(Some(out))
}

/// The values of q, k and v from their storage and start offsets.
fn values<T: WithDType>(operands: [(&Storage, usize); 3]) -> Result<[&[T]; 3]> {
    let [q, k, v] =
        operands.map(|(store, start)| Ok::<_, candle_core::Error>(&cpu_slice(store)?[start..]));
    Ok([q?, k?, v?])
}

/// The values of a CPU tensor's storage.
fn cpu_slice<T: WithDType>(store: &Storage) -> Result<&[T]> {
    match store {
        Storage::Cpu(data) => data.as_slice::<T>(),
        _ => candle_core::bail!("attention: expected CPU storage"),
    }
}

/// The sizes of an attention: items, heads, queries, keys, head dim.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    h: usize,
    t: usize,
    s: usize,
    d: usize,
}

/// Where the rows of k and v lie: position `row` of (`item`, `head`) starts `item * self.item + head *
/// self.head + row * self.row` values from the first; its `d` values are contiguous.
#[derive(Clone, Copy)]
struct Rows {
    item: usize,
    head: usize,
    row: usize,
}

/// An additive mask read through the strides of its `[B, H, T, S]` broadcast.
#[derive(Clone, Copy)]
struct Mask<'a> {
    values: &'a [f32],
    stride: [usize; 4],
}

/// The kernel over `[q, k, v]` of `T`, q contiguous and k and v laid out as `kv` says: each task takes one
/// (item, head, block of query rows).
fn attend<T: Element>(
    [q, k, v]: [&[T]; 3],
    kv: Rows,
    mask: Option<Mask>,
    Dims { b, h, t, s, d }: Dims,
    scale: f32,
) -> Vec<T> {
    let mut out = vec![T::default(); b * h * t * d];
    // SAFETY: `out` lives past the loop, and each task writes only its own rows of it.
    let dst = unsafe { TaskPtr::new(out.as_mut_ptr()) };
    let blocks = t.div_ceil(QUERY_BLOCK);
    (0..b * h * blocks).into_par_iter().for_each_init(
        || (vec![0f32; QUERY_BLOCK * s], Vec::new()),
        |(scores, wide), task| {
            let (item, head, block) = (task / (h * blocks), task / blocks % h, task % blocks);
            let first = block * QUERY_BLOCK;
            let rows = QUERY_BLOCK.min(t - first);
            let q_at = (item * h + head) * t * d + first * d;
            let kv_at = item * kv.item + head * kv.head;
            let kv_len = (s - 1) * kv.row + d;
            let out_at = (item * h + head) * t * d + first * d;
            let scores = &mut scores[..rows * s];
            let (q, k, v) = (
                &q[q_at..][..rows * d],
                &k[kv_at..][..kv_len],
                &v[kv_at..][..kv_len],
            );
            // The scores' mask and softmax, between the two products.
            let normalize = |scores: &mut [f32]| {
                if let Some(Mask { values, stride }) = mask {
                    for (i, row) in scores.chunks_exact_mut(s).enumerate() {
                        let at = item * stride[0] + head * stride[1] + (first + i) * stride[2];
                        if stride[3] == 1 {
                            add_in_place(row, &values[at..][..s]);
                        } else {
                            for (j, v) in row.iter_mut().enumerate() {
                                *v += values[at + j * stride[3]];
                            }
                        }
                    }
                }
                softmax_rows(scores, s);
            };
            // `out = softmax(scale * q kᵀ + mask) v` for f32 operands, rows of k and v `kv_row` apart, by
            // `matmul`.
            let f32_products = |q: &[f32],
                                (k, v, kv_row): (&[f32], &[f32], usize),
                                scores: &mut [f32],
                                out: &mut [f32]| {
                // SAFETY: each matrix lies in its slice: q and out `rows x d`, k and v `s` rows `kv_row`
                // apart, the scores `rows x s`; out and the scores are this task's own.
                unsafe {
                    let (k, v) = (Mat::rows(k.as_ptr(), kv_row), Mat::rows(v.as_ptr(), kv_row));
                    let q = Mat::rows(q.as_ptr(), d);
                    matmul((rows, s, d), q, k.t(), scores.as_mut_ptr(), s, scale);
                    normalize(scores);
                    let probs = Mat::rows(scores.as_ptr(), s);
                    matmul((rows, d, s), probs, v, out.as_mut_ptr(), d, 1.0);
                }
            };
            // SAFETY: this task's rows of `out`, which no other task writes.
            let out_rows = unsafe { std::slice::from_raw_parts_mut(dst.at(out_at), rows * d) };
            if let (Some(q), Some(k), Some(v)) = (T::as_f32(q), T::as_f32(k), T::as_f32(v)) {
                // f32 (`T` is f32): read in place, written in place.
                // SAFETY: the same values, as f32.
                let out = unsafe {
                    std::slice::from_raw_parts_mut(out_rows.as_mut_ptr().cast::<f32>(), rows * d)
                };
                f32_products(q, (k, v, kv.row), scores, out);
                return;
            }
            // Narrower values are computed in f32 in `wide` (q, then k and v where widened, then the output) and
            // the output rounded once. A few query rows (a decode step) read k and v as stored, in the direct
            // products (no widened copy: the same sums); more are multiplied by the gemm crate on widened rows.
            let direct = rows <= DIRECT_ROWS;
            let kv_values = if direct { 0 } else { 2 * s * d };
            wide.resize(2 * rows * d + kv_values, 0.0);
            let (wq, rest) = wide.split_at_mut(rows * d);
            let (wkv, result) = rest.split_at_mut(kv_values);
            let result = &mut result[..rows * d];
            widen_rows(q, d, d, wq);
            if direct {
                // SAFETY: as in `f32_products`, k and v as stored (rows `kv.row` apart) and the output in
                // `result`.
                unsafe {
                    let (k, v) = (Mat::rows(k.as_ptr(), kv.row), Mat::rows(v.as_ptr(), kv.row));
                    let q = Mat::rows(wq.as_ptr(), d);
                    let done =
                        direct_product((rows, s, d), q, k.t(), scores.as_mut_ptr(), s, scale);
                    normalize(scores);
                    let probs = Mat::rows(scores.as_ptr(), s);
                    let done =
                        done && direct_product((rows, d, s), probs, v, result.as_mut_ptr(), d, 1.0);
                    assert!(done, "the direct products take {rows} rows");
                }
            } else {
                let (wk, wv) = wkv.split_at_mut(s * d);
                widen_rows(k, kv.row, d, wk);
                widen_rows(v, kv.row, d, wv);
                f32_products(wq, (wk, wv, d), scores, result);
            }
            narrow_into(result, out_rows);
        },
    );
    out
}

/// A matrix of `T` in memory: element `(i, j)` at `ptr + i * row_stride + j * col_stride`.
pub struct Mat<T = f32> {
    ptr: *const T,
    row_stride: isize,
    col_stride: isize,
}

impl<T> Clone for Mat<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Mat<T> {}

impl<T> Mat<T> {
    /// Rows `row_stride` values apart, each contiguous.
    pub fn rows(ptr: *const T, row_stride: usize) -> Self {
        Self {
            ptr,
            row_stride: row_stride as isize,
            col_stride: 1,
        }
    }

    /// The transpose of the same elements.
    pub fn t(self) -> Self {
        Self {
            ptr: self.ptr,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }
}

/// `dst[m x n] = scale * lhs[m x k] @ rhs[k x n]` on this thread, `dst` rows `dst_row_stride` apart.
///
/// # Safety
/// Every element the three matrices address lies inside live allocations, and `dst`'s do not overlap the
/// others'.
pub unsafe fn matmul(
    (m, n, k): (usize, usize, usize),
    lhs: Mat,
    rhs: Mat,
    dst: *mut f32,
    dst_row_stride: usize,
    scale: f32,
) {
    if direct_product((m, n, k), lhs, rhs, dst, dst_row_stride, scale) {
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_row_stride as isize,
        false,
        lhs.ptr,
        lhs.col_stride,
        lhs.row_stride,
        rhs.ptr,
        rhs.col_stride,
        rhs.row_stride,
        0.0,
        scale,
        false,
        false,
        false,
        Parallelism::None,
    )
}

/// [`matmul`] for up to [`DIRECT_ROWS`] rows of `lhs`, computed in place as dot products or row sums, with
/// `rhs` of any [`Element`] (read as f32, exactly); `false`, computing nothing, for shapes or strides it does not
/// take (then [`matmul`] calls the gemm crate).
///
/// # Safety
/// As [`matmul`]'s.
pub unsafe fn direct_product<T: Element>(
    (m, n, k): (usize, usize, usize),
    lhs: Mat,
    rhs: Mat<T>,
    dst: *mut f32,
    dst_row_stride: usize,
    scale: f32,
) -> bool {
    let contiguous = |stride: isize| stride == 1;
    // The output slice below spans whole rows: with several rows, only where they are contiguous (rows
    // further apart may interleave other tasks' outputs).
    let direct = m <= DIRECT_ROWS
        && m * n * k > 0
        && (m == 1 || dst_row_stride == n)
        && contiguous(lhs.col_stride)
        && lhs.row_stride >= 0
        && rhs.row_stride >= 0
        && rhs.col_stride >= 0
        && (contiguous(rhs.row_stride) || contiguous(rhs.col_stride));
    if !direct {
        return false;
    }
    // SAFETY (the slices): the contract says every element the matrices address is live; each slice spans
    // from a matrix's first element to its last, and `dst`'s (whole rows, contiguous) overlaps neither input
    // nor another task's output.
    let span = |count: usize, stride: isize, len: usize| (count - 1) * stride as usize + len;
    let lhs_rows = std::slice::from_raw_parts(lhs.ptr, span(m, lhs.row_stride, k));
    let out = std::slice::from_raw_parts_mut(dst, span(m, dst_row_stride as isize, n));
    let shape = Shape {
        m,
        n,
        k,
        lhs_stride: lhs.row_stride as usize,
        dst_stride: dst_row_stride,
    };
    // rhs's `count` lines (columns or rows) of `len` values, `stride` apart.
    let operands = |count: usize, stride: isize, len: usize| Direct {
        shape,
        lhs: lhs_rows,
        rhs: std::slice::from_raw_parts(rhs.ptr, span(count, stride, len)),
        stride: stride as usize,
        scale,
    };
    if contiguous(rhs.row_stride) {
        // Column j of rhs is contiguous: each output is a dot product.
        dot_products(operands(n, rhs.col_stride, k), out);
    } else {
        // Row t of rhs is contiguous: each output row is a sum of rhs rows.
        row_sums(operands(k, rhs.row_stride, n), out);
    }
    true
}

/// The sizes of a [`matmul`] and the row strides of its `lhs` and `dst`.
#[derive(Clone, Copy)]
struct Shape {
    m: usize,
    n: usize,
    k: usize,
    lhs_stride: usize,
    dst_stride: usize,
}

/// The operands of a direct product: `lhs`'s rows, rhs's columns ([`dot_products`]) or rows ([`row_sums`])
/// `stride` values apart in `rhs`, and the scale of the outputs.
#[derive(Clone, Copy)]
struct Direct<'a, T> {
    shape: Shape,
    lhs: &'a [f32],
    rhs: &'a [T],
    stride: usize,
    scale: f32,
}

impl<'a, T> Direct<'a, T> {
    /// Row `i` of lhs (`k` values).
    fn lhs_row(&self, i: usize) -> &'a [f32] {
        &self.lhs[i * self.shape.lhs_stride..][..self.shape.k]
    }

    /// The first `len` values of column (dot products) or row (row sums) `j` of rhs.
    fn rhs_line(&self, j: usize, len: usize) -> &'a [T] {
        &self.rhs[j * self.stride..][..len]
    }
}

/// `out[i][j] = scale * lhs[i] · col[j]`, column j of rhs at `cols[j * col_stride..][..k]`, each dot product
/// [`dot`]'s sum. With AVX-512 and `k` a multiple of 16, [`dot_products_avx512`]: the same sums, 16 columns
/// at a time.
fn dot_products<T: Element>(direct: Direct<T>, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::features::has_avx512() && direct.shape.k.is_multiple_of(16) {
        // SAFETY: the CPU has AVX-512; the slices hold the shape (`direct_product`'s spans).
        return unsafe { dot_products_avx512(direct, out) };
    }
    dot_products_wide(direct, out)
}

wide_fn! {
    /// [`dot_products`] one column at a time.
    fn dot_products_wide[T: Element](direct: Direct<T>, out: &mut [f32]) = dot_products_portable;
}

#[inline(always)]
fn dot_products_portable<T: Element>(direct: Direct<T>, out: &mut [f32]) {
    let (s, scale) = (direct.shape, direct.scale);
    for i in 0..s.m {
        let row = direct.lhs_row(i);
        for (j, out) in out[i * s.dst_stride..][..s.n].iter_mut().enumerate() {
            *out = scale * dot(row, direct.rhs_line(j, s.k));
        }
    }
}

/// [`dot_products`] for `k` a multiple of 16, 16 columns at a time: each column's 16 partial sums (one
/// vector, [`dot`]'s lanes) are summed into one lane of the result by a transpose and 16 vector adds in
/// [`dot`]'s order, where one column alone adds its lanes one by one in a chain. The columns after the last
/// whole 16 go to [`dot`].
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL; the slices hold the shape: `lhs` `m` rows `lhs_stride` apart, `cols` `n`
/// columns `col_stride` apart, `out` `m` rows `dst_stride` apart, each of `k` (`n`) values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn dot_products_avx512<T: Element>(direct: Direct<T>, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let (s, scale) = (direct.shape, direct.scale);
    // Where `dot` starts its sum of the lanes and its remainder's sum (empty here): an empty f32 sum.
    let empty = _mm512_set1_ps(std::iter::empty::<f32>().sum());
    let whole = s.n / 16 * 16;
    for i in 0..s.m {
        let row = direct.lhs_row(i);
        let out = &mut out[i * s.dst_stride..][..s.n];
        for first in (0..whole).step_by(16) {
            let lanes: [__m512; 16] = std::array::from_fn(|c| {
                let col = direct.rhs_line(first + c, s.k);
                let mut acc = _mm512_setzero_ps();
                for at in (0..s.k).step_by(16) {
                    let x = _mm512_loadu_ps(row.as_ptr().add(at));
                    let y = T::load16(col.as_ptr().add(at), u16::MAX);
                    acc = _mm512_add_ps(acc, _mm512_mul_ps(x, y));
                }
                acc
            });
            // Lane c of `by_lane[l]` is lane l of column c's sums.
            let by_lane = transpose16(lanes);
            let sums = by_lane.iter().fold(empty, |sum, &v| _mm512_add_ps(sum, v));
            let sums = _mm512_mul_ps(_mm512_set1_ps(scale), _mm512_add_ps(sums, empty));
            _mm512_storeu_ps(out.as_mut_ptr().add(first), sums);
        }
        for (j, out) in out.iter_mut().enumerate().skip(whole) {
            *out = scale * dot(row, direct.rhs_line(j, s.k));
        }
    }
}

/// The 16 x 16 transpose of `rows`: lane c of row l of the result is lane l of `rows[c]`.
///
/// # Safety
/// The CPU has AVX-512 F, and the caller is compiled with it.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn transpose16(rows: [std::arch::x86_64::__m512; 16]) -> [std::arch::x86_64::__m512; 16] {
    use std::arch::x86_64::*;
    // Pairs of rows interleaved by lanes, then by pairs of lanes, then by 128-bit quarters twice.
    let pairs: [__m512; 16] = std::array::from_fn(|i| {
        let (a, b) = (rows[i & !1], rows[i | 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_ps(a, b)
        } else {
            _mm512_unpackhi_ps(a, b)
        }
    });
    // Quad `4q + c`, 128-bit block k: lane `4k + c` of rows `4q..4q + 4`.
    let quads: [__m512; 16] = std::array::from_fn(|i| {
        let (base, c) = (i / 4 * 4, i % 4);
        let (a, b) = (
            _mm512_castps_pd(pairs[base + c / 2]),
            _mm512_castps_pd(pairs[base + c / 2 + 2]),
        );
        _mm512_castpd_ps(if c % 2 == 0 {
            _mm512_unpacklo_pd(a, b)
        } else {
            _mm512_unpackhi_pd(a, b)
        })
    });
    let eights: [__m512; 16] = std::array::from_fn(|i| {
        let base = i / 8 * 8;
        let (a, b) = (quads[base + i % 4], quads[base + i % 4 + 4]);
        if i % 8 < 4 {
            _mm512_shuffle_f32x4::<0x88>(a, b)
        } else {
            _mm512_shuffle_f32x4::<0xdd>(a, b)
        }
    });
    std::array::from_fn(|i| {
        let (a, b) = (eights[i % 8], eights[i % 8 + 8]);
        if i < 8 {
            _mm512_shuffle_f32x4::<0x88>(a, b)
        } else {
            _mm512_shuffle_f32x4::<0xdd>(a, b)
        }
    })
}

wide_fn! {
    /// `out[i] = scale * Σ_t lhs[i][t] * rhs[t]`, row t of rhs at `rows[t * row_stride..][..n]`.
    fn row_sums[T: Element](direct: Direct<T>, out: &mut [f32]) = row_sums_portable;
}

#[inline(always)]
fn row_sums_portable<T: Element>(direct: Direct<T>, out: &mut [f32]) {
    match direct.shape.n {
        64 => return row_sums_in_registers::<T, 64>(direct, out),
        32 => return row_sums_in_registers::<T, 32>(direct, out),
        _ => {}
    }
    let (s, scale) = (direct.shape, direct.scale);
    for i in 0..s.m {
        let out = &mut out[i * s.dst_stride..][..s.n];
        out.fill(0.0);
        for (t, &weight) in direct.lhs_row(i).iter().enumerate() {
            for (out, &x) in out.iter_mut().zip(direct.rhs_line(t, s.n)) {
                *out += weight * x.to_f32();
            }
        }
        if scale != 1.0 {
            out.iter_mut().for_each(|v| *v *= scale);
        }
    }
}

/// [`row_sums_portable`] for `N` (a head dim: 64 in the released models) columns, each output row's sums in
/// registers over the whole of `k` (in `out` they pass through memory at every row of rhs): the same
/// operations in the same order.
#[inline(always)]
fn row_sums_in_registers<T: Element, const N: usize>(direct: Direct<T>, out: &mut [f32]) {
    let (s, scale) = (direct.shape, direct.scale);
    for i in 0..s.m {
        let mut sums = [0f32; N];
        for (t, &weight) in direct.lhs_row(i).iter().enumerate() {
            let row: &[T; N] = direct.rhs_line(t, N).try_into().expect("N values");
            for (sum, &x) in sums.iter_mut().zip(row) {
                *sum += weight * x.to_f32();
            }
        }
        for (out, sum) in out[i * s.dst_stride..][..N].iter_mut().zip(sums) {
            *out = if scale != 1.0 { sum * scale } else { sum };
        }
    }
}

wide_fn! {
    /// In-place softmax of each `len`-long row of `rows`, vectorized for the widest SIMD the CPU has (libm's
    /// `expf` is scalar).
    pub fn softmax_rows(rows: &mut [f32], len: usize) = softmax_rows_portable;
}

#[inline(always)]
fn softmax_rows_portable(rows: &mut [f32], len: usize) {
    for row in rows.chunks_exact_mut(len) {
        let max = lane_max(row);
        row.iter_mut().for_each(|v| *v = exp(*v - max));
        let inv = 1.0 / lane_sum(row, |v| v);
        row.iter_mut().for_each(|v| *v *= inv);
    }
}

wide_fn! {
    /// `row[j] += mask[j]`: a mask row that is contiguous along the keys (a padding mask, a causal one).
    fn add_in_place(row: &mut [f32], mask: &[f32]) = add_in_place_portable;
}

#[inline(always)]
fn add_in_place_portable(row: &mut [f32], mask: &[f32]) {
    row.iter_mut().zip(mask).for_each(|(v, m)| *v += m);
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    use crate::kernels::cpu::test_values::spread as values;

    /// `(m, n, k, lhs_stride, col_stride, dst_stride)`: a decode step's 1 to 4 rows against fewer than 16
    /// columns, whole sixteens and a remainder, head dims that are and are not a multiple of 16.
    const SHAPES: [(usize, usize, usize, usize, usize, usize); 6] = [
        (1, 15, 64, 64, 64, 15),
        (1, 581, 64, 64, 64, 581),
        (3, 40, 64, 70, 200, 40),
        (4, 17, 32, 32, 96, 17),
        (2, 33, 48, 48, 48, 33),
        (2, 20, 20, 20, 25, 20),
    ];

    /// The direct products give the bits of the one-column-at-a-time loops, f32 and bf16 columns.
    #[test]
    fn direct_products_give_the_bits_of_the_plain_loops() {
        for (m, n, k, lhs_stride, col_stride, dst_stride) in SHAPES {
            let lhs = values((m - 1) * lhs_stride + k, 1);
            let cols32 = values((n - 1) * col_stride + k, 2);
            let cols16: Vec<bf16> = cols32.iter().map(|&v| bf16::from_f32(v)).collect();
            let shape = Shape {
                m,
                n,
                k,
                lhs_stride,
                dst_stride,
            };
            let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            let run = |f: &dyn Fn(&mut [f32])| {
                let mut out = vec![0f32; (m - 1) * dst_stride + n];
                f(&mut out);
                bits(&out)
            };
            let f32_case = (
                run(&|out| dot_products(operands(shape, &lhs, &cols32, col_stride), out)),
                run(&|out| dot_products_portable(operands(shape, &lhs, &cols32, col_stride), out)),
            );
            let bf16_case = (
                run(&|out| dot_products(operands(shape, &lhs, &cols16, col_stride), out)),
                run(&|out| dot_products_portable(operands(shape, &lhs, &cols16, col_stride), out)),
            );
            assert_eq!(f32_case.0, f32_case.1, "dot products f32 {m}x{n}x{k}");
            assert_eq!(bf16_case.0, bf16_case.1, "dot products bf16 {m}x{n}x{k}");

            // Row sums: `k` rows of `n` values (here the transpose of the shape above).
            let rows = values((k - 1) * col_stride + n.max(64), 3);
            let lhs_rows = values((m - 1) * lhs_stride.max(k) + k, 4);
            for width in [n.min(col_stride), 32, 64] {
                if width > col_stride {
                    continue;
                }
                let shape = Shape {
                    m,
                    n: width,
                    k,
                    lhs_stride: lhs_stride.max(k),
                    dst_stride: width,
                };
                let mut want = vec![0f32; m * width];
                for (i, out) in want.chunks_exact_mut(width).enumerate() {
                    for t in 0..k {
                        let weight = lhs_rows[i * shape.lhs_stride + t];
                        for (o, x) in out.iter_mut().zip(&rows[t * col_stride..][..width]) {
                            *o += weight * x;
                        }
                    }
                    out.iter_mut().for_each(|v| *v *= 0.3);
                }
                let got = run_rows(shape, &lhs_rows, &rows, col_stride, m * width);
                assert_eq!(bits(&got), bits(&want), "row sums {m}x{width}x{k}");
            }
        }
    }

    /// The operands of a product scaled by 0.3.
    fn operands<'a, T>(shape: Shape, lhs: &'a [f32], rhs: &'a [T], stride: usize) -> Direct<'a, T> {
        Direct {
            shape,
            lhs,
            rhs,
            stride,
            scale: 0.3,
        }
    }

    fn run_rows(shape: Shape, lhs: &[f32], rows: &[f32], stride: usize, len: usize) -> Vec<f32> {
        let mut out = vec![f32::NAN; len];
        row_sums(operands(shape, lhs, rows, stride), &mut out);
        out
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn transpose16_moves_each_lane() {
        use std::arch::x86_64::*;
        if !crate::kernels::cpu::features::has_avx512() {
            eprintln!("skipped: no AVX-512 here");
            return;
        }
        #[target_feature(enable = "avx512f")]
        unsafe fn check() {
            let rows: [__m512; 16] = std::array::from_fn(|r| {
                let values: [f32; 16] = std::array::from_fn(|c| (r * 16 + c) as f32);
                _mm512_loadu_ps(values.as_ptr())
            });
            for (l, row) in transpose16(rows).iter().enumerate() {
                let mut got = [0f32; 16];
                _mm512_storeu_ps(got.as_mut_ptr(), *row);
                let want: [f32; 16] = std::array::from_fn(|c| (c * 16 + l) as f32);
                assert_eq!(got, want, "row {l}");
            }
        }
        // SAFETY: the CPU has AVX-512 (checked above).
        unsafe { check() }
    }
}
