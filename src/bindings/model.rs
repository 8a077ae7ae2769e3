//! `NativeModel`: the Rust model behind `florence2_rs.Florence2ForConditionalGeneration`. Every heavy call
//! copies its inputs, releases the GIL, and runs; the model is immutable, so threads may share it.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use numpy::{PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::arrays::{HostArray, HostOutput};
use super::errors::{detached_interruptible, guarded};
use super::values;
use crate::generation::{GenerateOutput, GenerationConfig};
use crate::interrupt::Interrupt;
use crate::io::adapter::Adapter;
use crate::io::checkpoint::Checkpoint;
use crate::io::save::save_weights;
use crate::layers::linear::Quantization;
use crate::model::{Florence2ForConditionalGeneration, LoadOptions};
use crate::{Error, Result};

/// True when this is a CUDA build and GPU 0 can be opened: what `device_map="auto"` picks the GPU on.
#[pyfunction]
pub fn cuda_available(py: Python<'_>) -> bool {
    // Opening the device creates (or retains) its CUDA context: slow the first time, so without the GIL.
    candle_core::utils::cuda_is_available() && py.detach(|| Device::new_cuda(0).is_ok())
}

/// Parses "cpu", "cuda" or "cuda:N".
pub fn parse_device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        cuda if cuda == "cuda" || cuda.starts_with("cuda:") => {
            let ordinal = cuda.strip_prefix("cuda:").map_or(Ok(0), |n| {
                n.parse::<usize>()
                    .map_err(|_| Error::invalid(format!("bad device {name:?}")))
            })?;
            if !candle_core::utils::cuda_is_available() {
                return Err(Error::invalid(format!(
                    "device {name:?} needs a CUDA build of florence2-rs (cargo feature `cuda`); this build runs on \
                     the CPU only: use device=\"cpu\""
                )));
            }
            Device::new_cuda(ordinal).map_err(|err| {
                Error::invalid(format!(
                    "cannot open device {name:?} ({err}); `nvidia-smi -L` lists the GPUs this machine has"
                ))
            })
        }
        other => Err(Error::invalid(format!(
            "device {other:?} is not supported: use \"cpu\" or \"cuda[:N]\""
        ))),
    }
}

/// The loaded model.
#[pyclass(name = "NativeModel", module = "florence2_rs._native", frozen)]
pub struct PyModel {
    pub(crate) inner: Arc<Florence2ForConditionalGeneration>,
    /// The checkpoint's generation settings: what `model.generation_config` starts as in Python.
    generation: GenerationConfig,
    /// The modules whose LoRA factors the merged adapter's file holds but its config does not target: left
    /// out, as peft leaves them out; the Python layer warns of them.
    adapter_ignored_modules: Vec<String>,
}

impl PyModel {
    /// Runs `f` on the model with the GIL released; a panic becomes a RuntimeError naming `call`, and Ctrl-C
    /// stops it through the [`Interrupt`] it gets (see `detached_interruptible`).
    pub(crate) fn detached<T: Send>(
        &self,
        py: Python<'_>,
        call: &str,
        f: impl FnOnce(&Florence2ForConditionalGeneration, &dyn Interrupt) -> Result<T> + Send,
    ) -> PyResult<T> {
        let model = Arc::clone(&self.inner);
        detached_interruptible(py, call, move |interrupt| f(&model, interrupt))
    }
}

fn pixels(array: &PyReadonlyArrayDyn<'_, f32>) -> Result<HostArray<f32>> {
    HostArray::copy(array, "pixel_values", 4)
}

fn ids(array: &PyReadonlyArrayDyn<'_, i64>, name: &str) -> Result<HostArray<i64>> {
    HostArray::copy(array, name, 2)
}

#[pymethods]
impl PyModel {
    /// Loads a checkpoint folder (config.json + model.safetensors or pytorch_model.bin, either layout).
    /// `dtype` "auto" follows transformers: the config's dtype, else the stored weights'. `quantize` "int8" or
    /// "int4" stores the linear layers' weights quantized (the formats of `layers::linear`); None keeps them as
    /// loaded.
    /// `adapter`: a PEFT LoRA adapter folder merged into the weights.
    #[staticmethod]
    #[pyo3(signature = (path, dtype, device, quantize=None, adapter=None))]
    fn load(
        py: Python<'_>,
        path: PathBuf,
        dtype: &str,
        device: &str,
        quantize: Option<&str>,
        adapter: Option<PathBuf>,
    ) -> PyResult<Self> {
        let device = parse_device(device)?;
        let quantize = quantize.map(Quantization::parse).transpose()?;
        let dtype = if dtype == "auto" {
            None
        } else {
            Some(crate::dtype::parse(dtype)?)
        };
        let (model, generation, ignored) = py.detach(move || {
            guarded("from_pretrained", move || {
                crate::limits::check_setting()?;
                let dtype = match dtype {
                    Some(dtype) => dtype,
                    None => Florence2ForConditionalGeneration::auto_dtype(&path)?,
                };
                let adapter = adapter
                    .as_deref()
                    .map(Adapter::open)
                    .transpose()?
                    .map(Arc::new);
                let ignored = adapter
                    .as_ref()
                    .map(|a| a.ignored_modules().to_vec())
                    .unwrap_or_default();
                let options = LoadOptions { quantize, adapter };
                let model = Florence2ForConditionalGeneration::from_dir_with(
                    &path, dtype, &device, &options,
                )?;
                let generation = GenerationConfig::from_dir(&path, model.config().layout)?;
                Ok::<_, Error>((model, generation, ignored))
            })
        })?;
        Ok(Self {
            inner: Arc::new(model),
            generation,
            adapter_ignored_modules: ignored,
        })
    }

    /// `save_pretrained`'s weights: writes those of the checkpoint folder `source` (the PEFT adapter folder
    /// `adapter` merged) into the folder `out` in the layout of `source` (HF-native or Microsoft's), floating
    /// tensors in `dtype`, sharded above `max_shard_size` bytes (see `io::save::save_weights`). Returns the names
    /// of the files written.
    #[staticmethod]
    #[pyo3(signature = (source, out, dtype, max_shard_size, adapter=None))]
    fn save_weights(
        py: Python<'_>,
        source: PathBuf,
        out: PathBuf,
        dtype: &str,
        max_shard_size: u64,
        adapter: Option<PathBuf>,
    ) -> PyResult<Vec<String>> {
        let dtype = crate::dtype::parse(dtype)?;
        py.detach(move || {
            guarded("save_pretrained", move || {
                let checkpoint = Checkpoint::open(&source)?;
                let checkpoint = match adapter {
                    Some(adapter) => checkpoint.with_adapter(Arc::new(Adapter::open(&adapter)?)),
                    None => checkpoint,
                };
                save_weights(&checkpoint, dtype, &out, max_shard_size)
            })
        })
    }

    /// "hf" or "original": the checkpoint layout.
    /// The modules whose LoRA factors the adapter's file holds but its config does not target (sorted): not
    /// merged, as peft leaves them out. Empty without an adapter.
    #[getter]
    fn adapter_ignored_modules(&self) -> Vec<String> {
        self.adapter_ignored_modules.clone()
    }

    #[getter]
    fn layout(&self) -> &'static str {
        super::layout::name(self.inner.config().layout)
    }

    /// The checkpoint's generation settings (those that are set, by transformers' names): what `generate`
    /// starts from for this layout (see `GenerationConfig::from_dir`).
    #[getter]
    fn generation_config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        values::to_python(py, &self.generation.to_json())
    }

    /// The dtype the model was loaded in (a name of `crate::dtype`), as asked: on the CPU float16 computes in
    /// float32 (bfloat16 when quantized), see `compute_dtype` in the model.
    #[getter]
    fn dtype(&self) -> &'static str {
        crate::dtype::name(self.inner.dtype())
    }

    /// The vision tower's last hidden state for `pixel_values` [B, 3, H, W].
    fn vision_features<'py>(
        &self,
        py: Python<'py>,
        pixel_values: PyReadonlyArrayDyn<'py, f32>,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let pixels = pixels(&pixel_values)?;
        let out = self.detached(py, "vision_features", move |m, interrupt| {
            HostOutput::from_tensor(&m.vision_features(pixels.into_tensor()?, interrupt)?)
        })?;
        out.into_numpy(py)
    }

    /// One pass of the vision tower and the projector: (the tower's last hidden state [B, C, H', W'], the
    /// projected image tokens [B, 1 + H'W', d_model]).
    #[allow(clippy::type_complexity)]
    fn get_image_features<'py>(
        &self,
        py: Python<'py>,
        pixel_values: PyReadonlyArrayDyn<'py, f32>,
    ) -> PyResult<(Bound<'py, PyArrayDyn<f32>>, Bound<'py, PyArrayDyn<f32>>)> {
        let pixels = pixels(&pixel_values)?;
        let (vision, pooled) = self.detached(py, "get_image_features", move |m, interrupt| {
            let vision = m.vision_features(pixels.into_tensor()?, interrupt)?;
            let pooled = m.project_image_features(&vision)?;
            Ok((
                HostOutput::from_tensor(&vision)?,
                HostOutput::from_tensor(&pooled)?,
            ))
        })?;
        Ok((vision.into_numpy(py)?, pooled.into_numpy(py)?))
    }

    /// One forward pass as transformers' `forward`: returns a dict with `last_hidden_state` (the decoder's), `logits`,
    /// `encoder_last_hidden_state` and `image_hidden_states` (None without pixels).
    #[pyo3(signature = (input_ids, decoder_input_ids, attention_mask=None, pixel_values=None, image_features=None))]
    fn forward<'py>(
        &self,
        py: Python<'py>,
        input_ids: PyReadonlyArrayDyn<'py, i64>,
        decoder_input_ids: PyReadonlyArrayDyn<'py, i64>,
        attention_mask: Option<PyReadonlyArrayDyn<'py, i64>>,
        pixel_values: Option<PyReadonlyArrayDyn<'py, f32>>,
        image_features: Option<PyReadonlyArrayDyn<'py, f32>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let input_ids = ids(&input_ids, "input_ids")?;
        let decoder_input_ids = ids(&decoder_input_ids, "decoder_input_ids")?;
        let attention_mask = attention_mask
            .map(|m| ids(&m, "attention_mask"))
            .transpose()?;
        let pixel_values = pixel_values.map(|p| pixels(&p)).transpose()?;
        let image_features = image_features
            .map(|f| HostArray::copy(&f, "image_features", 3))
            .transpose()?;
        let (decoder, logits, encoder, image) =
            self.detached(py, "forward", move |m, interrupt| {
                let features = features_tensor(m, pixel_values, image_features, interrupt)?;
                let mask = attention_mask
                    .map(|a| a.to_u32_tensor("attention_mask"))
                    .transpose()?;
                let encoder = m.encode(
                    &input_ids.to_u32_tensor("input_ids")?,
                    mask.as_ref(),
                    features.as_ref(),
                    interrupt,
                )?;
                let (decoder, logits) = m.decoder_forward(
                    &decoder_input_ids.to_u32_tensor("decoder_input_ids")?,
                    &encoder,
                )?;
                Ok((
                    HostOutput::from_tensor(&decoder)?,
                    HostOutput::from_tensor(&logits)?,
                    HostOutput::from_tensor(&encoder.hidden_states)?,
                    features.as_ref().map(HostOutput::from_tensor).transpose()?,
                ))
            })?;
        let out = PyDict::new(py);
        out.set_item("last_hidden_state", decoder.into_numpy(py)?)?;
        out.set_item("logits", logits.into_numpy(py)?)?;
        out.set_item("encoder_last_hidden_state", encoder.into_numpy(py)?)?;
        out.set_item(
            "image_hidden_states",
            image.map(|i| i.into_numpy(py)).transpose()?,
        )?;
        Ok(out)
    }

    /// transformers' `generate`: `config` holds generation-config attributes (the caller's generation config
    /// over the model's, as the Python layer merges them; unknown attributes are ignored; None: the
    /// checkpoint's settings) and `kwargs` generate() keyword arguments (unknown names are errors), applied in
    /// that order over transformers' global defaults. Returns a dict (see `generate_output_dict`), whose
    /// `ignored` lists the attributes of `config` that were ignored.
    #[pyo3(signature = (input_ids, attention_mask=None, pixel_values=None, image_features=None, config=None, kwargs=None))]
    #[allow(clippy::too_many_arguments)]
    fn generate<'py>(
        &self,
        py: Python<'py>,
        input_ids: PyReadonlyArrayDyn<'py, i64>,
        attention_mask: Option<PyReadonlyArrayDyn<'py, i64>>,
        pixel_values: Option<PyReadonlyArrayDyn<'py, f32>>,
        image_features: Option<PyReadonlyArrayDyn<'py, f32>>,
        config: Option<&Bound<'py, PyDict>>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let config = config
            .map(|c| values::settings(c, "generation_config"))
            .transpose()?;
        let kwargs = kwargs
            .map(|k| values::settings(k, "generate()"))
            .transpose()?
            .unwrap_or_default();
        let (cfg, ignored) = settings(&self.generation, config.as_ref(), kwargs)?;
        let input_ids = ids(&input_ids, "input_ids")?;
        let attention_mask = attention_mask
            .map(|m| ids(&m, "attention_mask"))
            .transpose()?;
        let pixel_values = pixel_values.map(|p| pixels(&p)).transpose()?;
        let image_features = image_features
            .map(|f| HostArray::copy(&f, "image_features", 3))
            .transpose()?;
        let run_cfg = cfg.clone();
        let out = self.detached(py, "generate", move |m, interrupt| {
            let features = features_tensor(m, pixel_values, image_features, interrupt)?;
            let mask = attention_mask
                .map(|a| a.to_u32_tensor("attention_mask"))
                .transpose()?;
            m.generate(
                &input_ids.to_u32_tensor("input_ids")?,
                mask.as_ref(),
                features.as_ref(),
                &run_cfg,
                interrupt,
            )
        })?;
        let dict = generate_output_dict(py, out, &cfg)?;
        dict.set_item("ignored", ignored)?;
        Ok(dict)
    }
}

/// The settings of one generate call: the generation-config attributes `config` (lenient; None: `checkpoint`),
/// then the keyword arguments `kwargs` (strict); with the names of the ignored attributes.
fn settings(
    checkpoint: &GenerationConfig,
    config: Option<&serde_json::Map<String, serde_json::Value>>,
    kwargs: serde_json::Map<String, serde_json::Value>,
) -> Result<(GenerationConfig, Vec<String>)> {
    let (mut cfg, ignored) = match config {
        Some(config) => {
            let mut cfg = GenerationConfig::default();
            let ignored = cfg.merge_lenient(config)?;
            (cfg, ignored)
        }
        None => (checkpoint.clone(), Vec::new()),
    };
    for (key, value) in kwargs {
        cfg.set(&key, value)?;
    }
    cfg.validate()?;
    Ok((cfg, ignored))
}

/// `GenerateOutput` as numpy arrays: sequences int64 [N, T]; token_scores f32 [N, T-1]; and, where the
/// settings asked for them, sequences_scores f32 [N] (beam search) and scores (a list of f32 [rows, vocab]).
fn generate_output_dict<'py>(
    py: Python<'py>,
    out: GenerateOutput,
    cfg: &GenerationConfig,
) -> PyResult<Bound<'py, PyDict>> {
    let rows = out.sequences.len();
    let len = out.sequences.first().map_or(0, Vec::len);
    let ids: Vec<i64> = out
        .sequences
        .iter()
        .flatten()
        .map(|&t| i64::from(t))
        .collect();
    let dict = PyDict::new(py);
    dict.set_item(
        "sequences",
        numpy::PyArray1::from_vec(py, ids).reshape([rows, len])?,
    )?;
    let token_scores: Vec<f32> = out.token_scores.iter().flatten().copied().collect();
    let width = out.token_scores.first().map_or(0, Vec::len);
    dict.set_item(
        "token_scores",
        numpy::PyArray1::from_vec(py, token_scores).reshape([rows, width])?,
    )?;
    let output_scores = cfg.output_scores.unwrap_or(false);
    dict.set_item(
        "return_dict_in_generate",
        cfg.return_dict_in_generate.unwrap_or(false),
    )?;
    dict.set_item(
        "sequences_scores",
        out.sequences_scores
            .filter(|_| output_scores)
            .map(|s| numpy::PyArray1::from_vec(py, s)),
    )?;
    let scores = match out.scores {
        Some(steps) if output_scores => Some(
            steps
                .into_iter()
                .map(|step| {
                    let (r, v) = (step.len(), step.first().map_or(0, Vec::len));
                    numpy::PyArray1::from_vec(py, step.into_iter().flatten().collect())
                        .reshape([r, v])
                })
                .collect::<PyResult<Vec<_>>>()?,
        ),
        _ => None,
    };
    dict.set_item("scores", scores)?;
    Ok(dict)
}

/// The image tokens to merge: given features win over pixels (transformers refuses both; the Python layer
/// checks that), none without either.
pub(crate) fn features_tensor(
    model: &Florence2ForConditionalGeneration,
    pixel_values: Option<HostArray<f32>>,
    image_features: Option<HostArray<f32>>,
    interrupt: &dyn Interrupt,
) -> Result<Option<Tensor>> {
    Ok(match (image_features, pixel_values) {
        (Some(f), _) => Some(f.into_tensor()?),
        (None, Some(p)) => Some(model.get_image_features(p.into_tensor()?, interrupt)?),
        (None, None) => None,
    })
}
