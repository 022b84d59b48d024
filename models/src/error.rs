use std::path::PathBuf;

/// Errors raised while building models or loading their weights.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The weight file does not exist or cannot be read.
    #[error("cannot read weights {path}: {reason}")]
    Unreadable {
        /// The file that was asked for.
        path: PathBuf,
        /// What went wrong, as the reader reported it.
        reason: String,
    },
    /// The file extension names no format kiln can read.
    #[error("cannot tell the format of {path}: expected a .pth, .pt or .safetensors file")]
    UnknownFormat {
        /// The file that was asked for.
        path: PathBuf,
    },
    /// The file was read but does not match the model: missing, unused or mis-shaped tensors.
    #[error("weights {path} do not match the model: {details}")]
    Mismatch {
        /// The weight file.
        path: PathBuf,
        /// Which tensors are missing, unused or of the wrong shape.
        details: String,
    },
    /// A model's configuration or input is invalid (a GPT whose heads do not divide its
    /// width, a prompt outside its vocabulary).
    #[error("{0}")]
    Config(String),
    /// A model could not be turned into a file's bytes.
    #[error("cannot serialize the model: {0}")]
    Export(String),
    /// A file could not be written.
    #[error("cannot write {path}: {reason}")]
    Write {
        /// The file being written.
        path: PathBuf,
        /// What the operating system said.
        reason: String,
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, ImportError>;
