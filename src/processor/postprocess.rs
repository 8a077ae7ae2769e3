//! Parses generated text into boxes, polygons and labels: transformers' `Florence2PostProcessor` and
//! `Florence2Processor.post_process_generation`, with the same results on well-formed and malformed text.
//!
//! transformers parses with Python regular expressions (lazy groups, lookaheads, `findall` scanning).
//! The `regex` crate has no lookahead, so each pattern is a small hand-written scanner whose comment
//! names the Python pattern it reproduces and why the scan is equivalent. All markup is ASCII, so the
//! scanners work on bytes; every slice boundary they cut at is an ASCII byte, hence a char boundary.
//!
//! Known difference: Python's `\d` also matches non-ASCII decimal digits (`<loc_٣>`); here only ASCII
//! digits make a location token.

use std::collections::HashSet;

use serde_json::Value;

use super::prompts::{parse_type_for, ParseType};
use super::pytext::{is_py_space, py_strip};
use crate::{Error, Result};

/// Location tokens (`<loc_0>` .. `<loc_999>`) quantize each axis into this many bins.
pub const LOCATION_BINS: usize = 1000;
const BINS: f64 = LOCATION_BINS as f64;

/// transformers' default OCR pattern; the only one this parser implements.
const DEFAULT_OCR_PATTERN: &str = r"(.+?)<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>";

/// Phrases that `<CAPTION_TO_PHRASE_GROUNDING>` drops, as transformers' conversion script writes them
/// into `post_processor_config` of the HF-native checkpoints.
const DEFAULT_BANNED_GROUNDING_TOKENS: &[&str] = &[
    "it",
    "I",
    "me",
    "mine",
    "you",
    "your",
    "yours",
    "he",
    "him",
    "his",
    "she",
    "her",
    "hers",
    "they",
    "them",
    "their",
    "theirs",
    "one",
    "oneself",
    "we",
    "us",
    "our",
    "ours",
    "its",
    "myself",
    "yourself",
    "himself",
    "herself",
    "itself",
    "ourselves",
    "yourselves",
    "themselves",
    "this",
    "that",
    "these",
    "those",
    "who",
    "whom",
    "whose",
    "which",
    "what",
    "all",
    "another",
    "any",
    "anybody",
    "anyone",
    "anything",
    "each",
    "everybody",
    "everyone",
    "everything",
    "few",
    "many",
    "nobody",
    "none",
    "several",
    "some",
    "somebody",
    "someone",
    "something",
    "each other",
    "one another",
    "the image",
    "image",
    "images",
    "the",
    "a",
    "an",
    "a group",
    "other objects",
    "lots",
    "a set",
];

/// The `post_processor_config` of a processor: which parse types it allows and their settings.
#[derive(Debug, Clone, PartialEq)]
pub struct PostProcessorConfig {
    enabled: HashSet<ParseType>,
    banned_grounding_tokens: HashSet<String>,
    ocr_area_threshold: f64,
    /// An OCR `PATTERN` other than the default; rejected when OCR output is parsed.
    custom_ocr_pattern: Option<String>,
}

impl Default for PostProcessorConfig {
    /// What transformers' conversion script saves with every HF-native checkpoint. Microsoft's original
    /// checkpoints have no such section; their remote-code processor behaves the same way.
    fn default() -> Self {
        Self {
            enabled: ParseType::ALL.into_iter().collect(),
            banned_grounding_tokens: DEFAULT_BANNED_GROUNDING_TOKENS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            ocr_area_threshold: 0.0,
            custom_ocr_pattern: None,
        }
    }
}

impl PostProcessorConfig {
    /// Reads a `post_processor_config` JSON object; `None` or `null` gives [`Self::default`].
    ///
    /// As in transformers, only the upper-case `PATTERN` / `AREA_THRESHOLD` keys of `ocr` are read
    /// (the conversion script writes lower-case ones, which transformers ignores too).
    pub fn from_json(value: Option<&Value>) -> Result<Self> {
        let obj = match value {
            None | Some(Value::Null) => return Ok(Self::default()),
            Some(Value::Object(obj)) => obj,
            Some(other) => {
                return Err(Error::invalid(format!(
                    "post_processor_config must be an object, got {other}"
                )))
            }
        };
        let enabled = ParseType::ALL
            .into_iter()
            .filter(|t| obj.contains_key(t.name()))
            .collect();
        let banned_grounding_tokens = obj
            .get("phrase_grounding")
            .and_then(|g| g.get("banned_grounding_tokens"))
            .and_then(Value::as_array)
            .map(|items| {
                items
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        let ocr = obj.get("ocr");
        let ocr_area_threshold = ocr
            .and_then(|o| o.get("AREA_THRESHOLD"))
            .and_then(Value::as_f64)
            .unwrap_or(0.0);
        let custom_ocr_pattern = ocr
            .and_then(|o| o.get("PATTERN"))
            .and_then(Value::as_str)
            .filter(|p| *p != DEFAULT_OCR_PATTERN)
            .map(str::to_string);
        Ok(Self {
            enabled,
            banned_grounding_tokens,
            ocr_area_threshold,
            custom_ocr_pattern,
        })
    }
}

/// The parsed answer of one task, shaped like the dict transformers returns under the task key.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// `pure_text`: the text without `<s>` / `</s>`, stripped.
    Text(String),
    /// `description_with_bboxes`, `bboxes` and `phrase_grounding`: `{"bboxes", "labels"}`.
    Boxes {
        bboxes: Vec<[i32; 4]>,
        labels: Vec<String>,
    },
    /// `ocr`: `{"quad_boxes", "labels"}`.
    Ocr {
        quad_boxes: Vec<[i32; 8]>,
        labels: Vec<String>,
    },
    /// `polygons`: `{"polygons", "labels"}`, each instance a list of flat `[x0, y0, x1, y1, ...]` lists.
    Polygons {
        polygons: Vec<Vec<Vec<i32>>>,
        labels: Vec<String>,
    },
    /// `description_with_bboxes_or_polygons`.
    BoxesOrPolygons {
        bboxes: Vec<[i32; 4]>,
        bboxes_labels: Vec<String>,
        polygons: Vec<Vec<Vec<i32>>>,
        polygons_labels: Vec<String>,
    },
}

/// transformers' `post_process_generation(text, task=task, image_size=image_size)`.
///
/// `image_size` is `(width, height)`; it is needed only when a location is dequantized (and always
/// for OCR), where transformers fails with a TypeError and this returns [`Error::InvalidInput`].
pub fn post_process_generation(
    config: &PostProcessorConfig,
    text: &str,
    task: &str,
    image_size: Option<(f64, f64)>,
) -> Result<Answer> {
    post_process_with_locations(config, text, task, image_size).map(|(answer, _)| answer)
}

/// [`post_process_generation`], and where each box of the answer was read: for each of its `bboxes`
/// (`quad_boxes` for OCR), in order, the byte offsets in `text` of the location tokens that hold its
/// coordinates (4, or 8 for a quad). Polygons are not boxes: their answers have none.
pub fn post_process_with_locations(
    config: &PostProcessorConfig,
    text: &str,
    task: &str,
    image_size: Option<(f64, f64)>,
) -> Result<(Answer, Vec<Vec<usize>>)> {
    let parse_type = parse_type_for(task);
    if !config.enabled.contains(&parse_type) {
        return Err(Error::invalid(format!(
            "Unsupported parse task: {}",
            parse_type.name()
        )));
    }
    let size = Dequantizer { size: image_size };
    let (cleaned, origin) = remove_markers(text)?;
    // Offsets of the boxes' location tokens in `cleaned`, mapped back to `text` at the end.
    let mut locations: Vec<Vec<usize>> = Vec::new();
    let answer = match parse_type {
        ParseType::PureText => {
            Answer::Text(py_strip(&text.replace("<s>", "").replace("</s>", "")).to_string())
        }
        ParseType::Ocr => {
            if config.custom_ocr_pattern.is_some() {
                return Err(Error::invalid(
                    "a custom ocr PATTERN in post_processor_config is not supported",
                ));
            }
            let (quads, labels): (Vec<_>, _) =
                parse_ocr(&cleaned, size, config.ocr_area_threshold)?
                    .into_iter()
                    .unzip();
            let quad_boxes;
            (quad_boxes, locations) = quads.into_iter().unzip();
            Answer::Ocr { quad_boxes, labels }
        }
        ParseType::PhraseGrounding => {
            let mut bboxes = Vec::new();
            let mut labels = Vec::new();
            for (boxes, label) in
                parse_phrase_grounding(&cleaned, size, &config.banned_grounding_tokens)?
            {
                labels.extend(std::iter::repeat_n(label, boxes.len()));
                for (bbox, at) in boxes {
                    bboxes.push(bbox);
                    locations.push(at);
                }
            }
            Answer::Boxes { bboxes, labels }
        }
        ParseType::DescriptionWithBboxes | ParseType::Bboxes => {
            let allow_empty = parse_type == ParseType::Bboxes;
            let (boxes, labels): (Vec<_>, _) = parse_bboxes(&cleaned, size, allow_empty)?
                .into_iter()
                .unzip();
            let bboxes;
            (bboxes, locations) = boxes.into_iter().unzip();
            Answer::Boxes { bboxes, labels }
        }
        ParseType::Polygons => {
            let (polygons, labels) = parse_polygons(&cleaned, size, true)?.into_iter().unzip();
            Answer::Polygons { polygons, labels }
        }
        ParseType::DescriptionWithBboxesOrPolygons => {
            // transformers looks for `<poly>` in the text before `<s>`/`</s>`/`<pad>` are removed.
            if text.contains("<poly>") {
                let (polygons, polygons_labels) =
                    parse_polygons(&cleaned, size, false)?.into_iter().unzip();
                Answer::BoxesOrPolygons {
                    bboxes: vec![],
                    bboxes_labels: vec![],
                    polygons,
                    polygons_labels,
                }
            } else {
                let (boxes, bboxes_labels): (Vec<_>, _) =
                    parse_bboxes(&cleaned, size, false)?.into_iter().unzip();
                let bboxes;
                (bboxes, locations) = boxes.into_iter().unzip();
                Answer::BoxesOrPolygons {
                    bboxes,
                    bboxes_labels,
                    polygons: vec![],
                    polygons_labels: vec![],
                }
            }
        }
    };
    for at in &mut locations {
        for offset in at.iter_mut() {
            *offset = origin[*offset];
        }
    }
    Ok((answer, locations))
}

/// `text.replace("<s>", "").replace("</s>", "").replace("<pad>", "")`, and for each byte of the
/// result its offset in `text`. Each pass removes non-overlapping matches from left to right, as
/// Python's `str.replace` does; a later pass may remove a marker that an earlier one joined.
fn remove_markers(text: &str) -> Result<(String, Vec<usize>)> {
    let mut bytes = text.as_bytes().to_vec();
    let mut origin: Vec<usize> = (0..bytes.len()).collect();
    for marker in [&b"<s>"[..], b"</s>", b"<pad>"] {
        let (mut kept, mut kept_origin) = (Vec::with_capacity(bytes.len()), Vec::new());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i..].starts_with(marker) {
                i += marker.len();
            } else {
                kept.push(bytes[i]);
                kept_origin.push(origin[i]);
                i += 1;
            }
        }
        (bytes, origin) = (kept, kept_origin);
    }
    // The markers are ASCII, so removing them leaves whole UTF-8 characters.
    let cleaned = String::from_utf8(bytes)
        .map_err(|_| Error::invalid("internal: removing markers split a character"))?;
    Ok((cleaned, origin))
}

/// Bin → pixel coordinate, bit for bit as transformers computes it with torch: the int64 bins become
/// float32, `+ 0.5`, times the bin width (a Python float that torch applies as float32), truncated.
#[derive(Debug, Clone, Copy)]
struct Dequantizer {
    size: Option<(f64, f64)>,
}

impl Dequantizer {
    fn per_bin(self) -> Result<(f32, f32)> {
        let (w, h) = self.size.ok_or_else(|| {
            Error::invalid("image_size (width, height) is required to place locations")
        })?;
        Ok(((w / BINS) as f32, (h / BINS) as f32))
    }

    /// Dequantizes alternating x, y bins (a box, a quad or a polygon).
    fn points(self, bins: &[u64]) -> Result<Vec<i32>> {
        let (per_w, per_h) = self.per_bin()?;
        Ok(bins
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                let per_bin = if i % 2 == 0 { per_w } else { per_h };
                ((b as f32 + 0.5) * per_bin) as i32
            })
            .collect())
    }

    fn bbox(self, bins: &[u64]) -> Result<[i32; 4]> {
        let v = self.points(bins)?;
        Ok([v[0], v[1], v[2], v[3]])
    }
}

/// `<loc_(\d+)>` at byte `i`: the bin (saturated; Python's int is unbounded) and the end offset.
fn loc_at(s: &[u8], i: usize) -> Option<(u64, usize)> {
    let rest = s.get(i..)?.strip_prefix(b"<loc_")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || rest.get(digits) != Some(&b'>') {
        return None;
    }
    let value = rest[..digits].iter().fold(0u64, |acc, d| {
        acc.saturating_mul(10).saturating_add(u64::from(d - b'0'))
    });
    Some((value, i + 5 + digits + 1))
}

/// A polygon-markup token (`<loc_N>`, `<sep>`, `<poly>`, `</poly>`) at byte `i`: its end offset.
fn poly_token_at(s: &[u8], i: usize) -> Option<usize> {
    if let Some((_, end)) = loc_at(s, i) {
        return Some(end);
    }
    let rest = s.get(i..)?;
    [&b"<sep>"[..], b"<poly>", b"</poly>"]
        .iter()
        .find(|t| rest.starts_with(t))
        .map(|t| i + t.len())
}

/// End of the run of consecutive tokens starting at `i`, and how many there are.
fn token_run(s: &[u8], i: usize, token_at: fn(&[u8], usize) -> Option<usize>) -> (usize, usize) {
    let (mut end, mut count) = (i, 0);
    while let Some(next) = token_at(s, end) {
        end = next;
        count += 1;
    }
    (end, count)
}

/// Whether `token` is exactly one location token (`<loc_N>`).
pub fn is_location_token(token: &str) -> bool {
    loc_at(token.as_bytes(), 0).is_some_and(|(_, end)| end == token.len())
}

fn loc_end(s: &[u8], i: usize) -> Option<usize> {
    loc_at(s, i).map(|(_, end)| end)
}

/// The consecutive `<loc_N>` tokens in `s[start..end]`: (bin, byte offset of the token).
fn loc_tokens(s: &[u8], start: usize, end: usize) -> Vec<(u64, usize)> {
    let mut tokens = Vec::new();
    let mut i = start;
    while i < end {
        match loc_at(s, i) {
            Some((bin, next)) => {
                tokens.push((bin, i));
                i = next;
            }
            None => break,
        }
    }
    tokens
}

/// A box and the byte offsets of the location tokens it was read from.
type Placed<B> = (B, Vec<usize>);

/// `[x1, y1, x2, y2]`, placed.
type PlacedBox = Placed<[i32; 4]>;

/// A phrase match of `re.findall`: `[start, tokens)` is the text part, `[tokens, end)` the markup run.
#[derive(Debug, Clone, Copy)]
struct PhraseSpan {
    start: usize,
    tokens: usize,
    end: usize,
}

/// `re.findall` of `([^<]+(?:TOKEN){4,})` (`need_text`) or `(?:(?:TOKEN){4,})`.
///
/// `[^<]+` cannot consume a token's `<`, so from any start inside a run of non-`<` text the match
/// depends only on the tokens after that run: either the whole run plus every following token (at
/// least 4) matches, or no start inside the run does and scanning resumes after the next `<`.
fn find_phrases(
    s: &[u8],
    need_text: bool,
    token_at: fn(&[u8], usize) -> Option<usize>,
) -> Vec<PhraseSpan> {
    let mut found = Vec::new();
    let mut i = 0;
    while i < s.len() {
        let start = if need_text {
            match s[i..].iter().position(|&b| b != b'<') {
                Some(off) => i + off,
                None => break,
            }
        } else {
            match s[i..].iter().position(|&b| b == b'<') {
                Some(off) => i + off,
                None => break,
            }
        };
        let tokens = if need_text {
            s[start..]
                .iter()
                .position(|&b| b == b'<')
                .map_or(s.len(), |o| start + o)
        } else {
            start
        };
        let (end, count) = token_run(s, tokens, token_at);
        if count >= 4 {
            found.push(PhraseSpan { start, tokens, end });
            i = end;
        } else {
            i = tokens + 1;
        }
    }
    found
}

/// `re.search(r"^\s*(.*?)(?=STOP|...)", s).group()`: the text before the first stop marker.
///
/// `.` does not match a newline, so the match fails when a newline lies between the leading
/// whitespace (which `\s*` may consume, newlines included) and the first stop.
fn text_before_stop<'a>(s: &'a str, stops: &[&str]) -> Option<&'a str> {
    let lead = s.len() - s.trim_start_matches(is_py_space).len();
    let stop = s
        .match_indices('<')
        .map(|(i, _)| i)
        .find(|&i| stops.iter().any(|t| s[i..].starts_with(t)))?;
    if s[lead..stop].contains('\n') {
        return None;
    }
    Some(&s[..stop])
}

const BOX_STOPS: &[&str] = &[
    "<od>", "</od>", "<box>", "</box>", "<bbox>", "</bbox>", "<loc_",
];
const POLYGON_STOPS: &[&str] = &[
    "<od>", "</od>", "<box>", "</box>", "<bbox>", "</bbox>", "<loc_", "<poly>",
];

/// Python's `s.encode("ascii", "ignore").decode("ascii")`.
fn ascii_only(s: &str) -> String {
    s.chars().filter(char::is_ascii).collect()
}

/// Phrases with their boxes (`parse_description_with_bboxes_from_text_and_spans` before flattening).
///
/// A phrase's text part holds no `<`, so `<loc_>{4}` can only match in its token run, from its start:
/// the boxes are the run's bins in fours, a remainder dropped.
fn phrases_with_boxes(
    text: &str,
    size: Dequantizer,
    allow_empty: bool,
) -> Result<Vec<(String, Vec<PlacedBox>)>> {
    let s = text.as_bytes();
    let mut out = Vec::new();
    for span in find_phrases(s, !allow_empty, loc_end) {
        let phrase_text = &text[span.start..span.end];
        let Some(phrase) = text_before_stop(phrase_text, BOX_STOPS) else {
            continue;
        };
        let boxes = loc_tokens(s, span.tokens, span.end)
            .chunks_exact(4)
            .map(|chunk| {
                let (bins, at): (Vec<u64>, Vec<usize>) = chunk.iter().copied().unzip();
                Ok((size.bbox(&bins)?, at))
            })
            .collect::<Result<Vec<_>>>()?;
        out.push((py_strip(phrase).to_string(), boxes));
    }
    Ok(out)
}

/// `description_with_bboxes` / `bboxes`: one (box, label) per box.
fn parse_bboxes(
    text: &str,
    size: Dequantizer,
    allow_empty: bool,
) -> Result<Vec<(PlacedBox, String)>> {
    let mut out = Vec::new();
    for (phrase, boxes) in phrases_with_boxes(text, size, allow_empty)? {
        let label = ascii_only(&phrase);
        out.extend(boxes.into_iter().map(|b| (b, label.clone())));
    }
    Ok(out)
}

/// `phrase_grounding`: phrases with all their boxes, banned phrases dropped (checked before the
/// non-ASCII characters are removed, as transformers does).
fn parse_phrase_grounding(
    text: &str,
    size: Dequantizer,
    banned: &HashSet<String>,
) -> Result<Vec<(Vec<PlacedBox>, String)>> {
    Ok(phrases_with_boxes(text, size, false)?
        .into_iter()
        .filter(|(phrase, _)| !banned.contains(phrase))
        .map(|(phrase, boxes)| (boxes, ascii_only(&phrase)))
        .collect())
}

/// `ocr`: `re.findall(r"(.+?)<loc_(\d+)>{8}", text)`, the content stripped, small quads dropped.
///
/// The lazy `.+?` takes at least one character and no newline, and stops at the first place where
/// eight location tokens follow. `eights_from[i]` is the first such place at or after `i`.
fn parse_ocr(
    text: &str,
    size: Dequantizer,
    area_threshold: f64,
) -> Result<Vec<(Placed<[i32; 8]>, String)>> {
    let s = text.as_bytes();
    let (width, height) = size
        .size
        .ok_or_else(|| Error::invalid("image_size (width, height) is required for OCR"))?;
    // run[i]: how many consecutive location tokens start at byte i.
    let mut run = vec![0usize; s.len() + 1];
    for i in (0..s.len()).rev() {
        if let Some((_, end)) = loc_at(s, i) {
            run[i] = 1 + run[end];
        }
    }
    let mut eights_from = vec![usize::MAX; s.len() + 2];
    for i in (0..=s.len()).rev() {
        eights_from[i] = if run[i] >= 8 { i } else { eights_from[i + 1] };
    }
    let mut out = Vec::new();
    let mut i = 0;
    while i < s.len() {
        let first_len = text[i..].chars().next().map_or(1, char::len_utf8);
        let content_end = eights_from[i + first_len];
        if content_end == usize::MAX {
            break;
        }
        if let Some(nl) = s[i..content_end].iter().position(|&b| b == b'\n') {
            // No start before the newline can reach past it.
            i += nl + 1;
            continue;
        }
        let mut end = content_end;
        let mut bins = [0u64; 8];
        let mut at = Vec::with_capacity(8);
        for bin in bins.iter_mut() {
            let (b, next) = loc_at(s, end)
                .ok_or_else(|| Error::invalid("internal: OCR location run changed"))?;
            *bin = b;
            at.push(end);
            end = next;
        }
        let q = size.points(&bins)?;
        let quad = [q[0], q[1], q[2], q[3], q[4], q[5], q[6], q[7]];
        if area_threshold <= 0.0 || !below_area(&quad, width, height, area_threshold) {
            out.push(((quad, at), py_strip(&text[i..content_end]).to_string()));
        }
        i = end;
    }
    Ok(out)
}

/// transformers' shoelace area test. It sums only the three edges i → i+1 (not the closing one);
/// kept as is because it decides which quads are dropped.
fn below_area(quad: &[i32; 8], width: f64, height: f64, threshold: f64) -> bool {
    let (x, y): (Vec<i64>, Vec<i64>) = quad
        .chunks_exact(2)
        .map(|p| (i64::from(p[0]), i64::from(p[1])))
        .unzip();
    let twice: i64 = (0..3).map(|i| x[i] * y[i + 1] - x[i + 1] * y[i]).sum();
    0.5 * (twice.abs() as f64) < width * height * threshold
}

/// `polygons` (`allow_empty`) and the polygon half of `description_with_bboxes_or_polygons`.
fn parse_polygons(
    text: &str,
    size: Dequantizer,
    allow_empty: bool,
) -> Result<Vec<(Vec<Vec<i32>>, String)>> {
    let s = text.as_bytes();
    let mut out = Vec::new();
    for span in find_phrases(s, !allow_empty, poly_token_at) {
        let phrase_text = &text[span.start..span.end];
        // re.sub(r"^<loc_\d+>", "", phrase_text, count=1)
        let stripped = match loc_at(phrase_text.as_bytes(), 0) {
            Some((_, end)) => &phrase_text[end..],
            None => phrase_text,
        };
        let Some(phrase) = text_before_stop(stripped, POLYGON_STOPS) else {
            continue;
        };
        let phrase = py_strip(phrase).to_string();
        let instances = if phrase_text.contains("<poly>") && phrase_text.contains("</poly>") {
            poly_groups(phrase_text)
        } else {
            vec![phrase_text]
        };
        for inst in instances {
            let polygons = separated_loc_runs(inst)
                .into_iter()
                .map(|mut bins| {
                    bins.truncate(bins.len() - bins.len() % 2);
                    size.points(&bins)
                })
                .collect::<Result<Vec<_>>>()?;
            if !polygons.is_empty() {
                out.push((polygons, phrase.clone()));
            }
        }
    }
    Ok(out)
}

/// `re.finditer(r"<poly>(.*?)</poly>", s)` group 1. The token run holds no newline, so `.*?` simply
/// reaches the next `</poly>`; without one, no later `<poly>` can close either.
fn poly_groups(s: &str) -> Vec<&str> {
    let mut groups = Vec::new();
    let mut i = 0;
    while let Some(open) = s[i..].find("<poly>").map(|o| i + o + "<poly>".len()) {
        let Some(close) = s[open..].find("</poly>").map(|o| open + o) else {
            break;
        };
        groups.push(&s[open..close]);
        i = close + "</poly>".len();
    }
    groups
}

/// `re.finditer(r"((?:<loc_\d+>)+)(?:<sep>|$)", s)`: the bins of each maximal run of location tokens
/// that a `<sep>` or the end of `s` follows. A shorter run ends before another location token, which
/// is neither, so only maximal runs can match.
fn separated_loc_runs(s: &str) -> Vec<Vec<u64>> {
    let b = s.as_bytes();
    let mut runs = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if loc_at(b, i).is_none() {
            i += 1;
            continue;
        }
        let (end, _) = token_run(b, i, loc_end);
        let rest = &s[end..];
        // `$` also matches before a final newline.
        if rest.is_empty() || rest == "\n" || rest.starts_with("<sep>") {
            runs.push(
                loc_tokens(b, i, end)
                    .into_iter()
                    .map(|(bin, _)| bin)
                    .collect(),
            );
        }
        i = end;
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(text: &str, task: &str) -> Answer {
        post_process_generation(
            &PostProcessorConfig::default(),
            text,
            task,
            Some((1000.0, 1000.0)),
        )
        .unwrap()
    }

    #[test]
    fn pure_text_drops_bos_eos() {
        assert_eq!(
            run("</s><s> A car. </s>", "<CAPTION>"),
            Answer::Text("A car.".into())
        );
    }

    #[test]
    fn od_boxes_and_labels() {
        let a = run("</s><s>car<loc_53><loc_334><loc_933><loc_775>door handle<loc_425><loc_504><loc_474><loc_516></s>", "<OD>");
        assert_eq!(
            a,
            Answer::Boxes {
                bboxes: vec![[53, 334, 933, 775], [425, 504, 474, 516]],
                labels: vec!["car".into(), "door handle".into()]
            }
        );
    }

    #[test]
    fn region_proposal_allows_empty_phrases() {
        let a = run(
            "<loc_1><loc_2><loc_3><loc_4><loc_5><loc_6><loc_7><loc_8><loc_9>",
            "<REGION_PROPOSAL>",
        );
        assert_eq!(
            a,
            Answer::Boxes {
                bboxes: vec![[1, 2, 3, 4], [5, 6, 7, 8]],
                labels: vec!["".into(), "".into()]
            }
        );
    }

    #[test]
    fn phrase_grounding_drops_banned_phrases() {
        let a = run("red car<loc_1><loc_2><loc_3><loc_4><loc_5><loc_6><loc_7><loc_8>the image<loc_1><loc_1><loc_2><loc_2>", "<CAPTION_TO_PHRASE_GROUNDING>");
        assert_eq!(
            a,
            Answer::Boxes {
                bboxes: vec![[1, 2, 3, 4], [5, 6, 7, 8]],
                labels: vec!["red car".into(), "red car".into()]
            }
        );
    }

    #[test]
    fn ocr_quads() {
        let a = run(
            "</s><s>Hello<loc_100><loc_100><loc_200><loc_100><loc_200><loc_200><loc_100><loc_200>",
            "<OCR_WITH_REGION>",
        );
        assert_eq!(
            a,
            Answer::Ocr {
                quad_boxes: vec![[100, 100, 200, 100, 200, 200, 100, 200]],
                labels: vec!["Hello".into()]
            }
        );
    }

    #[test]
    fn polygons_split_on_sep_and_drop_odd_bins() {
        let a = run(
            "<loc_1><loc_2><loc_3><loc_4><sep><loc_5><loc_6><loc_7>",
            "<REFERRING_EXPRESSION_SEGMENTATION>",
        );
        // The first location of the phrase is dropped from the label search only, not from the polygons.
        assert_eq!(
            a,
            Answer::Polygons {
                polygons: vec![vec![vec![1, 2, 3, 4], vec![5, 6]]],
                labels: vec!["".into()]
            }
        );
    }

    #[test]
    fn open_vocabulary_detection_picks_polygons_when_poly_present() {
        let a = run(
            "cat<poly><loc_1><loc_2><loc_3><loc_4></poly>",
            "<OPEN_VOCABULARY_DETECTION>",
        );
        assert_eq!(
            a,
            Answer::BoxesOrPolygons {
                bboxes: vec![],
                bboxes_labels: vec![],
                polygons: vec![vec![vec![1, 2, 3, 4]]],
                polygons_labels: vec!["cat".into()]
            }
        );
    }

    #[test]
    fn box_locations_are_offsets_in_the_uncleaned_text() {
        let text = "</s>car<loc_1><pad><loc_2><loc_3><loc_4>dog<loc_5><loc_6><loc_7><loc_8></s>";
        let (answer, locations) = post_process_with_locations(
            &PostProcessorConfig::default(),
            text,
            "<OD>",
            Some((1000.0, 1000.0)),
        )
        .unwrap();
        assert_eq!(answer, run(text, "<OD>"));
        let at = |token: &str| text.find(token).unwrap();
        let expected: Vec<Vec<usize>> = [[1, 2, 3, 4], [5, 6, 7, 8]]
            .iter()
            .map(|bins| bins.iter().map(|b| at(&format!("<loc_{b}>"))).collect())
            .collect();
        assert_eq!(locations, expected);
    }

    #[test]
    fn markers_are_removed_pass_by_pass_like_str_replace() {
        // "<s>" goes first, which joins "</" and "s>" into a "</s>" the second pass removes.
        let (cleaned, origin) = remove_markers("a</<s>s>b<pad>c").unwrap();
        assert_eq!(cleaned, "abc");
        assert_eq!(origin, vec![0, 8, 14]);
    }

    #[test]
    fn dequantizes_bin_centres_like_torch() {
        let d = Dequantizer {
            size: Some((800.0, 1200.0)),
        };
        assert_eq!(d.points(&[0, 0, 999, 999]).unwrap(), vec![0, 0, 799, 1199]);
        assert!(Dequantizer { size: None }.points(&[1, 2]).is_err());
    }

    #[test]
    fn malformed_text_is_not_an_error() {
        for t in [
            "",
            "<loc_",
            "<loc_1><loc_2>",
            "a<loc_1><loc_2><loc_3>",
            "\n<poly></poly><sep><sep>",
            "é<loc_1>",
        ] {
            for task in [
                "<OD>",
                "<OCR_WITH_REGION>",
                "<REGION_TO_SEGMENTATION>",
                "<OPEN_VOCABULARY_DETECTION>",
            ] {
                run(t, task);
            }
        }
    }

    #[test]
    fn config_limits_parse_types() {
        let cfg =
            PostProcessorConfig::from_json(Some(&serde_json::json!({"pure_text": {}}))).unwrap();
        assert!(post_process_generation(&cfg, "x", "<OD>", None).is_err());
        assert!(post_process_generation(&cfg, "x", "<CAPTION>", None).is_ok());
    }
}
