//! Maps the crate's [`Error`] to Python exceptions: what a transformers user would catch.

use std::cell::{Cell, RefCell};
use std::time::{Duration, Instant};

use pyo3::create_exception;
use pyo3::exceptions::{
    PyException, PyFileNotFoundError, PyKeyboardInterrupt, PyMemoryError, PyOSError,
    PyRuntimeError, PyValueError,
};
use pyo3::prelude::*;

use crate::interrupt::Interrupt;
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
            // The bindings' check re-raises the exception Python's signal handler raised; this is the
            // fallback for any other stop.
            Error::Interrupted => PyKeyboardInterrupt::new_err(msg),
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

/// Runs `f` with the GIL released, through [`guarded`], handing it an [`Interrupt`] that stops it when a signal
/// handler raises: Ctrl-C raises KeyboardInterrupt (or whatever the SIGINT handler raises) from the call, as
/// it would from Python code. Python runs signal handlers in the main thread only, so a call made from
/// another thread runs to its end.
pub(crate) fn detached_interruptible<T: Send>(
    py: Python<'_>,
    call: &str,
    f: impl FnOnce(&dyn Interrupt) -> crate::Result<T> + Send,
) -> PyResult<T> {
    let signals = PendingSignals::new(py)?;
    let (result, raised) = py.detach(move || {
        let result = guarded(call, || f(&signals));
        (result, signals.raised.into_inner())
    });
    match raised {
        Some(err) => Err(err),
        None => result,
    }
}

/// How often a native call asks Python for pending signals: taking the GIL waits for whichever thread holds
/// it, so not at every step, and often enough that Ctrl-C stops a call well within a second.
const SIGNAL_CHECK_INTERVAL: Duration = Duration::from_millis(50);

/// The [`Interrupt`] of [`detached_interruptible`]: takes the GIL at most every [`SIGNAL_CHECK_INTERVAL`] to
/// run Python's pending signal handlers, and keeps the exception one raised.
struct PendingSignals {
    /// Whether the call runs in Python's main thread, the only one that runs signal handlers.
    main_thread: bool,
    last_check: Cell<Instant>,
    raised: RefCell<Option<PyErr>>,
}

impl PendingSignals {
    fn new(py: Python<'_>) -> PyResult<Self> {
        let threading = py.import("threading")?;
        let main_thread = threading
            .call_method0("current_thread")?
            .is(&threading.call_method0("main_thread")?);
        Ok(Self {
            main_thread,
            last_check: Cell::new(Instant::now()),
            raised: RefCell::new(None),
        })
    }
}

impl Interrupt for PendingSignals {
    fn check(&self) -> crate::Result<()> {
        if !self.main_thread || self.last_check.get().elapsed() < SIGNAL_CHECK_INTERVAL {
            return Ok(());
        }
        self.last_check.set(Instant::now());
        // None: the interpreter is shutting down, and no handler will run.
        match Python::try_attach(|py| py.check_signals()) {
            Some(Err(err)) => {
                *self.raised.borrow_mut() = Some(err);
                Err(Error::Interrupted)
            }
            _ => Ok(()),
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
