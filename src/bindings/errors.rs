//! Maps the crate's [`Error`] to Python exceptions: what a transformers user would catch.

use pyo3::create_exception;
use pyo3::exceptions::{
    PyException, PyFileNotFoundError, PyMemoryError, PyOSError, PyRuntimeError, PyValueError,
};
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
        // candle attaches a backtrace when RUST_BACKTRACE is set; the exception says what went wrong only.
        let msg = match &err {
            Error::Candle(candle_core::Error::WithBacktrace { inner, .. }) => inner.to_string(),
            Error::WeightsLoad {
                path,
                source: candle_core::Error::WithBacktrace { inner, .. },
            } => format!("weights {}: {inner}", path.display()),
            _ => err.to_string(),
        };
        match err {
            Error::NotFound { .. } => PyFileNotFoundError::new_err(msg),
            Error::Io { .. } => PyOSError::new_err(msg),
            // transformers raises OSError for checkpoints it cannot load and ValueError for bad arguments.
            Error::Config { .. } | Error::Weights { .. } | Error::WeightsLoad { .. } => {
                PyOSError::new_err(msg)
            }
            Error::InvalidInput(_) | Error::Tokenizer(_) | Error::Image(_) => {
                PyValueError::new_err(msg)
            }
            Error::TooLarge(_) => PyMemoryError::new_err(msg),
            Error::Candle(_) => Florence2Error::new_err(msg),
        }
    }
}

/// Runs `f`, turning a panic into a RuntimeError that names `call`. A panic is a bug, but pyo3 would raise it
/// as PanicException, a BaseException that `except Exception` does not catch; every native entry point that
/// runs model or processor code goes through here.
pub(crate) fn guarded<T>(call: &str, f: impl FnOnce() -> crate::Result<T>) -> PyResult<T> {
    // The model and processor are immutable after loading, so a call that panicked leaves nothing half-changed.
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(result) => Ok(result?),
        Err(payload) => {
            let what = crate::error::panic_message(payload.as_ref());
            Err(PyRuntimeError::new_err(format!(
                "florence2_rs: internal error in {call}: {what}. This is a bug in florence2-rs: please report \
                 it with the input that caused it."
            )))
        }
    }
}

/// Panics inside [`guarded`]: lets the test suite check that a panic reaches Python as a RuntimeError.
#[pyfunction]
fn _panic_inside_guard() -> PyResult<()> {
    guarded("_panic_inside_guard", || -> crate::Result<()> {
        panic!("deliberate panic for the test of the guard")
    })
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("Florence2Error", m.py().get_type::<Florence2Error>())?;
    m.add_function(wrap_pyfunction!(_panic_inside_guard, m)?)?;
    Ok(())
}
