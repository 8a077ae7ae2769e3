//! Which SIMD instructions the CPU kernels may use, decided once per process, and [`wide_fn!`], the one
//! way a kernel is compiled for the widest of them.
//!
//! The default build targets baseline x86-64 (SSE2), so a plain loop vectorizes 4 floats wide. A kernel
//! written as portable Rust (`#[inline(always)]`, helpers too) and wrapped by [`wide_fn!`] is also compiled
//! inside functions that enable AVX2 + FMA and AVX-512, and the entry point calls the widest this CPU runs.
//! The results do not depend on the width: each lane computes its own values in the same order. Kernels
//! written with intrinsics check [`has_avx2_fma`] / [`has_avx512`] / [`has_avx512_bf16`] /
//! [`has_avx512_vnni`] / [`has_dotprod`] / [`has_i8mm`] themselves; no other code of ours detects CPU
//! features. (The gemm crate, which the GEMM glue and candle's matmul call, picks its own kernels for the
//! CPU.)

/// The kernel families of our CPU code, narrowest first within an architecture (x86-64: scalar, avx2,
/// avx512; aarch64: scalar, dotprod, i8mm). Every kernel with a wide version asks [`cpu_tier`] (through
/// [`has_avx2_fma`], [`has_avx512`], [`has_avx512_bf16`], [`has_avx512_vnni`], [`has_dotprod`],
/// [`has_i8mm`]); no other code detects CPU features.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum CpuTier {
    /// The target's baseline: SSE2 on x86-64, NEON on aarch64 (whose packed f32 and bf16 kernels run at every
    /// tier).
    Scalar,
    /// AVX2 and FMA (x86-64).
    Avx2,
    /// AVX-512 F, BW and VL, with AVX2 and FMA (x86-64).
    Avx512,
    /// NEON's byte dot products, `sdot`: little-endian aarch64 CPUs with the DotProd extension (optional from
    /// Armv8.2, required from Armv8.4: Cortex-A55/A75 and later, Neoverse N1 and later, Apple silicon; not
    /// Cortex-A53/A72).
    Dotprod,
    /// NEON's byte matrix products, `usmmla`, as well as `sdot`: CPUs with the Int8 matrix multiply extension
    /// too (optional from Armv8.2, required from Armv8.6: Cortex-A510/A710 and later, Neoverse N2/V1 and
    /// later, Graviton 3 and later, Apple M2 and later; not Neoverse N1, Graviton 2 or Apple M1).
    I8mm,
}

/// The environment variable that lowers the tier below the CPU's (x86-64: `scalar`, `avx2` or `avx512`;
/// aarch64: `scalar`, `dotprod` or `i8mm`; empty or unset: the CPU's). It is read once, at the first kernel call, so
/// that every kernel of a process runs at the same tier.
pub const CPU_TIER_VAR: &str = "FLORENCE2_CPU_TIER";

impl CpuTier {
    /// The tiers of this architecture, narrowest first, with their names.
    #[cfg(target_arch = "x86_64")]
    const ALL: &[(CpuTier, &str)] = &[
        (CpuTier::Scalar, "scalar"),
        (CpuTier::Avx2, "avx2"),
        (CpuTier::Avx512, "avx512"),
    ];
    #[cfg(target_arch = "aarch64")]
    const ALL: &[(CpuTier, &str)] = &[
        (CpuTier::Scalar, "scalar"),
        (CpuTier::Dotprod, "dotprod"),
        (CpuTier::I8mm, "i8mm"),
    ];
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    const ALL: &[(CpuTier, &str)] = &[(CpuTier::Scalar, "scalar")];

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
        #[cfg(target_arch = "aarch64")]
        {
            use std::arch::is_aarch64_feature_detected as has;
            // The kernels read bytes of activations as 32- and 64-bit values: little-endian only.
            match (
                cfg!(target_endian = "little"),
                has!("dotprod"),
                has!("i8mm"),
            ) {
                (true, true, true) => CpuTier::I8mm,
                (true, true, false) => CpuTier::Dotprod,
                _ => CpuTier::Scalar,
            }
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
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
        let names = Self::ALL
            .iter()
            .map(|(_, name)| *name)
            .collect::<Vec<_>>()
            .join(", ");
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
    cfg!(target_arch = "x86_64") && cpu_tier() >= CpuTier::Avx2
}

/// Whether the kernels may use AVX-512 (F, BW, VL) as well as AVX2 and FMA (always false off x86-64).
pub fn has_avx512() -> bool {
    cfg!(target_arch = "x86_64") && cpu_tier() >= CpuTier::Avx512
}

/// Whether the kernels may use NEON's `sdot` ([`super::quantized_gemm`]; always false off aarch64).
pub fn has_dotprod() -> bool {
    matches!(cpu_tier(), CpuTier::Dotprod | CpuTier::I8mm)
}

/// Whether the kernels may use NEON's `usmmla` ([`super::quantized_gemm`]; always false off aarch64).
pub fn has_i8mm() -> bool {
    cpu_tier() == CpuTier::I8mm
}

/// Whether the kernels may use AVX512-BF16 ([`super::bf16_gemm`]): the AVX-512 tier on a CPU that has it.
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

/// Whether the kernels may use AVX512-VNNI ([`super::quantized_gemm`]): the AVX-512 tier on a CPU that has
/// it.
pub fn has_avx512_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        has_avx512() && is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `$vis fn $name[generics](args) -> ret` that calls `$kernel(args)` (an `#[inline(always)]` function)
/// compiled for AVX-512, else AVX2 + FMA, else the baseline, as [`cpu_tier`] allows. Generics go in square
/// brackets (`fn map[S: Copy, D](...)`). The kernel is named rather than passed as a closure because LLVM
/// inlines a closure's body into the closure first and may then find it too big to inline into the wide
/// function, which leaves the loop compiled for the baseline.
macro_rules! wide_fn {
    ($(#[$meta:meta])* $vis:vis fn $name:ident $([$($gen:tt)*])?
        ($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? = $kernel:path;) => {
        $(#[$meta])*
        $vis fn $name<$($($gen)*)?>($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                /// # Safety
                /// The CPU has AVX-512 F, BW and VL, AVX2 and FMA.
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
                unsafe fn avx512<$($($gen)*)?>($($arg: $ty),*) $(-> $ret)? {
                    $kernel($($arg),*)
                }
                /// # Safety
                /// The CPU has AVX2 and FMA.
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2<$($($gen)*)?>($($arg: $ty),*) $(-> $ret)? {
                    $kernel($($arg),*)
                }
                if $crate::kernels::cpu::features::has_avx512() {
                    // SAFETY: the CPU has the features `avx512` is compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if $crate::kernels::cpu::features::has_avx2_fma() {
                    // SAFETY: the CPU has the features `avx2` is compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $kernel($($arg),*)
        }
    };
}
pub(crate) use wide_fn;

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_arch = "x86_64")]
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

    #[cfg(target_arch = "aarch64")]
    #[test]
    fn cpu_tier_is_the_cpus_or_a_lower_one_named() {
        use CpuTier::*;
        assert_eq!(CpuTier::choose(Dotprod, None), Ok(Dotprod));
        assert_eq!(CpuTier::choose(Dotprod, Some("scalar")), Ok(Scalar));
        assert_eq!(CpuTier::choose(I8mm, Some("dotprod")), Ok(Dotprod));
        let above = CpuTier::choose(Scalar, Some("dotprod")).unwrap_err();
        assert!(above.contains("at most \"scalar\""), "{above}");
        let above = CpuTier::choose(Dotprod, Some("i8mm")).unwrap_err();
        assert!(above.contains("at most \"dotprod\""), "{above}");
        let other = CpuTier::choose(I8mm, Some("avx2")).unwrap_err();
        assert!(
            other.contains("expected one of scalar, dotprod, i8mm"),
            "{other}"
        );
    }
}
