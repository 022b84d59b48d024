//! Pipeline benchmark on SimpleCNN (batch 64, 2 stages: conv1 | conv2 + classifier, each stage
//! given one thread as if it had its own device):
//! - the measured bubble fraction against theory `(p - 1) / (m + p - 1)` for GPipe and 1F1B at
//!   m = 1, 2, 4, 8, with the peak number of micro-batch activations each stage held;
//! - training throughput of the naive split, GPipe and 1F1B (m = 4), against one device
//!   using both cores.
//!
//! Configurations are interleaved step by step so that machine noise hits them alike; medians
//! are reported. Prints one JSON object.
//!
//! Run: `cargo bench --bench pipeline` (options: `-- --steps N`).

mod common;

use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{GradientsParams, ModuleOptimizer, SgdConfig};
use burn::tensor::{Device, Int, Tensor};
use common::{arg, median};
use kiln::models::{SimpleCnn, SimpleCnnConfig};
use kiln::multi::pipeline::{
    Activation, Pipeline, PipelineConfig, PipelineSchedule, StepReport, merge_grads,
    theoretical_bubble,
};
use kiln::recipes::cnn_mnist::simple_cnn_stages;
use kiln::recipes::mnist_data::MnistSource;
use kiln::trainer::data::{MnistSplit, make_batch};
use serde_json::{Value, json};

const BATCH: usize = 64;
const STAGES: usize = 2;

fn sgd() -> ModuleOptimizer {
    SgdConfig::new()
        .with_momentum(Some(MomentumConfig {
            momentum: 0.9,
            dampening: 0.0,
            nesterov: false,
        }))
        .init()
}

/// A model, its optimizer, and how it takes a step.
struct Runner {
    name: String,
    model: Option<SimpleCnn>,
    optimizer: ModuleOptimizer,
    pipeline: Option<Pipeline>,
    times: Vec<f64>,
    reports: Vec<StepReport>,
}

impl Runner {
    fn new(name: &str, device: &Device, pipeline: Option<(PipelineSchedule, usize)>) -> Self {
        let pipeline = pipeline.map(|(schedule, m)| {
            let config = PipelineConfig {
                schedule,
                micro_batches: NonZeroUsize::new(m).expect("m > 0"),
                timeout: Duration::from_secs(60),
                threads_per_stage: Some(NonZeroUsize::MIN),
            };
            Pipeline::new(NonZeroUsize::new(STAGES).expect("2 > 0"), config).expect("pools start")
        });
        Self {
            name: name.to_string(),
            model: Some(SimpleCnnConfig::new().init(device, 0)),
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
                    .forward(model.forward(images), targets);
                GradientsParams::from_grads(loss.backward(), &model)
            }
            Some(pipeline) => {
                let mut stages = simple_cnn_stages(&model, STAGES, device);
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

    fn summary(&self) -> Value {
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
            "samples_per_sec": BATCH as f64 / step,
            "measured_bubble": (!bubbles.is_empty()).then(|| median(bubbles)),
            "peak_in_flight_per_stage": self.reports.first().map(|r| r.peak_in_flight.clone()),
            "median_busy_ms_per_stage": (stages > 0).then_some(busy_ms),
        })
    }
}

fn main() -> anyhow::Result<()> {
    let steps = arg("--steps", 12).max(2);
    let device = Device::flex().autodiff();
    let train = MnistSource::Embedded.load(MnistSplit::Train)?;

    let mut runners = vec![Runner::new("one device, 2 threads", &device, None)];
    runners.push(Runner::new(
        "naive split",
        &device,
        Some((PipelineSchedule::Naive, 1)),
    ));
    for m in [1, 2, 4, 8] {
        for (schedule, name) in [
            (PipelineSchedule::GPipe, "gpipe"),
            (PipelineSchedule::OneFOneB, "1f1b"),
        ] {
            runners.push(Runner::new(
                &format!("{name} m={m}"),
                &device,
                Some((schedule, m)),
            ));
        }
    }
    for step in 0..=steps {
        let indices: Vec<usize> = (step * BATCH..(step + 1) * BATCH).collect();
        let batch = make_batch(&train, &indices, &device);
        for runner in &mut runners {
            runner.step(
                batch.images.clone(),
                batch.targets.clone(),
                &device,
                step > 0,
            );
        }
    }

    let rate = |name: &str| {
        runners
            .iter()
            .find(|r| r.name == name)
            .map_or(f64::NAN, |r| BATCH as f64 / median(r.times.clone()))
    };
    let p = NonZeroUsize::new(STAGES).expect("2 > 0");
    let bubble_table: Vec<Value> = [1usize, 2, 4, 8]
        .iter()
        .map(|&m| {
            let measured = |prefix: &str| {
                runners
                    .iter()
                    .find(|r| r.name == format!("{prefix} m={m}"))
                    .map(|r| r.summary())
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
    let report = json!({
        "benchmark": "pipeline",
        "model": "SimpleCNN, batch 64, stages conv1 | conv2 + classifier, 1 thread per stage",
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "steps": steps,
        "bubble": bubble_table,
        "runs": runners.iter().map(Runner::summary).collect::<Vec<_>>(),
        "speedup": {
            "1f1b_m4_over_naive": rate("1f1b m=4") / rate("naive split"),
            "gpipe_m4_over_naive": rate("gpipe m=4") / rate("naive split"),
            "1f1b_m4_over_one_device": rate("1f1b m=4") / rate("one device, 2 threads"),
        },
    });
    println!("{report}");
    Ok(())
}
