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

/// Bytes of one pixel in `pixel_values`: three float32 channels.
const PIXEL_BYTES: u128 = 3 * 4;
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

/// One input image and how its values were brought to uint8.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageInput {
    pub image: RgbImage,
    /// The caller's image was float in [0, 1] and scaled by 255 to be resized through Pillow.
    /// transformers then divides the resized values by 255 *and* applies `rescale_factor` as well;
    /// kept so that pixel_values match.
    pub from_unit_float: bool,
}

/// Pillow's resampling filters by their `Image.Resampling` number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    Lanczos = 1,
    Bilinear = 2,
    Bicubic = 3,
    Box = 4,
    Hamming = 5,
}

impl Filter {
    /// The filter for a PIL resample code; NEAREST (0) is not implemented.
    pub fn from_pil(code: i64) -> Result<Self> {
        Ok(match code {
            1 => Filter::Lanczos,
            2 => Filter::Bilinear,
            3 => Filter::Bicubic,
            4 => Filter::Box,
            5 => Filter::Hamming,
            other => {
                return Err(Error::invalid(format!(
                    "unsupported resample filter {other} (use 1..=5)"
                )))
            }
        })
    }

    fn support(self) -> f64 {
        match self {
            Filter::Box => 0.5,
            Filter::Bilinear | Filter::Hamming => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
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
            Filter::Box => f64::from(u8::from(x > -0.5 && x <= 0.5)),
            Filter::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Filter::Hamming => {
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
            Filter::Bicubic => {
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
            Filter::Lanczos => {
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
fn precompute_coeffs(in_size: usize, out_size: usize, filter: Filter) -> Coeffs {
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

/// Resamples the rows `rows` (all when None) of `img` to `width` columns.
fn horizontal_pass(
    img: &RgbImage,
    width: usize,
    filter: Filter,
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
fn vertical_pass(img: &RgbImage, height: usize, filter: Filter) -> RgbImage {
    vertical_pass_from(img, height, filter, img.height, 0)
}

/// Vertical pass over `img`, which holds rows `first..` of a source `source_height` rows tall
/// (Pillow's shifted bounds after a horizontal pass that skipped unused rows).
fn vertical_pass_from(
    img: &RgbImage,
    height: usize,
    filter: Filter,
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

/// The image-processor settings of a checkpoint (CLIPImageProcessor's fields that Florence-2 uses).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessorConfig {
    pub do_resize: bool,
    /// (height, width)
    pub size: (usize, usize),
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
    /// `<image>` tokens per image in the prompt of HF-native checkpoints.
    pub image_seq_length: usize,
}

impl Default for ImageProcessorConfig {
    /// The released Florence-2 settings.
    fn default() -> Self {
        Self {
            do_resize: true,
            size: (768, 768),
            resample: Filter::Bicubic,
            do_center_crop: false,
            crop_size: (768, 768),
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: [0.485, 0.456, 0.406],
            image_std: [0.229, 0.224, 0.225],
            do_convert_rgb: true,
            image_seq_length: 577,
        }
    }
}

fn height_width(v: &Value, key: &str) -> Result<(usize, usize)> {
    let get = |k: &str| {
        v.get(k)
            .and_then(Value::as_u64)
            .and_then(|n| usize::try_from(n).ok())
    };
    match (get("height"), get("width")) {
        (Some(h), Some(w)) if h > 0 && w > 0 => Ok((h, w)),
        _ => Err(Error::invalid(format!(
            "{key} must be {{\"height\": H, \"width\": W}}, got {v}"
        ))),
    }
}

fn three(v: &Value, key: &str) -> Result<[f64; 3]> {
    if let Some(x) = v.as_f64() {
        return Ok([x; 3]);
    }
    let items: Option<Vec<f64>> = v
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect());
    match items.as_deref() {
        Some([a, b, c]) => Ok([*a, *b, *c]),
        _ => Err(Error::invalid(format!(
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
        if let Some(s) = present("size") {
            c.size = height_width(s, "size")?;
        }
        if let Some(s) = present("crop_size") {
            c.crop_size = height_width(s, "crop_size")?;
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
            c.image_mean = three(m, "image_mean")?;
        }
        if let Some(s) = present("image_std") {
            c.image_std = three(s, "image_std")?;
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

    /// Refuses sizes whose buffers could not be allocated: every prompt holds `image_seq_length` ids and
    /// every image becomes `size` (or `crop_size`) pixels where resizing (or cropping) is on, so these are
    /// checked once, at load.
    fn check_sizes(&self) -> Result<()> {
        let used = [
            ("size", self.size, self.do_resize),
            ("crop_size", self.crop_size, self.do_center_crop),
        ];
        for (key, (h, w), _) in used.into_iter().filter(|setting| setting.2) {
            check_alloc(
                &format!("{key} {h}x{w} (the pixel array of one image)"),
                product(&[h as u128 * w as u128, PIXEL_BYTES]),
            )?;
        }
        let n = self.image_seq_length;
        check_alloc(
            &format!("image_seq_length {n} (the <image> ids of one prompt)"),
            product(&[n as u128, ID_BYTES]),
        )
    }
}

/// Preprocessed images: `data` in `[batch, 3, height, width]` order.
#[derive(Debug, Clone, PartialEq)]
pub struct PixelValues {
    pub data: Vec<f32>,
    pub shape: [usize; 4],
}

/// Resize, center-crop, rescale and normalize, as CLIPImageProcessorPil's `_preprocess`.
pub fn preprocess(config: &ImageProcessorConfig, images: &[ImageInput]) -> Result<PixelValues> {
    let pixels: u128 = images
        .iter()
        .map(|input| {
            let (h, w) = if config.do_resize {
                config.size
            } else {
                (input.image.height, input.image.width)
            };
            h as u128 * w as u128
        })
        .sum();
    check_alloc(
        &format!("pixel_values of {} images", images.len()),
        product(&[pixels, PIXEL_BYTES]),
    )?;
    let mut data = Vec::new();
    let mut dims: Option<(usize, usize)> = None;
    for input in images {
        let mut img = if config.do_resize && (input.image.height, input.image.width) != config.size
        {
            resize(&input.image, config.size.1, config.size.0, config.resample)?
        } else {
            input.image.clone()
        };
        if config.do_center_crop {
            img = center_crop(&img, config.crop_size)?;
        }
        if *dims.get_or_insert((img.height, img.width)) != (img.height, img.width) {
            return Err(Error::invalid(
                "images of different sizes cannot be batched without resizing",
            ));
        }
        push_chw(config, input.from_unit_float, &img, &mut data);
    }
    let (h, w) = dims.unwrap_or(config.size);
    Ok(PixelValues {
        data,
        shape: [images.len(), 3, h, w],
    })
}

/// numpy's arithmetic: rescale in float64 then cast to float32; normalize in float32.
fn push_chw(
    config: &ImageProcessorConfig,
    from_unit_float: bool,
    img: &RgbImage,
    out: &mut Vec<f32>,
) {
    let mean = config.image_mean.map(|m| m as f32);
    let std = config.image_std.map(|s| s as f32);
    for c in 0..3 {
        out.extend(img.data.chunks_exact(3).map(|px| {
            let mut v = f32::from(px[c]);
            if from_unit_float {
                v = (f64::from(px[c]) * (1.0 / 255.0)) as f32;
            }
            if config.do_rescale {
                v = (f64::from(v) * config.rescale_factor) as f32;
            }
            if config.do_normalize {
                v = (v - mean[c]) / std[c];
            }
            v
        }));
    }
}

/// numpy center crop for a crop no larger than the image (transformers pads otherwise; Florence-2
/// never crops).
fn center_crop(img: &RgbImage, (ch, cw): (usize, usize)) -> Result<RgbImage> {
    if ch > img.height || cw > img.width {
        return Err(Error::invalid(format!(
            "crop_size {ch}x{cw} larger than the resized image is not supported"
        )));
    }
    let (top, left) = ((img.height - ch) / 2, (img.width - cw) / 2);
    let mut data = Vec::with_capacity(ch * cw * 3);
    for y in top..top + ch {
        let row = (y * img.width + left) * 3;
        data.extend_from_slice(&img.data[row..row + cw * 3]);
    }
    RgbImage::new(cw, ch, data)
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
            let c = precompute_coeffs(i, o, Filter::Bicubic);
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
            size: (2, 2),
            ..Default::default()
        };
        let pv = preprocess(
            &cfg,
            &[ImageInput {
                image: img,
                from_unit_float: false,
            }],
        )
        .unwrap();
        assert_eq!(pv.shape, [1, 3, 2, 2]);
        assert!((pv.data[0] - (0.0 - 0.485) / 0.229).abs() < 1e-6);
        assert!((pv.data[4] - (1.0 - 0.456) / 0.224).abs() < 1e-6);
    }

    #[test]
    fn reads_released_settings() {
        let v = serde_json::json!({"size": {"height": 768, "width": 768}, "resample": 3, "do_convert_rgb": null,
            "image_seq_length": 577, "image_mean": [0.485, 0.456, 0.406]});
        assert_eq!(
            ImageProcessorConfig::from_json(&v).unwrap(),
            ImageProcessorConfig::default()
        );
        assert!(ImageProcessorConfig::from_json(
            &serde_json::json!({"size": {"shortest_edge": 3}})
        )
        .is_err());
        assert!(RgbImage::new(2, 2, vec![0; 5]).is_err());
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
