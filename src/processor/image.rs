//! Image preprocessing: resize exactly like Pillow's `Image.resize` (what transformers' PIL backend of
//! `CLIPImageProcessor` calls), then rescale and normalize into `pixel_values` `[B, 3, H, W]`.
//!
//! Pillow resamples in two separable passes (horizontal then vertical, or the other way round when the
//! height shrinks much more than the width) with filter weights scaled
//! by the reduction factor (antialiasing), quantized to 22-bit fixed point, and the intermediate image
//! rounded and clipped to uint8. `resample` below follows Pillow's `libImaging/Resample.c` step by
//! step so that the uint8 result is identical.

use serde_json::Value;

use crate::limits::{check_alloc, product};
use crate::{Error, Result};

/// Bytes of one pixel in `pixel_values`: three float32 channels (a float64 pixel counts as two).
const PIXEL_BYTES: u128 = 3 * 4;
/// Bytes of one pixel of the caller's values (`ImageInput::Values`): 3 float64.
const VALUE_PIXEL_BYTES: u128 = 3 * 8;
/// Bytes of one token id in a prompt: a u32 here, and in Python a list entry (a pointer) to an int
/// object (at least 28 bytes on 64-bit CPython) or an int64 numpy entry.
const ID_BYTES: u128 = 4 + 8 + 28;

/// An 8-bit RGB image, rows of `width * 3` bytes (what `np.array(pil_image.convert("RGB"))` holds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl RgbImage {
    /// Checks that `data` holds `width * height * 3` bytes.
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<Self> {
        let expected = width.checked_mul(height).and_then(|n| n.checked_mul(3));
        if expected != Some(data.len()) {
            return Err(Error::Image(format!(
                "{width}x{height} RGB image needs {expected:?} bytes, got {}",
                data.len()
            )));
        }
        if width == 0 || height == 0 {
            return Err(Error::Image(format!("empty image ({width}x{height})")));
        }
        Ok(Self {
            width,
            height,
            data,
        })
    }
}

/// One input image as the image processor receives it.
#[derive(Debug, Clone, PartialEq)]
pub enum ImageInput {
    /// 8-bit RGB, what Pillow resizes.
    Rgb8 {
        image: RgbImage,
        /// The caller's image was float in [0, 1] and scaled by 255 to be resized through Pillow.
        /// transformers then divides the resized values by 255 *and* applies `rescale_factor` as well;
        /// kept so that pixel_values match.
        from_unit_float: bool,
    },
    /// The caller's values, H×W×3 interleaved, unchanged: transformers converts an image to uint8 only to
    /// resize it, so without resizing the values are rescaled and normalized as given (floats included).
    Values {
        width: usize,
        height: usize,
        data: Vec<f64>,
        /// The caller's array was float64: numpy keeps it float64 unless it is rescaled (which casts
        /// to float32), so it is normalized and returned in float64.
        float64: bool,
    },
}

impl ImageInput {
    /// (height, width)
    fn dims(&self) -> (usize, usize) {
        match self {
            ImageInput::Rgb8 { image, .. } => (image.height, image.width),
            ImageInput::Values { width, height, .. } => (*height, *width),
        }
    }
}

/// Pillow's resampling filters by their `Image.Resampling` number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    Nearest = 0,
    Lanczos = 1,
    Bilinear = 2,
    Bicubic = 3,
    Box = 4,
    Hamming = 5,
}

impl Filter {
    /// The filter for a PIL resample code. Pillow 13's MKS2013 (6) and MKS2021 (7) are not implemented.
    pub fn from_pil(code: i64) -> Result<Self> {
        Ok(match code {
            0 => Filter::Nearest,
            1 => Filter::Lanczos,
            2 => Filter::Bilinear,
            3 => Filter::Bicubic,
            4 => Filter::Box,
            5 => Filter::Hamming,
            6 | 7 => {
                return Err(Error::invalid(format!(
                    "resample={code} (Pillow's MKS2013 / MKS2021) is not supported by florence2-rs: use \
                     0 (NEAREST), 1 (LANCZOS), 2 (BILINEAR), 3 (BICUBIC), 4 (BOX) or 5 (HAMMING)"
                )))
            }
            other => {
                return Err(Error::invalid(format!(
                    "The resampling should be one of [0, 1, 2, 3, 4, 5] when provided as integer, but got \
                     resampling={other}"
                )))
            }
        })
    }

    /// The convolution kernel Pillow resamples with; None for NEAREST, which picks source pixels.
    fn kernel(self) -> Option<Kernel> {
        match self {
            Filter::Nearest => None,
            Filter::Lanczos => Some(Kernel::Lanczos),
            Filter::Bilinear => Some(Kernel::Bilinear),
            Filter::Bicubic => Some(Kernel::Bicubic),
            Filter::Box => Some(Kernel::Box),
            Filter::Hamming => Some(Kernel::Hamming),
        }
    }
}

/// The convolution filters of Pillow's resampling (every filter but NEAREST).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Lanczos,
    Bilinear,
    Bicubic,
    Box,
    Hamming,
}

impl Kernel {
    fn support(self) -> f64 {
        match self {
            Kernel::Box => 0.5,
            Kernel::Bilinear | Kernel::Hamming => 1.0,
            Kernel::Bicubic => 2.0,
            Kernel::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        fn sinc(x: f64) -> f64 {
            if x == 0.0 {
                return 1.0;
            }
            let x = x * std::f64::consts::PI;
            x.sin() / x
        }
        match self {
            Kernel::Box => f64::from(u8::from(x > -0.5 && x <= 0.5)),
            Kernel::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Kernel::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let x = x * std::f64::consts::PI;
                    x.sin() / x * (0.54 + 0.46 * x.cos())
                }
            }
            Kernel::Bicubic => {
                // Keys' cubic with a = -0.5, as Pillow.
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Kernel::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

/// Fixed-point precision of Pillow's 8-bit resampling.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output pixel: the first input pixel, how many are used, and their fixed-point weights.
struct Coeffs {
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
    ksize: usize,
}

/// Pillow's `precompute_coeffs` followed by `normalize_coeffs_8bpc`, for the full-image box.
fn precompute_coeffs(in_size: usize, out_size: usize, filter: Kernel) -> Coeffs {
    // Pillow keeps the box in `float`; integer sizes below 2^24 are exact either way.
    let scale = f64::from(in_size as f32) / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C casts truncate toward zero; negative starts are clamped to 0 right after.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64)
            .min(in_size as i64)
            .max(xmin as i64) as usize
            - xmin;
        let xmax = xmax.min(ksize);
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(xmax) {
            let w = filter.weight((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        let row = &mut weights[xx * ksize..xx * ksize + xmax];
        for (dst, &w) in row.iter_mut().zip(k.iter()) {
            let w = if ww != 0.0 { w / ww } else { w };
            let fixed = w * f64::from(1u32 << PRECISION_BITS);
            *dst = if w < 0.0 {
                (-0.5 + fixed) as i32
            } else {
                (0.5 + fixed) as i32
            };
        }
        bounds.push((xmin, xmax));
    }
    Coeffs {
        bounds,
        weights,
        ksize,
    }
}

/// Rounds a fixed-point accumulator to uint8 with clipping (Pillow's `clip8`).
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One separable pass over interleaved RGB rows. `stride_in` / `stride_out` address the pixel along
/// the resampled axis; `lines`, `line_in`, `line_out` the other axis.
struct Pass<'a> {
    src: &'a [u8],
    dst: &'a mut [u8],
    coeffs: &'a Coeffs,
    lines: usize,
    line_in: usize,
    line_out: usize,
    stride_in: usize,
    stride_out: usize,
    /// First source line used (Pillow skips rows no output pixel reads).
    offset: usize,
}

impl Pass<'_> {
    fn run(self) {
        let half = 1i64 << (PRECISION_BITS - 1);
        for line in 0..self.lines {
            let src_line = (line + self.offset) * self.line_in;
            let dst_line = line * self.line_out;
            for (xx, &(xmin, xmax)) in self.coeffs.bounds.iter().enumerate() {
                let k = &self.coeffs.weights[xx * self.coeffs.ksize..xx * self.coeffs.ksize + xmax];
                let mut acc = [half; 3];
                for (x, &w) in k.iter().enumerate() {
                    let p = src_line + (x + xmin) * self.stride_in;
                    for (c, a) in acc.iter_mut().enumerate() {
                        *a += i64::from(self.src[p + c]) * i64::from(w);
                    }
                }
                let q = dst_line + xx * self.stride_out;
                for (c, a) in acc.iter().enumerate() {
                    self.dst[q + c] = clip8(*a);
                }
            }
        }
    }
}

/// `Image.resize((width, height), resample=filter)` of an RGB image, bit-exact with Pillow.
pub fn resize(img: &RgbImage, width: usize, height: usize, filter: Filter) -> Result<RgbImage> {
    if width == 0 || height == 0 {
        return Err(Error::invalid(format!("cannot resize to {width}x{height}")));
    }
    let Some(filter) = filter.kernel() else {
        return Ok(resize_nearest(img, width, height));
    };
    let need_horizontal = width != img.width;
    let need_vertical = height != img.height;
    // Pillow 13 (libImaging/Resample.c, ImagingResampleInner) runs the vertical pass first when the
    // height shrinks by more than twice as many pixels as the width does; older Pillow always went
    // horizontal first. The pass order changes the uint8 rounding of the intermediate image.
    let rows_removed = img.height as i64 - height as i64;
    let cols_removed = img.width as i64 - width as i64;
    let vertical_first =
        need_horizontal && need_vertical && rows_removed > 0 && rows_removed > cols_removed * 2;
    if vertical_first {
        let tall = vertical_pass(img, height, filter);
        return Ok(horizontal_pass(&tall, width, filter, None));
    }
    match (need_horizontal, need_vertical) {
        (true, true) => {
            // Only the rows the vertical pass reads are resampled horizontally.
            let vert = precompute_coeffs(img.height, height, filter);
            let first = vert.bounds.first().map_or(0, |b| b.0);
            let last = vert.bounds.last().map_or(img.height, |b| b.0 + b.1);
            let wide = horizontal_pass(img, width, filter, Some((first, last)));
            Ok(vertical_pass_from(&wide, height, filter, img.height, first))
        }
        (true, false) => Ok(horizontal_pass(img, width, filter, None)),
        (false, true) => Ok(vertical_pass(img, height, filter)),
        (false, false) => Ok(img.clone()),
    }
}

/// Pillow's NEAREST resize (`ImagingScaleAffine`): each output pixel copies the input pixel under its
/// centre, the source coordinate stepped in double precision from `scale / 2` (the accumulated sum, not
/// `(x + 0.5) * scale`, is what picks the pixel) and truncated.
fn resize_nearest(img: &RgbImage, width: usize, height: usize) -> RgbImage {
    if (width, height) == (img.width, img.height) {
        return img.clone();
    }
    let source_index = |in_size: usize, out_size: usize| -> Vec<usize> {
        let step = in_size as f64 / out_size as f64;
        let mut at = step * 0.5;
        (0..out_size)
            .map(|_| {
                let index = (at as usize).min(in_size - 1);
                at += step;
                index
            })
            .collect()
    };
    let columns = source_index(img.width, width);
    let rows = source_index(img.height, height);
    let mut data = Vec::with_capacity(width * height * 3);
    for &y in &rows {
        let row = &img.data[y * img.width * 3..(y + 1) * img.width * 3];
        for &x in &columns {
            data.extend_from_slice(&row[x * 3..x * 3 + 3]);
        }
    }
    RgbImage {
        width,
        height,
        data,
    }
}

/// Resamples the rows `rows` (all when None) of `img` to `width` columns.
fn horizontal_pass(
    img: &RgbImage,
    width: usize,
    filter: Kernel,
    rows: Option<(usize, usize)>,
) -> RgbImage {
    let (first, last) = rows.unwrap_or((0, img.height));
    let coeffs = precompute_coeffs(img.width, width, filter);
    let n = last - first;
    let mut out = vec![0u8; n * width * 3];
    Pass {
        src: &img.data,
        dst: &mut out,
        coeffs: &coeffs,
        lines: n,
        line_in: img.width * 3,
        line_out: width * 3,
        stride_in: 3,
        stride_out: 3,
        offset: first,
    }
    .run();
    RgbImage {
        width,
        height: n,
        data: out,
    }
}

/// Resamples the columns of `img` to `height` rows.
fn vertical_pass(img: &RgbImage, height: usize, filter: Kernel) -> RgbImage {
    vertical_pass_from(img, height, filter, img.height, 0)
}

/// Vertical pass over `img`, which holds rows `first..` of a source `source_height` rows tall
/// (Pillow's shifted bounds after a horizontal pass that skipped unused rows).
fn vertical_pass_from(
    img: &RgbImage,
    height: usize,
    filter: Kernel,
    source_height: usize,
    first: usize,
) -> RgbImage {
    let mut coeffs = precompute_coeffs(source_height, height, filter);
    for b in coeffs.bounds.iter_mut() {
        b.0 -= first;
    }
    let mut out = vec![0u8; height * img.width * 3];
    Pass {
        src: &img.data,
        dst: &mut out,
        coeffs: &coeffs,
        lines: img.width,
        line_in: 3,
        line_out: 3,
        stride_in: img.width * 3,
        stride_out: img.width * 3,
        offset: 0,
    }
    .run();
    RgbImage {
        width: img.width,
        height,
        data: out,
    }
}

/// The `size` setting: one of transformers' size dicts, each a rule giving an image's resized
/// (height, width) (`PilBackend.resize`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    /// `{"height", "width"}`: exactly that.
    Exact { height: usize, width: usize },
    /// `{"shortest_edge"}`: the shorter side becomes this, the longer one keeps the aspect ratio.
    ShortestEdge(usize),
    /// `{"shortest_edge", "longest_edge"}`: as above, made smaller where the longer side would pass
    /// `longest_edge`.
    ShortestLongest { shortest: usize, longest: usize },
    /// `{"max_height", "max_width"}`: the largest size within both that keeps the aspect ratio.
    Max { height: usize, width: usize },
    /// `{"longest_edge"}` or `{"min_pixels", "max_pixels"}`: valid size dicts that CLIP's resize refuses.
    Unsupported(&'static str),
}

/// The keys of a size dict, in the order transformers lists the valid sets.
const SIZE_KEY_SETS: [&[&str]; 6] = [
    &["height", "width"],
    &["shortest_edge"],
    &["longest_edge", "shortest_edge"],
    &["longest_edge"],
    &["max_height", "max_width"],
    &["max_pixels", "min_pixels"],
];

impl Size {
    /// A size dict given as (key, value) pairs; `key` names the setting in messages.
    pub fn from_entries(entries: &[(String, i64)], key: &str) -> Result<Self> {
        let mut keys: Vec<&str> = entries.iter().map(|(k, _)| k.as_str()).collect();
        keys.sort_unstable();
        let shown = || {
            let pairs: Vec<String> = entries.iter().map(|(k, v)| format!("'{k}': {v}")).collect();
            format!("{{{}}}", pairs.join(", "))
        };
        if !SIZE_KEY_SETS.contains(&keys.as_slice()) {
            return Err(Error::invalid(format!(
                "{key} must have one of the following set of keys: ({{'height', 'width'}}, {{'shortest_edge'}}, \
                 {{'shortest_edge', 'longest_edge'}}, {{'longest_edge'}}, {{'max_height', 'max_width'}}, \
                 {{'min_pixels', 'max_pixels'}}), got {}",
                shown()
            )));
        }
        let get = |name: &str| -> Result<usize> {
            let value = entries
                .iter()
                .find(|(k, _)| k == name)
                .map_or(0, |(_, v)| *v);
            usize::try_from(value)
                .ok()
                .filter(|&v| v > 0)
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "{key} must be a dict of positive integers, got {}",
                        shown()
                    ))
                })
        };
        Ok(match keys.as_slice() {
            ["height", "width"] => Size::Exact {
                height: get("height")?,
                width: get("width")?,
            },
            ["shortest_edge"] => Size::ShortestEdge(get("shortest_edge")?),
            ["longest_edge", "shortest_edge"] => Size::ShortestLongest {
                shortest: get("shortest_edge")?,
                longest: get("longest_edge")?,
            },
            ["max_height", "max_width"] => Size::Max {
                height: get("max_height")?,
                width: get("max_width")?,
            },
            ["longest_edge"] => Size::Unsupported("longest_edge"),
            _ => Size::Unsupported("min_pixels, max_pixels"),
        })
    }

    /// The size dict's (key, value) pairs.
    pub fn entries(&self) -> Vec<(&'static str, usize)> {
        match *self {
            Size::Exact { height, width } => vec![("height", height), ("width", width)],
            Size::ShortestEdge(s) => vec![("shortest_edge", s)],
            Size::ShortestLongest { shortest, longest } => {
                vec![("shortest_edge", shortest), ("longest_edge", longest)]
            }
            Size::Max { height, width } => vec![("max_height", height), ("max_width", width)],
            Size::Unsupported(_) => Vec::new(),
        }
    }

    /// The (height, width) an image of `(height, width)` is resized to, computed as transformers does
    /// (Python's float arithmetic, truncated to int; `round` to even).
    pub fn resized(&self, (height, width): (usize, usize)) -> Result<(usize, usize)> {
        let (h, w) = (height as f64, width as f64);
        Ok(match *self {
            Size::Exact { height, width } => (height, width),
            Size::ShortestEdge(size) => {
                let (short, long) = if width <= height { (w, h) } else { (h, w) };
                let new_long = (size as f64 * long / short) as usize;
                if width <= height {
                    (new_long, size)
                } else {
                    (size, new_long)
                }
            }
            Size::ShortestLongest { shortest, longest } => {
                let (min_side, max_side) = (h.min(w), h.max(w));
                let mut size = shortest;
                let mut raw = None;
                if max_side / min_side * shortest as f64 > longest as f64 {
                    let r = longest as f64 * min_side / max_side;
                    size = r.round_ties_even() as usize;
                    raw = Some(r);
                }
                let scaled = |num: f64, den: f64| match raw {
                    Some(r) => (r * num / den) as usize,
                    None => (size as f64 * num / den) as usize,
                };
                if (height <= width && height == size) || (width <= height && width == size) {
                    (height, width)
                } else if width < height {
                    (scaled(h, w), size)
                } else {
                    (size, scaled(w, h))
                }
            }
            Size::Max {
                height: max_h,
                width: max_w,
            } => {
                let scale = (max_h as f64 / h).min(max_w as f64 / w);
                ((h * scale) as usize, (w * scale) as usize)
            }
            Size::Unsupported(keys) => {
                return Err(Error::invalid(format!(
                "Size must contain 'height' and 'width' keys, or 'max_height' and 'max_width', or \
                     'shortest_edge' key. Got a size with {keys}."
            )))
            }
        })
    }
}

/// A `{"height", "width"}` dict given as (key, value) pairs (crop_size, pad_size).
pub fn height_width_entries(entries: &[(String, i64)], key: &str) -> Result<(usize, usize)> {
    match Size::from_entries(entries, key)? {
        Size::Exact { height, width } => Ok((height, width)),
        _ => Err(Error::invalid(format!(
            "The size dictionary must have keys 'height' and 'width'. Got {key} with keys {:?}",
            entries.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>()
        ))),
    }
}

/// The image-processor settings of a checkpoint (CLIPImageProcessor's fields that Florence-2 uses); a
/// processor call may override each of them.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessorConfig {
    pub do_resize: bool,
    pub size: Size,
    pub resample: Filter,
    pub do_center_crop: bool,
    /// (height, width)
    pub crop_size: (usize, usize),
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
    pub do_convert_rgb: bool,
    /// Pad each image with zeros at the bottom and right (after normalizing) to `pad_size`, or to the
    /// batch's largest height and width when it is None.
    pub do_pad: bool,
    /// (height, width)
    pub pad_size: Option<(usize, usize)>,
    /// `<image>` tokens per image in the prompt of HF-native checkpoints.
    pub image_seq_length: usize,
}

impl Default for ImageProcessorConfig {
    /// The released Florence-2 settings.
    fn default() -> Self {
        Self {
            do_resize: true,
            size: Size::Exact {
                height: 768,
                width: 768,
            },
            resample: Filter::Bicubic,
            do_center_crop: false,
            crop_size: (768, 768),
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: [0.485, 0.456, 0.406],
            image_std: [0.229, 0.224, 0.225],
            do_convert_rgb: true,
            do_pad: false,
            pad_size: None,
            image_seq_length: 577,
        }
    }
}

/// A JSON size as the (key, value) pairs of its size dict, as transformers' `get_size_dict` reads it: a
/// dict; an integer, a square with `default_to_square`, else the shortest edge; a list, (height, width).
/// A value that is not an integer becomes -1 (refused).
fn json_entries(v: &Value, key: &str, default_to_square: bool) -> Result<Vec<(String, i64)>> {
    let entry = |k: &str, value: &Value| (k.to_string(), value.as_i64().unwrap_or(-1));
    match v {
        Value::Object(object) => Ok(object.iter().map(|(k, value)| entry(k, value)).collect()),
        Value::Number(_) if default_to_square => Ok(vec![entry("height", v), entry("width", v)]),
        Value::Number(_) => Ok(vec![entry("shortest_edge", v)]),
        Value::Array(items) if items.len() >= 2 => {
            Ok(vec![entry("height", &items[0]), entry("width", &items[1])])
        }
        _ => Err(Error::invalid(format!(
            "{key} must be a dict such as {{\"height\": H, \"width\": W}}, an integer or [height, width], got {v}"
        ))),
    }
}

/// `image_mean` / `image_std` given as a sequence: one value per channel.
pub fn three(values: &[f64], key: &str) -> Result<[f64; 3]> {
    match values {
        [a, b, c] => Ok([*a, *b, *c]),
        _ => Err(Error::invalid(format!(
            "{key} must have 3 elements if it is an iterable, got {}",
            values.len()
        ))),
    }
}

/// `image_mean` / `image_std` in a JSON file: one number for all channels, or three.
fn json_three(v: &Value, key: &str) -> Result<[f64; 3]> {
    if let Some(x) = v.as_f64() {
        return Ok([x; 3]);
    }
    let items: Option<Vec<f64>> = v
        .as_array()
        .and_then(|a| a.iter().map(Value::as_f64).collect());
    match items {
        Some(items) => three(&items, key),
        None => Err(Error::invalid(format!(
            "{key} must hold 3 numbers, got {v}"
        ))),
    }
}

impl ImageProcessorConfig {
    /// Reads a preprocessor_config.json object (or processor_config.json's `image_processor`).
    /// Missing or null keys keep the released defaults.
    pub fn from_json(v: &Value) -> Result<Self> {
        let mut c = Self::default();
        let present = |k: &str| v.get(k).filter(|x| !x.is_null());
        let flag = |k: &str, default: bool| -> Result<bool> {
            present(k).map_or(Ok(default), |x| {
                x.as_bool()
                    .ok_or_else(|| Error::invalid(format!("{k} must be a boolean")))
            })
        };
        c.do_resize = flag("do_resize", c.do_resize)?;
        c.do_center_crop = flag("do_center_crop", c.do_center_crop)?;
        c.do_rescale = flag("do_rescale", c.do_rescale)?;
        c.do_normalize = flag("do_normalize", c.do_normalize)?;
        c.do_convert_rgb = flag("do_convert_rgb", c.do_convert_rgb)?;
        c.do_pad = flag("do_pad", c.do_pad)?;
        if let Some(s) = present("size") {
            c.size = Size::from_entries(&json_entries(s, "size", false)?, "size")?;
        }
        if let Some(s) = present("crop_size") {
            c.crop_size = height_width_entries(&json_entries(s, "crop_size", true)?, "crop_size")?;
        }
        if let Some(s) = present("pad_size") {
            c.pad_size = Some(height_width_entries(
                &json_entries(s, "pad_size", true)?,
                "pad_size",
            )?);
        }
        if let Some(r) = present("resample") {
            c.resample = Filter::from_pil(
                r.as_i64()
                    .ok_or_else(|| Error::invalid("resample must be an integer"))?,
            )?;
        }
        if let Some(r) = present("rescale_factor") {
            c.rescale_factor = r
                .as_f64()
                .ok_or_else(|| Error::invalid("rescale_factor must be a number"))?;
        }
        if let Some(m) = present("image_mean") {
            c.image_mean = json_three(m, "image_mean")?;
        }
        if let Some(s) = present("image_std") {
            c.image_std = json_three(s, "image_std")?;
        }
        if let Some(n) = present("image_seq_length") {
            c.image_seq_length = n
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| Error::invalid("image_seq_length must be a non-negative integer"))?;
        }
        c.check_sizes()?;
        Ok(c)
    }

    /// Refuses fixed sizes whose buffers could not be allocated: every prompt holds `image_seq_length`
    /// ids and every image becomes `size` (or `crop_size`, `pad_size`) pixels where that step is on, so
    /// these are checked once, at load. Sizes that depend on the image are checked per image.
    pub fn check_sizes(&self) -> Result<()> {
        let exact = match self.size {
            Size::Exact { height, width } => Some((height, width)),
            _ => None,
        };
        let used = [
            ("size", exact, self.do_resize),
            ("crop_size", Some(self.crop_size), self.do_center_crop),
            ("pad_size", self.pad_size, self.do_pad),
        ];
        for (key, dims, on) in used {
            if let (true, Some((h, w))) = (on, dims) {
                check_alloc(
                    &format!("{key} {h}x{w} (the pixel array of one image)"),
                    product(&[h as u128 * w as u128, PIXEL_BYTES]),
                )?;
            }
        }
        let n = self.image_seq_length;
        check_alloc(
            &format!("image_seq_length {n} (the <image> ids of one prompt)"),
            product(&[n as u128, ID_BYTES]),
        )
    }
}

/// The values of one preprocessed image: float32, or float64 where transformers leaves a float64 image in
/// float64 (neither resized nor rescaled).
#[derive(Debug, Clone, PartialEq)]
pub enum PixelData {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

/// One preprocessed image: `data` in `[3, height, width]` order (`shape`).
#[derive(Debug, Clone, PartialEq)]
pub struct PixelValues {
    pub data: PixelData,
    pub shape: [usize; 3],
}

/// Resize, center-crop, rescale, normalize and pad, as CLIPImageProcessorPil's `_preprocess`, one
/// `[3, H, W]` array per image (their sizes may differ where nothing resizes, crops or pads them).
pub fn preprocess(
    config: &ImageProcessorConfig,
    images: &[ImageInput],
) -> Result<Vec<PixelValues>> {
    // The sizes of every step, worked out and checked before any buffer is made.
    let mut steps = Vec::with_capacity(images.len());
    let mut output_pixels: u128 = 0;
    for input in images {
        let resized = if config.do_resize {
            let resized = config.size.resized(input.dims())?;
            check_alloc(
                &format!("resizing an image to {}x{}", resized.0, resized.1),
                product(&[resized.0 as u128, resized.1 as u128, 3]),
            )?;
            resized
        } else {
            input.dims()
        };
        let cropped = if config.do_center_crop {
            config.crop_size
        } else {
            resized
        };
        if config.do_center_crop && matches!(input, ImageInput::Values { .. }) {
            // The caller's values are cropped in float64 before they become pixel values.
            check_alloc(
                &format!("center-cropping an image to {}x{}", cropped.0, cropped.1),
                product(&[cropped.0 as u128, cropped.1 as u128, VALUE_PIXEL_BYTES]),
            )?;
        }
        steps.push((resized, cropped));
    }
    let pad_to = match (config.do_pad, config.pad_size) {
        (false, _) => None,
        (true, Some(size)) => Some(size),
        (true, None) => steps
            .iter()
            .map(|step| step.1)
            .reduce(|a, b| (a.0.max(b.0), a.1.max(b.1))),
    };
    for (input, &(_, (h, w))) in images.iter().zip(&steps) {
        if let Some((ph, pw)) = pad_to {
            if ph < h || pw < w {
                return Err(Error::invalid(format!(
                    "Padding dimensions are negative. Please make sure that the `pad_size` is larger than the \
                     image size. Got pad_size=({ph}, {pw}), image_size=({h}, {w})."
                )));
            }
        }
        let (oh, ow) = pad_to.unwrap_or((h, w));
        let float64 =
            matches!(input, ImageInput::Values { float64: true, .. }) && !config.do_rescale;
        output_pixels += oh as u128 * ow as u128 * if float64 { 2 } else { 1 };
    }
    check_alloc(
        &format!("pixel_values of {} images", images.len()),
        product(&[output_pixels, PIXEL_BYTES]),
    )?;
    let mut out = Vec::with_capacity(images.len());
    for (input, &(resized, cropped)) in images.iter().zip(&steps) {
        let (oh, ow) = pad_to.unwrap_or(cropped);
        let data = match input {
            ImageInput::Rgb8 {
                image,
                from_unit_float,
            } => {
                let resized_image;
                let image = if config.do_resize && (image.height, image.width) != resized {
                    resized_image = resize(image, resized.1, resized.0, config.resample)?;
                    &resized_image
                } else {
                    image
                };
                let values = crop_if(config, &image.data, resized);
                PixelData::F32(to_chw(
                    &values,
                    cropped,
                    (oh, ow),
                    float32_steps(config, *from_unit_float),
                ))
            }
            ImageInput::Values {
                data: values,
                float64,
                ..
            } => {
                if config.do_resize {
                    return Err(Error::invalid(
                        "images are resized from uint8 values (as transformers does through Pillow); \
                         convert the image to uint8 first",
                    ));
                }
                let values = crop_if(config, values, resized);
                if *float64 && !config.do_rescale {
                    let (mean, std) = (config.image_mean, config.image_std);
                    let normalize = config.do_normalize;
                    PixelData::F64(to_chw(&values, cropped, (oh, ow), move |c, v| {
                        if normalize {
                            (v - mean[c]) / std[c]
                        } else {
                            v
                        }
                    }))
                } else {
                    PixelData::F32(to_chw(
                        &values,
                        cropped,
                        (oh, ow),
                        float32_steps(config, false),
                    ))
                }
            }
        };
        out.push(PixelValues {
            data,
            shape: [3, oh, ow],
        });
    }
    Ok(out)
}

/// The interleaved RGB values after the center crop, when it is on.
fn crop_if<'a, T: Copy + Default>(
    config: &ImageProcessorConfig,
    data: &'a [T],
    dims: (usize, usize),
) -> std::borrow::Cow<'a, [T]>
where
    [T]: ToOwned<Owned = Vec<T>>,
{
    if config.do_center_crop {
        std::borrow::Cow::Owned(center_crop(data, dims, config.crop_size))
    } else {
        std::borrow::Cow::Borrowed(data)
    }
}

/// Rescale and normalize in float32 with numpy's arithmetic: rescale in float64 then cast to float32;
/// normalize in float32. `from_unit_float`: the values are a float image resized through Pillow, which
/// transformers divides by 255 (in float32) before its own rescale.
fn float32_steps(
    config: &ImageProcessorConfig,
    from_unit_float: bool,
) -> impl Fn(usize, f64) -> f32 {
    let mean = config.image_mean.map(|m| m as f32);
    let std = config.image_std.map(|s| s as f32);
    let (rescale, factor, normalize) = (
        config.do_rescale,
        config.rescale_factor,
        config.do_normalize,
    );
    move |c, source| {
        let base = if from_unit_float {
            f64::from((source * (1.0 / 255.0)) as f32)
        } else {
            source
        };
        let v = if rescale {
            (base * factor) as f32
        } else {
            base as f32
        };
        if normalize {
            (v - mean[c]) / std[c]
        } else {
            v
        }
    }
}

/// Interleaved RGB values of a `(h, w)` image, each mapped by `value(channel, v)`, in the top left corner of
/// a `[3, oh, ow]` array whose rest is 0 (transformers' padding comes after normalizing).
fn to_chw<T: Copy + Into<f64>, O: Copy + Default>(
    values: &[T],
    (h, w): (usize, usize),
    (oh, ow): (usize, usize),
    value: impl Fn(usize, f64) -> O,
) -> Vec<O> {
    let mut out = vec![O::default(); 3 * oh * ow];
    for c in 0..3 {
        let plane = &mut out[c * oh * ow..(c + 1) * oh * ow];
        for y in 0..h {
            let row = &values[y * w * 3..(y + 1) * w * 3];
            for (dst, px) in plane[y * ow..y * ow + w]
                .iter_mut()
                .zip(row.chunks_exact(3))
            {
                *dst = value(c, px[c].into());
            }
        }
    }
    out
}

/// transformers' numpy center crop of interleaved RGB values: a crop larger than the image pads it with
/// zeros, the image placed at ceil(excess / 2).
fn center_crop<T: Copy + Default>(
    data: &[T],
    (h, w): (usize, usize),
    (ch, cw): (usize, usize),
) -> Vec<T> {
    // Per axis: (first source index, first destination index, length copied).
    let axis = |n: usize, c: usize| {
        if c > n {
            (0, (c - n).div_ceil(2), n)
        } else {
            ((n - c) / 2, 0, c)
        }
    };
    let (sy, dy, ny) = axis(h, ch);
    let (sx, dx, nx) = axis(w, cw);
    let mut out = vec![T::default(); ch * cw * 3];
    for y in 0..ny {
        let src = ((sy + y) * w + sx) * 3;
        let dst = ((dy + y) * cw + dx) * 3;
        out[dst..dst + nx * 3].copy_from_slice(&data[src..src + nx * 3]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: usize, h: usize) -> RgbImage {
        let data = (0..w * h * 3).map(|i| ((i * 37) % 251) as u8).collect();
        RgbImage::new(w, h, data).unwrap()
    }

    #[test]
    fn identity_size_is_a_copy() {
        let img = gradient(5, 4);
        assert_eq!(resize(&img, 5, 4, Filter::Bicubic).unwrap(), img);
    }

    #[test]
    fn constant_images_stay_constant() {
        let img = RgbImage::new(7, 3, vec![200; 63]).unwrap();
        for (w, h) in [(768, 768), (2, 1), (1, 1)] {
            let out = resize(&img, w, h, Filter::Bicubic).unwrap();
            assert!(out.data.iter().all(|&v| v == 200), "{w}x{h}");
        }
    }

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (i, o) in [(7, 768), (8000, 768), (1, 768), (768, 1)] {
            let c = precompute_coeffs(i, o, Kernel::Bicubic);
            for (xx, &(_, n)) in c.bounds.iter().enumerate() {
                let sum: i64 = c.weights[xx * c.ksize..xx * c.ksize + n]
                    .iter()
                    .map(|&w| i64::from(w))
                    .sum();
                assert!(
                    (sum - (1 << PRECISION_BITS)).abs() <= n as i64,
                    "{i}->{o} #{xx}: {sum}"
                );
            }
        }
    }

    #[test]
    fn normalizes_into_chw() {
        let img = RgbImage::new(1, 1, vec![0, 255, 128]).unwrap();
        let cfg = ImageProcessorConfig {
            size: Size::Exact {
                height: 2,
                width: 2,
            },
            ..Default::default()
        };
        let pv = preprocess(
            &cfg,
            &[ImageInput::Rgb8 {
                image: img,
                from_unit_float: false,
            }],
        )
        .unwrap();
        assert_eq!(pv[0].shape, [3, 2, 2]);
        let PixelData::F32(data) = &pv[0].data else {
            panic!("uint8 images give float32 values")
        };
        assert!((data[0] - (0.0 - 0.485) / 0.229).abs() < 1e-6);
        assert!((data[4] - (1.0 - 0.456) / 0.224).abs() < 1e-6);
    }

    #[test]
    fn resized_sizes_follow_transformers() {
        assert_eq!(Size::ShortestEdge(32).resized((40, 60)).unwrap(), (32, 48));
        assert_eq!(Size::ShortestEdge(32).resized((61, 40)).unwrap(), (48, 32));
        let capped = Size::ShortestLongest {
            shortest: 32,
            longest: 40,
        };
        assert_eq!(capped.resized((40, 60)).unwrap(), (27, 40));
        assert_eq!(
            Size::Max {
                height: 50,
                width: 50
            }
            .resized((100, 200))
            .unwrap(),
            (25, 50)
        );
        assert!(Size::Unsupported("longest_edge").resized((4, 4)).is_err());
    }

    #[test]
    fn center_crop_pads_small_images_with_zeros() {
        let data: Vec<u8> = (1..=12).collect(); // 2x2 RGB
        let out = center_crop(&data, (2, 2), (3, 1));
        // Height 2 -> 3: one row of zeros on top (ceil(1 / 2)); width 2 -> 1: column (2 - 1) / 2 = 0.
        assert_eq!(out, vec![0, 0, 0, 1, 2, 3, 7, 8, 9]);
    }

    #[test]
    fn reads_released_settings() {
        let v = serde_json::json!({"size": {"height": 768, "width": 768}, "resample": 3, "do_convert_rgb": null,
            "image_seq_length": 577, "image_mean": [0.485, 0.456, 0.406]});
        assert_eq!(
            ImageProcessorConfig::from_json(&v).unwrap(),
            ImageProcessorConfig::default()
        );
        for bad in [
            serde_json::json!({"size": {"shortest": 3}}),
            serde_json::json!({"size": {"height": 3}}),
            serde_json::json!({"size": {"height": 0, "width": 3}}),
            serde_json::json!({"crop_size": {"shortest_edge": 3}}),
            serde_json::json!({"image_mean": [0.5, 0.5]}),
        ] {
            assert!(ImageProcessorConfig::from_json(&bad).is_err(), "{bad}");
        }
        let shortest =
            ImageProcessorConfig::from_json(&serde_json::json!({"size": {"shortest_edge": 3}}));
        assert_eq!(shortest.unwrap().size, Size::ShortestEdge(3));
        assert!(RgbImage::new(2, 2, vec![0; 5]).is_err());
    }

    #[test]
    fn reads_sizes_as_transformers_get_size_dict() {
        let v = serde_json::json!({"size": 384, "crop_size": 100, "pad_size": [300, 200]});
        let c = ImageProcessorConfig::from_json(&v).unwrap();
        assert_eq!(c.size, Size::ShortestEdge(384));
        assert_eq!(c.crop_size, (100, 100));
        assert_eq!(c.pad_size, Some((300, 200)));
        let pair =
            ImageProcessorConfig::from_json(&serde_json::json!({"size": [300, 200]})).unwrap();
        assert_eq!(
            pair.size,
            Size::Exact {
                height: 300,
                width: 200
            }
        );
        for bad in [
            serde_json::json!({"size": [3]}),
            serde_json::json!({"size": "3"}),
        ] {
            assert!(ImageProcessorConfig::from_json(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes_that_cannot_be_allocated_are_refused_at_load() {
        for (json, setting) in [
            (
                serde_json::json!({"size": {"height": 100_000, "width": 100_000}}),
                "size 100000x100000",
            ),
            (
                serde_json::json!({"crop_size": {"height": 1u64 << 40, "width": 1}, "do_center_crop": true}),
                "crop_size",
            ),
            (
                serde_json::json!({"image_seq_length": 1_000_000_000_000u64}),
                "image_seq_length 1000000000000",
            ),
        ] {
            let err = ImageProcessorConfig::from_json(&json)
                .unwrap_err()
                .to_string();
            assert!(err.contains(setting) && err.contains("needs"), "{err}");
        }
        // A size that is not used is not allocated.
        let unused =
            serde_json::json!({"size": {"height": 100_000, "width": 100_000}, "do_resize": false});
        assert!(ImageProcessorConfig::from_json(&unused).is_ok());
        assert!(
            ImageProcessorConfig::from_json(&serde_json::json!({"image_seq_length": 577})).is_ok()
        );
    }
}
