//! Maps the crate's [`Error`] to Python exceptions: what a transformers user would catch.

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyFileNotFoundError, PyOSError, PyValueError};
use pyo3::prelude::*;

use crate::Error;

create_exception!(
    _native,
    Florence2Error,
    PyException,
    "Base class of the errors raised by florence2_rs that are not plain ValueError/OSError."
);

impl From<Error> for PyErr {
    fn from(err: Error) -> PyErr {
        let msg = err.to_string();
        match err {
            Error::NotFound { .. } => PyFileNotFoundError::new_err(msg),
            Error::Io { .. } => PyOSError::new_err(msg),
            // transformers raises OSError for checkpoints it cannot load and ValueError for bad arguments.
            Error::Config { .. } | Error::Weights { .. } => PyOSError::new_err(msg),
            Error::InvalidInput(_) | Error::Tokenizer(_) | Error::Image(_) => {
                PyValueError::new_err(msg)
            }
            Error::Candle(_) => Florence2Error::new_err(msg),
        }
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("Florence2Error", m.py().get_type::<Florence2Error>())?;
    Ok(())
}
