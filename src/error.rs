//! The crate's one error type. Every fallible path returns [`Error`]; the Python layer maps each
//! variant to the exception a transformers user would expect (see `bindings/errors.rs`).

use std::path::PathBuf;

/// Everything that can go wrong, with enough context to tell the user what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or folder the caller named is not there.
    #[error("{path}: not found. {hint}")]
    NotFound { path: PathBuf, hint: String },

    /// Reading a file failed for another reason (permissions, a folder where a file should be ...).
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A config.json (or another JSON settings file) that cannot be parsed or describes an impossible model.
    #[error("invalid configuration in {path}: {msg}")]
    Config { path: PathBuf, msg: String },

    /// A weights file that cannot be read as a Florence-2 checkpoint: a truncated or corrupt file or shard
    /// index, tensor names of neither layout, a layout other than the config's.
    #[error("weights {path}: {msg}")]
    Weights { path: PathBuf, msg: String },

    /// A readable weights file from which the model cannot be built (a tensor the config needs is missing or
    /// has another shape): the tensor library's error, kept as the cause, and the file.
    #[error("weights {path}: {source}")]
    WeightsLoad {
        path: PathBuf,
        #[source]
        source: candle_core::Error,
    },

    /// A bad argument from the caller (wrong shape, unknown task, out of range value ...).
    #[error("{0}")]
    InvalidInput(String),

    /// The tokenizer could not be loaded or failed on the given text.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// An image could not be decoded or converted.
    #[error("image: {0}")]
    Image(String),

    /// A request for more memory than one call may allocate ([`crate::limits`]).
    #[error("{0}")]
    TooLarge(String),

    /// An error from the tensor library: a bug here, or an unsupported device/dtype combination.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// The caller's [`Interrupt`](crate::interrupt::Interrupt) check asked a long computation to stop (the
    /// Python bindings: Ctrl-C).
    #[error("interrupted")]
    Interrupted,
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// The message a panic carried (`panic!` with a literal or a formatted string), for errors that report one.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string())
}

impl Error {
    /// Shorthand for [`Error::InvalidInput`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidInput(msg.into())
    }
}
