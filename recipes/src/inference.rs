//! Evaluation and prediction from a kiln checkpoint or from PyTorch-exported weights.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use kiln_kernels::int8::Int8Kernel;
use kiln_models::quant::{
    Activations, Int8ResNet, Int8SimpleCnn, QuantBits, QuantScheme, QuantizedFileInfo,
    load_quantized, read_quantized_info, round_weights,
};
use kiln_models::{ResNet, ResNetDepth, SimpleCnn, SimpleCnnConfig, load_weights};
use kiln_multi::DeviceSpec;
use kiln_trainer::checkpoint::{EpochMetrics, read_checkpoint, resolve_checkpoint};
use kiln_trainer::data::{
    MnistSplit, NpyArray, is_image_file, load_eval_image, read_npy_f32, write_npy_f32,
};
use kiln_trainer::{TrainError, evaluate};

use crate::cnn_mnist::{check_image_shape, checkpoint_quantization};
use crate::error::{RecipeError, Result};
use crate::finetune::{FinetuneOptions, open_data};
use crate::mnist_data::MnistSource;
use crate::report::{ClassScore, EvalReport, ImagePrediction, ImagePredictions, PredictReport};
use crate::run_info::ModelName;

/// Model architectures that can be built for PyTorch weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    /// [`SimpleCnn`].
    SimpleCnn,
    /// A torchvision ResNet with `num_classes` outputs.
    ResNet {
        /// 18, 34 or 50 layers.
        depth: ResNetDepth,
        /// Outputs of its `fc` layer (1000 for ImageNet weights).
        num_classes: usize,
    },
}

impl ModelKind {
    /// The name used in checkpoints and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::SimpleCnn => ModelName::SimpleCnn.as_str(),
            ModelKind::ResNet { depth, .. } => depth.name(),
        }
    }
}

/// A built model of any kind kiln knows.
pub(crate) enum Net {
    SimpleCnn(SimpleCnn),
    ResNet(ResNet),
    /// A quantized SimpleCNN file on the integer path.
    SimpleCnnInt8(Box<Int8SimpleCnn>),
    /// A quantized ResNet file on the integer path.
    ResNetInt8(Box<Int8ResNet>),
}

impl Net {
    pub(crate) fn valid(&self) -> Self {
        match self {
            Net::SimpleCnn(m) => Net::SimpleCnn(m.valid()),
            Net::ResNet(m) => Net::ResNet(m.valid()),
            Net::SimpleCnnInt8(m) => Net::SimpleCnnInt8(m.clone()),
            Net::ResNetInt8(m) => Net::ResNetInt8(m.clone()),
        }
    }

    /// How this model runs: `float32`, or the integer path with its kernel and activations.
    pub(crate) fn inference_path(&self) -> String {
        match self {
            Net::SimpleCnn(_) | Net::ResNet(_) => "float32".into(),
            Net::SimpleCnnInt8(m) => integer_path_name(m.activations()),
            Net::ResNetInt8(m) => integer_path_name(m.activations()),
        }
    }

    fn round_weights(self, scheme: QuantScheme) -> Self {
        match self {
            Net::SimpleCnn(m) => Net::SimpleCnn(round_weights(m, scheme)),
            Net::ResNet(m) => Net::ResNet(round_weights(m, scheme)),
            int8 @ (Net::SimpleCnnInt8(_) | Net::ResNetInt8(_)) => int8,
        }
    }

    pub(crate) fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        match self {
            Net::SimpleCnn(m) => m.forward(images),
            Net::ResNet(m) => m.forward(images),
            Net::SimpleCnnInt8(m) => m.forward_tensor(images),
            Net::ResNetInt8(m) => m.forward_tensor(images),
        }
    }

    /// Whether the model takes samples of shape `[c, h, w]`, and what it takes if not.
    fn check_sample_shape(&self, chw: [usize; 3]) -> std::result::Result<(), String> {
        match self {
            Net::SimpleCnn(_) | Net::SimpleCnnInt8(_) => {
                let [c, h, w] = SimpleCnn::input_shape();
                (chw == [c, h, w])
                    .then_some(())
                    .ok_or(format!("{c}, {h}, {w}"))
            }
            // The stem and four stride-2 stages need at least 32x32 to leave a 1x1 map.
            Net::ResNet(_) | Net::ResNetInt8(_) => (chw[0] == 3 && chw[1] >= 32 && chw[2] >= 32)
                .then_some(())
                .ok_or_else(|| "3, H, W with H and W at least 32".to_string()),
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

/// How a loaded model's weights relate to quantization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Quantization {
    /// Plain float weights.
    Float,
    /// A quantization-aware training checkpoint: float weights trained to be rounded under
    /// this scheme; inference rounds them.
    Aware(QuantScheme),
    /// A quantized file: the weights were dequantized from integers.
    Quantized(QuantScheme),
}

impl Quantization {
    fn scheme(self) -> Option<String> {
        match self {
            Quantization::Float => None,
            Quantization::Aware(s) | Quantization::Quantized(s) => Some(s.to_string()),
        }
    }
}

/// A loaded model plus what its checkpoint said about its training.
pub(crate) struct Loaded {
    /// The model with the weights as stored.
    pub(crate) model: Net,
    pub(crate) name: &'static str,
    pub(crate) source: PathBuf,
    pub(crate) trained: Option<(f64, usize)>,
    pub(crate) quantization: Quantization,
    /// A fine-tuned ResNet's classes, image size and data.
    pub(crate) finetune: Option<FinetuneOptions>,
}

impl Loaded {
    /// The model as inference runs it: in evaluation mode, and with a quantization-aware
    /// checkpoint's weights rounded as they were in training.
    fn inference_model(&self) -> Net {
        let model = self.model.valid();
        match self.quantization {
            Quantization::Aware(scheme) => model.round_weights(scheme),
            Quantization::Float | Quantization::Quantized(_) => model,
        }
    }
}

/// The header of `path` when it is a kiln quantized model file (`.safetensors` with kiln's
/// header).
fn quantized_file(path: &Path) -> Result<Option<QuantizedFileInfo>> {
    if path.extension().is_none_or(|e| e != "safetensors") || !path.is_file() {
        return Ok(None);
    }
    Ok(read_quantized_info(path)?)
}

/// Builds the model a kiln quantized file holds: SimpleCNN, or a fine-tuned ResNet (its
/// classes and image size come from the file's header).
fn load_quantized_model(path: &Path, info: QuantizedFileInfo, device: &Device) -> Result<Loaded> {
    let name = ModelName::parse(&info.model, path)?;
    let (model, finetune) = match name {
        ModelName::SimpleCnn => {
            let mut net = SimpleCnnConfig::new().init(device, 0);
            let _ = load_quantized(&mut net, path)?;
            (integer_path(net, &info), None)
        }
        ModelName::Gpt => return Err(not_a_classifier(path)),
        ModelName::ResNet(depth) => {
            let text = info
                .options
                .as_deref()
                .ok_or_else(|| RecipeError::UnknownModel {
                    path: path.to_path_buf(),
                    model: format!("{} without its fine-tuning settings", info.model),
                })?;
            let options = FinetuneOptions::from_json(text, path)?;
            let mut net = ResNet::new(depth, options.classes.len(), device);
            let _ = load_quantized(&mut net, path)?;
            (resnet_integer_path(net, &info), Some(options))
        }
    };
    Ok(Loaded {
        name: name.as_str(),
        model,
        source: path.to_path_buf(),
        trained: None,
        quantization: Quantization::Quantized(info.scheme),
        finetune,
    })
}

/// A quantized ResNet on the integer path when its weights are int8 (per tensor or per
/// channel: folded with the BatchNorms and quantized per channel again, which for per-channel
/// files gives their integers back) and it records how to quantize activations; other files
/// stay on the float path.
fn resnet_integer_path(net: ResNet, info: &QuantizedFileInfo) -> Net {
    let int8 = match (info.scheme.bits, &info.activations) {
        (QuantBits::Int8, Some(activations)) => Int8ResNet::new(&net, activations.clone()),
        _ => None,
    };
    match int8 {
        Some(int8) => Net::ResNetInt8(Box::new(int8)),
        None => Net::ResNet(net),
    }
}

/// How a model on the integer path runs, for reports.
fn integer_path_name(activations: &Activations) -> String {
    format!(
        "int8 (u8 x i8 GEMM, {} kernel, {} activations)",
        Int8Kernel::active().name(),
        activations.name()
    )
}

/// A quantized SimpleCNN on the integer path when its weights are int8 per tensor or per
/// channel (the file's integers, exactly) and it records how to quantize activations;
/// weight-only files (`--activations float`, and files from before the integer path), int4
/// and block-wise files stay on the float path.
fn integer_path(net: SimpleCnn, info: &QuantizedFileInfo) -> Net {
    let int8 = info
        .activations
        .clone()
        .and_then(|activations| Int8SimpleCnn::new(&net, info.scheme, activations));
    match int8 {
        Some(int8) => Net::SimpleCnnInt8(Box::new(int8)),
        None => Net::SimpleCnn(net),
    }
}

pub(crate) fn load(source: &ModelSource, device: &Device) -> Result<Loaded> {
    match source {
        ModelSource::Weights { model, path } => {
            if let Some(info) = quantized_file(path)? {
                return load_quantized_model(path, info, device);
            }
            let net = match *model {
                ModelKind::SimpleCnn => {
                    let mut net = SimpleCnnConfig::new().init(device, 0);
                    let _report = load_weights(&mut net, path)?;
                    Net::SimpleCnn(net)
                }
                ModelKind::ResNet { depth, num_classes } => {
                    let mut net = ResNet::new(depth, num_classes, device);
                    let _report = load_weights(&mut net, path)?;
                    Net::ResNet(net)
                }
            };
            Ok(Loaded {
                model: net,
                name: model.name(),
                source: path.clone(),
                trained: None,
                quantization: Quantization::Float,
                finetune: None,
            })
        }
        ModelSource::Checkpoint(path) => {
            let file = resolve_checkpoint(path)?;
            if let Some(info) = quantized_file(&file)? {
                return load_quantized_model(&file, info, device);
            }
            let checkpoint = read_checkpoint(&file)?;
            let trained = Some((
                EpochMetrics::throughput(&checkpoint.state.history),
                checkpoint.state.epoch,
            ));
            match ModelName::parse(&checkpoint.state.model, &file)? {
                ModelName::ResNet(depth) => {
                    let options = FinetuneOptions::from_map(&checkpoint.state.options, &file)?;
                    let model = checkpoint
                        .load_model(ResNet::new(depth, options.classes.len(), device), &file)?;
                    Ok(Loaded {
                        model: Net::ResNet(model),
                        name: depth.name(),
                        source: file,
                        trained,
                        quantization: Quantization::Float,
                        finetune: Some(options),
                    })
                }
                ModelName::Gpt => Err(not_a_classifier(&file)),
                ModelName::SimpleCnn => {
                    let model =
                        checkpoint.load_model(SimpleCnnConfig::new().init(device, 0), &file)?;
                    let quantization = match checkpoint_quantization(&file, &checkpoint.state)? {
                        Some(scheme) => Quantization::Aware(scheme),
                        None => Quantization::Float,
                    };
                    Ok(Loaded {
                        model: Net::SimpleCnn(model),
                        name: ModelName::SimpleCnn.as_str(),
                        source: file,
                        trained,
                        quantization,
                        finetune: None,
                    })
                }
            }
        }
    }
}

/// The error of eval, predict and quantize for a language model's checkpoint.
fn not_a_classifier(file: &Path) -> RecipeError {
    RecipeError::Options {
        flag: "--checkpoint",
        reason: format!(
            "{} holds a GPT language model; eval, predict and quantize take image classifiers: \
             sample from it with kiln generate --checkpoint {}",
            file.display(),
            file.display()
        ),
    }
}

/// Evaluates a model: SimpleCNN on the MNIST test split of `data` (a directory of IDX files,
/// or the embedded subset), a fine-tuned ResNet on the `val/` folder of `data` (or of the
/// folder it was trained on).
///
/// # Errors
/// Checkpoint, weight-import and data errors, each naming the bad file.
pub fn eval(
    source: &ModelSource,
    data: Option<&Path>,
    batch_size: usize,
    device: DeviceSpec,
) -> Result<EvalReport> {
    let batch_size = NonZeroUsize::new(batch_size).ok_or(TrainError::Config {
        field: "--batch-size",
        reason: "must be at least 1".into(),
    })?;
    let device = device.device()?;
    let loaded = load(source, &device)?;
    let model = loaded.inference_model();
    let metrics = match (&model, &loaded.finetune) {
        (net @ (Net::SimpleCnn(_) | Net::SimpleCnnInt8(_)), _) => {
            let test = MnistSource::from_option(data).load(MnistSplit::Test)?;
            check_image_shape(&test)?;
            // `evaluate` takes a module; an integer model is plain data, so a constant stands
            // in for it and the closure runs the model, whichever path it is on.
            evaluate(&0usize, |_, x| net.forward(x), &test, batch_size, &device)
        }
        (net @ (Net::ResNet(_) | Net::ResNetInt8(_)), Some(options)) => {
            let root = data.unwrap_or(&options.data);
            let data = open_data(root, options.image_size, None)?;
            if data.classes != options.classes {
                return Err(RecipeError::Options {
                    flag: "--data",
                    reason: format!(
                        "{} has classes {:?}, the model was trained on {:?}",
                        root.display(),
                        data.classes,
                        options.classes
                    ),
                });
            }
            // A constant stands in for the module, as for SimpleCNN above.
            evaluate(
                &0usize,
                |_, x| net.forward(x),
                data.val.as_ref(),
                batch_size,
                &device,
            )
        }
        (Net::ResNet(_) | Net::ResNetInt8(_), None) => {
            return Err(RecipeError::Options {
                flag: "--model",
                reason: format!(
                    "kiln eval reads MNIST, which {} cannot take; evaluate a fine-tuned \
                     checkpoint (kiln finetune), or run the weights on your images with kiln predict",
                    loaded.name
                ),
            });
        }
    };
    Ok(EvalReport {
        model: loaded.name.into(),
        source: loaded.source,
        test_accuracy: metrics.accuracy,
        test_loss: metrics.loss,
        samples: metrics.samples,
        samples_per_sec: loaded.trained.map(|(t, _)| t),
        epochs: loaded.trained.map(|(_, e)| e),
        eval_samples_per_sec: metrics.samples_per_sec,
        quantization: loaded.quantization.scheme(),
        inference: model.inference_path(),
    })
}

/// Runs the float32 NCHW batch in `input` (a `.npy` file, used as is: no preprocessing)
/// through the model in evaluation mode and writes the logits to `output` as `.npy`.
///
/// # Errors
/// Checkpoint and weight-import errors, a bad or mis-shaped `.npy` input, and write errors.
pub fn predict(
    source: &ModelSource,
    input: &Path,
    output: &Path,
    device: DeviceSpec,
) -> Result<PredictReport> {
    let device = device.device()?;
    let loaded = load(source, &device)?;
    let array = read_npy_f32(input)?;
    let shape_error = |expected: String| RecipeError::InputShape {
        path: input.to_path_buf(),
        found: array.shape.clone(),
        expected,
    };
    let [n, c, h, w] = match array.shape.as_slice() {
        &[n, c, h, w] if n > 0 => [n, c, h, w],
        _ => return Err(shape_error("C, H, W".to_string())),
    };
    loaded
        .model
        .check_sample_shape([c, h, w])
        .map_err(shape_error)?;
    let model = loaded.inference_model();
    let images = Tensor::<4>::from_data(TensorData::new(array.values, [n, c, h, w]), &device);
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
        model: loaded.name.into(),
        samples: n,
        output: output.to_path_buf(),
        predictions,
    })
}

/// Index of the largest value (the first one on ties, like `torch.argmax`).
pub(crate) fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 { (i, v) } else { best }
        })
        .0
}

/// Images under `path`: the file itself, or the image files directly in the directory,
/// sorted.
fn image_files(path: &Path) -> Result<Vec<PathBuf>> {
    if is_image_file(path) {
        return Ok(vec![path.to_path_buf()]);
    }
    let no_images = || RecipeError::Options {
        flag: "--image",
        reason: format!(
            "{} is not a .png/.jpg file or a directory of them",
            path.display()
        ),
    };
    let entries = std::fs::read_dir(path).map_err(|_| no_images())?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| is_image_file(p))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(no_images());
    }
    Ok(files)
}

/// Classifies the image file, or every image file in the directory, at `path` with a ResNet
/// (torchvision's evaluation transform: resize, centre crop, ImageNet normalisation) and
/// returns the `top` most probable classes of each, with class names when the model is a
/// fine-tuned checkpoint. `image_size` defaults to the checkpoint's, else 224.
///
/// # Errors
/// Model errors as [`predict`], an unreadable image (naming it), or a SimpleCNN model (which
/// takes preprocessed `.npy` input).
pub fn predict_images(
    source: &ModelSource,
    path: &Path,
    image_size: Option<usize>,
    top: usize,
    device: DeviceSpec,
) -> Result<ImagePredictions> {
    let device = device.device()?;
    let loaded = load(source, &device)?;
    let model = loaded.inference_model();
    let (Net::ResNet(_) | Net::ResNetInt8(_)) = model else {
        return Err(RecipeError::Options {
            flag: "--image",
            reason: "images are classified by ResNets; give SimpleCNN a preprocessed .npy \
                     batch with --input"
                .to_string(),
        });
    };
    let size = image_size
        .or(loaded.finetune.as_ref().map(|o| o.image_size))
        .unwrap_or(224);
    if size < 32 {
        return Err(RecipeError::Options {
            flag: "--image-size",
            reason: format!("{size} is too small: ResNets take at least 32x32"),
        });
    }
    let names = loaded.finetune.as_ref().map(|o| o.classes.clone());
    let files = image_files(path)?;
    let mut images = Vec::with_capacity(files.len());
    for chunk in files.chunks(32) {
        let mut pixels = Vec::with_capacity(chunk.len() * 3 * size * size);
        for file in chunk {
            pixels.extend(load_eval_image(file, size)?);
        }
        let batch = Tensor::<4>::from_data(
            TensorData::new(pixels, [chunk.len(), 3, size, size]),
            &device,
        );
        let probabilities = burn::tensor::activation::softmax(model.forward(batch), 1);
        let [_, classes] = probabilities.dims();
        let values = probabilities
            .into_data()
            .try_to_vec::<f32>()
            .map_err(|e| RecipeError::Internal(format!("logits are not float32: {e:?}")))?;
        for (file, row) in chunk.iter().zip(values.chunks_exact(classes)) {
            let mut order: Vec<usize> = (0..classes).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            let top = order
                .into_iter()
                .take(top)
                .map(|index| ClassScore {
                    index,
                    class: names
                        .as_ref()
                        .and_then(|n| n.get(index).cloned())
                        .unwrap_or_else(|| index.to_string()),
                    probability: f64::from(row[index]),
                })
                .collect();
            images.push(ImagePrediction {
                file: file.clone(),
                top,
            });
        }
    }
    Ok(ImagePredictions {
        model: loaded.name.into(),
        image_size: size,
        images,
    })
}
