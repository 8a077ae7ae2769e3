//! Criterion benches of the CPU kernels on the hot paths: the direct channels-last 3x3 depthwise
//! convolution plus residual (the DaViT position-encoding convs, against candle's grouped conv2d on NCHW); the
//! window attention core of each tower stage; the bf16 linear layer against candle's bf16 matmul; the linear
//! layer's kernels (f32 through the gemm crate and packed, bf16 packed, int8 and int4, and candle's Q8_0 and
//! Q4_0 matmul that the int8 and int4 layers fall back to) on the same shapes, each where the CPU runs it; one
//! beam-search decode step (3 beams); and the rate of the instructions those kernels are built on, alone
//! ("unit peak"), the ceiling their GFLOP/s are measured against (docs/performance.md).
//!
//!     cargo bench --bench kernels
//!     FLORENCE2_BENCH_CHECKPOINT=/work/bench-ckpt/base/hf cargo bench --bench kernels   # full-size decoder
//!
//! Without FLORENCE2_BENCH_CHECKPOINT the decode step runs on the tiny test checkpoint (a smoke run, not a
//! measurement); the full-size checkpoints are made by benches/compare.py.

use std::path::PathBuf;

use candle_core::{DType, Device, Module, Tensor};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use florence2_rs::generation::DecoderSession;
use florence2_rs::kernels::cpu::depthwise::{channels_last_taps, depthwise_conv3x3_residual};
use florence2_rs::kernels::cpu::gemm::Epilogue;
use florence2_rs::model::Florence2ForConditionalGeneration;

/// The stage shapes of Florence-2-base's vision tower at 768x768 (channels, side).
const DEPTHWISE_SHAPES: [(usize, usize); 3] = [(128, 192), (256, 96), (512, 48)];

fn depthwise(c: &mut Criterion) {
    let dev = Device::Cpu;
    let mut group = c.benchmark_group("depthwise3x3");
    group.sample_size(10);
    for (channels, side) in DEPTHWISE_SHAPES {
        let xs = Tensor::randn(0f32, 1., (1, channels, side, side), &dev).expect("input");
        let weight = Tensor::randn(0f32, 1., (channels, 1, 3, 3), &dev).expect("weight");
        let bias = Tensor::randn(0f32, 1., channels, &dev).expect("bias");
        let nhwc = xs
            .permute((0, 2, 3, 1))
            .and_then(|t| t.contiguous())
            .expect("nhwc");
        let taps = channels_last_taps(&weight).expect("taps");
        group.bench_function(
            format!("direct + residual, channels last {channels}x{side}x{side}"),
            |b| b.iter(|| depthwise_conv3x3_residual(&nhwc, &taps, &bias).expect("conv")),
        );
        let cfg = candle_nn::Conv2dConfig {
            padding: 1,
            groups: channels,
            ..Default::default()
        };
        let grouped = candle_nn::Conv2d::new(weight.clone(), Some(bias.clone()), cfg);
        group.bench_function(format!("candle conv2d {channels}x{side}x{side}"), |b| {
            b.iter(|| grouped.forward(&xs).expect("conv"))
        });
    }
    group.finish();
}

/// Each stage of Florence-2-base's vision tower at 768x768: (windows of 12 x 12 tokens, channels, heads).
const WINDOW_SHAPES: [(usize, usize, usize); 4] =
    [(256, 128, 4), (64, 256, 8), (16, 512, 16), (4, 1024, 32)];

/// The window attention core (between the qkv projection and the output projection) of each stage, f32 and
/// bf16.
fn window_attention(c: &mut Criterion) {
    use florence2_rs::kernels::cpu::window_attention::window_attention;
    let mut group = c.benchmark_group("window attention");
    group.sample_size(10);
    for (windows, channels, heads) in WINDOW_SHAPES {
        let qkv = Tensor::randn(0f32, 1., (windows, 144, 3 * channels), &Device::Cpu).expect("qkv");
        let scale = ((channels / heads) as f64).powf(-0.5);
        for qkv in [qkv.clone(), qkv.to_dtype(DType::BF16).expect("bf16")] {
            let name = format!("{:?} {windows}x144x{channels} {heads} heads", qkv.dtype());
            group.bench_function(name, |b| {
                b.iter(|| window_attention(&qkv, heads, scale).expect("attention"))
            });
        }
    }
    group.finish();
}

fn checkpoint() -> PathBuf {
    std::env::var_os("FLORENCE2_BENCH_CHECKPOINT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/hf"))
}

fn decode_step(c: &mut Criterion) {
    let dev = Device::Cpu;
    let model = Florence2ForConditionalGeneration::from_dir(&checkpoint(), DType::F32, &dev)
        .expect("checkpoint");
    // 581 encoder positions, as for one 768x768 image and an `<OD>` prompt; random states suffice for timing.
    let d_model = model.config().text.d_model;
    let states = Tensor::randn(0f32, 1., (1, 581, d_model), &dev).expect("states");
    let encoder = florence2_rs::model::EncoderOutput {
        hidden_states: states,
        attention_mask: Tensor::ones((1, 581), DType::F32, &dev).expect("mask"),
    };
    let beams = 3;
    let mut group = c.benchmark_group("decoder");
    group.sample_size(20);
    group.bench_function("step, 3 beams", |b| {
        b.iter_batched(
            || {
                let mut state = model
                    .start_decoding_grouped(&encoder, beams)
                    .expect("cache");
                state.next_logits(&[2; 3]).expect("first step");
                state
            },
            |mut state| state.next_logits(&[0; 3]).expect("step"),
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

/// bf16 `x @ wᵀ + b` shapes (rows, in, out): base vision tower stages 0 and 2 (qkv, FFN in and out), large's
/// stage 2 and 3 FFN out, the encoder's FFN, and decode-step products of 1, 2, 3 and 6 rows (greedy, beams).
const BF16_SHAPES: [(usize, usize, usize); 13] = [
    (36864, 128, 384),
    (2304, 512, 2048),
    (2304, 2048, 512),
    (2304, 4096, 1024),
    (576, 8192, 2048),
    (581, 768, 3072),
    (581, 3072, 768),
    (1, 768, 3072),
    (2, 768, 3072),
    (3, 768, 3072),
    (6, 768, 3072),
    (1, 768, 51289),
    (3, 768, 51289),
];

fn bf16_gemm(c: &mut Criterion) {
    if !florence2_rs::kernels::cpu::bf16_gemm::available() {
        eprintln!("bf16 linear: this CPU has no AVX2 + FMA, skipped");
        return;
    }
    let dev = Device::Cpu;
    let mut group = c.benchmark_group("bf16 linear");
    group.sample_size(10);
    for (m, k, n) in BF16_SHAPES {
        let x = Tensor::randn(0f32, 1., (m, k), &dev).expect("x");
        let w = Tensor::randn(0f32, 1., (n, k), &dev).expect("w");
        let b = Tensor::randn(0f32, 1., n, &dev).expect("b");
        let [x, w, b] = [x, w, b].map(|t| t.to_dtype(DType::BF16).expect("bf16"));
        let (xs, ws, bs) = (to_vec(&x), to_vec(&w), to_vec(&b));
        let packed = florence2_rs::kernels::cpu::bf16_gemm::Packed::new(&ws, n, k);
        group.bench_function(format!("AVX512-BF16 {m}x{k}x{n}"), |bench| {
            bench.iter(|| {
                florence2_rs::kernels::cpu::bf16_gemm::linear_packed(
                    &xs,
                    m,
                    &packed,
                    &bs,
                    Epilogue::None,
                )
            })
        });
        let candle = candle_nn::Linear::new(w.clone(), Some(b.clone()));
        group.bench_function(format!("candle {m}x{k}x{n}"), |bench| {
            bench.iter(|| candle.forward(&x).expect("linear"))
        });
    }
    group.finish();
}

/// The kernels a linear layer takes on the CPU, on the same shapes: f32 through the gemm crate (weights as
/// stored) and packed at load, bf16 packed, int8 and int4 (bf16 activations).
fn linear_kernels(c: &mut Criterion) {
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use florence2_rs::kernels::cpu::{bf16_gemm, f32_gemm, quantized_gemm};
    let dev = Device::Cpu;
    let mut group = c.benchmark_group("linear kernels");
    group.sample_size(10);
    for (m, k, n) in BF16_SHAPES {
        let x = Tensor::randn(0f32, 1., (m, k), &dev).expect("x");
        let w = Tensor::randn(0f32, 0.02, (n, k), &dev).expect("w");
        let b = Tensor::randn(0f32, 1., n, &dev).expect("b");
        let values =
            |t: &Tensor| -> Vec<f32> { t.flatten_all().and_then(|t| t.to_vec1()).expect("values") };
        let (xs, ws, bs) = (values(&x), values(&w), values(&b));
        let x16 = to_vec(&x.to_dtype(DType::BF16).expect("bf16"));
        group.bench_function(format!("f32 gemm crate {m}x{k}x{n}"), |bench| {
            bench.iter(|| {
                florence2_rs::kernels::cpu::gemm::linear(&x, &w, Some(&b)).expect("linear")
            })
        });
        // Each packed kernel where this CPU runs it (f32 and bf16: x86-64 with AVX2 + FMA; int8 and int4:
        // also aarch64 with sdot, or usmmla at the i8mm tier).
        if f32_gemm::available() {
            let packed = f32_gemm::Packed::new(&ws, n, k);
            group.bench_function(format!("f32 packed {m}x{k}x{n}"), |bench| {
                bench.iter(|| f32_gemm::linear(&xs, m, &packed, &bs, Epilogue::None))
            });
        }
        if bf16_gemm::available() {
            let w16 = to_vec(&w.to_dtype(DType::BF16).expect("bf16"));
            let b16 = to_vec(&b.to_dtype(DType::BF16).expect("bf16"));
            let packed = bf16_gemm::Packed::new(&w16, n, k);
            group.bench_function(format!("bf16 packed {m}x{k}x{n}"), |bench| {
                bench.iter(|| bf16_gemm::linear_packed(&x16, m, &packed, &b16, Epilogue::None))
            });
        }
        for (name, bits, ggml) in [
            ("int8", quantized_gemm::Bits::Int8, GgmlDType::Q8_0),
            ("int4", quantized_gemm::Bits::Int4, GgmlDType::Q4_0),
        ] {
            if quantized_gemm::available() {
                let packed = quantized_gemm::Packed::new(&ws, n, k, bits);
                group.bench_function(format!("{name} {m}x{k}x{n}"), |bench| {
                    bench.iter(|| quantized_gemm::linear(&x16, m, &packed, &bs, Epilogue::None))
                });
            }
            // candle's quantized matmul (f32 activations), which the linear layers fall back to where the
            // kernel does not run.
            let qmatmul = QMatMul::from_qtensor(QTensor::quantize(&w, ggml).expect("quantize"))
                .expect("qmatmul");
            group.bench_function(format!("candle {ggml:?} {m}x{k}x{n}"), |bench| {
                bench.iter(|| qmatmul.forward(&x).expect("forward"))
            });
        }
    }
    group.finish();
}

fn to_vec(t: &Tensor) -> Vec<half::bf16> {
    t.flatten_all().and_then(|t| t.to_vec1()).expect("values")
}

/// Independent accumulators per thread in [`unit_peak`]: more than the instruction's latency times the
/// units that run it, so that the loop measures throughput.
#[cfg(target_arch = "x86_64")]
const PEAK_CHAINS: usize = 16;

/// Loop trips per thread and measured call in [`unit_peak`].
#[cfg(target_arch = "x86_64")]
const PEAK_TRIPS: usize = 100_000;

/// The rate of the multiply-add instructions the linear kernels are built on, with nothing else in the
/// loop, on every thread of rayon's pool at once: `vfmadd231ps` (f32, 32 FLOP a 512-bit instruction),
/// `vdpbf16ps` (bf16 pairs, 64) and `vpdpbusd` (u8 x i8 quads, 128 integer operations). Criterion's
/// throughput line is the machine's ceiling for each kernel in G(FL)OP/s.
#[cfg(target_arch = "x86_64")]
fn unit_peak(c: &mut Criterion) {
    use std::arch::x86_64::*;

    // SAFETY (the three): called only where `is_x86_feature_detected!` found the features.
    #[target_feature(enable = "avx512f")]
    unsafe fn fma_f32() -> f32 {
        let (a, b) = (_mm512_set1_ps(1e-3), _mm512_set1_ps(1e-3));
        let mut acc: [__m512; PEAK_CHAINS] = std::array::from_fn(|i| _mm512_set1_ps(i as f32));
        for _ in 0..PEAK_TRIPS {
            for acc in &mut acc {
                *acc = _mm512_fmadd_ps(a, b, *acc);
            }
        }
        acc.iter().map(|&v| _mm512_reduce_add_ps(v)).sum()
    }
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn dot_bf16() -> f32 {
        // 32 bf16 ones.
        let pairs = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi16(0x3F80));
        let mut acc: [__m512; PEAK_CHAINS] = std::array::from_fn(|i| _mm512_set1_ps(i as f32));
        for _ in 0..PEAK_TRIPS {
            for acc in &mut acc {
                *acc = _mm512_dpbf16_ps(*acc, pairs, pairs);
            }
        }
        acc.iter().map(|&v| _mm512_reduce_add_ps(v)).sum()
    }
    #[target_feature(enable = "avx512f,avx512vnni")]
    unsafe fn dot_int8() -> i32 {
        let quads = _mm512_set1_epi8(1);
        let mut acc: [__m512i; PEAK_CHAINS] = std::array::from_fn(|i| _mm512_set1_epi32(i as i32));
        for _ in 0..PEAK_TRIPS {
            for acc in &mut acc {
                *acc = _mm512_dpbusd_epi32(*acc, quads, quads);
            }
        }
        acc.iter().map(|&v| _mm512_reduce_add_epi32(v)).sum()
    }

    let threads = rayon::current_num_threads();
    let mut group = c.benchmark_group("unit peak");
    group.sample_size(10);
    // (name, whether the CPU has it, operations an instruction, the loop on one thread)
    type Unit = (&'static str, fn() -> bool, u64, fn() -> f64);
    let units: [Unit; 3] = [
        (
            "f32 vfmadd231ps",
            || is_x86_feature_detected!("avx512f"),
            32,
            || unsafe { fma_f32() } as f64,
        ),
        (
            "bf16 vdpbf16ps",
            || is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16"),
            64,
            || unsafe { dot_bf16() } as f64,
        ),
        (
            "int8 vpdpbusd",
            || is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vnni"),
            128,
            || unsafe { dot_int8() } as f64,
        ),
    ];
    for (name, present, ops, run) in units {
        if !present() {
            eprintln!("unit peak: this CPU has no {name}, skipped");
            continue;
        }
        let per_call = ops * (PEAK_CHAINS * PEAK_TRIPS * threads) as u64;
        group.throughput(criterion::Throughput::Elements(per_call));
        group.bench_function(format!("{name} x{threads} threads"), |bench| {
            bench.iter(|| std::hint::black_box(rayon::broadcast(|_| run())))
        });
    }
    group.finish();
}

#[cfg(not(target_arch = "x86_64"))]
fn unit_peak(_: &mut Criterion) {}

/// The self-attention of one decode step at 1,000 cached positions (3 beams, 12 heads of 64): q against
/// keys and values read through the strides of a decoder cache's `[rows, heads, capacity, head_dim]` buffers.
fn decode_attention(c: &mut Criterion) {
    use florence2_rs::kernels::cpu::attention::fused_attention;
    let dev = Device::Cpu;
    let mut group = c.benchmark_group("decode attention");
    group.sample_size(20);
    for dtype in [DType::BF16, DType::F32] {
        let randn = |shape: (usize, usize, usize, usize)| {
            Tensor::randn(0f32, 1., shape, &dev)
                .and_then(|t| t.to_dtype(dtype))
                .expect("values")
        };
        let q = randn((3, 12, 1, 64));
        let [k, v] = [0, 1].map(|_| randn((3, 12, 1024, 64)).narrow(2, 0, 1000).expect("view"));
        group.bench_function(
            format!("{dtype:?} 3 beams x 12 heads, 1000 positions"),
            |b| b.iter(|| fused_attention(&q, &k, &v, 0.125, None).expect("attention")),
        );
    }
    group.finish();
}

criterion_group!(
    benches,
    depthwise,
    window_attention,
    decode_attention,
    bf16_gemm,
    linear_kernels,
    decode_step,
    unit_peak
);
criterion_main!(benches);
