//! Python objects to and from the JSON-shaped values [`crate::generation::GenerationConfig`] keeps its
//! settings as (transformers' settings are dynamic: a name, then a number, a list or a nested dict). The
//! conversion says what is wrong with a value, and which setting it was, in Python's terms.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyFrozenSet, PyInt, PyList, PySet, PyString, PyTuple};
use pyo3::IntoPyObjectExt;
use serde_json::{Map, Number, Value};

/// How deep lists and dicts may nest in a setting. The deepest real ones are two levels (`bad_words_ids`, a
/// config's nested dicts three); the bound turns a list that contains itself, or a `tolist()` that returns
/// its own object, into an error where recursing would overflow the stack.
const MAX_DEPTH: usize = 32;

/// The settings `dict` (names to values) as a JSON object; `what` names the call in errors.
pub fn settings(dict: &Bound<'_, PyDict>, what: &str) -> PyResult<Map<String, Value>> {
    object(dict, what, None, 0)
}

/// A dict at nesting depth `depth` as a JSON object. `parent` is the path of the setting that holds it (None
/// for the settings themselves), so that errors name `setting.key` the way the user wrote it. The keys of a
/// nested dict may be ints, which become their decimal text as `json.dumps` writes them (a config's
/// `id2label`); the setting names themselves must be strings.
fn object(
    dict: &Bound<'_, PyDict>,
    what: &str,
    parent: Option<&str>,
    depth: usize,
) -> PyResult<Map<String, Value>> {
    let mut map = Map::new();
    // A snapshot of the items: iterating the dict itself panics when a value's `tolist()` changes it.
    for item in dict.items().iter() {
        let (key, value): (Bound<'_, PyAny>, Bound<'_, PyAny>) = item.extract()?;
        let key: String = match (key.extract::<String>(), parent) {
            (Ok(key), _) => key,
            (Err(_), Some(_))
                if key.is_instance_of::<PyInt>() && !key.is_instance_of::<PyBool>() =>
            {
                key.str()?.to_string()
            }
            (Err(_), None) => {
                return Err(PyTypeError::new_err(format!(
                    "{what}: setting names must be strings, got {key:?}"
                )))
            }
            (Err(_), Some(parent)) => {
                return Err(PyTypeError::new_err(format!(
                    "{what}: the keys of `{parent}` must be strings or ints, got {key:?}"
                )))
            }
        };
        let path = match parent {
            Some(parent) => format!("{parent}.{key}"),
            None => key.clone(),
        };
        let value = setting(&value, &path, what, depth)?;
        map.insert(key, value);
    }
    Ok(map)
}

/// One setting's value: None, bool, int, float (finite), str, and lists, tuples, sets (sorted) and dicts of
/// them; a numpy or torch scalar or array by its `tolist()`. Anything else is a TypeError naming `key` (the
/// setting's path: `setting.key` inside a dict); nesting past [`MAX_DEPTH`] a ValueError naming it.
fn setting(value: &Bound<'_, PyAny>, key: &str, what: &str, depth: usize) -> PyResult<Value> {
    if depth > MAX_DEPTH {
        // The setting's own name: the path of a dict that contains itself repeats its key 32 times.
        let setting = key.split('.').next().unwrap_or(key);
        return Err(PyValueError::new_err(format!(
            "{what}: `{setting}` nests lists or dicts more than {MAX_DEPTH} deep (a list that contains itself?)"
        )));
    }
    let inner = depth + 1;
    if value.is_none() {
        Ok(Value::Null)
    } else if let Ok(flag) = value.cast::<PyBool>() {
        Ok(Value::Bool(flag.is_true()))
    } else if value.is_instance_of::<PyInt>() {
        // Beyond 64 bits a number still reaches the setting's own check, which names its range.
        Ok(if let Ok(n) = value.extract::<i64>() {
            Value::from(n)
        } else if let Ok(n) = value.extract::<u64>() {
            Value::from(n)
        } else {
            finite(value, key)?
        })
    } else if value.is_instance_of::<PyFloat>() {
        finite(value, key)
    } else if value.is_instance_of::<PyString>() {
        Ok(Value::String(value.extract()?))
    } else if value.is_instance_of::<PyList>() || value.is_instance_of::<PyTuple>() {
        let items = value
            .try_iter()?
            .map(|item| setting(&item?, key, what, inner))
            .collect::<PyResult<_>>()?;
        Ok(Value::Array(items))
    } else if value.is_instance_of::<PySet>() || value.is_instance_of::<PyFrozenSet>() {
        // A set has no order; sorted, the same set always gives the same list.
        let sorted = value
            .py()
            .import("builtins")?
            .call_method1("sorted", (value,))?;
        setting(&sorted, key, what, inner)
    } else if let Ok(dict) = value.cast::<PyDict>() {
        Ok(Value::Object(object(dict, what, Some(key), inner)?))
    } else if value.hasattr("tolist")? {
        setting(&value.call_method0("tolist")?, key, what, inner)
    } else {
        Err(PyTypeError::new_err(format!(
            "{what} got a value of type {} for `{key}` that is not a setting: {}",
            value.get_type().name()?,
            value.repr()?
        )))
    }
}

/// A Python number as a finite JSON number (JSON, like the settings, has no inf or NaN).
fn finite(value: &Bound<'_, PyAny>, key: &str) -> PyResult<Value> {
    // An int too large for a float is out of every setting's range, as an infinite float is.
    match value.extract::<f64>().ok().and_then(Number::from_f64) {
        Some(number) => Ok(Value::Number(number)),
        None => Err(PyValueError::new_err(format!(
            "`{key}` must be a finite number, but is {}",
            value.str()?
        ))),
    }
}

/// A JSON value as the Python object `json.loads` would give.
pub fn to_python<'py>(py: Python<'py>, value: &Value) -> PyResult<Bound<'py, PyAny>> {
    match value {
        Value::Null => Ok(py.None().into_bound(py)),
        Value::Bool(flag) => flag.into_bound_py_any(py),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(n), _) => n.into_bound_py_any(py),
            (None, Some(n)) => n.into_bound_py_any(py),
            _ => n.as_f64().unwrap_or(f64::NAN).into_bound_py_any(py),
        },
        Value::String(text) => text.into_bound_py_any(py),
        Value::Array(items) => {
            let items = items
                .iter()
                .map(|item| to_python(py, item))
                .collect::<PyResult<Vec<_>>>()?;
            PyList::new(py, items)?.into_bound_py_any(py)
        }
        Value::Object(map) => {
            let dict = PyDict::new(py);
            for (key, item) in map {
                dict.set_item(key, to_python(py, item)?)?;
            }
            dict.into_bound_py_any(py)
        }
    }
}
