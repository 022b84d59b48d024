//! Which x86 instruction sets kiln's kernels run with, chosen once per process at run time.
//!
//! [`active`] is the widest level this CPU supports ([`detected`]), capped by the environment
//! variable `KILN_ISA` (`avx512`, `avx2` or `scalar`) or by [`set_cap`]; every kernel with a
//! SIMD version dispatches on it, so one binary runs on any x86-64 CPU and an AVX-512 machine
//! can still be measured on its AVX2 path. The float GEMM underneath convolutions and matmuls
//! is the `gemm` crate's, which picks its own kernels: AVX-512 ones only when kiln is built
//! with the `avx512` feature (the default), so `--no-default-features` together with
//! `KILN_ISA=avx2` is the whole AVX2 path. [`IsaReport`] records all of it for benchmarks.

use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};

/// An instruction-set level of kiln's kernels, narrowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Plain Rust (auto-vectorised for the baseline x86-64 target, SSE2).
    Scalar,
    /// AVX2 and FMA (x86-64-v3).
    Avx2,
    /// AVX-512 F, BW, DQ and VL (x86-64-v4).
    Avx512,
}

impl Isa {
    /// The name `KILN_ISA` takes and reports print.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// Parses a `KILN_ISA` value.
    ///
    /// # Errors
    /// A message listing the accepted values when `value` is none of them.
    pub fn parse(value: &str) -> Result<Isa, String> {
        match value.trim().to_ascii_lowercase().as_str() {
            "scalar" => Ok(Isa::Scalar),
            "avx2" => Ok(Isa::Avx2),
            "avx512" => Ok(Isa::Avx512),
            other => Err(format!(
                "KILN_ISA={other:?} is not an instruction set kiln knows: use avx512, avx2 or scalar"
            )),
        }
    }

    fn code(self) -> u8 {
        self as u8 + 1
    }

    fn from_code(code: u8) -> Option<Isa> {
        [Isa::Scalar, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .find(|isa| isa.code() == code)
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The widest level this CPU supports.
pub fn detected() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512vl")
        {
            return Isa::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Isa::Avx2;
        }
    }
    Isa::Scalar
}

/// 0: not decided yet; else [`Isa::code`] of the active level.
static ACTIVE: AtomicU8 = AtomicU8::new(0);

/// The cap `KILN_ISA` asks for: `Ok(None)` when it is unset.
///
/// # Errors
/// The message of [`Isa::parse`] for a value it does not accept (the `kiln` binary stops on
/// it; the kernels ignore such a value).
pub fn env_cap() -> Result<Option<Isa>, String> {
    match std::env::var("KILN_ISA") {
        Ok(v) => Isa::parse(&v).map(Some),
        Err(_) => Ok(None),
    }
}

/// The level kiln's kernels run with: [`detected`] capped by `KILN_ISA` or [`set_cap`].
pub fn active() -> Isa {
    if let Some(isa) = Isa::from_code(ACTIVE.load(Ordering::Relaxed)) {
        return isa;
    }
    let cap = env_cap().ok().flatten();
    let isa = cap.map_or(detected(), |cap| cap.min(detected()));
    ACTIVE.store(isa.code(), Ordering::Relaxed);
    isa
}

/// Caps the level for the whole process from now on (`None`: what the CPU supports), and
/// returns the level that results. A cap above what the CPU supports gives the CPU's level.
pub fn set_cap(cap: Option<Isa>) -> Isa {
    let isa = cap.map_or(detected(), |cap| cap.min(detected()));
    ACTIVE.store(isa.code(), Ordering::Relaxed);
    isa
}

/// Runs `f` compiled for the vectors `isa` allows: `f` is inlined into a function with the
/// level's target features, so the plain loops in it are vectorised at that width (16 lanes on
/// AVX-512, 8 on AVX2, 4 on the SSE2 baseline). `f` must be `#[inline(always)] || ...` (and so
/// must any closure it calls in its loops): a closure the inliner leaves out of line is
/// compiled for the baseline, whatever its caller's features. For loops whose results do not
/// depend on the width (element-wise maps, or sums in fixed lanes); a loop that must give the
/// same bits on every level needs that by construction.
#[inline(always)]
pub fn vectorized<R>(isa: Isa, f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
        fn avx512<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "avx2,fma")]
        fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        // SAFETY: `isa` is `active()` or a level the callers checked against `detected()`,
        // never more than the CPU has.
        match isa.min(detected()) {
            Isa::Avx512 => return unsafe { avx512(f) },
            Isa::Avx2 => return unsafe { avx2(f) },
            Isa::Scalar => {}
        }
    }
    f()
}

/// What a benchmark records about the machine and the code paths its figures came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IsaReport {
    /// `model name` from /proc/cpuinfo (`unknown` elsewhere).
    pub cpu_model: String,
    /// The SIMD extensions the CPU reports that matter to kiln (avx2, fma, avx512f, ...).
    pub cpu_features: Vec<&'static str>,
    /// The level kiln's own kernels ran with ([`active`]).
    pub kernels: Isa,
    /// The level of the `gemm` crate's float kernels (`avx512` only in an `avx512` build).
    pub gemm: Isa,
}

impl IsaReport {
    /// The report for this process, now.
    pub fn current() -> IsaReport {
        let gemm = if cfg!(feature = "avx512") {
            detected()
        } else {
            detected().min(Isa::Avx2)
        };
        IsaReport {
            cpu_model: cpu_model(),
            cpu_features: cpu_features(),
            kernels: active(),
            gemm,
        }
    }
}

/// The CPU's model name from /proc/cpuinfo, or `unknown`.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The SIMD extensions relevant to kiln that this CPU has.
pub fn cpu_features() -> Vec<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! present {
            ($($f:tt),*) => {{
                let mut v = Vec::new();
                $(if std::arch::is_x86_feature_detected!($f) { v.push($f); })*
                v
            }};
        }
        present!(
            "sse4.1",
            "avx",
            "avx2",
            "fma",
            "avx512f",
            "avx512bw",
            "avx512dq",
            "avx512vl",
            "avx512vnni",
            "avxvnni",
            "avx512bf16"
        )
    }
    #[cfg(not(target_arch = "x86_64"))]
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_and_order() {
        assert_eq!(Isa::parse("AVX2"), Ok(Isa::Avx2));
        assert_eq!(Isa::parse(" scalar "), Ok(Isa::Scalar));
        assert!(
            Isa::parse("sse")
                .unwrap_err()
                .contains("avx512, avx2 or scalar")
        );
        assert!(Isa::Scalar < Isa::Avx2 && Isa::Avx2 < Isa::Avx512);
        for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512] {
            assert_eq!(Isa::from_code(isa.code()), Some(isa));
            assert_eq!(Isa::parse(isa.name()), Ok(isa));
        }
    }

    #[test]
    fn a_cap_never_exceeds_the_cpu() {
        assert!(set_cap(Some(Isa::Avx512)) <= detected());
        assert_eq!(set_cap(Some(Isa::Scalar)), Isa::Scalar);
        assert_eq!(active(), Isa::Scalar);
        assert_eq!(set_cap(None), detected());
    }
}
