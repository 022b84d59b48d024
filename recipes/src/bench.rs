//! Throughput workloads shared by `kiln bench` and the repository's `benches/`: ResNet-18
//! training steps and inference passes on any device, each timed until the device has
//! finished, and the PyTorch twin scripts run beside them in the same process's run.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use kiln_models::{ResNet, ResNetDepth};
use kiln_trainer::TrainerConfig;
use serde_json::Value;

/// The ResNet-18 workloads, by the names their figures carry: a training step at batch 8 of
/// 224x224 images, one at batch 32 of 32x32, and inference at batch 32 of 224x224.
pub const RESNET_WORKLOADS: [ResNetWorkload; 3] = [
    ResNetWorkload {
        name: "train_b8_224",
        train: true,
        batch: 8,
        side: 224,
    },
    ResNetWorkload {
        name: "train_b32_32",
        train: true,
        batch: 32,
        side: 32,
    },
    ResNetWorkload {
        name: "infer_b32_224",
        train: false,
        batch: 32,
        side: 224,
    },
];

/// One timed ResNet-18 pass: a training step (forward, cross-entropy, backward, SGD with
/// momentum) or an inference forward in eval mode, on random images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResNetWorkload {
    /// The name its figures carry (`train_b8_224`, ...), the PyTorch twin's key too.
    pub name: &'static str,
    /// A training step, or an inference pass.
    pub train: bool,
    /// Images per step.
    pub batch: usize,
    /// Height and width of the images.
    pub side: usize,
}

/// A ResNet-18 (1,000 classes, random weights) that runs [`ResNetWorkload`]s on one device,
/// training with one SGD-with-momentum optimizer throughout (its velocities kept from step to
/// step, as PyTorch's twin keeps them).
pub struct ResNetBench {
    model: Option<ResNet>,
    optimizer: ModuleOptimizer,
    device: Device,
    /// Training steps run on a thread of the kernels' pool ([`kiln_kernels::on_pool`]).
    on_pool: bool,
}

impl ResNetBench {
    /// A fresh ResNet-18 on `device` (trained on its autodiff twin).
    pub fn new(device: &Device) -> Self {
        let device = device.clone().autodiff();
        Self {
            model: Some(ResNet::new(ResNetDepth::R18, 1000, &device)),
            optimizer: TrainerConfig::default().build_optimizer(),
            device,
            on_pool: true,
        }
    }

    /// Whether training steps run on a thread of the kernels' pool, as `kiln`'s trainer runs
    /// them on one device (the default), or on the calling thread.
    pub fn set_on_pool(&mut self, on: bool) {
        self.on_pool = on;
    }

    /// Runs `workload` once; returns its samples per second.
    pub fn run(&mut self, workload: &ResNetWorkload) -> f64 {
        let seconds = if workload.train {
            self.train_step(workload.batch, workload.side)
        } else {
            self.infer(workload.batch, workload.side)
        };
        workload.batch as f64 / seconds
    }

    /// Seconds of one training step of `batch` images of `side` x `side`.
    fn train_step(&mut self, batch: usize, side: usize) -> f64 {
        if self.on_pool {
            return kiln_kernels::on_pool(|| self.train_step_here(batch, side));
        }
        self.train_step_here(batch, side)
    }

    fn train_step_here(&mut self, batch: usize, side: usize) -> f64 {
        let device = &self.device;
        let images = Tensor::<4>::random([batch, 3, side, side], Distribution::Default, device);
        let labels: Vec<i64> = (0..batch as i64).map(|i| (i * 37) % 1000).collect();
        let targets = Tensor::<1, Int>::from_data(TensorData::new(labels, [batch]), device);
        let loss_fn = CrossEntropyLossConfig::new().init(device);
        let start = Instant::now();
        let current = self
            .model
            .take()
            .expect("the model is put back after every step");
        let loss = loss_fn.forward(current.forward(images), targets);
        let grads = GradientsParams::from_grads(loss.backward(), &current);
        let next = self.optimizer.step(0.01, current, grads);
        // Wait for the new parameters, not only for the graph (GPUs run asynchronously).
        let _ = next.fc.weight.val().into_data();
        self.model = Some(next);
        start.elapsed().as_secs_f64()
    }

    /// Seconds of one eval-mode forward pass of `batch` images of `side` x `side`.
    fn infer(&self, batch: usize, side: usize) -> f64 {
        let model = self.model.as_ref().expect("model present").valid();
        let device = model.fc.weight.val().device();
        let images = Tensor::<4>::random([batch, 3, side, side], Distribution::Default, &device);
        let start = Instant::now();
        let _ = model.forward(images).into_data();
        start.elapsed().as_secs_f64()
    }
}

/// The median of `values` (the upper one for an even count); `NaN` when empty.
pub fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Runs a PyTorch twin script, `python3 script args...`, and parses the JSON object on the last
/// line of its stdout. The error says why when Python, PyTorch or the script fails.
pub fn run_python_twin(script: &Path, args: &[&str]) -> Result<Value, String> {
    let output = Command::new("python3")
        .arg(script)
        .args(args)
        .output()
        .map_err(|e| format!("could not start python3: {e}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(format!(
            "{} failed: {}",
            script.display(),
            stderr.lines().last().unwrap_or("(no output)")
        ));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or("");
    serde_json::from_str(last)
        .map_err(|e| format!("{} printed no JSON line ({e})", script.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_takes_the_middle_or_the_upper_middle() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 3.0);
        assert!(median(Vec::new()).is_nan());
    }

    #[test]
    fn a_missing_twin_script_is_an_error() {
        let err = run_python_twin(Path::new("/nonexistent/twin.py"), &[]).unwrap_err();
        assert!(
            err.contains("twin.py") || err.contains("python3"),
            "unexpected message: {err}"
        );
    }
}
