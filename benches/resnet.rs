//! ResNet-18 on the CPU next to PyTorch: training steps (SGD momentum, cross-entropy) at batch
//! 8 x 224x224 and batch 32 x 32x32, and inference at batch 32 x 224x224, in samples/s, with
//! kiln's CPU kernels, with im2col in place of Winograd, with glibc's default malloc settings,
//! and (`burn_ops`) with Burn's own ops, A/B in each round (in turn: each mode runs first in
//! some rounds). When PyTorch and torchvision are
//! installed, benches/resnet_pytorch.py (2 threads) runs after each kiln round, alternating;
//! medians over rounds. Prints one JSON object with the ratios. The workloads are
//! `kiln_recipes::bench`'s, which `kiln bench resnet18` runs too (on GPUs as well).
//!
//! `cargo bench --bench resnet -- --rounds 2 --reps 3`; `--kiln-only`: kiln's default kernels
//! only, `--no-burn-ops`: no Burn-ops runs, `--only train_b8_224`: one workload,
//! `--device cuda:0` (a build with `--features cuda`): kiln's default only, PyTorch on the same
//! GPU.

mod common;

use kiln::multi::DeviceSpec;
use kiln::recipes::bench::{RESNET_WORKLOADS, ResNetBench};
use serde_json::{Value, json};

use common::{arg, median, median_field, run_pytorch_with, string_arg};

fn main() {
    let rounds = arg("--rounds", 2);
    let reps = arg("--reps", 3);
    let spec: DeviceSpec = string_arg("--device")
        .unwrap_or_else(|| "cpu".into())
        .parse()
        .unwrap_or_else(|e| panic!("--device: {e}"));
    let device = spec.device().unwrap_or_else(|e| panic!("{e}"));
    let mut bench = ResNetBench::new(&device);
    let device_arg = spec.to_string();
    // kiln's CPU kernels (the default: Winograd for stride-1 3x3 convolutions), the same with
    // im2col for every convolution, and Burn's own ops, A/B in each round; on a GPU all run
    // Burn's ops (the kernels are for Flex), so only the first is measured there.
    // `--kiln-only` skips the other two (for profiling the kernels' run alone), `--no-burn-ops`
    // the last.
    let kiln_only = std::env::args().any(|a| a == "--kiln-only");
    // `--only train_b8_224|train_b32_32|infer_b32_224`: one workload (for profiling).
    let only = string_arg("--only");
    let wanted = |name: &str| only.as_deref().is_none_or(|o| o == name);
    let no_burn_ops = std::env::args().any(|a| a == "--no-burn-ops");
    // (name, kiln's kernels, Winograd, large buffers kept by malloc, steps on the pool)
    let all_modes = [
        ("kiln", true, true, true, true),
        ("kiln_caller_thread", true, true, true, false),
        ("kiln_im2col", true, false, true, true),
        ("kiln_default_malloc", true, true, false, true),
        ("burn_ops", false, false, true, true),
    ];
    type Mode = (&'static str, bool, bool, bool, bool);
    let modes: &[Mode] = if spec.is_cuda() || kiln_only {
        &all_modes[..1]
    } else if no_burn_ops {
        &all_modes[..4]
    } else {
        &all_modes
    };
    let set_mode = |bench: &mut ResNetBench, &(_, kernels, winograd, keep, pool): &Mode| {
        kiln::kernels::set_enabled(kernels);
        kiln::kernels::winograd::set_enabled(winograd);
        kiln::kernels::malloc::keep_large_buffers(keep);
        bench.set_on_pool(pool);
    };
    let mut runs: Vec<[Vec<f64>; 3]> = modes.iter().map(|_| Default::default()).collect();
    let mut pytorch: Vec<Value> = Vec::new();
    for mode in modes {
        set_mode(&mut bench, mode);
        // Warm-up (of the workloads measured, so that a profile of one sees only it).
        for workload in RESNET_WORKLOADS
            .iter()
            .filter(|w| w.train && wanted(w.name))
        {
            let _ = bench.run(workload);
        }
    }
    for round in 0..rounds {
        // The modes take turns at running first after PyTorch's round: the first one measured
        // fastest in every run while the order was fixed.
        let mut order: Vec<usize> = (0..modes.len()).collect();
        order.rotate_left(round % modes.len());
        for i in order {
            let (mode, times) = (&modes[i], &mut runs[i]);
            set_mode(&mut bench, mode);
            for _ in 0..reps {
                for (workload, figures) in RESNET_WORKLOADS.iter().zip(times.iter_mut()) {
                    if wanted(workload.name) {
                        figures.push(bench.run(workload));
                    }
                }
            }
        }
        set_mode(&mut bench, &modes[0]);
        eprintln!("round {}/{rounds}: kiln done", round + 1);
        if let Some(p) = run_pytorch_with(
            "resnet_pytorch.py",
            &["--reps", &reps.to_string(), "--device", &device_arg],
        ) {
            pytorch.push(p);
        }
    }
    let med = |v: Vec<f64>| (!v.is_empty()).then(|| median(v));
    let summary = |[t8, t32, i32_]: [Vec<f64>; 3]| {
        json!({
            "train_b8_224": med(t8),
            "train_b32_32": med(t32),
            "infer_b32_224": med(i32_),
        })
    };
    let mut runs = modes
        .iter()
        .zip(runs)
        .map(|(&(name, ..), times)| (name, summary(times)));
    let kiln = runs.next().expect("the kernels' run").1;
    let others: serde_json::Map<String, Value> = runs.map(|(n, v)| (n.to_string(), v)).collect();
    let pt = |key: &str| median_field(&pytorch, key);
    let keys = ["train_b8_224", "train_b32_32", "infer_b32_224"];
    let torch: serde_json::Map<String, Value> = keys
        .iter()
        .filter_map(|k| pt(k).map(|v| (k.to_string(), json!(v))))
        .collect();
    let ratios: serde_json::Map<String, Value> = keys
        .iter()
        .filter_map(|k| {
            let ours = kiln[*k].as_f64()?;
            pt(k).map(|theirs| (k.to_string(), json!(ours / theirs)))
        })
        .collect();
    println!(
        "{}",
        json!({
            "unit": "samples/s",
            "machine": common::machine(),
            "device": device_arg,
            "rounds": rounds,
            "reps_per_round": reps,
            "kiln": kiln,
            "kiln_caller_thread": others.get("kiln_caller_thread"),
            "kiln_im2col": others.get("kiln_im2col"),
            "kiln_default_malloc": others.get("kiln_default_malloc"),
            "burn_ops": others.get("burn_ops"),
            "pytorch": (!torch.is_empty()).then_some(torch),
            "kiln_over_pytorch": (!ratios.is_empty()).then_some(ratios),
        })
    );
}
