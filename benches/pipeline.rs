//! Pipeline benchmark, 2 stages, each stage given one thread as if it had its own device:
//! - SimpleCNN (batch 64, conv1 | conv2 + classifier): the measured bubble fraction against
//!   theory `(p - 1) / (m + p - 1)` for GPipe and 1F1B at m = 1, 2, 4, 8, with the peak number
//!   of micro-batch activations each stage held; training throughput of the naive split, GPipe
//!   and 1F1B (m = 4) against one device using both cores;
//! - ResNet-18 (batch 32 at 32x32, 10 classes, stem..layer2 | layer3..fc): the same throughput
//!   comparison for GPipe at m = 2, 4 and 1F1B at m = 2, 4, 8, and 1F1B m = 4 once more with
//!   every micro-batch's weight gradients computed and summed as they come
//!   (`defer_weight_gradients: false`, the A/B of the deferral); `deferred_gradients_per_stage`
//!   says how many weights each stage deferred.
//!
//! Configurations are interleaved step by step so that machine noise hits them alike; medians
//! are reported. Prints one JSON object.
//!
//! Run: `cargo bench --bench pipeline` (options: `-- --steps N`).

mod common;

use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Int, Tensor};
use burn::tensor::{Distribution, TensorData};
use common::{arg, median};
use kiln::models::{ResNet, ResNetBack, ResNetDepth, ResNetFront, SimpleCnn, SimpleCnnConfig};
use kiln::multi::pipeline::{
    Activation, ModuleStage, Pipeline, PipelineConfig, PipelineSchedule, PipelineStage, StepReport,
    merge_grads, theoretical_bubble,
};
use kiln::recipes::cnn_mnist::simple_cnn_stages;
use kiln::recipes::mnist_data::MnistSource;
use kiln::trainer::TrainerConfig;
use kiln::trainer::data::{MnistSplit, make_batch};
use serde_json::{Value, json};

const BATCH: usize = 64;
const RESNET_BATCH: usize = 32;
const STAGES: usize = 2;

/// SGD with momentum 0.9, as the trainer runs it.
fn sgd() -> ModuleOptimizer {
    TrainerConfig::default().build_optimizer()
}

/// How a benchmarked model runs whole and split into stages.
struct Arch<M> {
    forward: fn(&M, Tensor<4>) -> Tensor<2>,
    split: fn(&M, &Device) -> Vec<Box<dyn PipelineStage>>,
}

/// A model, its optimizer, and how it takes a step.
struct Runner<M> {
    name: String,
    model: Option<M>,
    arch: Arch<M>,
    optimizer: ModuleOptimizer,
    pipeline: Option<Pipeline>,
    times: Vec<f64>,
    reports: Vec<StepReport>,
}

impl<M: Module> Runner<M> {
    fn new(
        name: &str,
        model: M,
        arch: Arch<M>,
        pipeline: Option<(PipelineSchedule, usize, bool)>,
    ) -> Self {
        let pipeline = pipeline.map(|(schedule, m, defer)| {
            let config = PipelineConfig {
                schedule,
                micro_batches: NonZeroUsize::new(m).expect("m > 0"),
                timeout: Duration::from_secs(60),
                threads_per_stage: Some(NonZeroUsize::MIN),
                defer_weight_gradients: defer,
            };
            Pipeline::new(NonZeroUsize::new(STAGES).expect("2 > 0"), config).expect("pools start")
        });
        Self {
            name: name.to_string(),
            model: Some(model),
            arch,
            optimizer: sgd(),
            pipeline,
            times: Vec::new(),
            reports: Vec::new(),
        }
    }

    fn step(&mut self, images: Tensor<4>, targets: Tensor<1, Int>, device: &Device, record: bool) {
        let model = self.model.take().expect("present between steps");
        let start = Instant::now();
        let grads = match &self.pipeline {
            None => {
                let loss = CrossEntropyLossConfig::new()
                    .init(device)
                    .forward((self.arch.forward)(&model, images), targets);
                GradientsParams::from_grads(loss.backward(), &model)
            }
            Some(pipeline) => {
                let mut stages = (self.arch.split)(&model, device);
                let report = pipeline
                    .run(&mut stages, Activation::Rank4(images), targets)
                    .expect("pipeline step");
                if record {
                    self.reports.push(report);
                }
                merge_grads(&model, &mut stages)
            }
        };
        self.model = Some(self.optimizer.step(0.01, model, grads));
        if record {
            self.times.push(start.elapsed().as_secs_f64());
        }
    }

    fn summary(&self, batch: usize) -> Value {
        let step = median(self.times.clone());
        let bubbles: Vec<f64> = self
            .reports
            .iter()
            .map(StepReport::bubble_fraction)
            .collect();
        let stages = self.reports.first().map_or(0, |r| r.busy_seconds.len());
        let busy_ms: Vec<f64> = (0..stages)
            .map(|s| 1e3 * median(self.reports.iter().map(|r| r.busy_seconds[s]).collect()))
            .collect();
        json!({
            "name": self.name,
            "median_step_ms": step * 1e3,
            "samples_per_sec": batch as f64 / step,
            "measured_bubble": (!bubbles.is_empty()).then(|| median(bubbles)),
            "peak_in_flight_per_stage": self.reports.first().map(|r| r.peak_in_flight.clone()),
            "median_busy_ms_per_stage": (stages > 0).then_some(busy_ms),
            "deferred_gradients_per_stage": self.reports.first().map(|r| r.deferred_gradients.clone()),
        })
    }
}

fn simple_cnn_arch() -> Arch<SimpleCnn> {
    Arch {
        forward: SimpleCnn::forward,
        split: |m, device| simple_cnn_stages(m, STAGES, &[device.clone(), device.clone()]),
    }
}

fn resnet_arch() -> Arch<ResNet> {
    Arch {
        forward: ResNet::forward,
        split: |m, device| {
            let (front, back) = m.halves();
            vec![
                Box::new(ModuleStage::new(
                    "stem..layer2",
                    front,
                    ResNetFront::forward,
                    device.clone(),
                )),
                Box::new(ModuleStage::new(
                    "layer3..fc",
                    back,
                    ResNetBack::forward,
                    device.clone(),
                )),
            ]
        },
    }
}

/// Runs every runner on the same batches, interleaved, and returns each one's summary.
fn run_all<M: Module>(
    runners: &mut [Runner<M>],
    batches: &[(Tensor<4>, Tensor<1, Int>)],
    batch: usize,
    device: &Device,
) -> Vec<Value> {
    for (step, (images, targets)) in batches.iter().enumerate() {
        for runner in runners.iter_mut() {
            runner.step(images.clone(), targets.clone(), device, step > 0);
        }
    }
    runners.iter().map(|r| r.summary(batch)).collect()
}

fn rate(runs: &[Value], name: &str) -> f64 {
    runs.iter()
        .find(|r| r["name"] == name)
        .and_then(|r| r["samples_per_sec"].as_f64())
        .unwrap_or(f64::NAN)
}

/// The pipelined runs' throughput against the naive split and against one device.
fn speedup(runs: &[Value]) -> Value {
    json!({
        "1f1b_m2_over_naive": rate(runs, "1f1b m=2") / rate(runs, "naive split"),
        "1f1b_m4_over_naive": rate(runs, "1f1b m=4") / rate(runs, "naive split"),
        "1f1b_m4_per_micro_batch_weight_gradients_over_naive": rate(runs, "1f1b m=4, weight gradients per micro-batch") / rate(runs, "naive split"),
        "gpipe_m4_over_naive": rate(runs, "gpipe m=4") / rate(runs, "naive split"),
        "1f1b_m4_over_one_device": rate(runs, "1f1b m=4") / rate(runs, "one device, 2 threads"),
    })
}

fn main() -> anyhow::Result<()> {
    // The allocator setting `kiln train` runs with (large buffers reused, not re-faulted).
    kiln::kernels::malloc::keep_large_buffers(true);
    let steps = arg("--steps", 12).max(2);
    let device = Device::flex().autodiff();
    let train = MnistSource::Embedded.load(MnistSplit::Train)?;

    // SimpleCNN: bubble table and throughput.
    let cnn = || SimpleCnnConfig::new().init(&device, 0);
    let mut runners = vec![
        Runner::new("one device, 2 threads", cnn(), simple_cnn_arch(), None),
        Runner::new(
            "naive split",
            cnn(),
            simple_cnn_arch(),
            Some((PipelineSchedule::Naive, 1, true)),
        ),
    ];
    for m in [1, 2, 4, 8] {
        for (schedule, name) in [
            (PipelineSchedule::GPipe, "gpipe"),
            (PipelineSchedule::OneFOneB, "1f1b"),
        ] {
            runners.push(Runner::new(
                &format!("{name} m={m}"),
                cnn(),
                simple_cnn_arch(),
                Some((schedule, m, true)),
            ));
        }
    }
    let batches: Vec<_> = (0..=steps)
        .map(|step| {
            let indices: Vec<usize> = (step * BATCH..(step + 1) * BATCH).collect();
            let batch = make_batch(&train, &indices, &device);
            (batch.images, batch.targets)
        })
        .collect();
    let runs = run_all(&mut runners, &batches, BATCH, &device);
    let p = NonZeroUsize::new(STAGES).expect("2 > 0");
    let bubble_table: Vec<Value> = [1usize, 2, 4, 8]
        .iter()
        .map(|&m| {
            let measured = |prefix: &str| {
                runs.iter()
                    .find(|r| r["name"] == format!("{prefix} m={m}"))
                    .cloned()
                    .unwrap_or(Value::Null)
            };
            json!({
                "stages": STAGES,
                "micro_batches": m,
                "theory": theoretical_bubble(p, NonZeroUsize::new(m).expect("m > 0")),
                "gpipe": measured("gpipe")["measured_bubble"],
                "1f1b": measured("1f1b")["measured_bubble"],
                "gpipe_peak_in_flight": measured("gpipe")["peak_in_flight_per_stage"],
                "1f1b_peak_in_flight": measured("1f1b")["peak_in_flight_per_stage"],
            })
        })
        .collect();

    // ResNet-18, batch 32 at 32x32.
    let resnet_steps = (steps / 2).max(2);
    let net = || ResNet::new(ResNetDepth::R18, 10, &device);
    let mut resnet_runners = vec![Runner::new(
        "one device, 2 threads",
        net(),
        resnet_arch(),
        None,
    )];
    for (name, schedule, m, defer) in [
        ("naive split", PipelineSchedule::Naive, 1, true),
        ("1f1b m=2", PipelineSchedule::OneFOneB, 2, true),
        ("gpipe m=2", PipelineSchedule::GPipe, 2, true),
        ("gpipe m=4", PipelineSchedule::GPipe, 4, true),
        ("1f1b m=4", PipelineSchedule::OneFOneB, 4, true),
        ("1f1b m=8", PipelineSchedule::OneFOneB, 8, true),
        (
            "1f1b m=4, weight gradients per micro-batch",
            PipelineSchedule::OneFOneB,
            4,
            false,
        ),
    ] {
        resnet_runners.push(Runner::new(
            name,
            net(),
            resnet_arch(),
            Some((schedule, m, defer)),
        ));
    }
    let resnet_batches: Vec<_> = (0..=resnet_steps)
        .map(|step| {
            let images = Tensor::<4>::random(
                [RESNET_BATCH, 3, 32, 32],
                Distribution::Normal(0.0, 1.0),
                &device,
            );
            let labels: Vec<i64> = (0..RESNET_BATCH)
                .map(|i| ((i + step) % 10) as i64)
                .collect();
            let targets =
                Tensor::<1, Int>::from_data(TensorData::new(labels, [RESNET_BATCH]), &device);
            (images, targets)
        })
        .collect();
    let resnet_runs = run_all(&mut resnet_runners, &resnet_batches, RESNET_BATCH, &device);

    let report = json!({
        "benchmark": "pipeline",
        "machine": common::machine(),
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "steps": steps,
        "simple_cnn": {
            "model": "SimpleCNN, batch 64, stages conv1 | conv2 + classifier, 1 thread per stage",
            "bubble": bubble_table,
            "runs": runs,
            "speedup": speedup(&runs),
        },
        "resnet18": {
            "model": "ResNet-18, batch 32 at 32x32, 10 classes, stages stem..layer2 | layer3..fc, 1 thread per stage",
            "steps": resnet_steps,
            "runs": resnet_runs,
            "speedup": speedup(&resnet_runs),
        },
    });
    println!("{report}");
    Ok(())
}
