//! Strict loading of PyTorch weights (`.pth`/`.pt` pickles and `.safetensors`) into Burn modules.
//!
//! Parameter names must match the PyTorch `state_dict` keys exactly (kiln's models use
//! torchvision's names), with two mappings torchvision needs: `downsample.0`/`downsample.1` are
//! kiln's `downsample.conv`/`downsample.bn`, and BatchNorm's `num_batches_tracked` counters
//! (which inference never uses) are read past. Linear weights are transposed from PyTorch's
//! `[out, in]` to Burn's `[in, out]`, and BatchNorm's `weight`/`bias` become `gamma`/`beta`.
//! Loading is strict: a missing, unused or mis-shaped tensor is an error that names every
//! offending key, never a silent partial import. Pickles are read as data: no pickled code is
//! ever run.

use std::path::Path;

use burn::module::Module;
use burn::store::{
    ApplyResult, ModuleSnapshot, PyTorchToBurnAdapter, PytorchStore, SafetensorsStore,
};

use crate::error::{ImportError, Result};

/// The on-disk formats [`load_weights`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// A `torch.save(model.state_dict(), path)` pickle (`.pth` or `.pt`).
    Pytorch,
    /// A SafeTensors file as written by `safetensors.torch.save_file(state_dict, path)`.
    Safetensors,
}

impl WeightFormat {
    /// The format a file's extension names.
    ///
    /// # Errors
    /// [`ImportError::UnknownFormat`] when the extension is neither `.pth`, `.pt` nor
    /// `.safetensors`.
    pub fn from_path(path: &Path) -> Result<Self> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("pth" | "pt") => Ok(Self::Pytorch),
            Some("safetensors") => Ok(Self::Safetensors),
            _ => Err(ImportError::UnknownFormat {
                path: path.to_path_buf(),
            }),
        }
    }
}

/// What an import applied: every tensor of the model was found, so this lists them.
#[derive(Debug, Clone)]
#[must_use]
pub struct ImportReport {
    /// Format the weights were read from.
    pub format: WeightFormat,
    /// Names of the tensors that were loaded into the model.
    pub applied: Vec<String>,
    /// With [`LoadOptions::allow_partial`]: model tensors the file lacked (left as
    /// initialised).
    pub missing: Vec<String>,
    /// With [`LoadOptions::allow_partial`]: file tensors the model has no place for.
    pub unused: Vec<String>,
}

/// torchvision's shortcut convolution, `downsample.0`, is kiln's `downsample.conv`.
const DOWNSAMPLE_CONV: (&str, &str) = (r"\.downsample\.0\.", ".downsample.conv.");
/// torchvision's shortcut batch norm, `downsample.1`, is kiln's `downsample.bn`.
const DOWNSAMPLE_NORM: (&str, &str) = (r"\.downsample\.1\.", ".downsample.bn.");
/// A BatchNorm counter PyTorch saves and Burn does not keep (it only matters for momentum-free
/// running averages, which torchvision does not use).
const BATCHES_TRACKED: &str = "num_batches_tracked";

/// How [`load_weights_with`] treats tensors that do not match.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Leave the classifier head (`fc.*`, torchvision's name) as initialised and ignore the
    /// file's: fine-tuning with a new head for another number of classes.
    pub new_head: bool,
    /// Tolerate missing and unused tensors (they are listed in the report instead); shape
    /// mismatches stay errors.
    pub allow_partial: bool,
}

/// The classifier head torchvision's ResNets call `fc`.
const HEAD_PREFIX: &str = "fc.";

/// Loads the weights in `path` into `model`, strictly.
///
/// # Errors
/// [`ImportError::Unreadable`] if the file cannot be read or parsed,
/// [`ImportError::UnknownFormat`] for an unknown extension, and [`ImportError::Mismatch`] when
/// a tensor is missing, unused or of the wrong shape; the model is then left unusable and
/// should be dropped.
pub fn load_weights<M: Module>(model: &mut M, path: &Path) -> Result<ImportReport> {
    load_weights_with(model, path, LoadOptions::default())
}

/// [`load_weights`] with a new head or partial loading allowed.
///
/// # Errors
/// As [`load_weights`]; with `allow_partial`, only unreadable files and shape mismatches.
pub fn load_weights_with<M: Module>(
    model: &mut M,
    path: &Path,
    options: LoadOptions,
) -> Result<ImportReport> {
    let format = WeightFormat::from_path(path)?;
    if !path.is_file() {
        return Err(ImportError::Unreadable {
            path: path.to_path_buf(),
            reason: "no such file".into(),
        });
    }
    let unreadable = |reason: String| ImportError::Unreadable {
        path: path.to_path_buf(),
        reason,
    };
    let not_head: fn(&str, &str) -> bool = |path, _| !path.starts_with(HEAD_PREFIX);
    let result = match format {
        WeightFormat::Pytorch => {
            let mut store = PytorchStore::from_file(path)
                .with_key_remapping(DOWNSAMPLE_CONV.0, DOWNSAMPLE_CONV.1)
                .with_key_remapping(DOWNSAMPLE_NORM.0, DOWNSAMPLE_NORM.1)
                .skip_enum_variants(true)
                // Mismatches are collected and reported below, one message for every format.
                .validate(false)
                .allow_partial(true);
            if options.new_head {
                store = store.with_predicate(not_head);
            }
            model
                .load_from(&mut store)
                .map_err(|e| unreadable(e.to_string()))?
        }
        WeightFormat::Safetensors => {
            let mut store = SafetensorsStore::from_file(path);
            if options.new_head {
                store = store.with_predicate(not_head);
            }
            load_safetensors_store(model, store).map_err(unreadable)?
        }
    };
    let mut result = result;
    if options.new_head {
        result
            .missing
            .retain(|(name, _)| !name.starts_with(HEAD_PREFIX));
        result.unused.retain(|name| !name.starts_with(HEAD_PREFIX));
    }
    if options.allow_partial {
        let mut report = check_complete(
            ApplyResult {
                missing: Vec::new(),
                unused: Vec::new(),
                ..result.clone()
            },
            format,
            path,
        )?;
        report.missing = result.missing.into_iter().map(|(name, _)| name).collect();
        report.unused = result.unused;
        return Ok(report);
    }
    check_complete(result, format, path)
}

/// Loads a PyTorch-style SafeTensors file held in memory into `model`, strictly; `path` names
/// where the bytes came from in errors.
pub(crate) fn load_safetensors_bytes<M: Module>(
    model: &mut M,
    bytes: Vec<u8>,
    path: &Path,
) -> Result<ImportReport> {
    let result = load_safetensors_store(model, SafetensorsStore::from_bytes(Some(bytes))).map_err(
        |reason| ImportError::Unreadable {
            path: path.to_path_buf(),
            reason,
        },
    )?;
    check_complete(result, WeightFormat::Safetensors, path)
}

fn load_safetensors_store<M: Module>(
    model: &mut M,
    store: SafetensorsStore,
) -> std::result::Result<ApplyResult, String> {
    let mut store = store
        .with_from_adapter(PyTorchToBurnAdapter)
        .with_key_remapping(DOWNSAMPLE_CONV.0, DOWNSAMPLE_CONV.1)
        .with_key_remapping(DOWNSAMPLE_NORM.0, DOWNSAMPLE_NORM.1)
        .skip_enum_variants(true)
        // Mismatches are collected and reported by `check_complete`, one message for every
        // format.
        .validate(false)
        .allow_partial(true);
    model.load_from(&mut store).map_err(|e| e.to_string())
}

/// Names, all of them up to 20, else the first 20 and how many more: enough to see whether
/// a file belongs to another model without pages of output.
fn name_list(names: &[&str]) -> String {
    const SHOWN: usize = 20;
    if names.len() <= SHOWN {
        names.join(", ")
    } else {
        format!(
            "{} ... and {} more",
            names[..SHOWN].join(", "),
            names.len() - SHOWN
        )
    }
}

fn check_complete(result: ApplyResult, format: WeightFormat, path: &Path) -> Result<ImportReport> {
    let mut problems = Vec::new();
    if !result.missing.is_empty() {
        let names: Vec<&str> = result
            .missing
            .iter()
            .map(|(name, _)| name.as_str())
            .collect();
        problems.push(format!("missing from the file: {}", name_list(&names)));
    }
    let unused: Vec<&str> = result
        .unused
        .iter()
        .map(String::as_str)
        .filter(|name| !name.ends_with(BATCHES_TRACKED))
        .collect();
    if !unused.is_empty() {
        problems.push(format!("not in the model: {}", name_list(&unused)));
    }
    for error in &result.errors {
        problems.push(error.to_string());
    }
    if problems.is_empty() {
        Ok(ImportReport {
            format,
            applied: result.applied,
            missing: Vec::new(),
            unused: Vec::new(),
        })
    } else {
        Err(ImportError::Mismatch {
            path: path.to_path_buf(),
            details: problems.join("; "),
        })
    }
}
