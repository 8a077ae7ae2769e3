//! `checkpoint_layout`: which released checkpoint layout a config follows, by the crate's one rule
//! ([`Layout::of_config`]), so that `florence2_rs.Florence2Config.layout` and the model agree.

use pyo3::prelude::*;
use pyo3::types::PyDict;
use serde_json::Value;

use super::values;
use crate::io::Layout;

/// The package's name of a layout: "hf" (transformers' own Florence-2) or "original" (Microsoft's).
pub(crate) fn name(layout: Layout) -> &'static str {
    match layout {
        Layout::HfNative => "hf",
        Layout::Original => "original",
    }
}

/// Which released checkpoint layout a config follows.
///
/// Args:
///     config: config.json's content as a dict (nested configs as dicts).
///
/// Returns:
///     str: "original" for Microsoft's remote-code layout (a vision model_type "davit" or a text model_type
///     "florence2_language"), else "hf" (transformers' own).
///
/// Raises:
///     TypeError: a value that config.json cannot hold.
#[pyfunction]
fn checkpoint_layout(config: &Bound<'_, PyDict>) -> PyResult<&'static str> {
    let config = Value::Object(values::settings(config, "Florence2Config")?);
    Ok(name(Layout::of_config(&config)))
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(checkpoint_layout, m)?)
}
