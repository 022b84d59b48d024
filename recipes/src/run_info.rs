//! What a recipe records about a run in its checkpoints, as types: the model's architecture
//! ([`ModelName`]) and each recipe's settings ([`CnnMnistOptions`], the fine-tuning options).
//! The trainer stores them as a name and a JSON object without knowing them; the recipes
//! parse them here, once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kiln_models::{ResNet, ResNetDepth};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{RecipeError, Result};

/// The architecture of a trained model, as checkpoints and quantized files name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelName {
    /// `simple-cnn`.
    SimpleCnn,
    /// `resnet18`, `resnet34` or `resnet50`.
    ResNet(ResNetDepth),
    /// `gpt`: the byte-level transformer of the gpt recipe.
    Gpt,
}

impl ModelName {
    /// The recorded spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelName::SimpleCnn => "simple-cnn",
            ModelName::ResNet(depth) => depth.name(),
            ModelName::Gpt => "gpt",
        }
    }

    /// The model a file records as `name`.
    ///
    /// # Errors
    /// [`RecipeError::UnknownModel`] naming `file` for a name no recipe writes.
    pub fn parse(name: &str, file: &Path) -> Result<Self> {
        if name == ModelName::SimpleCnn.as_str() {
            return Ok(ModelName::SimpleCnn);
        }
        if name == ModelName::Gpt.as_str() {
            return Ok(ModelName::Gpt);
        }
        ResNet::depth_from_name(name)
            .map(ModelName::ResNet)
            .ok_or_else(|| RecipeError::UnknownModel {
                path: file.to_path_buf(),
                model: name.to_string(),
            })
    }
}

/// The data a cnn-mnist run trained on, recorded so that a resume trains on the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CnnMnistOptions {
    /// The `--data` directory; `None` for the embedded subset.
    pub data: Option<PathBuf>,
    /// `--limit`: the first N training samples only.
    pub train_limit: Option<usize>,
}

impl CnnMnistOptions {
    /// In flag spelling: `--data DIR --limit N`, or `the embedded data`.
    pub fn describe(&self) -> String {
        let data = self
            .data
            .as_ref()
            .map_or("the embedded data".to_string(), |d| {
                format!("--data {}", d.display())
            });
        match self.train_limit {
            Some(n) => format!("{data} with --limit {n}"),
            None => format!("{data} without --limit"),
        }
    }
}

/// `options` as the JSON object a checkpoint stores.
pub(crate) fn to_map<T: Serialize>(options: &T) -> BTreeMap<String, Value> {
    match serde_json::to_value(options) {
        Ok(Value::Object(map)) => map.into_iter().collect(),
        // Every options type is a struct, which serialises to an object.
        _ => BTreeMap::new(),
    }
}

/// Reads options back from a checkpoint's JSON object; `file` names it in errors.
pub(crate) fn from_map<T: DeserializeOwned>(
    map: &BTreeMap<String, Value>,
    file: &Path,
    what: &str,
) -> Result<T> {
    let object = Value::Object(map.clone().into_iter().collect());
    serde_json::from_value(object).map_err(|e| {
        RecipeError::Train(kiln_trainer::TrainError::Checkpoint {
            path: file.to_path_buf(),
            reason: format!("bad {what} settings: {e}"),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_ones_are_named() {
        for name in [
            ModelName::SimpleCnn,
            ModelName::ResNet(ResNetDepth::R18),
            ModelName::ResNet(ResNetDepth::R50),
            ModelName::Gpt,
        ] {
            assert_eq!(
                ModelName::parse(name.as_str(), Path::new("f")).unwrap(),
                name
            );
        }
        let error = ModelName::parse("vgg16", Path::new("run/x.ckpt")).unwrap_err();
        assert!(
            error.to_string().contains("run/x.ckpt holds a vgg16 model"),
            "{error}"
        );
    }

    #[test]
    fn options_round_trip_through_the_checkpoint_map() {
        let options = CnnMnistOptions {
            data: Some(PathBuf::from("/data/mnist")),
            train_limit: Some(128),
        };
        let map = to_map(&options);
        let back: CnnMnistOptions = from_map(&map, Path::new("f"), "cnn-mnist").unwrap();
        assert_eq!(back, options);
        assert_eq!(options.describe(), "--data /data/mnist with --limit 128");
        let mut broken = map;
        broken.insert("train_limit".into(), Value::from("many"));
        let error = from_map::<CnnMnistOptions>(&broken, Path::new("f"), "cnn-mnist").unwrap_err();
        assert!(
            error.to_string().contains("bad cnn-mnist settings"),
            "{error}"
        );
    }
}
