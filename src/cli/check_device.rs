//! `kiln check-device`: runs kiln's models on a device and on a reference path with the same
//! weights and inputs, and compares logits and every parameter gradient.
//!
//! - `--device cuda:N` / `wgpu:N`: Burn's CUDA / wgpu backend against the CPU (Flex, kiln's
//!   kernels);
//! - `--device cpu`: kiln's CPU kernels (convolutions, Winograd, max-pool, batch norm) against
//!   Burn's own ops.
//!
//! Each tensor's difference is measured at its scale: the largest |device - reference| over
//! max(1, rms(reference)), absolute for tensors of values up to about 1 (the kernels' tests use
//! the same measure). Weights and inputs come from a fixed seed: two implementations that sum in
//! different orders can break a max-pool near-tie differently and send a gradient to another
//! input (with random draws, 1 run in 6 did so here, by 0.05), so each run checks the same
//! case.

use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use clap::Args;
use kiln::models::{ResNet, ResNetDepth, SimpleCnnConfig};
use kiln_multi::DeviceSpec;
use serde_json::{Map, json};

/// Flags of `kiln check-device`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  kiln check-device                         # kiln's CPU kernels against Burn's ops
  kiln check-device --device cuda:0 --json  # the GPU against the CPU (a build with --features cuda)

Checks: SimpleCNN (batch 64 of 28x28, cross-entropy: logits and every gradient), ResNet-18
training step (batch 4 of 64x64, batch norm in training mode: logits and every gradient) and
ResNet-18 inference (eval mode). Exits non-zero when a difference is above --tolerance.")]
pub struct CheckDeviceArgs {
    /// cpu (kiln's kernels against Burn's ops), or cuda:N / wgpu:N (that device against the
    /// CPU).
    #[arg(long, value_name = "DEVICE", default_value = "cpu")]
    device: DeviceSpec,
    /// Largest accepted difference, relative to max(1, rms) of each reference tensor.
    #[arg(long, value_name = "X", default_value_t = 1e-4)]
    tolerance: f32,
}

/// The seed of the checks' random weights and inputs.
const SEED: u64 = 2024;

/// Logits and gradients of one run, each tensor with its name.
type Tensors = Vec<(String, Vec<f32>)>;

/// Runs the checks, prints the differences, and fails when one is above the tolerance.
pub fn run(args: &CheckDeviceArgs, json_output: bool) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.tolerance.is_finite() && args.tolerance >= 0.0,
        "--tolerance must be a non-negative number, got {}",
        args.tolerance
    );
    let device = args.device.device()?;
    let cpu = Device::flex();
    let on_cpu = args.device.is_cpu();
    let (candidate_name, reference_name) = match args.device {
        DeviceSpec::Cpu => ("kiln's kernels", "the CPU with Burn's ops"),
        DeviceSpec::Cuda(_) => ("Burn's CUDA backend", "the CPU with kiln's kernels"),
        DeviceSpec::Wgpu(_) | DeviceSpec::WgpuShared(_) => {
            ("Burn's wgpu backend", "the CPU with kiln's kernels")
        }
    };
    // The reference runs first; on the CPU with kiln's kernels switched off.
    let with_reference = |f: &dyn Fn(&Device) -> anyhow::Result<Tensors>| {
        let kernels = kiln::kernels::enabled();
        kiln::kernels::set_enabled(!on_cpu && kernels);
        let reference = f(&cpu);
        kiln::kernels::set_enabled(kernels);
        Ok::<_, anyhow::Error>((reference?, f(&device)?))
    };

    // The same weights and inputs on every run: the differences come from summation order,
    // and through max-pool a near-tie can send a gradient to another input, so a run that
    // passes keeps passing.
    cpu.seed(SEED);
    let images = Tensor::<4>::random([64, 1, 28, 28], Distribution::Default, &cpu).into_data();
    let labels: Vec<i64> = (0..64).map(|i| (i * 7) % 10).collect();
    let simple = SimpleCnnConfig::new().init(&cpu.clone().autodiff(), 7);
    let simple_cnn = with_reference(&|d| train_pass(&simple, d, &images, &labels))?;

    let resnet = ResNet::new(ResNetDepth::R18, 10, &cpu.clone().autodiff());
    let images = Tensor::<4>::random([4, 3, 64, 64], Distribution::Default, &cpu).into_data();
    let labels: Vec<i64> = vec![1, 7, 3, 9];
    let resnet_train = with_reference(&|d| train_pass(&resnet, d, &images, &labels))?;
    let resnet_eval = with_reference(&|d| {
        let model = resnet.valid().fork(d);
        let logits = model.forward(Tensor::from_data(images.clone(), d));
        Ok(vec![("logits".into(), values(logits)?)])
    })?;

    let mut checks = Map::new();
    let mut worst_overall = 0.0f32;
    let mut lines = Vec::new();
    for (name, (reference, candidate)) in [
        ("simple_cnn_train", simple_cnn),
        ("resnet18_train", resnet_train),
        ("resnet18_eval", resnet_eval),
    ] {
        let (worst, tensor) = compare(&reference, &candidate)?;
        worst_overall = worst_overall.max(worst);
        lines.push(format!(
            "  {name:<17} largest difference {worst:.3e} ({tensor}) over {} tensors",
            reference.len()
        ));
        checks.insert(
            name.into(),
            json!({ "max_diff": worst, "worst_tensor": tensor, "tensors": reference.len() }),
        );
    }
    let passed = worst_overall <= args.tolerance;
    if json_output {
        println!(
            "{}",
            json!({
                "device": args.device.to_string(),
                "candidate": candidate_name,
                "reference": reference_name,
                "tolerance": args.tolerance,
                "checks": checks,
                "passed": passed,
            })
        );
    } else {
        println!(
            "{} ({candidate_name}) against {reference_name}, tolerance {:e}:",
            args.device, args.tolerance
        );
        for line in lines {
            println!("{line}");
        }
    }
    anyhow::ensure!(
        passed,
        "{} ({candidate_name}) differs from {reference_name} by {worst_overall:e}, above the tolerance {:e}",
        args.device,
        args.tolerance
    );
    Ok(())
}

/// Logits and every parameter gradient of one cross-entropy training pass of `model` (a copy
/// on `device`, its autodiff twin) on `images`.
fn train_pass<M>(
    model: &M,
    device: &Device,
    images: &TensorData,
    labels: &[i64],
) -> anyhow::Result<Tensors>
where
    M: Module + Forward,
{
    let device = device.clone().autodiff();
    let model = model.clone().fork(&device);
    let x = Tensor::<4>::from_data(images.clone(), &device);
    let y = Tensor::<1, Int>::from_data(TensorData::new(labels.to_vec(), [labels.len()]), &device);
    let logits = model.logits(x);
    let loss = CrossEntropyLossConfig::new()
        .init(&device)
        .forward(logits.clone(), y);
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let mut out = vec![("logits".to_string(), values(logits)?)];
    out.extend(named_grads(&model, &grads)?);
    Ok(out)
}

/// The models the checks train.
trait Forward {
    fn logits(&self, images: Tensor<4>) -> Tensor<2>;
}

impl Forward for kiln::models::SimpleCnn {
    fn logits(&self, images: Tensor<4>) -> Tensor<2> {
        self.forward(images)
    }
}

impl Forward for ResNet {
    fn logits(&self, images: Tensor<4>) -> Tensor<2> {
        self.forward(images)
    }
}

fn values<const D: usize>(t: Tensor<D>) -> anyhow::Result<Vec<f32>> {
    t.into_data()
        .try_into_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("reading a tensor back: {e:?}"))
}

/// Every parameter gradient of `model` in `grads`, named by its module path, in visiting order.
fn named_grads<M: Module>(model: &M, grads: &GradientsParams) -> anyhow::Result<Tensors> {
    struct Collect<'a> {
        grads: &'a GradientsParams,
        path: Vec<String>,
        out: Vec<(String, Tensor<1>)>,
    }
    impl ModuleVisitor for Collect<'_> {
        fn enter_module(&mut self, name: &str, _container: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                self.out.push((
                    format!("{} (gradient)", self.path.join(".")),
                    g.flatten(0, D - 1),
                ));
            }
        }
    }
    let mut collect = Collect {
        grads,
        path: Vec::new(),
        out: Vec::new(),
    };
    model.visit(&mut collect);
    collect
        .out
        .into_iter()
        .map(|(name, t)| Ok((name, values(t)?)))
        .collect()
}

/// The largest scale-relative difference between matching tensors, and that tensor's name.
fn compare(reference: &Tensors, candidate: &Tensors) -> anyhow::Result<(f32, String)> {
    anyhow::ensure!(
        reference.len() == candidate.len(),
        "the device produced {} tensors, the reference {}",
        candidate.len(),
        reference.len()
    );
    let mut worst = (0.0f32, String::from("none"));
    for ((name, r), (_, c)) in reference.iter().zip(candidate) {
        anyhow::ensure!(
            r.len() == c.len(),
            "{name}: {} values on the device, {} in the reference",
            c.len(),
            r.len()
        );
        let rms = (r.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / r.len().max(1) as f64)
            .sqrt() as f32;
        let scale = rms.max(1.0);
        let diff = r
            .iter()
            .zip(c)
            .map(|(a, b)| {
                let d = (a - b).abs() / scale;
                // A NaN on either side is a failure, not a zero.
                if d.is_nan() { f32::INFINITY } else { d }
            })
            .fold(0.0, f32::max);
        if diff > worst.0 || worst.1 == "none" {
            worst = (diff, name.clone());
        }
    }
    Ok(worst)
}
