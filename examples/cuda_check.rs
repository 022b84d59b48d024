//! Checks Burn's CUDA backend against the CPU (Flex) on kiln's models, for
//! `scripts/gpu-check` on a machine with a GPU (build with `--features cuda`):
//!
//! - SimpleCNN: logits and every parameter gradient of a cross-entropy loss on a batch of 64
//!   MNIST-sized images, the same weights on `--device` and on the CPU;
//! - ResNet-18 (eval mode): logits of 4 images of 64x64.
//!
//! Prints one JSON object with the largest differences; exits non-zero when one is above
//! `--tolerance` (default 1e-4; GPU kernels sum in another order than the CPU's).
//!
//! `cargo run --release --features cuda --example cuda_check -- --device cuda:0`

use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use kiln::models::{ResNet, ResNetDepth, SimpleCnnConfig};
use kiln::multi::DeviceSpec;
use serde_json::json;

fn flag(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn values<const D: usize>(t: Tensor<D>) -> anyhow::Result<Vec<f32>> {
    t.into_data()
        .try_to_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("reading a tensor back: {e:?}"))
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "same shapes");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Every parameter gradient of `model` in `grads`, flattened, in visiting order.
fn flat_grads<M: Module>(model: &M, grads: &GradientsParams) -> Vec<f32> {
    struct Collect<'a> {
        grads: &'a GradientsParams,
        out: Vec<f32>,
    }
    impl ModuleVisitor for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                self.out.extend(g.into_data().iter::<f32>());
            }
        }
    }
    let mut collect = Collect {
        grads,
        out: Vec::new(),
    };
    model.visit(&mut collect);
    collect.out
}

/// SimpleCNN's logits and gradients on `device` (weights made on the CPU, then moved).
fn simple_cnn_on(
    device: &Device,
    images: &TensorData,
    labels: &[i64],
) -> anyhow::Result<(Vec<f32>, Vec<f32>)> {
    let cpu = Device::flex().autodiff();
    let model = SimpleCnnConfig::new().init(&cpu, 7).fork(device);
    let x = Tensor::<4>::from_data(images.clone(), device);
    let y = Tensor::<1, Int>::from_data(TensorData::new(labels.to_vec(), [labels.len()]), device);
    let logits = model.forward(x);
    let loss = CrossEntropyLossConfig::new()
        .init(device)
        .forward(logits.clone(), y);
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    Ok((values(logits)?, flat_grads(&model, &grads)))
}

fn main() -> anyhow::Result<()> {
    let spec: DeviceSpec = flag("--device")
        .unwrap_or_else(|| "cuda:0".into())
        .parse()?;
    let tolerance: f32 = flag("--tolerance").map_or(Ok(1e-4), |t| t.parse())?;
    let gpu = spec.device()?;
    let cpu = Device::flex();

    let images = Tensor::<4>::random([64, 1, 28, 28], Distribution::Default, &cpu).into_data();
    let labels: Vec<i64> = (0..64).map(|i| (i * 7) % 10).collect();
    let (cpu_logits, cpu_grads) = simple_cnn_on(&cpu.clone().autodiff(), &images, &labels)?;
    let (gpu_logits, gpu_grads) = simple_cnn_on(&gpu.clone().autodiff(), &images, &labels)?;
    let simple_logits = max_diff(&cpu_logits, &gpu_logits);
    let simple_grads = max_diff(&cpu_grads, &gpu_grads);

    let resnet = ResNet::new(ResNetDepth::R18, 10, &cpu);
    let x = Tensor::<4>::random([4, 3, 64, 64], Distribution::Default, &cpu);
    let cpu_out = values(resnet.forward(x.clone()))?;
    let gpu_out = values(resnet.fork(&gpu).forward(x.to_device(&gpu)))?;
    let resnet_logits = max_diff(&cpu_out, &gpu_out);

    let worst = simple_logits.max(simple_grads).max(resnet_logits);
    println!(
        "{}",
        json!({
            "device": spec.to_string(),
            "tolerance": tolerance,
            "simple_cnn_max_logit_diff": simple_logits,
            "simple_cnn_max_grad_diff": simple_grads,
            "simple_cnn_grad_elements": gpu_grads.len(),
            "resnet18_max_logit_diff": resnet_logits,
            "passed": worst <= tolerance,
        })
    );
    anyhow::ensure!(
        worst <= tolerance,
        "the GPU differs from the CPU by {worst:e} (tolerance {tolerance:e})"
    );
    Ok(())
}
