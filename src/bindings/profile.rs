//! The opt-in operation profile ([`crate::profile`]), for benches/tower_profile.py.

use pyo3::prelude::*;

/// Turns the profile's recording on or off.
#[pyfunction]
fn profile_enable(enabled: bool) {
    crate::profile::set_enabled(enabled);
}

/// What was recorded since the last call, as `(stage, kind, calls, seconds, flops)` rows (stage None outside
/// the vision tower's stages), and clears it.
#[pyfunction]
fn profile_take() -> Vec<(Option<usize>, &'static str, u64, f64, f64)> {
    crate::profile::take()
        .into_iter()
        .map(|row| {
            let e = row.entry;
            (row.stage, row.kind, e.calls, e.seconds, e.flops)
        })
        .collect()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(profile_enable, m)?)?;
    m.add_function(wrap_pyfunction!(profile_take, m)?)?;
    Ok(())
}
