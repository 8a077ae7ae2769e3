//! PyO3 bindings: thin wrappers only, one file per exposed class. Model logic lives in the crate.

use pyo3::prelude::*;

mod arrays;
mod errors;
mod hub;
mod layout;
mod model;
mod processor;
mod profile;
mod values;

/// The native half of the `florence2_rs` package. Import `florence2_rs`, not this module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::register(m)?;
    m.add_class::<model::PyModel>()?;
    processor::register(m)?;
    hub::register(m)?;
    layout::register(m)?;
    profile::register(m)?;
    // Whether this build has the `cuda` cargo feature: the tests that need a GPU build skip without it.
    m.add("CUDA_BUILD", cfg!(feature = "cuda"))?;
    // Constants the Python side needs, defined once, here.
    m.add(
        "LOCATION_BINS",
        crate::processor::postprocess::LOCATION_BINS,
    )?;
    // BartConfig's defaults for the settings a text_config leaves out, as the model applies them.
    let text_defaults = crate::model::config::TextConfig::defaults()?;
    m.add(
        "TEXT_CONFIG_DEFAULTS",
        values::to_python(m.py(), &serde_json::Value::Object(text_defaults))?,
    )?;
    m.add("DTYPES", crate::dtype::names().collect::<Vec<_>>())?;
    m.add(
        "DTYPE_NAMES",
        crate::dtype::spellings().collect::<std::collections::HashMap<_, _>>(),
    )?;
    m.add("WEIGHTS", crate::io::shards::WEIGHTS)?;
    m.add("WEIGHTS_INDEX", crate::io::shards::WEIGHTS_INDEX)?;
    m.add("PYTORCH_WEIGHTS", crate::io::pytorch::PYTORCH_WEIGHTS)?;
    m.add(
        "PYTORCH_WEIGHTS_INDEX",
        crate::io::pytorch::PYTORCH_WEIGHTS_INDEX,
    )?;
    m.add("ADAPTER_CONFIG", crate::io::adapter::ADAPTER_CONFIG)?;
    m.add("ADAPTER_WEIGHTS", crate::io::adapter::ADAPTER_WEIGHTS)?;
    m.add(
        "ADAPTER_WEIGHTS_BIN",
        crate::io::adapter::ADAPTER_WEIGHTS_BIN,
    )?;
    m.add_function(wrap_pyfunction!(model::cuda_available, m)?)?;
    Ok(())
}
