//! Integer GEMM throughput next to the machine's peak: how many `u8 x i8` multiply-adds per
//! second `kiln_kernels::int8` reaches on the shapes kiln's int8 models run, and how many the
//! CPU's instruction can do at most (a loop of independent `vpdpbusd`s on registers, or the
//! AVX2 `vpmaddubsw` + `vpmaddwd` + `vpaddd` triple, no memory traffic), on one thread and on
//! every thread at once. Medians over rounds; one JSON object with the machine.
//!
//! `cargo bench --bench int8_gemm -- --rounds 5`

mod common;

use std::time::Instant;

use kiln::kernels::int8::{Int8Kernel, PackedWeights, gemm_u8i8, gemm_u8i8_rows};
use serde_json::json;

use common::{arg, median};

/// Multiply-adds per second one thread's `kernel` instruction stream reaches at most.
fn peak_one_thread(kernel: Int8Kernel) -> Option<f64> {
    const STEPS: u64 = 20_000_000;
    let start = Instant::now();
    // SAFETY: each runs only when the CPU reports its features.
    let macs = match kernel {
        #[cfg(target_arch = "x86_64")]
        Int8Kernel::Avx512Vnni => unsafe { peak::avx512_vnni(STEPS) },
        #[cfg(target_arch = "x86_64")]
        Int8Kernel::AvxVnni => unsafe { peak::avx_vnni(STEPS) },
        #[cfg(target_arch = "x86_64")]
        Int8Kernel::Avx2 => unsafe { peak::avx2(STEPS) },
        _ => return None,
    };
    Some(macs as f64 / start.elapsed().as_secs_f64())
}

#[cfg(target_arch = "x86_64")]
mod peak {
    //! Sixteen independent accumulators (more than latency x throughput), so the loop runs
    //! at the instruction's throughput; the result is kept alive through `black_box`.
    use std::arch::x86_64::*;
    use std::hint::black_box;

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn avx512_vnni(steps: u64) -> u64 {
        let (a, b) = (
            black_box(_mm512_set1_epi8(3)),
            black_box(_mm512_set1_epi8(-2)),
        );
        let mut acc = [_mm512_setzero_si512(); 16];
        for _ in 0..steps {
            for v in acc.iter_mut() {
                *v = _mm512_dpbusd_epi32(*v, a, b);
            }
        }
        black_box(acc);
        steps * 16 * 64
    }

    #[target_feature(enable = "avx2,avxvnni")]
    pub(super) unsafe fn avx_vnni(steps: u64) -> u64 {
        let (a, b) = (
            black_box(_mm256_set1_epi8(3)),
            black_box(_mm256_set1_epi8(-2)),
        );
        let mut acc = [_mm256_setzero_si256(); 16];
        for _ in 0..steps {
            for v in acc.iter_mut() {
                *v = _mm256_dpbusd_avx_epi32(*v, a, b);
            }
        }
        black_box(acc);
        steps * 16 * 32
    }

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn avx2(steps: u64) -> u64 {
        let (a, b) = (
            black_box(_mm256_set1_epi8(3)),
            black_box(_mm256_set1_epi8(-2)),
        );
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_si256(); 12];
        for _ in 0..steps {
            for v in acc.iter_mut() {
                let pairs = _mm256_maddubs_epi16(a, b);
                *v = _mm256_add_epi32(*v, _mm256_madd_epi16(pairs, ones));
            }
        }
        black_box(acc);
        steps * 12 * 32
    }
}

/// Deterministic bytes in `lo..=hi` (a linear congruential generator).
fn bytes(len: usize, seed: u32, lo: i32, hi: i32) -> Vec<i32> {
    let mut s = seed;
    (0..len)
        .map(|_| {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            lo + ((s >> 8) % (hi - lo + 1) as u32) as i32
        })
        .collect()
}

/// Multiply-adds per second of `C (m x n) = A (m x k) W^T` with the active kernel: on this
/// thread (`gemm_u8i8_rows`) and over the thread pool (`gemm_u8i8`, blocks of rows).
fn gemm_rate(m: usize, n: usize, k: usize, reps: usize) -> (f64, f64) {
    let w: Vec<i8> = bytes(n * k, 7, -128, 127)
        .into_iter()
        .map(|v| v as i8)
        .collect();
    let w = PackedWeights::new(&w, n, k);
    let a: Vec<u8> = bytes(m * w.k_padded(), 3, 0, 127)
        .into_iter()
        .map(|v| v as u8)
        .collect();
    let macs = (m * n * k) as f64;
    let mut c = Vec::new();
    let mut out = vec![0i32; m];
    let mut one = Vec::new();
    let mut all = Vec::new();
    for _ in 0..reps {
        let start = Instant::now();
        gemm_u8i8_rows(&a, m, &w, &mut c);
        one.push(macs / start.elapsed().as_secs_f64());
        let start = Instant::now();
        gemm_u8i8(&a, m, &w, &mut out, 1, |c, out| out[0] = c[0]);
        all.push(macs / start.elapsed().as_secs_f64());
    }
    std::hint::black_box((&c, &out));
    (median(one), median(all))
}

fn main() {
    let rounds = arg("--rounds", 5);
    let kernel = Int8Kernel::active();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut one_peak = Vec::new();
    let mut all_peak = Vec::new();
    for _ in 0..rounds {
        one_peak.extend(peak_one_thread(kernel));
        let per_thread: Vec<Option<f64>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|_| s.spawn(move || peak_one_thread(kernel)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().ok().flatten())
                .collect()
        });
        if per_thread.iter().all(Option::is_some) {
            all_peak.push(per_thread.into_iter().flatten().sum::<f64>());
        }
    }
    let peak_one = (!one_peak.is_empty()).then(|| median(one_peak));
    let peak_all = (!all_peak.is_empty()).then(|| median(all_peak));
    // (name, m, n, k): SimpleCNN's layers at batch 256 (conv2 per image, as it runs), a
    // ResNet-18 layer1 convolution of one 224 image, and a large square.
    let shapes = [
        ("simple_cnn conv1 (one image)", 784, 32, 9),
        ("simple_cnn conv2 (one image)", 196, 64, 288),
        ("simple_cnn fc1 (batch 256)", 256, 128, 3136),
        ("resnet18 layer1 3x3 (one 224 image)", 3136, 64, 576),
        ("resnet18 layer4 3x3 (one 224 image)", 49, 512, 4608),
        ("resnet18 layer3 3x3 (one 224 image)", 196, 256, 2304),
        ("square 1024", 1024, 1024, 1024),
    ];
    let rows: Vec<_> = shapes
        .iter()
        .map(|&(name, m, n, k)| {
            let reps = (2e9 / (m * n * k) as f64).clamp(5.0, 2000.0) as usize;
            let mut one = Vec::new();
            let mut all = Vec::new();
            for _ in 0..rounds {
                let (o, a) = gemm_rate(m, n, k, reps);
                one.push(o);
                all.push(a);
            }
            let (one, all) = (median(one), median(all));
            json!({
                "shape": name, "m": m, "n": n, "k": k,
                "gmacs_one_thread": one / 1e9,
                "gmacs_all_threads": all / 1e9,
                "of_peak_one_thread": peak_one.map(|p| one / p),
                "of_peak_all_threads": peak_all.map(|p| all / p),
            })
        })
        .collect();
    println!(
        "{}",
        json!({
            "machine": common::machine(),
            "kernel": kernel.name(),
            "rounds": rounds,
            "peak_gmacs_one_thread": peak_one.map(|p| p / 1e9),
            "peak_gmacs_all_threads": peak_all.map(|p| p / 1e9),
            "gemm": rows,
        })
    );
}
