//! Evaluation and prediction from a kiln checkpoint or from PyTorch-exported weights.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use kiln_models::{SimpleCnn, SimpleCnnConfig, load_weights};
use kiln_trainer::checkpoint::{EpochMetrics, read_checkpoint, resolve_checkpoint};
use kiln_trainer::data::{MnistSplit, NpyArray, read_npy_f32, write_npy_f32};
use kiln_trainer::{TrainError, evaluate};

use crate::cnn_mnist::{MODEL, check_image_shape};
use crate::error::{RecipeError, Result};
use crate::mnist_data::MnistSource;
use crate::report::{EvalReport, PredictReport};

/// Model architectures that can be evaluated from raw weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    /// [`SimpleCnn`].
    SimpleCnn,
}

impl ModelKind {
    /// The name used in checkpoints and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::SimpleCnn => MODEL,
        }
    }
}

/// Where a model's parameters come from.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// A kiln checkpoint file, or a run directory (its latest checkpoint).
    Checkpoint(PathBuf),
    /// A PyTorch `state_dict` in `.pth`/`.pt` or `.safetensors` form.
    Weights {
        /// Architecture to build.
        model: ModelKind,
        /// Weight file.
        path: PathBuf,
    },
}

/// A loaded model plus what its checkpoint said about its training.
struct Loaded {
    model: SimpleCnn,
    source: PathBuf,
    trained: Option<(f64, usize)>,
}

fn load(source: &ModelSource, device: &Device) -> Result<Loaded> {
    match source {
        ModelSource::Weights { model, path } => match model {
            ModelKind::SimpleCnn => {
                let mut net = SimpleCnnConfig::new().init(device, 0);
                let _report = load_weights(&mut net, path)?;
                Ok(Loaded {
                    model: net,
                    source: path.clone(),
                    trained: None,
                })
            }
        },
        ModelSource::Checkpoint(path) => {
            let file = resolve_checkpoint(path)?;
            let checkpoint = read_checkpoint(&file)?;
            if checkpoint.state.model != MODEL {
                return Err(RecipeError::UnknownModel {
                    path: file,
                    model: checkpoint.state.model,
                });
            }
            let model = checkpoint.load_model(SimpleCnnConfig::new().init(device, 0), &file)?;
            let throughput = EpochMetrics::throughput(&checkpoint.state.history);
            Ok(Loaded {
                model,
                source: file,
                trained: Some((throughput, checkpoint.state.epoch)),
            })
        }
    }
}

/// Evaluates a model on the test split of `data`.
///
/// # Errors
/// Checkpoint, weight-import and data errors, each naming the bad file.
pub fn eval(source: &ModelSource, data: &MnistSource, batch_size: usize) -> Result<EvalReport> {
    let batch_size = NonZeroUsize::new(batch_size).ok_or(TrainError::Config {
        field: "--batch-size",
        reason: "must be at least 1".into(),
    })?;
    let device = Device::flex();
    let loaded = load(source, &device)?;
    let test = data.load(MnistSplit::Test)?;
    check_image_shape(&test)?;
    let metrics = evaluate(
        &loaded.model,
        SimpleCnn::forward,
        &test,
        batch_size,
        &device,
    );
    Ok(EvalReport {
        model: MODEL.into(),
        source: loaded.source,
        test_accuracy: metrics.accuracy,
        test_loss: metrics.loss,
        samples: metrics.samples,
        samples_per_sec: loaded.trained.map(|(t, _)| t),
        epochs: loaded.trained.map(|(_, e)| e),
        eval_samples_per_sec: metrics.samples_per_sec,
    })
}

/// Runs the float32 NCHW batch in `input` (a `.npy` file, used as is: no preprocessing)
/// through the model in evaluation mode and writes the logits to `output` as `.npy`.
///
/// # Errors
/// Checkpoint and weight-import errors, a bad or mis-shaped `.npy` input, and write errors.
pub fn predict(source: &ModelSource, input: &Path, output: &Path) -> Result<PredictReport> {
    let device = Device::flex();
    let loaded = load(source, &device)?;
    let array = read_npy_f32(input)?;
    let per_sample = SimpleCnn::input_shape();
    let n = match array.shape.as_slice() {
        [n, c, h, w] if [*c, *h, *w] == per_sample && *n > 0 => *n,
        _ => {
            return Err(RecipeError::InputShape {
                path: input.to_path_buf(),
                found: array.shape,
                expected: format!("{}, {}, {}", per_sample[0], per_sample[1], per_sample[2]),
            });
        }
    };
    let model = loaded.model.valid();
    let images = Tensor::<4>::from_data(
        TensorData::new(
            array.values,
            [n, per_sample[0], per_sample[1], per_sample[2]],
        ),
        &device,
    );
    let logits = model.forward(images);
    let [_, classes] = logits.dims();
    let values = logits
        .into_data()
        .try_to_vec::<f32>()
        .map_err(|e| RecipeError::Internal(format!("logits are not float32: {e:?}")))?;
    let predictions = values.chunks_exact(classes).map(argmax).collect();
    write_npy_f32(
        output,
        &NpyArray {
            shape: vec![n, classes],
            values,
        },
    )?;
    Ok(PredictReport {
        model: MODEL.into(),
        samples: n,
        output: output.to_path_buf(),
        predictions,
    })
}

/// Index of the largest value (the first one on ties, like `torch.argmax`).
fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 { (i, v) } else { best }
        })
        .0
}
