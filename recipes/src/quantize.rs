//! The quantize recipe: post-training quantization of a SimpleCNN checkpoint (or of
//! PyTorch weights) to an int8/int4 file, and a report comparing it with the float model on
//! the MNIST test split: size, accuracy, argmax agreement, throughput and latency.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::{Device, Tensor};
use kiln_models::quant::{
    Activations, Granularity, Int8ResNet, Int8SimpleCnn, QuantBits, QuantScheme, QuantizedSizes,
    read_quantized_info, save_quantized_with,
};
use kiln_models::{ResNet, SimpleCnn};
use kiln_trainer::TrainError;
use kiln_trainer::data::{ImageDataset, MnistSplit, make_batch};

use crate::cnn_mnist::check_image_shape;
use crate::error::{RecipeError, Result};
use crate::finetune::open_data;
use crate::inference::{ModelSource, Net, Quantization, argmax, load};
use crate::mnist_data::MnistSource;
use crate::report::QuantizeReport;
use crate::run_info::ModelName;

/// Configuration of `kiln quantize`.
#[derive(Debug, Clone)]
pub struct QuantizeConfig {
    /// The float model: a cnn-mnist checkpoint (or run directory), or SimpleCNN weights.
    pub source: ModelSource,
    /// Integer width; `None` takes a quantization-aware checkpoint's own, else int8.
    pub bits: Option<QuantBits>,
    /// Scale granularity; `None` takes a quantization-aware checkpoint's own, else per tensor.
    pub granularity: Option<Granularity>,
    /// Quantized file to write; `None` puts it next to the checkpoint.
    pub out: Option<PathBuf>,
    /// Test data for the comparison.
    pub data: MnistSource,
    /// Batch size of the throughput measurement.
    pub batch_size: NonZeroUsize,
    /// Timed batches per model for throughput (interleaved; the median is reported).
    pub throughput_batches: NonZeroUsize,
    /// Timed single-sample passes per model for latency (interleaved; the median is reported).
    pub latency_samples: NonZeroUsize,
    /// How the integer path quantizes activations (int8 SimpleCNN files).
    pub activations: ActivationMode,
    /// Training batches of 32 images that static activation ranges are measured on.
    pub calibration_batches: NonZeroUsize,
}

/// How activations of an int8 file are quantized at inference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActivationMode {
    /// Each layer's input range measured on every batch.
    Dynamic,
    /// Ranges fixed by calibration on training images, stored in the file.
    Static,
    /// Weight-only quantization: the file runs in float32 on its dequantized weights.
    Float,
}

impl QuantizeConfig {
    /// Batch 256 for throughput, 20 timed batches and 200 single-sample passes per model.
    pub fn new(source: ModelSource, data: MnistSource) -> Self {
        Self {
            source,
            bits: None,
            granularity: None,
            out: None,
            data,
            batch_size: NonZeroUsize::new(256).expect("256 is not zero"),
            throughput_batches: NonZeroUsize::new(20).expect("20 is not zero"),
            latency_samples: NonZeroUsize::new(200).expect("200 is not zero"),
            activations: ActivationMode::Static,
            calibration_batches: NonZeroUsize::new(32).expect("32 is not zero"),
        }
    }
}

/// Quantizes the model, writes the file, loads it back and compares it with the float model.
///
/// # Errors
/// Checkpoint, weight and data errors naming the file; [`RecipeError::Options`] for a model
/// that is already quantized, not SimpleCNN, or an `--out` that would overwrite some other
/// kind of file; [`RecipeError::Import`] when the file cannot be written.
pub fn run(config: &QuantizeConfig) -> Result<QuantizeReport> {
    let device = Device::flex();
    let loaded = load(&config.source, &device)?;
    let aware = match loaded.quantization {
        Quantization::Float => None,
        Quantization::Aware(scheme) => Some(scheme),
        Quantization::Quantized(_) => {
            return Err(RecipeError::Options {
                flag: "--checkpoint",
                reason: format!(
                    "{} is already quantized; quantize the float checkpoint it came from",
                    loaded.source.display()
                ),
            });
        }
    };
    let scheme_default = aware.unwrap_or(QuantScheme::INT8);
    let scheme = QuantScheme {
        bits: config.bits.unwrap_or(scheme_default.bits),
        granularity: config.granularity.unwrap_or(scheme_default.granularity),
    };
    let out = match &config.out {
        Some(out) => out.clone(),
        None => default_output(&loaded.source, loaded.name, scheme),
    };
    refuse_to_clobber(&out, &loaded.source)?;
    // The labelled data the model is compared on, and the quantized model read back from the
    // file, as `kiln eval` reads it.
    let float = loaded.model.valid();
    let (test, quantized, sizes): (Box<dyn ImageDataset>, Net, QuantizedSizes) =
        match (&float, &loaded.finetune) {
            (Net::SimpleCnn(model), _) => {
                let test = config.data.load(MnistSplit::Test)?;
                check_image_shape(&test)?;
                let activations = activations(model, scheme, config)?;
                let name = ModelName::SimpleCnn.as_str();
                let sizes =
                    save_quantized_with(model, name, None, activations.as_ref(), scheme, &out)?;
                // Read back as `kiln eval` reads it: the integer path for int8 files.
                let back = load(
                    &ModelSource::Weights {
                        model: crate::inference::ModelKind::SimpleCnn,
                        path: out.clone(),
                    },
                    &device,
                )?;
                (Box::new(test), back.model, sizes)
            }
            (Net::ResNet(model), Some(options)) => {
                let data = open_data(&options.data, options.image_size, None)?;
                let depth = ResNet::depth_from_name(loaded.name).ok_or_else(|| {
                    RecipeError::Internal(format!("{} is not a ResNet name", loaded.name))
                })?;
                let activations = resnet_activations(model, scheme, config, data.train.as_ref());
                let json = options.to_json();
                let sizes = save_quantized_with(
                    model,
                    loaded.name,
                    Some(&json),
                    activations.as_ref(),
                    scheme,
                    &out,
                )?;
                // Read back as `kiln eval` reads it: the integer path for int8 files.
                let kind = crate::inference::ModelKind::ResNet {
                    depth,
                    num_classes: options.classes.len(),
                };
                let back = load(
                    &ModelSource::Weights {
                        model: kind,
                        path: out.clone(),
                    },
                    &device,
                )?;
                (data.val, back.model, sizes)
            }
            (Net::SimpleCnnInt8(_) | Net::ResNetInt8(_), _) | (Net::ResNet(_), None) => {
                return Err(RecipeError::Options {
                    flag: "--model",
                    reason: format!(
                        "kiln quantize compares the models on labelled data: quantize a fine-tuned \
                     {} checkpoint (kiln finetune), whose validation folder it uses",
                        loaded.name
                    ),
                });
            }
        };
    let comparison = compare(
        &float,
        &quantized,
        test.as_ref(),
        config.batch_size,
        &device,
    );
    let speed = time_models(&float, &quantized, test.as_ref(), config, &device)?;
    Ok(QuantizeReport {
        model: loaded.name.into(),
        source: loaded.source.clone(),
        output: out,
        scheme: scheme.to_string(),
        quantization_aware: aware.map(|s| s.to_string()),
        fp32_bytes: sizes.float_bytes,
        quantized_bytes: sizes.quantized_bytes,
        size_ratio: sizes.quantized_bytes as f64 / sizes.float_bytes as f64,
        test_samples: comparison.samples,
        fp32_accuracy: comparison.float_correct as f64 / comparison.samples.max(1) as f64,
        quantized_accuracy: comparison.quantized_correct as f64 / comparison.samples.max(1) as f64,
        argmax_agreement: comparison.agree as f64 / comparison.samples.max(1) as f64,
        max_abs_logit_diff: comparison.max_abs_logit_diff,
        throughput_batch_size: config.batch_size.get(),
        fp32_samples_per_sec: speed.float_samples_per_sec,
        quantized_samples_per_sec: speed.quantized_samples_per_sec,
        fp32_latency_ms: speed.float_latency_ms,
        quantized_latency_ms: speed.quantized_latency_ms,
        inference: quantized.inference_path(),
        cpu: cpu_line(),
    })
}

/// `MODEL (kiln kernels: LEVEL)`, for reports with speed figures.
fn cpu_line() -> String {
    let isa = kiln_kernels::isa::IsaReport::current();
    format!("{} (kiln kernels: {})", isa.cpu_model, isa.kernels)
}

/// The activation quantization an int8 SimpleCNN file records: static ranges calibrated on
/// `config.calibration_batches` batches of 32 training images, or dynamic; `None` for
/// weight-only files and those the integer path does not run (int4, block-wise).
fn activations(
    model: &SimpleCnn,
    scheme: QuantScheme,
    config: &QuantizeConfig,
) -> Result<Option<Activations>> {
    if config.activations == ActivationMode::Float {
        return Ok(None);
    }
    let Some(mut int8) = Int8SimpleCnn::new(model, scheme, Activations::Dynamic) else {
        return Ok(None);
    };
    if config.activations == ActivationMode::Static {
        let train = config.data.load(MnistSplit::Train)?;
        check_image_shape(&train)?;
        int8.calibrate(calibration_batches(&train, config));
    }
    Ok(Some(int8.activations().clone()))
}

/// The activation quantization an int8 ResNet file records, as [`activations`] for SimpleCNN:
/// static ranges calibrated on `config.calibration_batches` batches of 32 of `train` (the
/// fine-tuning data's training images), or dynamic; `None` for weight-only, int4 and
/// block-wise files (and models the integer path does not run).
fn resnet_activations(
    model: &ResNet,
    scheme: QuantScheme,
    config: &QuantizeConfig,
    train: &dyn ImageDataset,
) -> Option<Activations> {
    if config.activations == ActivationMode::Float || scheme.bits != QuantBits::Int8 {
        return None;
    }
    let mut int8 = Int8ResNet::new(model, Activations::Dynamic)?;
    if config.activations == ActivationMode::Static {
        int8.calibrate(calibration_batches(train, config));
    }
    Some(int8.activations().clone())
}

/// The first `config.calibration_batches` batches of 32 images of `data` (fewer when it
/// runs out), as static calibration sees them.
fn calibration_batches<'a>(
    data: &'a dyn ImageDataset,
    config: &QuantizeConfig,
) -> impl Iterator<Item = Tensor<4>> + 'a {
    let device = Device::flex();
    (0..config.calibration_batches.get())
        .map(move |b| (b * 32..((b + 1) * 32).min(data.len())).collect::<Vec<_>>())
        .take_while(|chunk| !chunk.is_empty())
        .map(move |chunk| make_batch(data, &chunk, &device).images)
}

/// `RUN/model-int8-tensor.safetensors` for a checkpoint in `RUN/checkpoints/`, else next to
/// the source file.
fn default_output(source: &Path, model: &str, scheme: QuantScheme) -> PathBuf {
    let parent = source.parent().unwrap_or(Path::new("."));
    let dir = if parent
        .file_name()
        .is_some_and(|n| n == kiln_trainer::checkpoint::CHECKPOINT_DIR)
    {
        parent.parent().unwrap_or(Path::new("."))
    } else {
        parent
    };
    let scheme = scheme.to_string().replace(':', "-");
    dir.join(format!("{model}-{scheme}.safetensors"))
}

/// Overwriting an earlier quantized file is fine; anything else (the checkpoint itself, a
/// PyTorch file, a directory) is refused.
fn refuse_to_clobber(out: &Path, source: &Path) -> Result<()> {
    let refuse = |why: &str| {
        Err(RecipeError::Options {
            flag: "--out",
            reason: format!("{} {why}; choose another path", out.display()),
        })
    };
    if out == source {
        return refuse("is the model being quantized");
    }
    if out.is_dir() {
        return refuse("is a directory");
    }
    if out.exists() && read_quantized_info(out).ok().flatten().is_none() {
        return refuse("exists and is not a kiln quantized model, so it is not overwritten");
    }
    if out.extension().is_none_or(|e| e != "safetensors") {
        return refuse("should end in .safetensors (the file is SafeTensors)");
    }
    Ok(())
}

/// Counts over the test split.
struct Comparison {
    samples: usize,
    float_correct: usize,
    quantized_correct: usize,
    agree: usize,
    max_abs_logit_diff: f64,
}

fn logits(model: &Net, images: Tensor<4>) -> Vec<f32> {
    model
        .forward(images)
        .into_data()
        .try_to_vec::<f32>()
        .unwrap_or_default()
}

fn compare(
    float: &Net,
    quantized: &Net,
    test: &dyn ImageDataset,
    batch_size: NonZeroUsize,
    device: &Device,
) -> Comparison {
    let mut c = Comparison {
        samples: 0,
        float_correct: 0,
        quantized_correct: 0,
        agree: 0,
        max_abs_logit_diff: 0.0,
    };
    let indices: Vec<usize> = (0..test.len()).collect();
    for chunk in indices.chunks(batch_size.get()) {
        let batch = make_batch(test, chunk, device);
        let targets = batch
            .targets
            .into_data()
            .convert::<i64>()
            .try_to_vec::<i64>()
            .unwrap_or_default();
        let a = logits(float, batch.images.clone());
        let b = logits(quantized, batch.images);
        let classes = a.len() / chunk.len().max(1);
        for ((ra, rb), &target) in a
            .chunks_exact(classes)
            .zip(b.chunks_exact(classes))
            .zip(&targets)
        {
            let (pa, pb) = (argmax(ra), argmax(rb));
            c.samples += 1;
            c.float_correct += usize::from(pa as i64 == target);
            c.quantized_correct += usize::from(pb as i64 == target);
            c.agree += usize::from(pa == pb);
        }
        for (x, y) in a.iter().zip(&b) {
            c.max_abs_logit_diff = c.max_abs_logit_diff.max(f64::from((x - y).abs()));
        }
    }
    c
}

/// Medians of interleaved timings.
struct Speed {
    float_samples_per_sec: f64,
    quantized_samples_per_sec: f64,
    float_latency_ms: f64,
    quantized_latency_ms: f64,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Throughput at `config.batch_size` and latency at batch 1, float and quantized alternating
/// so that both see the same machine state; one untimed pass of each warms up.
fn time_models(
    float: &Net,
    quantized: &Net,
    test: &dyn ImageDataset,
    config: &QuantizeConfig,
    device: &Device,
) -> Result<Speed> {
    if test.is_empty() {
        return Err(RecipeError::Train(TrainError::Config {
            field: "--data",
            reason: "the test split is empty".into(),
        }));
    }
    let n = config.batch_size.get();
    let indices: Vec<usize> = (0..n).map(|i| i % test.len()).collect();
    let images = make_batch(test, &indices, device).images;
    let one = make_batch(test, &[0], device).images;
    let time = |model: &Net, images: &Tensor<4>| {
        let start = Instant::now();
        let _ = logits(model, images.clone());
        start.elapsed().as_secs_f64()
    };
    let _ = (time(float, &images), time(quantized, &images));
    let (mut fb, mut qb) = (Vec::new(), Vec::new());
    for _ in 0..config.throughput_batches.get() {
        fb.push(n as f64 / time(float, &images));
        qb.push(n as f64 / time(quantized, &images));
    }
    let (mut fl, mut ql) = (Vec::new(), Vec::new());
    for _ in 0..config.latency_samples.get() {
        fl.push(1e3 * time(float, &one));
        ql.push(1e3 * time(quantized, &one));
    }
    Ok(Speed {
        float_samples_per_sec: median(fb),
        quantized_samples_per_sec: median(qb),
        float_latency_ms: median(fl),
        quantized_latency_ms: median(ql),
    })
}
