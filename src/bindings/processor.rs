//! `ProcessorCore`: the native half of `florence2_rs.Florence2Processor` (the Python shim in
//! processing.py adds the transformers-shaped API). Thin wrappers over [`crate::processor`].

use std::collections::BTreeMap;
use std::path::PathBuf;

use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray3, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use super::errors::guarded;
use crate::limits::product;

use crate::processor::image::{height_width_entries, three, Filter};
use crate::processor::prompts::{Prompt, TASKS};
use crate::processor::{
    Answer, EncodeOptions, Florence2Processor, ImageInput, Padding, PixelData, RgbImage, Size,
};
use crate::Error;

/// The tokenizer's `truncation_side`: true for "left".
fn truncate_left_of(side: &str) -> PyResult<bool> {
    match side {
        "left" => Ok(true),
        "right" => Ok(false),
        other => Err(Error::invalid(format!(
            "truncation_side must be 'left' or 'right', got {other:?}"
        ))
        .into()),
    }
}

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

/// `{task: answer}` and, per box of the answer, the indices of its location tokens (or None).
type AnswerAndBoxTokens<'py> = (Bound<'py, PyDict>, Vec<Option<Vec<usize>>>);

#[pymethods]
impl PyProcessorCore {
    /// Loads the processor files of a local checkpoint folder.
    #[staticmethod]
    fn from_dir(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = py.detach(|| {
            guarded("AutoProcessor.from_pretrained", || {
                crate::limits::check_setting()?;
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
        let size = PyDict::new(py);
        for (key, value) in c.size.entries() {
            size.set_item(key, value)?;
        }
        d.set_item("do_resize", c.do_resize)?;
        d.set_item("size", size)?;
        d.set_item("resample", c.resample as i64)?;
        d.set_item("do_center_crop", c.do_center_crop)?;
        d.set_item("crop_size", hw(c.crop_size)?)?;
        d.set_item("do_rescale", c.do_rescale)?;
        d.set_item("rescale_factor", c.rescale_factor)?;
        d.set_item("do_normalize", c.do_normalize)?;
        d.set_item("image_mean", c.image_mean.to_vec())?;
        d.set_item("image_std", c.image_std.to_vec())?;
        d.set_item("do_convert_rgb", c.do_convert_rgb)?;
        d.set_item("do_pad", c.do_pad)?;
        d.set_item("pad_size", c.pad_size.map(hw).transpose()?)?;
        d.set_item("image_seq_length", c.image_seq_length)?;
        Ok(d)
    }

    /// Task tokens replaced by their prompts.
    fn build_prompts(&self, texts: Vec<String>) -> PyResult<Vec<String>> {
        Ok(self.inner.build_prompts(&texts)?)
    }

    /// Processor text encoding: prompts, layout, padding and truncation. Returns (input_ids, attention_mask).
    #[pyo3(signature = (texts, with_images, padding="do_not_pad", truncation=None, max_length=None, pad_to_multiple_of=None, add_special_tokens=false, truncation_side="right"))]
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
        add_special_tokens: bool,
        truncation_side: &str,
    ) -> PyResult<IdsAndMask> {
        let opts = EncodeOptions {
            padding: padding_of(padding)?,
            truncation,
            max_length,
            pad_to_multiple_of,
            truncate_left: truncate_left_of(truncation_side)?,
        };
        let batch = py.detach(|| {
            guarded("the processor's text encoding", || {
                self.inner
                    .encode_texts(&texts, with_images, add_special_tokens, &opts)
            })
        })?;
        Ok((batch.input_ids, batch.attention_mask))
    }

    /// Plain tokenizer encoding of texts (no task prompts). Returns (input_ids, attention_mask).
    #[pyo3(signature = (texts, add_special_tokens=true, padding="do_not_pad", truncation=None, max_length=None, pad_to_multiple_of=None, truncation_side="right"))]
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
        truncation_side: &str,
    ) -> PyResult<IdsAndMask> {
        let opts = EncodeOptions {
            padding: padding_of(padding)?,
            truncation,
            max_length,
            pad_to_multiple_of,
            truncate_left: truncate_left_of(truncation_side)?,
        };
        let tok = &self.inner.tokenizer;
        let batch = py.detach(|| {
            guarded("the tokenizer", || {
                let seqs = texts
                    .iter()
                    .map(|t| tok.encode(t, false))
                    .collect::<Result<Vec<_>, _>>()?;
                tok.pad_batch(seqs, add_special_tokens, &opts)
            })
        })?;
        Ok((batch.input_ids, batch.attention_mask))
    }

    /// `pixel_values`, one [3, H, W] array per image (float32; float64 for a float64 image left unrescaled),
    /// from (H×W×3 array, from_unit_float) pairs: uint8 arrays (resizable), or float32 / float64 arrays of the
    /// caller's values where nothing resizes them.
    /// The keywords override the checkpoint's image settings for this call (None keeps them); `size`,
    /// `crop_size` and `pad_size` are size dicts, `image_mean` / `image_std` a number or 3 numbers.
    #[pyo3(signature = (
        images, *, do_resize=None, size=None, resample=None, do_center_crop=None, crop_size=None,
        do_rescale=None, rescale_factor=None, do_normalize=None, image_mean=None, image_std=None,
        do_pad=None, pad_size=None,
    ))]
    #[allow(clippy::too_many_arguments)] // one argument per image-processor keyword
    fn preprocess<'py>(
        &self,
        py: Python<'py>,
        images: Vec<(Bound<'py, PyAny>, bool)>,
        do_resize: Option<bool>,
        size: Option<BTreeMap<String, i64>>,
        resample: Option<i64>,
        do_center_crop: Option<bool>,
        crop_size: Option<BTreeMap<String, i64>>,
        do_rescale: Option<bool>,
        rescale_factor: Option<f64>,
        do_normalize: Option<bool>,
        image_mean: Option<Bound<'py, PyAny>>,
        image_std: Option<Bound<'py, PyAny>>,
        do_pad: Option<bool>,
        pad_size: Option<BTreeMap<String, i64>>,
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let overridden = [
            do_resize.is_some(),
            size.is_some(),
            resample.is_some(),
            do_center_crop.is_some(),
            crop_size.is_some(),
            do_rescale.is_some(),
            rescale_factor.is_some(),
            do_normalize.is_some(),
            image_mean.is_some(),
            image_std.is_some(),
            do_pad.is_some(),
            pad_size.is_some(),
        ]
        .contains(&true);
        let config = if overridden {
            let mut c = self.inner.image_config.clone();
            let entries = |map: BTreeMap<String, i64>| map.into_iter().collect::<Vec<_>>();
            c.do_resize = do_resize.unwrap_or(c.do_resize);
            if let Some(size) = size {
                c.size = Size::from_entries(&entries(size), "size")?;
            }
            if let Some(code) = resample {
                c.resample = Filter::from_pil(code)?;
            }
            c.do_center_crop = do_center_crop.unwrap_or(c.do_center_crop);
            if let Some(crop) = crop_size {
                c.crop_size = height_width_entries(&entries(crop), "crop_size")?;
            }
            c.do_rescale = do_rescale.unwrap_or(c.do_rescale);
            c.rescale_factor = rescale_factor.unwrap_or(c.rescale_factor);
            c.do_normalize = do_normalize.unwrap_or(c.do_normalize);
            if let Some(mean) = image_mean {
                c.image_mean = per_channel(&mean, "mean")?;
            }
            if let Some(std) = image_std {
                c.image_std = per_channel(&std, "std")?;
            }
            c.do_pad = do_pad.unwrap_or(c.do_pad);
            if let Some(pad) = pad_size {
                c.pad_size = Some(height_width_entries(&entries(pad), "pad_size")?);
            }
            c.check_sizes()?;
            Some(c)
        } else {
            None
        };
        let inputs = images_of(&images)?;
        let pixel_values = py.detach(|| {
            guarded("the image processor", || {
                self.inner.preprocess_images(&inputs, config.as_ref())
            })
        })?;
        pixel_values
            .into_iter()
            .map(|pv| {
                Ok(match pv.data {
                    PixelData::F32(data) => {
                        PyArray1::from_vec(py, data).reshape(pv.shape)?.into_any()
                    }
                    PixelData::F64(data) => {
                        PyArray1::from_vec(py, data).reshape(pv.shape)?.into_any()
                    }
                })
            })
            .collect()
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

    /// `{task: answer}` of the decoded generated ids (`batch_decode(..., skip_special_tokens=False)`'s
    /// text), and for each box of the answer the indices in `sequence` of its location tokens (None where
    /// no location token of `sequence` wrote it): what a box's score is computed from.
    #[pyo3(signature = (task, sequence, image_size=None))]
    fn post_process_sequence<'py>(
        &self,
        py: Python<'py>,
        task: &str,
        sequence: Vec<u32>,
        image_size: Option<(f64, f64)>,
    ) -> PyResult<AnswerAndBoxTokens<'py>> {
        let (answer, spans) = py.detach(|| {
            guarded("post_process_generation", || {
                self.inner
                    .post_process_sequence(&sequence, task, image_size)
            })
        })?;
        Ok((answer_to_py(py, task, answer)?, spans))
    }
}

/// `image_mean` / `image_std` of a call: one number for all channels, or one per channel.
fn per_channel(value: &Bound<'_, PyAny>, key: &str) -> PyResult<[f64; 3]> {
    if let Ok(x) = value.extract::<f64>() {
        return Ok([x; 3]);
    }
    let values: Vec<f64> = value.extract().map_err(|_| {
        Error::invalid(format!(
            "{key} must be a number or a sequence of 3 numbers, got {value}"
        ))
    })?;
    Ok(three(&values, key)?)
}

/// The images of a `preprocess` call, copied out of their H×W×3 arrays (each copy checked against the
/// allocation limit first): uint8 arrays as RGB images, float32 and float64 arrays as values.
fn images_of(images: &[(Bound<'_, PyAny>, bool)]) -> PyResult<Vec<ImageInput>> {
    let mut inputs = Vec::with_capacity(images.len());
    let mut copied: u128 = 0;
    let mut charge = |shape: &[usize], bytes_per_value: u128| -> PyResult<(usize, usize)> {
        if shape[2] != 3 {
            let msg = format!("expected an H×W×3 RGB array, got shape {shape:?}");
            return Err(Error::Image(msg).into());
        }
        if shape[0] == 0 || shape[1] == 0 {
            let msg = format!("empty image ({}x{})", shape[1], shape[0]);
            return Err(Error::Image(msg).into());
        }
        copied += product(&[shape[0] as u128, shape[1] as u128, 3, bytes_per_value]);
        let what = format!(
            "copying {} images ({copied} bytes of RGB values)",
            images.len()
        );
        crate::limits::check_alloc(&what, copied)?;
        Ok((shape[0], shape[1]))
    };
    for (array, from_unit_float) in images {
        let input = if let Ok(pixels) = array.extract::<PyReadonlyArray3<'_, u8>>() {
            let (height, width) = charge(pixels.shape(), 1)?;
            let data = pixels.as_array().iter().copied().collect();
            ImageInput::Rgb8 {
                image: RgbImage::new(width, height, data)?,
                from_unit_float: *from_unit_float,
            }
        } else if let Ok(values) = array.extract::<PyReadonlyArray3<'_, f32>>() {
            let (height, width) = charge(values.shape(), 8)?;
            let data = values.as_array().iter().map(|&v| f64::from(v)).collect();
            ImageInput::Values {
                width,
                height,
                data,
                float64: false,
            }
        } else if let Ok(values) = array.extract::<PyReadonlyArray3<'_, f64>>() {
            let (height, width) = charge(values.shape(), 8)?;
            let data = values.as_array().iter().copied().collect();
            ImageInput::Values {
                width,
                height,
                data,
                float64: true,
            }
        } else {
            return Err(Error::Image(format!(
                "expected an H×W×3 uint8, float32 or float64 array, got {}",
                array.get_type().name()?
            ))
            .into());
        };
        inputs.push(input);
    }
    Ok(inputs)
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
    // The task table's two halves, in its order, for the labeling tools (python/florence2_rs/apps/labeling.py).
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
