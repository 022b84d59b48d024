//! Weight quantization: post-training (PTQ) conversion to int8/int4 files and fake
//! quantization for quantization-aware training (QAT).
//!
//! - [`QuantScheme`]: integer width ([`QuantBits`]) and scale granularity ([`Granularity`]:
//!   per tensor, per output channel, per block of N weights); symmetric, scales from the
//!   weights' max |w| (min-max calibration).
//! - [`QuantizedTensor`]: one weight quantized as numbers; [`quantize_dequantize`] is the same
//!   arithmetic in tensor operations, and [`fake_quantize`] wraps it in a straight-through
//!   estimator for training.
//! - [`save_quantized`] / [`load_quantized`]: a model's Linear and Conv2d weights as integers
//!   plus scales in a SafeTensors file ([`file`] describes the layout); loading dequantizes
//!   into an ordinary float model through the strict importer.
//!
//! Only weights are quantized; activations stay float32, and inference runs on the
//! dequantized weights (Burn's CPU backend has no integer matmul): the gains are file size
//! and a faithful preview of an integer deployment's accuracy, not speed.

mod fake;
pub mod file;
mod int8;
mod int8_resnet;
mod scheme;
mod weights;

use std::path::Path;

use burn::module::Module;

pub use fake::{fake_quantize, quantize_dequantize, round_weights};
pub use file::QuantizedFileInfo;
pub use int8::{Activations, Int8SimpleCnn};
pub use int8_resnet::Int8ResNet;
pub use scheme::{Granularity, QuantBits, QuantScheme};
pub use weights::QuantizedTensor;

use crate::error::{ImportError, Result};

/// Sizes of a quantized export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantizedSizes {
    /// Bytes of the same model as float32 SafeTensors (what `safetensors.torch.save_file` of
    /// its `state_dict` would write).
    pub float_bytes: u64,
    /// Bytes of the quantized file written.
    pub quantized_bytes: u64,
}

/// Writes `model`'s weights quantized under `scheme` to `path` (atomically: a file already
/// there is replaced only once the new one is complete).
///
/// # Errors
/// [`ImportError::Export`] when the model cannot be serialized, [`ImportError::Write`] when
/// the file cannot be written.
pub fn save_quantized<M: Module>(
    model: &M,
    model_name: &str,
    scheme: QuantScheme,
    path: &Path,
) -> Result<QuantizedSizes> {
    save_quantized_with(model, model_name, None, None, scheme, path)
}

/// [`save_quantized`] with recipe settings (JSON) stored in the file's header, for models that
/// need more than their name to be rebuilt (a fine-tuned ResNet's classes), and how integer
/// inference is to quantize activations ([`Activations`], e.g. calibrated ranges).
///
/// # Errors
/// As [`save_quantized`].
pub fn save_quantized_with<M: Module>(
    model: &M,
    model_name: &str,
    options: Option<&str>,
    activations: Option<&Activations>,
    scheme: QuantScheme,
    path: &Path,
) -> Result<QuantizedSizes> {
    let float = file::float_safetensors_with(model, model_name, options)?;
    let quantized = file::quantize_safetensors_with(&float, scheme, activations)?;
    let write = |e: std::io::Error| ImportError::Write {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, &quantized).map_err(write)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        write(e)
    })?;
    Ok(QuantizedSizes {
        float_bytes: float.len() as u64,
        quantized_bytes: quantized.len() as u64,
    })
}

/// The header of the kiln quantized file at `path`, or `None` when it is readable but some
/// other kind of file.
///
/// # Errors
/// [`ImportError::Unreadable`] when the file cannot be read.
pub fn read_quantized_info(path: &Path) -> Result<Option<QuantizedFileInfo>> {
    let bytes = std::fs::read(path).map_err(|e| ImportError::Unreadable {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(file::quantized_info(&bytes))
}

/// Loads a quantized file written by [`save_quantized`] into `model` (which must have the
/// architecture it came from), with the weights dequantized to float32; strict like
/// [`crate::load_weights`].
///
/// # Errors
/// [`ImportError::Unreadable`] for an unreadable, corrupt or non-quantized file,
/// [`ImportError::Mismatch`] when its tensors do not fit `model`.
pub fn load_quantized<M: Module>(model: &mut M, path: &Path) -> Result<QuantizedFileInfo> {
    let bytes = std::fs::read(path).map_err(|e| ImportError::Unreadable {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let (info, float) = file::dequantize_safetensors(&bytes, path)?;
    let _applied = crate::import::load_safetensors_bytes(model, float, path)?;
    Ok(info)
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroUsize;

    use burn::tensor::{Device, Distribution, Tensor};

    use super::*;
    use crate::{SimpleCnn, SimpleCnnConfig};

    fn schemes() -> Vec<QuantScheme> {
        let block = Granularity::Block(NonZeroUsize::new(32).unwrap());
        vec![
            QuantScheme::INT8,
            QuantScheme {
                bits: QuantBits::Int8,
                granularity: Granularity::Channel,
            },
            QuantScheme {
                bits: QuantBits::Int4,
                granularity: block,
            },
            QuantScheme {
                bits: QuantBits::Int4,
                granularity: Granularity::Tensor,
            },
        ]
    }

    fn weights(model: &SimpleCnn) -> Vec<Vec<f32>> {
        [
            model.conv1.weight.val().into_data(),
            model.conv2.weight.val().into_data(),
            model.fc1.weight.val().into_data(),
            model.fc2.weight.val().into_data(),
            model.fc2.bias.as_ref().unwrap().val().into_data(),
        ]
        .into_iter()
        .map(|d| d.try_to_vec::<f32>().unwrap())
        .collect()
    }

    #[test]
    fn file_round_trip_holds_exactly_the_fake_quantized_weights() {
        let device = Device::flex();
        let dir = std::env::temp_dir().join(format!("kiln-quant-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let model = SimpleCnnConfig::new().init(&device, 3);
        for scheme in schemes() {
            let path = dir.join(format!("{}.safetensors", scheme.bits.name()));
            let sizes = save_quantized(&model, "simple-cnn", scheme, &path).unwrap();
            let mut loaded = SimpleCnnConfig::new().init(&device, 99);
            let info = load_quantized(&mut loaded, &path).unwrap();
            assert_eq!(info.scheme, scheme);
            assert_eq!(info.model, "simple-cnn");
            assert_eq!(info.quantized_tensors, 4);
            let rounded = round_weights(model.clone(), scheme);
            let (a, b) = (weights(&loaded), weights(&rounded));
            for (x, y) in a.iter().zip(&b) {
                let diff = x
                    .iter()
                    .zip(y)
                    .map(|(p, q)| (p - q).abs())
                    .fold(
                        0.0,
                        |m: f32, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
                    ); // NaN fails
                assert!(
                    diff <= 1e-7,
                    "{scheme}: file and fake quantization differ by {diff}"
                );
            }
            // The biases are kept, the weights moved by at most half a step.
            assert_eq!(a[4], weights(&model)[4]);
            assert_ne!(a[2], weights(&model)[2]);
            let ratio = sizes.quantized_bytes as f64 / sizes.float_bytes as f64;
            let bound = if scheme.bits == QuantBits::Int8 {
                0.26
            } else {
                0.17
            };
            assert!(ratio < bound, "{scheme}: size ratio {ratio}");
            assert_eq!(
                sizes.quantized_bytes,
                std::fs::metadata(&path).unwrap().len()
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_quantized_files_are_clear_errors() {
        let device = Device::flex();
        let dir = std::env::temp_dir().join(format!("kiln-quant-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let model = SimpleCnnConfig::new().init(&device, 3);
        let path = dir.join("q.safetensors");
        save_quantized(&model, "simple-cnn", QuantScheme::INT8, &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();

        let truncated = dir.join("truncated.safetensors");
        std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
        let mut target = SimpleCnnConfig::new().init(&device, 0);
        let err = load_quantized(&mut target, &truncated).unwrap_err();
        assert!(matches!(err, ImportError::Unreadable { .. }), "{err}");

        let other_model = SimpleCnnConfig::new().with_num_classes(5).init(&device, 0);
        let mut other_model = other_model;
        let err = load_quantized(&mut other_model, &path)
            .unwrap_err()
            .to_string();
        assert!(err.contains("fc2"), "{err}");

        let float = dir.join("float.safetensors");
        std::fs::write(
            &float,
            file::float_safetensors(&model, "simple-cnn").unwrap(),
        )
        .unwrap();
        assert_eq!(read_quantized_info(&float).unwrap(), None);
        let err = load_quantized(&mut target, &float).unwrap_err().to_string();
        assert!(err.contains("not a kiln quantized model"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn straight_through_gradient_is_the_gradient_at_the_rounded_weights() {
        let device = Device::flex().autodiff();
        let scheme = QuantScheme {
            bits: QuantBits::Int4,
            granularity: Granularity::Channel,
        };
        let model = SimpleCnnConfig::new().init(&device, 5);
        let x = Tensor::<4>::random([3, 1, 28, 28], Distribution::Default, &device);
        let fake = fake_quantize(model.clone(), scheme);
        let grads = fake.forward(x.clone()).sum().backward();
        let through = model.fc1.weight.grad(&grads).unwrap();
        // Reference: a model whose leaves are the rounded weights.
        let rounded = round_weights(model.valid(), scheme).train();
        let grads = rounded.forward(x).sum().backward();
        let reference = rounded.fc1.weight.grad(&grads).unwrap();
        let diff = (through - reference).abs().max().into_scalar::<f32>();
        assert!(diff < 1e-5, "straight-through gradient differs by {diff}");
        // And the forward pass really saw rounded weights (index 2: fc1's weight).
        assert_ne!(weights(&model)[2], weights(&fake)[2]);
    }
}
