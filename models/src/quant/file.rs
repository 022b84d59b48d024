//! Quantized model files: SafeTensors with PyTorch's names and layouts, integer weights and
//! float scales, readable by any SafeTensors reader.
//!
//! Every Linear/Conv2d weight `NAME` (a rank-2 or rank-4 `*.weight`) is stored as
//! `NAME.qweight` (`I8` in the weight's shape for int8; `U8`, two weights per byte, for
//! int4) and `NAME.scale` (`F32`, one per group). Biases and normalisation tensors stay
//! `F32` under their own names. The header's metadata says what the file is:
//! `kiln.format = quantized-v1`, `kiln.model`, `kiln.scheme` (`int8:tensor`, ...) and
//! `kiln.shape.NAME` for each quantized weight.

use std::collections::HashMap;
use std::path::Path;

use burn::module::Module;
use burn::store::{BurnToPyTorchAdapter, ModuleSnapshot, SafetensorsStore};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use super::scheme::{QuantBits, QuantScheme};
use super::weights::{QuantizedTensor, group_count};
use crate::error::{ImportError, Result};

/// Metadata key naming kiln's file kinds.
const FORMAT_KEY: &str = "kiln.format";
/// The value of [`FORMAT_KEY`] in quantized files.
const QUANTIZED_FORMAT: &str = "quantized-v1";
/// Metadata key of the model architecture (`simple-cnn`, `resnet18`, ...).
const MODEL_KEY: &str = "kiln.model";
/// Metadata key of the scheme, as [`QuantScheme`]'s `Display` writes it.
const SCHEME_KEY: &str = "kiln.scheme";
/// Metadata key of the recipe settings a model needs to be rebuilt and evaluated (JSON),
/// e.g. a fine-tuned ResNet's classes and image size.
const OPTIONS_KEY: &str = "kiln.options";
/// Metadata key of the activations' quantization (JSON of [`super::Activations`]), for the
/// integer inference path.
const ACTIVATIONS_KEY: &str = "kiln.activations";
/// Prefix of the metadata keys holding quantized weights' shapes.
const SHAPE_PREFIX: &str = "kiln.shape.";
/// Suffix of a quantized weight's integers.
const QWEIGHT: &str = ".qweight";
/// Suffix of a quantized weight's scales.
const SCALE: &str = ".scale";

/// What a quantized file holds, from its header.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedFileInfo {
    /// Model architecture name.
    pub model: String,
    /// Scheme of its quantized weights.
    pub scheme: QuantScheme,
    /// Number of quantized weight tensors.
    pub quantized_tensors: usize,
    /// Recipe settings stored with the model (JSON), if any.
    pub options: Option<String>,
    /// How integer inference quantizes activations (`None`: a file from before activations
    /// were recorded, or one quantized for the float path only; dynamic then).
    pub activations: Option<super::Activations>,
}

/// An owned tensor on its way into a SafeTensors file.
struct Entry {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

fn serialize(entries: &[(String, Entry)], metadata: HashMap<String, String>) -> Result<Vec<u8>> {
    let views = entries
        .iter()
        .map(|(name, e)| {
            TensorView::new(e.dtype, e.shape.clone(), &e.bytes).map(|view| (name.clone(), view))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| ImportError::Export(e.to_string()))?;
    safetensors::serialize(views, Some(metadata)).map_err(|e| ImportError::Export(e.to_string()))
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn f32_values(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// torchvision calls kiln's `downsample.conv`/`downsample.bn` `downsample.0`/`downsample.1`.
fn torchvision_name(name: &str) -> String {
    name.replace(".downsample.conv.", ".downsample.0.")
        .replace(".downsample.bn.", ".downsample.1.")
}

/// Whether a float tensor of this name and shape is a Linear or Conv2d weight.
fn is_quantizable(name: &str, shape: &[usize]) -> bool {
    name.ends_with(".weight") && matches!(shape.len(), 2 | 4)
}

/// The model's parameters as a float32 SafeTensors file with PyTorch's names and layouts (the
/// file `safetensors.torch.save_file(model.state_dict())` would write, without BatchNorm's
/// `num_batches_tracked`), tagged with `model` in its metadata.
///
/// # Errors
/// [`ImportError::Export`] when Burn cannot collect or serialize a tensor.
pub fn float_safetensors<M: Module>(model: &M, model_name: &str) -> Result<Vec<u8>> {
    float_safetensors_with(model, model_name, None)
}

/// [`float_safetensors`] with recipe settings (JSON) stored under `kiln.options`, which
/// [`quantize_safetensors`] carries into the quantized file.
///
/// # Errors
/// As [`float_safetensors`].
pub fn float_safetensors_with<M: Module>(
    model: &M,
    model_name: &str,
    options: Option<&str>,
) -> Result<Vec<u8>> {
    // Enum variant names (ResNet's `ResidualBlock::Basic`) are not part of torchvision's paths.
    let mut store = SafetensorsStore::from_bytes(None)
        .with_to_adapter(BurnToPyTorchAdapter)
        .skip_enum_variants(true);
    model
        .save_into(&mut store)
        .map_err(|e| ImportError::Export(e.to_string()))?;
    let burn_bytes = store
        .get_bytes()
        .map_err(|e| ImportError::Export(e.to_string()))?;
    let parsed =
        SafeTensors::deserialize(&burn_bytes).map_err(|e| ImportError::Export(e.to_string()))?;
    let mut entries: Vec<(String, Entry)> = parsed
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let entry = Entry {
                dtype: view.dtype(),
                shape: view.shape().to_vec(),
                bytes: view.data().to_vec(),
            };
            (torchvision_name(&name), entry)
        })
        .collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let mut metadata = HashMap::from([(MODEL_KEY.to_string(), model_name.to_string())]);
    if let Some(options) = options {
        metadata.insert(OPTIONS_KEY.to_string(), options.to_string());
    }
    serialize(&entries, metadata)
}

/// Quantizes the Linear and Conv2d weights of a float SafeTensors file made by
/// [`float_safetensors`]; every other tensor is kept as it is.
///
/// # Errors
/// [`ImportError::Export`] when `float` is not a SafeTensors file or a weight is not `F32`.
pub fn quantize_safetensors(float: &[u8], scheme: QuantScheme) -> Result<Vec<u8>> {
    quantize_safetensors_with(float, scheme, None)
}

/// [`quantize_safetensors`] recording how activations are to be quantized.
///
/// # Errors
/// As [`quantize_safetensors`].
pub fn quantize_safetensors_with(
    float: &[u8],
    scheme: QuantScheme,
    activations: Option<&super::Activations>,
) -> Result<Vec<u8>> {
    let (_, header) =
        SafeTensors::read_metadata(float).map_err(|e| ImportError::Export(e.to_string()))?;
    let source = header.metadata().clone().unwrap_or_default();
    let model = source.get(MODEL_KEY).cloned().unwrap_or_default();
    let parsed = SafeTensors::deserialize(float).map_err(|e| ImportError::Export(e.to_string()))?;
    let mut metadata = HashMap::from([
        (FORMAT_KEY.to_string(), QUANTIZED_FORMAT.to_string()),
        (MODEL_KEY.to_string(), model),
        (SCHEME_KEY.to_string(), scheme.to_string()),
    ]);
    if let Some(options) = source.get(OPTIONS_KEY) {
        metadata.insert(OPTIONS_KEY.to_string(), options.clone());
    }
    if let Some(activations) = activations {
        let json =
            serde_json::to_string(activations).map_err(|e| ImportError::Export(e.to_string()))?;
        metadata.insert(ACTIVATIONS_KEY.to_string(), json);
    }
    let mut entries = Vec::new();
    for (name, view) in parsed.tensors() {
        let shape = view.shape().to_vec();
        if !is_quantizable(&name, &shape) {
            entries.push((
                name,
                Entry {
                    dtype: view.dtype(),
                    shape,
                    bytes: view.data().to_vec(),
                },
            ));
            continue;
        }
        if view.dtype() != Dtype::F32 {
            return Err(ImportError::Export(format!(
                "{name} is {:?}, only F32 weights are quantized",
                view.dtype()
            )));
        }
        let q = QuantizedTensor::quantize(&f32_values(view.data()), &shape, scheme);
        let packed = q.packed_values();
        let (dtype, stored_shape) = match scheme.bits {
            QuantBits::Int8 => (Dtype::I8, shape.clone()),
            QuantBits::Int4 => (Dtype::U8, vec![packed.len()]),
        };
        let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
        metadata.insert(format!("{SHAPE_PREFIX}{name}"), dims.join(","));
        entries.push((
            format!("{name}{SCALE}"),
            Entry {
                dtype: Dtype::F32,
                shape: vec![q.scales.len()],
                bytes: f32_bytes(&q.scales),
            },
        ));
        entries.push((
            format!("{name}{QWEIGHT}"),
            Entry {
                dtype,
                shape: stored_shape,
                bytes: packed,
            },
        ));
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    serialize(&entries, metadata)
}

/// The header of a kiln quantized file, or `None` when `bytes` is some other SafeTensors
/// file (or no SafeTensors file at all).
pub fn quantized_info(bytes: &[u8]) -> Option<QuantizedFileInfo> {
    let (_, header) = SafeTensors::read_metadata(bytes).ok()?;
    let metadata = header.metadata().as_ref()?;
    if metadata.get(FORMAT_KEY).map(String::as_str) != Some(QUANTIZED_FORMAT) {
        return None;
    }
    Some(QuantizedFileInfo {
        model: metadata.get(MODEL_KEY).cloned().unwrap_or_default(),
        scheme: metadata.get(SCHEME_KEY)?.parse().ok()?,
        quantized_tensors: metadata
            .keys()
            .filter(|k| k.starts_with(SHAPE_PREFIX))
            .count(),
        options: metadata.get(OPTIONS_KEY).cloned(),
        activations: match metadata.get(ACTIVATIONS_KEY) {
            Some(json) => Some(serde_json::from_str(json).ok()?),
            None => None,
        },
    })
}

/// Turns a quantized file back into a float SafeTensors file (weights dequantized), ready
/// for [`crate::load_weights`]' strict loader. `path` names the file in errors.
///
/// # Errors
/// [`ImportError::Unreadable`] when the bytes are not a kiln quantized file or are corrupt
/// (truncated, a missing scale, a value out of range, lengths that do not agree).
pub fn dequantize_safetensors(bytes: &[u8], path: &Path) -> Result<(QuantizedFileInfo, Vec<u8>)> {
    let corrupt = |reason: String| ImportError::Unreadable {
        path: path.to_path_buf(),
        reason,
    };
    let parsed = SafeTensors::deserialize(bytes).map_err(|e| corrupt(e.to_string()))?;
    let info = quantized_info(bytes).ok_or_else(|| {
        corrupt("not a kiln quantized model (no kiln.format = quantized-v1 in its header)".into())
    })?;
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| corrupt(e.to_string()))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let scheme = info.scheme;
    let mut entries = Vec::new();
    for (name, view) in parsed.tensors() {
        if name.ends_with(SCALE) {
            continue;
        }
        let Some(base) = name.strip_suffix(QWEIGHT) else {
            entries.push((
                name,
                Entry {
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    bytes: view.data().to_vec(),
                },
            ));
            continue;
        };
        let shape: Vec<usize> = metadata
            .get(&format!("{SHAPE_PREFIX}{base}"))
            .ok_or_else(|| corrupt(format!("no shape recorded for {base}")))?
            .split(',')
            .map(str::parse)
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| corrupt(format!("bad shape recorded for {base}")))?;
        let len: usize = shape.iter().product();
        let values =
            QuantizedTensor::unpack_values(view.data(), len, scheme.bits).ok_or_else(|| {
                corrupt(format!(
                    "{name} does not hold {len} {} values",
                    scheme.bits.name()
                ))
            })?;
        let scale_view = parsed
            .tensor(&format!("{base}{SCALE}"))
            .map_err(|_| corrupt(format!("{base}{SCALE} is missing")))?;
        let scales = f32_values(scale_view.data());
        if scale_view.dtype() != Dtype::F32 || scales.len() != group_count(&shape, scheme) {
            return Err(corrupt(format!(
                "{base}{SCALE} does not hold {} float32 scales",
                group_count(&shape, scheme)
            )));
        }
        let q = QuantizedTensor {
            shape: shape.clone(),
            scheme,
            values,
            scales,
        };
        entries.push((
            base.to_string(),
            Entry {
                dtype: Dtype::F32,
                shape,
                bytes: f32_bytes(&q.dequantize()),
            },
        ));
    }
    let metadata = HashMap::from([(MODEL_KEY.to_string(), info.model.clone())]);
    Ok((info, serialize(&entries, metadata)?))
}
