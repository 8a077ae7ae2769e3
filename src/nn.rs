//! Building blocks shared by the vision tower and the language model.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::Activation;
use half::bf16;
use rayon::prelude::*;

/// Scaled dot-product attention over the last two dims: `softmax(q @ kᵀ * scale + mask) @ v`.
///
/// The scale is applied after the product, as transformers' eager attention does. `mask` is additive
/// (0 where attending is allowed, a large negative value elsewhere) and broadcast over the scores.
///
/// On the CPU in f32 it is one fused kernel ([`crate::cpu_attention`]). bf16 operands are widened to f32
/// once and the output rounded once: candle's CPU matmul has no bf16 kernel and widens each product's
/// operands itself, with copies (the bf16 encoder was 4x slower than transformers'); f32 scores and
/// probabilities are no less exact than torch's bf16 ones.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let half = matches!(q.dtype(), DType::BF16 | DType::F16);
    if q.device().is_cpu() && half {
        let [q32, k, v] = [q, k, v].map(|t| to_dtype(t, DType::F32));
        let mask = mask.map(|m| to_dtype(m, DType::F32)).transpose()?;
        return to_dtype(
            &attention(&q32?, &k?, &v?, scale, mask.as_ref())?,
            q.dtype(),
        );
    }
    if let Some(out) = crate::cpu_attention::attention(q, k, v, scale, mask)? {
        return Ok(out);
    }
    // The queries are scaled before the product, as transformers' BART scales them, so that half-precision
    // scores stay in range; the softmax of half-precision scores runs in f32.
    let scores = (q * scale)?.matmul(&k.t()?)?;
    let scores = if half {
        scores.to_dtype(DType::F32)?
    } else {
        scores
    };
    let scores = match mask {
        Some(mask) => scores.broadcast_add(&mask.to_dtype(scores.dtype())?)?,
        None => scores,
    };
    candle_nn::ops::softmax_last_dim(&scores)?
        .to_dtype(q.dtype())?
        .matmul(v)
}

/// The activation transformers' `ACT2FN[name]` gives, for the names Florence-2 configs use.
pub fn activation(name: &str) -> std::result::Result<Activation, String> {
    match name {
        "gelu" => Ok(Activation::Gelu),
        "gelu_new" | "gelu_fast" => Ok(Activation::NewGelu),
        "gelu_pytorch_tanh" => Ok(Activation::GeluPytorchTanh),
        "relu" => Ok(Activation::Relu),
        "silu" | "swish" => Ok(Activation::Silu),
        other => Err(format!(
            "activation_function {other:?} is not supported (gelu, gelu_new, relu, silu)"
        )),
    }
}

/// `xs.apply(&act)`. The exact GELU (`gelu`, the released configs' activation) of a contiguous CPU f32 or bf16
/// tensor uses a vectorizable erf: candle's `gelu_erf` calls libm's scalar `erf` per element, which made it
/// about a tenth of the vision tower's time. bf16 is computed in f32 and rounded once, as torch does.
pub fn activate(xs: &Tensor, act: Activation) -> Result<Tensor> {
    if matches!(act, Activation::Gelu)
        && xs.device().is_cpu()
        && matches!(xs.dtype(), DType::F32 | DType::BF16)
        && xs.is_contiguous()
    {
        xs.apply_op1_no_bwd(&GeluErf)
    } else {
        xs.apply(&act)
    }
}

/// The f32 data of a custom op's operand, which must be contiguous; the error names the op.
pub fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((start, end))) => Ok(&data[start..end]),
        _ => candle_core::bail!("{op} takes contiguous f32 tensors"),
    }
}

/// `x · Φ(x) = x/2 · (1 + erf(x/√2))` for contiguous f32 or bf16 storage.
struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "gelu-erf-fast"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match (storage, layout.contiguous_offsets()) {
            (CpuStorage::BF16(data), Some((start, end))) => {
                CpuStorage::BF16(par_map(&data[start..end], |x| {
                    bf16::from_f32(gelu(x.to_f32()))
                }))
            }
            _ => CpuStorage::F32(par_map(contiguous_f32(storage, layout, self.name())?, gelu)),
        };
        Ok((out, layout.shape().clone()))
    }
}

/// `e^x` for f32, branch-free so that loops over it vectorize: `x = n ln2 + r` with `|r| <= ln2 / 2`, a
/// degree-7 Taylor polynomial for `e^r` (truncation under 1e-8 relative, about f32's own rounding) and `2^n`
/// put into the exponent bits. 0 below -87.3, where `2^n` would leave the normal range; the callers
/// (softmax) pass values up to 0.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5 * 2^23: adding it rounds to an integer (to nearest) in plain SSE2, where `round` is a libm call.
    const ROUND: f32 = 12_582_912.0;
    let x = x.min(88.0);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = [
        1.0 / 5040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ]
    .iter()
    .fold(0.0, |acc, &c| acc * r + c);
    let scale = f32::from_bits(((n as i32 + 127).max(0) as u32) << 23);
    if x < -87.3 {
        0.0
    } else {
        p * scale
    }
}

/// LayerNorm over the last dim with weight and bias. On the CPU in f32 and bf16 it takes two vectorized
/// passes per row in f32 (mean, then the variance about it, as torch computes it) and rounds the output
/// once; candle's CPU kernel sums `x` and `x²` in one sequential scalar loop, which took ~10 % of the bf16
/// vision tower. Elsewhere candle's.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    inner: candle_nn::LayerNorm,
    eps: f32,
}

/// [`LayerNorm`] of `size` features from `vb` (`weight` and `bias`, as candle_nn::layer_norm reads them).
pub fn layer_norm(size: usize, eps: f64, vb: candle_nn::VarBuilder) -> Result<LayerNorm> {
    Ok(LayerNorm {
        inner: candle_nn::layer_norm(size, eps, vb)?,
        eps: eps as f32,
    })
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (weight, bias) = (self.inner.weight(), self.inner.bias());
        let fits = |t: &Tensor| t.device().is_cpu() && t.dtype() == xs.dtype();
        match bias {
            Some(bias)
                if fits(xs)
                    && fits(weight)
                    && fits(bias)
                    && matches!(xs.dtype(), DType::F32 | DType::BF16) =>
            {
                xs.contiguous()?.apply_op3_no_bwd(
                    &weight.contiguous()?,
                    &bias.contiguous()?,
                    &LayerNormRows { eps: self.eps },
                )
            }
            _ => self.inner.forward(xs),
        }
    }
}

struct LayerNormRows {
    eps: f32,
}

impl LayerNormRows {
    fn normalize<T: Copy + Default + Send + Sync>(
        &self,
        xs: &[T],
        (weight, bias): (&[T], &[T]),
        to: impl Fn(T) -> f32 + Sync,
        from: impl Fn(f32) -> T + Sync,
    ) -> Vec<T> {
        let c = weight.len();
        let weight: Vec<f32> = weight.iter().map(|&w| to(w)).collect();
        let bias: Vec<f32> = bias.iter().map(|&b| to(b)).collect();
        let mut out = vec![T::default(); xs.len()];
        // Tasks of whole rows, about 16 Ki values each.
        let rows = (1 << 14) / c.max(1) + 1;
        let (to, from) = (&to, &from);
        out.par_chunks_mut(rows * c)
            .zip(xs.par_chunks(rows * c))
            .for_each_init(
                || vec![0f32; c],
                |row, (out, xs)| {
                    #[cfg(target_arch = "x86_64")]
                    if has_avx2_fma() {
                        // SAFETY: the CPU has AVX2 and FMA.
                        return unsafe {
                            self.rows_avx2(xs, out, (&weight, &bias), row, (to, from))
                        };
                    }
                    self.rows(xs, out, (&weight, &bias), row, (to, from))
                },
            );
        out
    }

    /// [`Self::rows`] compiled for AVX2 + FMA. (Not through [`simd`]: LLVM declined to inline this much
    /// code through its closure, which left it compiled for SSE2.)
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn rows_avx2<T: Copy>(
        &self,
        xs: &[T],
        out: &mut [T],
        params: (&[f32], &[f32]),
        row: &mut [f32],
        convert: (impl Fn(T) -> f32, impl Fn(f32) -> T),
    ) {
        self.rows(xs, out, params, row, convert)
    }

    /// The rows of `xs` into `out`, each widened into `row` first.
    #[inline(always)]
    fn rows<T: Copy>(
        &self,
        xs: &[T],
        out: &mut [T],
        (weight, bias): (&[f32], &[f32]),
        row: &mut [f32],
        (to, from): (impl Fn(T) -> f32, impl Fn(f32) -> T),
    ) {
        let c = weight.len();
        for (out, xs) in out.chunks_exact_mut(c).zip(xs.chunks_exact(c)) {
            row.iter_mut().zip(xs).for_each(|(r, &x)| *r = to(x));
            let mean = lane_sum(row, |x| x) / c as f32;
            let var = lane_sum(row, |x| (x - mean) * (x - mean)) / c as f32;
            let inv_std = 1.0 / (var + self.eps).sqrt();
            for (((o, &x), &w), &b) in out.iter_mut().zip(row.iter()).zip(weight).zip(bias) {
                *o = from((x - mean) * inv_std * w + b);
            }
        }
    }
}

/// `Σ f(x)` in 16 interleaved partial sums, so that the loop vectorizes.
#[inline(always)]
pub fn lane_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = xs.chunks_exact(16);
    let rest: f32 = chunks.remainder().iter().map(|&x| f(x)).sum();
    for chunk in chunks {
        for (a, &x) in acc.iter_mut().zip(chunk) {
            *a += f(x);
        }
    }
    acc.iter().sum::<f32>() + rest
}

impl CustomOp3 for LayerNormRows {
    fn name(&self) -> &'static str {
        "layer-norm-rows"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let c = xl.shape().dims().last().copied().unwrap_or(0);
        if wl.shape().elem_count() != c || bl.shape().elem_count() != c {
            candle_core::bail!(
                "layer norm over {c} features with a weight of {} and a bias of {}",
                wl.shape().elem_count(),
                bl.shape().elem_count()
            );
        }
        let out = match (xs, w, b) {
            (CpuStorage::BF16(x), CpuStorage::BF16(w), CpuStorage::BF16(b)) => {
                let [x, w, b] = [(x, xl), (w, wl), (b, bl)].map(|(d, l)| contiguous(d, l));
                CpuStorage::BF16(self.normalize(x?, (w?, b?), |v| v.to_f32(), bf16::from_f32))
            }
            _ => {
                let x = contiguous_f32(xs, xl, self.name())?;
                let (w, b) = (
                    contiguous_f32(w, wl, self.name())?,
                    contiguous_f32(b, bl, self.name())?,
                );
                CpuStorage::F32(self.normalize(x, (w, b), |v| v, |v| v))
            }
        };
        Ok((out, xl.shape().clone()))
    }
}

/// Converts a CPU tensor between f32 and bf16 in parallel, vectorized; other cases go to candle's `to_dtype`
/// (whose CPU conversion is one sequential scalar loop: ~5 % of the bf16 vision tower, which widens its
/// attention's operands to f32 and back).
pub fn to_dtype(xs: &Tensor, dtype: DType) -> Result<Tensor> {
    let pair = (xs.dtype(), dtype);
    if xs.device().is_cpu() && matches!(pair, (DType::F32, DType::BF16) | (DType::BF16, DType::F32))
    {
        xs.contiguous()?.apply_op1_no_bwd(&Convert)
    } else {
        xs.to_dtype(dtype)
    }
}

/// `a + b` for tensors of one shape; on the CPU in f32 or bf16 in parallel (bf16 summed in f32 and rounded
/// once, as candle does), elsewhere candle's. The vision tower's residual sums were one sequential pass each.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let cpu = a.device().is_cpu() && b.device().is_cpu();
    if cpu
        && a.dtype() == b.dtype()
        && a.dims() == b.dims()
        && matches!(a.dtype(), DType::F32 | DType::BF16)
    {
        a.contiguous()?.apply_op2_no_bwd(&b.contiguous()?, &Add)
    } else {
        a + b
    }
}

struct Add;

impl candle_core::CustomOp2 for Add {
    fn name(&self) -> &'static str {
        "add-parallel"
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn map<T: Copy + Default + Send + Sync>(
            a: &[T],
            b: &[T],
            f: impl Fn(T, T) -> T + Sync,
        ) -> Vec<T> {
            let mut out = vec![T::default(); a.len()];
            out.par_chunks_mut(1 << 15)
                .zip(a.par_chunks(1 << 15).zip(b.par_chunks(1 << 15)))
                .for_each(|(out, (a, b))| {
                    simd(|| {
                        for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
                            *o = f(x, y);
                        }
                    })
                });
            out
        }
        let out = match (a, b) {
            (CpuStorage::BF16(a), CpuStorage::BF16(b)) => {
                CpuStorage::BF16(map(contiguous(a, al)?, contiguous(b, bl)?, |x, y| {
                    bf16::from_f32(x.to_f32() + y.to_f32())
                }))
            }
            _ => CpuStorage::F32(map(
                contiguous_f32(a, al, self.name())?,
                contiguous_f32(b, bl, self.name())?,
                |x, y| x + y,
            )),
        };
        Ok((out, al.shape().clone()))
    }
}

/// f32 → bf16 (round to nearest even, as candle and torch convert) or bf16 → f32.
struct Convert;

impl CustomOp1 for Convert {
    fn name(&self) -> &'static str {
        "convert-f32-bf16"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match storage {
            CpuStorage::BF16(data) => {
                CpuStorage::F32(par_map(contiguous(data, layout)?, |v| v.to_f32()))
            }
            _ => CpuStorage::BF16(par_map(
                contiguous_f32(storage, layout, self.name())?,
                bf16::from_f32,
            )),
        };
        Ok((out, layout.shape().clone()))
    }
}

/// The data of a contiguous operand.
pub fn contiguous<'a, T>(data: &'a [T], layout: &Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("a custom op takes contiguous tensors"),
    }
}

/// `f` of each value, in parallel blocks compiled for AVX2 where the CPU has it.
fn par_map<S: Copy + Sync, D: Copy + Default + Send>(
    src: &[S],
    f: impl Fn(S) -> D + Sync,
) -> Vec<D> {
    let mut out = vec![D::default(); src.len()];
    out.par_chunks_mut(1 << 15)
        .zip(src.par_chunks(1 << 15))
        .for_each(|(out, src)| simd(|| out.iter_mut().zip(src).for_each(|(o, &s)| *o = f(s))));
    out
}

/// `x · Φ(x)`, the exact GELU.
#[inline(always)]
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// erf as an odd rational function of `x` clamped to [-4, 4] (beyond, erf is ±1 in f32): the minimax
/// approximation Eigen and XLA use for f32, within a few ulp of the exact value. Branch-free, so loops over
/// it vectorize.
#[inline(always)]
fn erf(x: f32) -> f32 {
    const ALPHA: [f32; 7] = [
        -2.726_142_3e-10,
        2.770_681_4e-8,
        -2.101_024e-6,
        -5.692_506_4e-5,
        -7.349_906_3e-4,
        -2.954_6e-3,
        -1.609_603_3e-2,
    ];
    const BETA: [f32; 5] = [
        -1.456_607_2e-5,
        -2.133_740_6e-4,
        -1.682_827e-3,
        -7.373_329_2e-3,
        -1.426_474e-2,
    ];
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let p = ALPHA.iter().fold(0.0, |acc, &a| acc * x2 + a) * x;
    let q = BETA.iter().fold(0.0, |acc, &b| acc * x2 + b);
    p / q
}

/// An output buffer written by many parallel tasks, each at its own elements.
pub struct Out<T>(pub *mut T);

impl<T> Clone for Out<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Out<T> {}

// SAFETY: the tasks that share an `Out` write disjoint elements, and the buffer outlives their parallel loop
// (each user says why at its loop).
unsafe impl<T: Send> Send for Out<T> {}
unsafe impl<T: Send> Sync for Out<T> {}

impl<T> Out<T> {
    /// The element `offset` values in. (A method, so that closures capture the whole `Out`, which is `Sync`,
    /// rather than its pointer field.)
    pub fn at(self, offset: usize) -> *mut T {
        self.0.wrapping_add(offset)
    }
}

/// The kernel families of our CPU code, narrowest first. Every kernel with a wide version asks [`cpu_tier`]
/// (through [`has_avx2_fma`], [`has_avx512`], [`has_avx512_bf16`]); no other code detects CPU features.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum CpuTier {
    /// The target's baseline (SSE2 on x86-64; every CPU off x86-64).
    Scalar,
    /// AVX2 and FMA.
    Avx2,
    /// AVX-512 F, BW and VL, with AVX2 and FMA.
    Avx512,
}

/// The environment variable that lowers the tier below the CPU's (`scalar`, `avx2` or `avx512`; empty or
/// unset: the CPU's). It is read once, at the first kernel call, so that every kernel of a process runs at
/// the same tier.
pub const CPU_TIER_VAR: &str = "FLORENCE2_CPU_TIER";

impl CpuTier {
    const ALL: [(CpuTier, &'static str); 3] = [
        (CpuTier::Scalar, "scalar"),
        (CpuTier::Avx2, "avx2"),
        (CpuTier::Avx512, "avx512"),
    ];

    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|(tier, _)| *tier == self).unwrap().1
    }

    /// The widest tier this CPU runs.
    fn detected() -> CpuTier {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            let avx512 = is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl");
            match (avx2, avx512) {
                (true, true) => CpuTier::Avx512,
                (true, false) => CpuTier::Avx2,
                _ => CpuTier::Scalar,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            CpuTier::Scalar
        }
    }

    /// The tier that `requested` (the value of [`CPU_TIER_VAR`], if set) asks for on a CPU whose widest is
    /// `detected`. A tier the CPU lacks is an error: its instructions would crash the process.
    fn choose(detected: CpuTier, requested: Option<&str>) -> std::result::Result<CpuTier, String> {
        let Some(name) = requested.map(str::trim).filter(|name| !name.is_empty()) else {
            return Ok(detected);
        };
        let names = Self::ALL.map(|(_, name)| name).join(", ");
        let tier = Self::ALL
            .iter()
            .find(|(_, known)| known.eq_ignore_ascii_case(name))
            .ok_or_else(|| format!("{CPU_TIER_VAR}={name:?}: expected one of {names}"))?
            .0;
        if tier > detected {
            return Err(format!(
                "{CPU_TIER_VAR}={name:?}: this CPU runs at most {:?}",
                detected.name()
            ));
        }
        Ok(tier)
    }
}

/// The tier [`CPU_TIER_VAR`] and the CPU give, decided once per process; the message of a setting that
/// cannot be honoured (an unknown name, a tier the CPU lacks).
fn tier_setting() -> &'static std::result::Result<CpuTier, String> {
    use std::sync::OnceLock;
    static TIER: OnceLock<std::result::Result<CpuTier, String>> = OnceLock::new();
    TIER.get_or_init(|| {
        let requested = std::env::var_os(CPU_TIER_VAR).map(|v| v.to_string_lossy().into_owned());
        CpuTier::choose(CpuTier::detected(), requested.as_deref())
    })
}

/// Refuses a [`CPU_TIER_VAR`] setting that cannot be honoured: model loading calls this, so that a bad
/// setting is an error there rather than a silent fallback.
pub fn check_cpu_tier() -> std::result::Result<(), String> {
    tier_setting().as_ref().map(|_| ()).map_err(Clone::clone)
}

/// The tier every kernel runs at: the CPU's widest, or the one [`CPU_TIER_VAR`] forces. Under a setting that
/// cannot be honoured (refused at model load by [`check_cpu_tier`]) the baseline, which every CPU runs.
pub fn cpu_tier() -> CpuTier {
    match tier_setting() {
        Ok(tier) => *tier,
        Err(_) => CpuTier::Scalar,
    }
}

/// Whether the kernels may use AVX2 and FMA (always false off x86-64).
pub fn has_avx2_fma() -> bool {
    cpu_tier() >= CpuTier::Avx2
}

/// `$vis fn $name(args) -> ret` that calls `$kernel(args)` (an `#[inline(always)]` function) compiled for
/// AVX-512, else AVX2 + FMA, else baseline x86-64, as the CPU allows. A kernel called through [`simd`]'s
/// closure was not always inlined into its wide entry points (LLVM inlines the kernel into the closure first,
/// and then finds the closure too big), which left the depthwise convolutions and the softmax compiled for
/// SSE2; the entry points made here call the kernel directly.
macro_rules! wide_fn {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) = $kernel:path;) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) {
                    $kernel($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    $kernel($($arg),*)
                }
                if $crate::nn::has_avx512() {
                    // SAFETY: the CPU has the features `avx512` is compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if $crate::nn::has_avx2_fma() {
                    // SAFETY: the CPU has the features `avx2` is compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $kernel($($arg),*)
        }
    };
}
pub(crate) use wide_fn;

/// Whether the kernels may use AVX-512 (F, BW, VL) as well as AVX2 and FMA (always false off x86-64).
pub fn has_avx512() -> bool {
    cpu_tier() >= CpuTier::Avx512
}

/// Whether the kernels may use AVX512-BF16 ([`crate::bf16_linear`]): the AVX-512 tier on a CPU that has it.
pub fn has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        has_avx512() && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Runs `kernel` inside a function compiled for AVX-512 or AVX2 + FMA, the widest this x86-64 CPU has: the
/// default build targets baseline x86-64 (SSE2), so a plain loop vectorizes 4 floats wide; inlined here it
/// gets 16 or 8. The kernel's own helpers should be `#[inline(always)]` so that they are compiled in this
/// context too. The results do not depend on the width: each lane computes its own values in the same order.
#[inline(always)]
pub fn simd<R>(kernel: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
        unsafe fn avx512<R>(kernel: impl FnOnce() -> R) -> R {
            kernel()
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<R>(kernel: impl FnOnce() -> R) -> R {
            kernel()
        }
        if has_avx512() {
            // SAFETY: the CPU has the features `avx512` is compiled for.
            return unsafe { avx512(kernel) };
        }
        if has_avx2_fma() {
            // SAFETY: the CPU has the features `avx2` is compiled for.
            return unsafe { avx2(kernel) };
        }
    }
    kernel()
}

/// `f` applied to consecutive slices of at most `rows` along dim 0 of `xs`, the results concatenated.
/// Row-local work (an MLP, window attention) over a large feature map then keeps its intermediates a few
/// MiB: small enough to stay in cache and to be reused by the allocator instead of being mapped fresh (and
/// page-faulted and zeroed) on every call.
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

/// `[B, C, H, W]` → `[B, H*W, C]`.
pub fn nchw_to_tokens(xs: &Tensor) -> Result<Tensor> {
    xs.flatten_from(2)?.transpose(1, 2)?.contiguous()
}

/// `[B, H*W, C]` → `[B, C, H, W]`.
pub fn tokens_to_nchw(xs: &Tensor, height: usize, width: usize) -> Result<Tensor> {
    let (b, _, c) = xs.dims3()?;
    xs.transpose(1, 2)?
        .contiguous()?
        .reshape((b, c, height, width))
}

/// The largest `|a - b|` of two tensors of one shape, in f32 (for tests).
#[cfg(test)]
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    (f32(a) - f32(b))
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// Hands the allocator's free memory back to the system (glibc's `malloc_trim`).
///
/// The vision tower makes and frees ~100 MB of intermediates per image, in blocks of a few MiB to 18 MiB.
/// glibc keeps freed blocks in its heaps, fragmented, and the peak resident set grew with each further image
/// (base f32, `VmHWM`: 1026 MB after one 768x768 image, 1038 MB after two). Trimmed after the tower, the
/// resident set is back at ~970 MB between images and the peak stays at the first image's; the tower's time
/// did not change beyond its run-to-run noise.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages; it takes the allocator's locks itself.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn cpu_tier_is_the_cpus_or_a_lower_one_named() {
        use CpuTier::*;
        for requested in [None, Some(""), Some(" ")] {
            assert_eq!(CpuTier::choose(Avx2, requested), Ok(Avx2));
        }
        assert_eq!(CpuTier::choose(Avx512, Some("avx2")), Ok(Avx2));
        assert_eq!(CpuTier::choose(Avx512, Some("Scalar")), Ok(Scalar));
        assert_eq!(CpuTier::choose(Avx512, Some("avx512")), Ok(Avx512));
        let above = CpuTier::choose(Avx2, Some("avx512")).unwrap_err();
        assert!(above.contains("at most \"avx2\""), "{above}");
        let unknown = CpuTier::choose(Avx512, Some("sse4")).unwrap_err();
        assert!(
            unknown.contains("expected one of scalar, avx2, avx512"),
            "{unknown}"
        );
    }

    #[test]
    fn fast_gelu_matches_candle_gelu_erf() {
        let xs = (Tensor::arange(-12_000f32, 12_000f32, &Device::Cpu).unwrap() / 1000.).unwrap();
        let expected: Vec<f32> = xs.gelu_erf().unwrap().to_vec1().unwrap();
        let got: Vec<f32> = activate(&xs, Activation::Gelu).unwrap().to_vec1().unwrap();
        for ((e, g), x) in expected.iter().zip(&got).zip(xs.to_vec1::<f32>().unwrap()) {
            // In the far negative tail both lose `1 + erf` to cancellation: a few 1e-6 absolute is f32 noise.
            assert!(
                (e - g).abs() <= 2e-6 + 1e-6 * e.abs(),
                "gelu({x}): {g} vs {e}"
            );
        }
    }

    #[test]
    fn fast_gelu_in_bf16_rounds_the_f32_value() {
        let xs = (Tensor::arange(-6_000f32, 6_000f32, &Device::Cpu).unwrap() / 1000.).unwrap();
        let xs = xs.to_dtype(DType::BF16).unwrap();
        let f32_of_bf16 = activate(&xs.to_dtype(DType::F32).unwrap(), Activation::Gelu).unwrap();
        let expected: Vec<bf16> = f32_of_bf16
            .to_dtype(DType::BF16)
            .unwrap()
            .to_vec1()
            .unwrap();
        let got = activate(&xs, Activation::Gelu).unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        assert_eq!(got.to_vec1::<bf16>().unwrap(), expected);
    }

    #[test]
    fn fast_exp_is_within_a_few_ulp() {
        for i in -100_000..=8_800 {
            let x = i as f32 / 1000.0;
            let (got, want) = (exp(x), (x as f64).exp());
            if x < -87.3 {
                assert_eq!(got, 0.0, "exp({x})");
            } else {
                assert!(
                    ((got as f64 - want) / want).abs() < 3e-7,
                    "exp({x}): {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn layer_norm_matches_candle() {
        let dev = Device::Cpu;
        for c in [1, 7, 16, 33, 768] {
            let xs = Tensor::randn(1.5f32, 3., (3, 5, c), &dev).unwrap();
            let weight = Tensor::randn(1f32, 0.5, c, &dev).unwrap();
            let bias = Tensor::randn(0f32, 0.5, c, &dev).unwrap();
            for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
                let [xs, weight, bias] = [&xs, &weight, &bias].map(|t| t.to_dtype(dtype).unwrap());
                let candle = candle_nn::LayerNorm::new(weight.clone(), bias.clone(), 1e-5);
                let ours = LayerNorm {
                    inner: candle.clone(),
                    eps: 1e-5,
                };
                let got = ours.forward(&xs).unwrap();
                assert_eq!(got.dtype(), dtype);
                let want = candle.forward(&xs).unwrap();
                let diff = max_abs_diff(&got, &want);
                // Relative to the outputs' magnitude (up to ~10 with these draws): one bf16 step there is
                // 0.06, and the unseeded draws once gave a difference above an absolute 2e-2.
                let scale = max_abs_diff(&want, &want.zeros_like().unwrap()).max(1.0);
                assert!(
                    diff <= tol * scale,
                    "{dtype:?}, {c} features: {diff} (outputs up to {scale})"
                );
            }
        }
    }

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

    #[test]
    fn parallel_add_matches_candle() {
        let a = Tensor::randn(0f32, 1., (3, 40_000), &Device::Cpu).unwrap();
        let b = Tensor::randn(0f32, 1., (3, 40_000), &Device::Cpu).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let [a, b] = [&a, &b].map(|t| t.to_dtype(dtype).unwrap());
            let want = (&a + &b).unwrap().to_dtype(DType::F32).unwrap();
            let got = add(&a, &b).unwrap();
            assert_eq!(got.dtype(), dtype);
            let got = got.to_dtype(DType::F32).unwrap();
            assert_eq!(
                got.to_vec2::<f32>().unwrap(),
                want.to_vec2::<f32>().unwrap()
            );
        }
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
