//! Results of the recipes, serialised as the last line of stdout under `--json`.

use std::path::{Path, PathBuf};

use kiln_trainer::checkpoint::{EpochMetrics, KeepBest};
use serde::Serialize;

/// A result that a command prints on stdout: a human sentence, or under `--json` one JSON
/// object (the last line of stdout).
pub trait Report: Serialize {
    /// One human sentence summing the result up.
    fn summary(&self) -> String;

    /// The line to print: the JSON object when `json` is set, else [`Report::summary`].
    ///
    /// # Errors
    /// When the report cannot be serialised (a non-finite number is written as `null`, so
    /// in practice never).
    fn stdout_line(&self, json: bool) -> serde_json::Result<String> {
        if json {
            serde_json::to_string(self)
        } else {
            Ok(match self.details() {
                Some(table) => format!("{}\n{table}", self.summary()),
                None => self.summary(),
            })
        }
    }

    /// Lines printed under the sentence (not with `--json`): a training run's summary table.
    fn details(&self) -> Option<String> {
        None
    }
}

/// The table under a training run's sentence: where the run is, its best epoch, the final
/// metrics, wall time and throughput, and what it left behind.
fn run_table(
    (run_dir, checkpoint): (&Path, Option<&Path>),
    history: &[EpochMetrics],
    resumed_from_epoch: usize,
    wall_seconds: f64,
) -> String {
    let last = history.last();
    // The epoch retention keeps as the best: validation accuracy, else loss.
    let best = KeepBest::Auto
        .best_epoch(history)
        .and_then(|epoch| history.iter().find(|m| m.epoch == epoch));
    let figures = |m: &EpochMetrics| {
        let accuracy = m.test_accuracy.map_or(String::new(), |a| {
            format!(", test accuracy {:.2}%", 100.0 * a)
        });
        format!(
            "train loss {:.4}, test loss {:.4}{accuracy}",
            m.train_loss, m.test_loss
        )
    };
    let trained: f64 = history[resumed_from_epoch.min(history.len())..]
        .iter()
        .map(|m| m.train_seconds)
        .sum();
    let mut rows = vec![
        ("run", run_dir.display().to_string()),
        (
            "epochs",
            match resumed_from_epoch {
                0 => history.len().to_string(),
                n => format!("{} (resumed after epoch {n})", history.len()),
            },
        ),
    ];
    if let Some(best) = best {
        rows.push(("best epoch", format!("{}: {}", best.epoch, figures(best))));
    }
    if let Some(last) = last {
        rows.push(("final", figures(last)));
    }
    rows.push((
        "wall time",
        format!("{wall_seconds:.1} s ({trained:.1} s training this call)"),
    ));
    rows.push((
        "throughput",
        format!("{:.0} samples/s", EpochMetrics::throughput(history)),
    ));
    if let Some(checkpoint) = checkpoint {
        rows.push(("checkpoint", checkpoint.display().to_string()));
    }
    rows.push((
        "curves",
        format!(
            "{}, or tensorboard --logdir {}",
            run_dir.join("curves.png").display(),
            run_dir.display()
        ),
    ));
    rows.iter()
        .map(|(k, v)| format!("  {k:<11} {v}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Result of a training run.
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    /// Recipe name.
    pub recipe: String,
    /// Output directory of the run.
    pub run_dir: PathBuf,
    /// Latest checkpoint written (or resumed from).
    pub checkpoint: Option<PathBuf>,
    /// Epochs completed.
    pub epochs: usize,
    /// Fraction of test samples classified correctly after the last epoch.
    pub test_accuracy: f64,
    /// Mean test loss after the last epoch.
    pub test_loss: f64,
    /// Mean training loss of the last epoch.
    pub train_loss: f64,
    /// Training samples per second over all epochs and all ranks, evaluation excluded.
    pub samples_per_sec: f64,
    /// Data-parallel ranks the run trained on.
    pub ranks: usize,
    /// The device of this rank (rank 0, or the first pipeline stage): `cpu`, `cuda:N` or `wgpu:N`.
    pub device: String,
    /// Samples per optimizer step, over all ranks.
    pub global_batch_size: usize,
    /// The pipeline the run trained through, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<PipelineReport>,
    /// Pipeline runs: the mean measured fraction of stage time spent idle, over this run's
    /// epochs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bubble_fraction: Option<f64>,
    /// With `--tensor-parallel N`: the split, and what each rank kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tensor_parallel: Option<TensorParallelReport>,
    /// With `--zero`: what each rank kept, next to plain data parallelism.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sharding: Option<ShardingReport>,
    /// Quantization-aware training: the scheme the weights were fake-quantized with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qat: Option<String>,
    /// Epochs that were already done when this run started (resume).
    pub resumed_from_epoch: usize,
    /// Seconds this call took, from the flags checked to the last checkpoint written.
    pub wall_seconds: f64,
    /// Metrics of every epoch.
    pub history: Vec<EpochMetrics>,
}

/// Per-rank training-state bytes of a sharded (ZeRO) run, as rank 0 kept them.
#[derive(Debug, Clone, Serialize)]
pub struct ShardingReport {
    /// ZeRO stage: 1 (optimizer state sharded) or 2 (and gradients).
    pub zero_stage: u8,
    /// Trainable parameter elements (replicated on every rank).
    pub parameter_elements: usize,
    /// Optimizer-state bytes one rank keeps.
    pub optimizer_state_bytes_per_rank: usize,
    /// Synchronised-gradient bytes one rank keeps until its step.
    pub gradient_bytes_per_rank: usize,
    /// Optimizer-state bytes each rank keeps without sharding.
    pub unsharded_optimizer_state_bytes: usize,
    /// Gradient bytes each rank keeps without sharding.
    pub unsharded_gradient_bytes: usize,
}

/// Per-rank sizes of a tensor-parallel run, as rank 0 kept them (SGD with momentum: one
/// float32 state and one gradient per parameter).
#[derive(Debug, Clone, Serialize)]
pub struct TensorParallelReport {
    /// Ranks the model was split over.
    pub ranks: usize,
    /// Parameter elements one rank holds: its shards and the replicated layers.
    pub parameter_elements_per_rank: usize,
    /// Optimizer-state (momentum) bytes one rank keeps.
    pub optimizer_state_bytes_per_rank: usize,
    /// Gradient bytes one rank keeps until its step.
    pub gradient_bytes_per_rank: usize,
    /// Parameter elements of the whole model (what one device holds).
    pub unsharded_parameter_elements: usize,
}

/// How a pipeline run was split.
#[derive(Debug, Clone, Serialize)]
pub struct PipelineReport {
    /// Stages.
    pub stages: usize,
    /// Micro-batches per batch.
    pub micro_batches: usize,
    /// Schedule (`Naive`, `GPipe`, `OneFOneB`).
    pub schedule: String,
}

/// Result of an evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// Model architecture.
    pub model: String,
    /// Checkpoint or weight file evaluated.
    pub source: PathBuf,
    /// Fraction of samples classified correctly.
    pub test_accuracy: f64,
    /// Mean cross-entropy.
    pub test_loss: f64,
    /// Samples evaluated.
    pub samples: usize,
    /// Training samples per second recorded in the checkpoint (absent for raw weights).
    pub samples_per_sec: Option<f64>,
    /// Epochs the checkpoint was trained for (absent for raw weights).
    pub epochs: Option<usize>,
    /// Samples per second of this evaluation.
    pub eval_samples_per_sec: f64,
    /// The quantization scheme of a quantized file or quantization-aware checkpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantization: Option<String>,
    /// How the model ran: `float32`, or `int8 (u8 x i8 GEMM, KERNEL kernel, MODE activations)`.
    pub inference: String,
}

/// Result of a prediction.
#[derive(Debug, Clone, Serialize)]
pub struct PredictReport {
    /// Model architecture.
    pub model: String,
    /// Samples run through the model.
    pub samples: usize,
    /// The `.npy` file of logits written.
    pub output: PathBuf,
    /// Arg-max class of every sample.
    pub predictions: Vec<usize>,
}

impl Report for TrainReport {
    fn details(&self) -> Option<String> {
        Some(run_table(
            (&self.run_dir, self.checkpoint.as_deref()),
            &self.history,
            self.resumed_from_epoch,
            self.wall_seconds,
        ))
    }

    fn summary(&self) -> String {
        format!(
            "test accuracy {:.2}% (loss {:.4}) after {} epoch{}, {:.0} training samples/s{}{}; run in {}",
            100.0 * self.test_accuracy,
            self.test_loss,
            self.epochs,
            if self.epochs == 1 { "" } else { "s" },
            self.samples_per_sec,
            match (&self.pipeline, self.bubble_fraction) {
                (Some(p), Some(bubble)) => format!(
                    " through a {}-stage {} pipeline ({} micro-batches, bubble {:.0}%)",
                    p.stages,
                    p.schedule,
                    p.micro_batches,
                    100.0 * bubble
                ),
                _ => match (&self.sharding, &self.tensor_parallel) {
                    (_, Some(tp)) => format!(
                        " tensor-parallel on {} ranks ({} parameters per rank of {})",
                        tp.ranks, tp.parameter_elements_per_rank, tp.unsharded_parameter_elements
                    ),
                    (Some(z), None) => format!(
                        " on {} ranks with ZeRO-{} ({} optimizer-state bytes per rank of {})",
                        self.ranks,
                        z.zero_stage,
                        z.optimizer_state_bytes_per_rank,
                        z.unsharded_optimizer_state_bytes
                    ),
                    (None, None) if self.ranks > 1 => format!(" on {} ranks", self.ranks),
                    (None, None) => String::new(),
                },
            },
            self.qat.as_ref().map_or(String::new(), |q| format!(
                ", quantization-aware ({q}: the accuracy is the quantized model's)"
            )),
            self.run_dir.display()
        )
    }
}

impl Report for EvalReport {
    fn summary(&self) -> String {
        let path = match self.quantization {
            Some(_) => format!("; ran {}", self.inference),
            None => String::new(),
        };
        format!(
            "test accuracy {:.2}%, test loss {:.4} on {} samples ({}){path}",
            100.0 * self.test_accuracy,
            self.test_loss,
            self.samples,
            self.source.display()
        )
    }
}

impl Report for PredictReport {
    fn summary(&self) -> String {
        format!(
            "wrote logits of {} samples to {}",
            self.samples,
            self.output.display()
        )
    }
}

/// Result of `kiln quantize`: the quantized file next to the float model it came from, on the
/// test split.
#[derive(Debug, Clone, Serialize)]
pub struct QuantizeReport {
    /// Model architecture.
    pub model: String,
    /// The float checkpoint or weights quantized.
    pub source: PathBuf,
    /// The quantized file written.
    pub output: PathBuf,
    /// Scheme, e.g. `int8:tensor`.
    pub scheme: String,
    /// The scheme the source was trained for, when it is a quantization-aware checkpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantization_aware: Option<String>,
    /// Bytes of the float model as SafeTensors (PyTorch's names and layouts).
    pub fp32_bytes: u64,
    /// Bytes of the quantized file.
    pub quantized_bytes: u64,
    /// `quantized_bytes / fp32_bytes`.
    pub size_ratio: f64,
    /// Test samples compared.
    pub test_samples: usize,
    /// Test accuracy of the float model (a quantization-aware checkpoint's float weights).
    pub fp32_accuracy: f64,
    /// Test accuracy of the quantized file, loaded back.
    pub quantized_accuracy: f64,
    /// Fraction of test samples on which both models predict the same class.
    pub argmax_agreement: f64,
    /// Largest absolute difference between the two models' logits.
    pub max_abs_logit_diff: f64,
    /// Batch size of the throughput figures.
    pub throughput_batch_size: usize,
    /// Float inference samples per second (median).
    pub fp32_samples_per_sec: f64,
    /// Quantized inference samples per second (median).
    pub quantized_samples_per_sec: f64,
    /// Float latency of one sample, milliseconds (median).
    pub fp32_latency_ms: f64,
    /// Quantized latency of one sample, milliseconds (median).
    pub quantized_latency_ms: f64,
    /// How the quantized model ran (see [`EvalReport::inference`]).
    pub inference: String,
    /// The CPU's model name and kiln's instruction-set level, for the speed figures.
    pub cpu: String,
}

impl Report for QuantizeReport {
    fn summary(&self) -> String {
        let rows = [
            (
                "size on disk (bytes)",
                self.fp32_bytes.to_string(),
                format!("{} ({:.3}x)", self.quantized_bytes, self.size_ratio),
            ),
            (
                "test accuracy",
                format!("{:.2}%", 100.0 * self.fp32_accuracy),
                format!(
                    "{:.2}% ({:+.2} points)",
                    100.0 * self.quantized_accuracy,
                    100.0 * (self.quantized_accuracy - self.fp32_accuracy)
                ),
            ),
            (
                "argmax agreement",
                String::new(),
                format!("{:.2}%", 100.0 * self.argmax_agreement),
            ),
            (
                "max |logit diff|",
                String::new(),
                format!("{:.4}", self.max_abs_logit_diff),
            ),
            (
                "samples/s at batch",
                format!(
                    "{:.0} ({})",
                    self.fp32_samples_per_sec, self.throughput_batch_size
                ),
                format!(
                    "{:.0} ({:.2}x)",
                    self.quantized_samples_per_sec,
                    self.quantized_samples_per_sec / self.fp32_samples_per_sec
                ),
            ),
            (
                "latency at batch 1 (ms)",
                format!("{:.3}", self.fp32_latency_ms),
                format!("{:.3}", self.quantized_latency_ms),
            ),
        ];
        let mut table = format!("{:<24} {:>18} {:>24}\n", "", "fp32", self.scheme);
        for (name, float, quantized) in rows {
            table.push_str(&format!("{name:<24} {float:>18} {quantized:>24}\n"));
        }
        table.push_str(&format!(
            "quantized model ran {} on {}\n",
            self.inference, self.cpu
        ));
        table.push_str(&format!(
            "wrote {} ({} test samples compared)",
            self.output.display(),
            self.test_samples
        ));
        table
    }
}

/// Result of `kiln finetune`.
#[derive(Debug, Clone, Serialize)]
pub struct FinetuneReport {
    /// Recipe name.
    pub recipe: String,
    /// Architecture (`resnet18`, ...).
    pub model: String,
    /// Output directory of the run.
    pub run_dir: PathBuf,
    /// Latest checkpoint written (or resumed from).
    pub checkpoint: Option<PathBuf>,
    /// The fine-tuned weights, SafeTensors with torchvision's names.
    pub weights: PathBuf,
    /// Class names in label order.
    pub classes: Vec<String>,
    /// Side of the square input images.
    pub image_size: usize,
    /// Whether only the head trained.
    pub freeze_backbone: bool,
    /// Parameters that received gradients.
    pub trainable_parameters: usize,
    /// With --allow-partial: model tensors the weight file lacked.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub missing_from_weights: Vec<String>,
    /// With --allow-partial: weight-file tensors the model has no place for.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unused_in_weights: Vec<String>,
    /// Validation accuracy before training (fresh runs only; the new head is random).
    pub initial_accuracy: Option<f64>,
    /// Epochs completed.
    pub epochs: usize,
    /// Validation accuracy after the last epoch.
    pub test_accuracy: f64,
    /// Validation loss after the last epoch.
    pub test_loss: f64,
    /// Mean training loss of the last epoch.
    pub train_loss: f64,
    /// Training samples per second, evaluation excluded.
    pub samples_per_sec: f64,
    /// Mean training seconds per epoch of this invocation.
    pub seconds_per_epoch: f64,
    /// Data-parallel ranks.
    pub ranks: usize,
    /// Epochs already done when this run started (resume).
    pub resumed_from_epoch: usize,
    /// Metrics of every epoch.
    pub history: Vec<EpochMetrics>,
    /// Seconds this call took, from the flags checked to the last checkpoint written.
    pub wall_seconds: f64,
}

impl Report for FinetuneReport {
    fn details(&self) -> Option<String> {
        Some(run_table(
            (&self.run_dir, self.checkpoint.as_deref()),
            &self.history,
            self.resumed_from_epoch,
            self.wall_seconds,
        ))
    }

    fn summary(&self) -> String {
        format!(
            "{} on {} classes: validation accuracy {}{:.2}% after {} epoch{} ({:.1} s per epoch, {}); weights in {}",
            self.model,
            self.classes.len(),
            self.initial_accuracy
                .map_or(String::new(), |a| format!("{:.2}% -> ", 100.0 * a)),
            100.0 * self.test_accuracy,
            self.epochs,
            if self.epochs == 1 { "" } else { "s" },
            self.seconds_per_epoch,
            if self.freeze_backbone {
                format!(
                    "head only, {} trainable parameters",
                    self.trainable_parameters
                )
            } else {
                format!("{} trainable parameters", self.trainable_parameters)
            },
            self.weights.display()
        )
    }
}

/// Result of `kiln predict --image`.
#[derive(Debug, Clone, Serialize)]
pub struct ImagePredictions {
    /// Model architecture.
    pub model: String,
    /// Side of the square crop the model saw.
    pub image_size: usize,
    /// One entry per image, in file-name order.
    pub images: Vec<ImagePrediction>,
}

/// The most probable classes of one image.
#[derive(Debug, Clone, Serialize)]
pub struct ImagePrediction {
    /// The image file.
    pub file: PathBuf,
    /// Classes by decreasing probability.
    pub top: Vec<ClassScore>,
}

/// One class and its softmax probability.
#[derive(Debug, Clone, Serialize)]
pub struct ClassScore {
    /// Output index.
    pub index: usize,
    /// Class name (the index when the model has no names).
    pub class: String,
    /// Softmax probability.
    pub probability: f64,
}

impl Report for ImagePredictions {
    fn summary(&self) -> String {
        self.images
            .iter()
            .map(|image| {
                let top: Vec<String> = image
                    .top
                    .iter()
                    .map(|c| format!("{} {:.1}%", c.class, 100.0 * c.probability))
                    .collect();
                format!("{}: {}", image.file.display(), top.join(", "))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Result of `kiln train gpt`.
#[derive(Debug, Clone, Serialize)]
pub struct GptReport {
    /// Recipe name.
    pub recipe: String,
    /// Output directory of the run.
    pub run_dir: PathBuf,
    /// Latest checkpoint written (or resumed from).
    pub checkpoint: Option<PathBuf>,
    /// The model's shape.
    pub model: kiln_models::GptConfig,
    /// Parameter elements.
    pub parameters: usize,
    /// The text trained on (`embedded:shakespeare` for the default).
    pub data: PathBuf,
    /// Epochs completed, including those before a resume.
    pub epochs: usize,
    /// Optimizer steps completed.
    pub steps: u64,
    /// Mean training loss of the last epoch (nats per token).
    pub train_loss: f64,
    /// Validation loss after the last epoch (nats per token).
    pub val_loss: f64,
    /// The validation loss in bits per byte (per character for ASCII text).
    pub val_bits_per_byte: f64,
    /// Training windows per second.
    pub samples_per_sec: f64,
    /// Training tokens per second.
    pub tokens_per_sec: f64,
    /// Data-parallel ranks.
    pub ranks: usize,
    /// ZeRO stage, if sharded.
    pub zero_stage: Option<u8>,
    /// With `--tensor-parallel`: what one rank held.
    pub tensor_parallel: Option<TensorParallelReport>,
    /// Epochs done before this call.
    pub resumed_from_epoch: usize,
    /// Every epoch's metrics.
    pub history: Vec<EpochMetrics>,
    /// A sample from the trained model (200 bytes after a newline, temperature 0.8, top-k 40).
    pub sample: String,
    /// Seconds this call took.
    pub wall_seconds: f64,
}

impl Report for GptReport {
    fn summary(&self) -> String {
        format!(
            "validation loss {:.4} ({:.3} bits per byte) after {} step{} ({} epoch{}), {:.0} training tokens/s{}; run in {}",
            self.val_loss,
            self.val_bits_per_byte,
            self.steps,
            if self.steps == 1 { "" } else { "s" },
            self.epochs,
            if self.epochs == 1 { "" } else { "s" },
            self.tokens_per_sec,
            match (&self.tensor_parallel, self.ranks) {
                (Some(tp), n) => format!(
                    ", blocks split over {} tensor-parallel ranks{} ({} parameters per rank of {})",
                    tp.ranks,
                    if n > 1 {
                        format!(" x {n} data-parallel replicas")
                    } else {
                        String::new()
                    },
                    tp.parameter_elements_per_rank,
                    tp.unsharded_parameter_elements
                ),
                (None, 1) => String::new(),
                (None, n) => format!(" on {n} ranks"),
            },
            self.run_dir.display()
        )
    }

    fn details(&self) -> Option<String> {
        let table = run_table(
            (&self.run_dir, self.checkpoint.as_deref()),
            &self.history,
            self.resumed_from_epoch,
            self.wall_seconds,
        );
        let m = &self.model;
        Some(format!(
            "{table}\n  {:<11} {} layers, {} heads, {} wide, {} tokens of context, {} parameters\n  sample:\n{}",
            "model",
            m.layers,
            m.heads,
            m.embed,
            m.block_size,
            self.parameters,
            self.sample
                .lines()
                .map(|l| format!("    {l}"))
                .collect::<Vec<_>>()
                .join("\n")
        ))
    }
}

/// Result of `kiln generate`.
#[derive(Debug, Clone, Serialize)]
pub struct GenerateReport {
    /// The checkpoint sampled from.
    pub checkpoint: PathBuf,
    /// The text continued.
    pub prompt: String,
    /// What the model added.
    pub text: String,
    /// Tokens (bytes) added.
    pub tokens: usize,
    /// Tokens drawn per second.
    pub tokens_per_sec: f64,
    /// Sampling temperature (0: greedy).
    pub temperature: f32,
    /// Top-k, if set.
    pub top_k: Option<usize>,
    /// Seed of the draws.
    pub seed: u64,
    /// Whether keys and values were cached.
    pub cached: bool,
}

impl Report for GenerateReport {
    fn summary(&self) -> String {
        format!(
            "{} tokens at {:.0} tokens/s from {}",
            self.tokens,
            self.tokens_per_sec,
            self.checkpoint.display()
        )
    }
}
