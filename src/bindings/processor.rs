//! `ProcessorCore`: the native half of `florence2_rs.Florence2Processor` (the Python shim in
//! processing.py adds the transformers-shaped API). Thin wrappers over [`crate::processor`].

use std::path::PathBuf;

use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray3, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use super::errors::guarded;

use crate::processor::prompts::{Prompt, TASKS};
use crate::processor::{Answer, EncodeOptions, Florence2Processor, ImageInput, Padding, RgbImage};
use crate::Error;

/// Tokenizer, image preprocessing, prompts and post-processing of one checkpoint.
#[pyclass(name = "ProcessorCore", module = "florence2_rs._native", frozen)]
pub struct PyProcessorCore {
    inner: Florence2Processor,
}

fn padding_of(padding: &str) -> PyResult<Padding> {
    Ok(match padding {
        "do_not_pad" => Padding::None,
        "longest" => Padding::Longest,
        "max_length" => Padding::MaxLength,
        other => {
            return Err(Error::invalid(format!(
            "padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {other:?}"
        ))
            .into())
        }
    })
}

fn answer_to_py<'py>(py: Python<'py>, task: &str, answer: Answer) -> PyResult<Bound<'py, PyDict>> {
    let out = PyDict::new(py);
    match answer {
        Answer::Text(text) => out.set_item(task, text)?,
        Answer::Boxes { bboxes, labels } => {
            let d = PyDict::new(py);
            d.set_item("bboxes", bboxes)?;
            d.set_item("labels", labels)?;
            out.set_item(task, d)?;
        }
        Answer::Ocr { quad_boxes, labels } => {
            let d = PyDict::new(py);
            d.set_item("quad_boxes", quad_boxes)?;
            d.set_item("labels", labels)?;
            out.set_item(task, d)?;
        }
        Answer::Polygons { polygons, labels } => {
            let d = PyDict::new(py);
            d.set_item("polygons", polygons)?;
            d.set_item("labels", labels)?;
            out.set_item(task, d)?;
        }
        Answer::BoxesOrPolygons {
            bboxes,
            bboxes_labels,
            polygons,
            polygons_labels,
        } => {
            let d = PyDict::new(py);
            d.set_item("bboxes", bboxes)?;
            d.set_item("bboxes_labels", bboxes_labels)?;
            d.set_item("polygons", polygons)?;
            d.set_item("polygons_labels", polygons_labels)?;
            out.set_item(task, d)?;
        }
    }
    Ok(out)
}

/// `(input_ids, attention_mask)` rows, as the processor methods return them.
type IdsAndMask = (Vec<Vec<u32>>, Vec<Vec<u32>>);

#[pymethods]
impl PyProcessorCore {
    /// Loads the processor files of a local checkpoint folder.
    #[staticmethod]
    fn from_dir(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = py.detach(|| {
            guarded("AutoProcessor.from_pretrained", || {
                Florence2Processor::from_dir(&path)
            })
        })?;
        Ok(Self { inner })
    }

    /// `<image>`'s id where the prompt holds image placeholders (HF-native layout), else None.
    #[getter]
    fn image_token_id(&self) -> Option<u32> {
        self.inner.image_token_id
    }

    #[getter]
    fn bos_token_id(&self) -> u32 {
        self.inner.tokenizer.bos_token_id
    }

    #[getter]
    fn eos_token_id(&self) -> u32 {
        self.inner.tokenizer.eos_token_id
    }

    #[getter]
    fn pad_token_id(&self) -> u32 {
        self.inner.tokenizer.pad_token_id
    }

    #[getter]
    fn model_max_length(&self) -> usize {
        self.inner.tokenizer.model_max_length
    }

    /// Vocabulary size with the added tokens (`len(tokenizer)`).
    fn vocab_len(&self) -> usize {
        self.inner.tokenizer.len()
    }

    /// The image-processor settings as a dict of plain values.
    fn image_settings<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let c = &self.inner.image_config;
        let d = PyDict::new(py);
        let hw = |(h, w): (usize, usize)| -> PyResult<Bound<'py, PyDict>> {
            let s = PyDict::new(py);
            s.set_item("height", h)?;
            s.set_item("width", w)?;
            Ok(s)
        };
        d.set_item("do_resize", c.do_resize)?;
        d.set_item("size", hw(c.size)?)?;
        d.set_item("resample", c.resample as i64)?;
        d.set_item("do_center_crop", c.do_center_crop)?;
        d.set_item("crop_size", hw(c.crop_size)?)?;
        d.set_item("do_rescale", c.do_rescale)?;
        d.set_item("rescale_factor", c.rescale_factor)?;
        d.set_item("do_normalize", c.do_normalize)?;
        d.set_item("image_mean", c.image_mean.to_vec())?;
        d.set_item("image_std", c.image_std.to_vec())?;
        d.set_item("do_convert_rgb", c.do_convert_rgb)?;
        d.set_item("image_seq_length", c.image_seq_length)?;
        Ok(d)
    }

    /// Task tokens replaced by their prompts.
    fn build_prompts(&self, texts: Vec<String>) -> PyResult<Vec<String>> {
        Ok(self.inner.build_prompts(&texts)?)
    }

    /// Processor text encoding: prompts, layout, padding and truncation. Returns (input_ids, attention_mask).
    #[pyo3(signature = (texts, with_images, padding="do_not_pad", truncation=None, max_length=None, pad_to_multiple_of=None))]
    #[allow(clippy::too_many_arguments)] // mirrors the processor's keyword arguments
    fn encode_prompts(
        &self,
        py: Python<'_>,
        texts: Vec<String>,
        with_images: bool,
        padding: &str,
        truncation: Option<bool>,
        max_length: Option<usize>,
        pad_to_multiple_of: Option<usize>,
    ) -> PyResult<IdsAndMask> {
        let opts = EncodeOptions {
            padding: padding_of(padding)?,
            truncation,
            max_length,
            pad_to_multiple_of,
        };
        let batch = py.detach(|| {
            guarded("the processor's text encoding", || {
                self.inner.encode_texts(&texts, with_images, &opts)
            })
        })?;
        Ok((batch.input_ids, batch.attention_mask))
    }

    /// Plain tokenizer encoding of texts (no task prompts). Returns (input_ids, attention_mask).
    #[pyo3(signature = (texts, add_special_tokens=true, padding="do_not_pad", truncation=None, max_length=None, pad_to_multiple_of=None))]
    #[allow(clippy::too_many_arguments)] // mirrors the processor's keyword arguments
    fn tokenize(
        &self,
        py: Python<'_>,
        texts: Vec<String>,
        add_special_tokens: bool,
        padding: &str,
        truncation: Option<bool>,
        max_length: Option<usize>,
        pad_to_multiple_of: Option<usize>,
    ) -> PyResult<IdsAndMask> {
        let opts = EncodeOptions {
            padding: padding_of(padding)?,
            truncation,
            max_length,
            pad_to_multiple_of,
        };
        let tok = &self.inner.tokenizer;
        let batch = py.detach(|| {
            guarded("the tokenizer", || {
                let seqs = texts
                    .iter()
                    .map(|t| tok.encode(t, add_special_tokens))
                    .collect::<Result<Vec<_>, _>>()?;
                tok.pad_batch(seqs, &opts)
            })
        })?;
        Ok((batch.input_ids, batch.attention_mask))
    }

    /// `pixel_values` float32 [B, 3, H, W] from (H×W×3 uint8 array, from_unit_float) pairs.
    fn preprocess<'py>(
        &self,
        py: Python<'py>,
        images: Vec<(PyReadonlyArray3<'py, u8>, bool)>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let copied: u128 = images.iter().map(|(array, _)| array.len() as u128).sum();
        crate::limits::check_alloc(
            &format!(
                "copying {} images ({copied} bytes of RGB values)",
                images.len()
            ),
            copied,
        )?;
        let mut inputs = Vec::with_capacity(images.len());
        for (array, from_unit_float) in &images {
            let shape = array.shape();
            if shape[2] != 3 {
                return Err(Error::Image(format!(
                    "expected an H×W×3 RGB array, got shape {shape:?}"
                ))
                .into());
            }
            let data = array.as_array().iter().copied().collect();
            inputs.push(ImageInput {
                image: RgbImage::new(shape[1], shape[0], data)?,
                from_unit_float: *from_unit_float,
            });
        }
        let pv = py.detach(|| {
            guarded("the image processor", || {
                self.inner.preprocess_images(&inputs)
            })
        })?;
        let flat = PyArray1::from_vec(py, pv.data);
        Ok(flat.reshape(pv.shape)?.into_any())
    }

    fn batch_decode(
        &self,
        py: Python<'_>,
        sequences: Vec<Vec<u32>>,
        skip_special_tokens: bool,
    ) -> PyResult<Vec<String>> {
        py.detach(|| {
            guarded("batch_decode", || {
                self.inner.batch_decode(&sequences, skip_special_tokens)
            })
        })
    }

    fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.tokenizer.token_to_id(token)
    }

    fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.tokenizer.id_to_token(id)
    }

    fn is_special(&self, id: u32) -> bool {
        self.inner.tokenizer.is_special(id)
    }

    /// transformers' `post_process_generation`, returning `{task: answer}` of plain lists and ints.
    #[pyo3(signature = (task, text=None, sequence=None, image_size=None))]
    fn post_process_generation<'py>(
        &self,
        py: Python<'py>,
        task: &str,
        text: Option<String>,
        sequence: Option<Vec<u32>>,
        image_size: Option<(f64, f64)>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let answer = py.detach(|| {
            guarded("post_process_generation", || {
                self.inner.post_process_generation(
                    text.as_deref(),
                    sequence.as_deref(),
                    task,
                    image_size,
                )
            })
        })?;
        answer_to_py(py, task, answer)
    }
}

/// Raises MemoryError when `what` would need more than `bytes` of memory allowed for one allocation
/// (`FLORENCE2_MAX_ALLOC_BYTES`): the Python side checks the copies it makes of a caller's image with it.
#[pyfunction]
fn check_alloc(what: &str, bytes: u128) -> PyResult<()> {
    Ok(crate::limits::check_alloc(what, bytes)?)
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyProcessorCore>()?;
    m.add_function(wrap_pyfunction!(check_alloc, m)?)?;
    // The task table's two halves, in its order, for the labeling tools (python/florence2_rs/labeling.py).
    let tokens = |with_input: bool| {
        TASKS
            .iter()
            .filter(move |task| matches!(task.prompt, Prompt::WithInput(_)) == with_input)
            .map(|task| task.token)
            .collect::<Vec<_>>()
    };
    m.add("TASKS_WITHOUT_INPUT", PyTuple::new(m.py(), tokens(false))?)?;
    m.add("TASKS_WITH_INPUT", PyTuple::new(m.py(), tokens(true))?)
}
