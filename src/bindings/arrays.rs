//! numpy ↔ candle conversions for the bindings. Inputs are copied out of numpy before the GIL is released
//! (a numpy view must not be read without it); outputs are f32 or i64 numpy arrays.

use candle_core::{DType, Device, Tensor};
use numpy::{PyArray1, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::{Error, Result};

/// An owned copy of a numpy array, ready to become a tensor on any thread.
pub struct HostArray<T> {
    data: Vec<T>,
    shape: Vec<usize>,
}

impl<T: numpy::Element + Copy> HostArray<T> {
    /// Copies `array` (any memory layout) and checks its rank.
    pub fn copy(array: &PyReadonlyArrayDyn<'_, T>, name: &str, rank: usize) -> Result<Self> {
        let shape = array.shape().to_vec();
        if shape.len() != rank {
            return Err(Error::invalid(format!(
                "{name} must have {rank} dimensions, got shape {shape:?}"
            )));
        }
        crate::limits::check_alloc(
            &format!("copying {name} of shape {shape:?}"),
            crate::limits::product(&[array.len() as u128, std::mem::size_of::<T>() as u128]),
        )?;
        let data = array.as_array().iter().copied().collect();
        Ok(Self { data, shape })
    }
}

impl HostArray<f32> {
    /// The values as a CPU tensor, without a copy: the pixels are 7 MB per 768x768 image, alive through the
    /// whole vision tower.
    pub fn into_tensor(self) -> Result<Tensor> {
        Ok(Tensor::from_vec(
            self.data,
            self.shape.as_slice(),
            &Device::Cpu,
        )?)
    }
}

impl HostArray<i64> {
    /// Token ids or a 0/1 mask as a u32 tensor; negative or huge values are an error, not a wrap-around.
    pub fn to_u32_tensor(&self, name: &str) -> Result<Tensor> {
        let data = self
            .data
            .iter()
            .map(|&v| {
                u32::try_from(v).map_err(|_| {
                    Error::invalid(format!("{name} holds {v}, which is not a valid id"))
                })
            })
            .collect::<Result<Vec<u32>>>()?;
        Ok(Tensor::from_vec(data, self.shape.as_slice(), &Device::Cpu)?)
    }
}

/// A tensor's values as f32, with its shape, ready to hand to numpy once the GIL is back.
pub struct HostOutput {
    data: Vec<f32>,
    shape: Vec<usize>,
}

impl HostOutput {
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let data = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(Self {
            data,
            shape: t.dims().to_vec(),
        })
    }

    pub fn into_numpy(self, py: Python<'_>) -> PyResult<Bound<'_, PyArrayDyn<f32>>> {
        PyArray1::from_vec(py, self.data).reshape(self.shape)
    }
}
