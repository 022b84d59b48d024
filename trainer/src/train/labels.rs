use std::collections::BTreeMap;

/// Names recorded in checkpoints so that `eval` and `--resume` rebuild the right thing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunLabels {
    /// Recipe name, e.g. `cnn-mnist`.
    pub recipe: String,
    /// Model architecture, e.g. `simple-cnn`.
    pub model: String,
    /// Quantization the model trains under (quantization-aware training), in the recipe's
    /// spelling (`int8:tensor`); `None` for float training. A run resumes only with the same.
    pub quantization: Option<String>,
    /// Recipe settings that rebuild the model and its data (a fine-tuned ResNet's classes and
    /// image size); compared on resume.
    pub options: BTreeMap<String, serde_json::Value>,
}

impl RunLabels {
    /// Labels of a run of `recipe` training `model`, in float, with no options: what a
    /// user's own training program records (a resume is refused for another name).
    pub fn named(recipe: &str, model: &str) -> Self {
        Self {
            recipe: recipe.to_string(),
            model: model.to_string(),
            quantization: None,
            options: BTreeMap::new(),
        }
    }
}
