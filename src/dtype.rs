//! The floating dtypes a model loads and computes in, by the names torch and transformers give them: the one
//! table that `config.json`'s `dtype` / `torch_dtype`, the Python bindings and the Python package (through
//! `_native.DTYPES` and `_native.DTYPE_NAMES`) read.

use candle_core::DType;

use crate::{Error, Result};

/// Each dtype with its name (torch's, without `torch.`) first, then the other spellings torch and
/// transformers users write for it (`model.to("half")`, `torch_dtype="bf16"`, `str(torch.float32)`).
const TABLE: [(DType, &[&str]); 3] = [
    (
        DType::F32,
        &["float32", "fp32", "float", "torch.float32", "torch.float"],
    ),
    (
        DType::F16,
        &["float16", "fp16", "half", "torch.float16", "torch.half"],
    ),
    (DType::BF16, &["bfloat16", "bf16", "torch.bfloat16"]),
];

/// The dtypes' names, in the table's order: "float32", "float16", "bfloat16".
pub fn names() -> impl Iterator<Item = &'static str> {
    TABLE.iter().map(|(_, spellings)| spellings[0])
}

/// Every accepted spelling with the name it stands for ("half" -> "float16"), names included.
pub fn spellings() -> impl Iterator<Item = (&'static str, &'static str)> {
    TABLE.iter().flat_map(|(_, spellings)| {
        spellings
            .iter()
            .map(move |&spelling| (spelling, spellings[0]))
    })
}

/// The dtype `spelling` names (any case), if it names one of the table's.
pub fn lookup(spelling: &str) -> Option<DType> {
    let spelling = spelling.to_ascii_lowercase();
    TABLE
        .iter()
        .find(|(_, spellings)| spellings.contains(&spelling.as_str()))
        .map(|&(dtype, _)| dtype)
}

/// The dtype `spelling` names, or an error that lists the names.
pub fn parse(spelling: &str) -> Result<DType> {
    lookup(spelling).ok_or_else(|| {
        let names: Vec<_> = names().collect();
        Error::invalid(format!(
            "dtype {spelling:?} is not supported: use {}",
            names.join(", ")
        ))
    })
}

/// `dtype`'s name in the table; candle's own name for a dtype outside it (a model never holds one).
pub fn name(dtype: DType) -> &'static str {
    TABLE
        .iter()
        .find(|&&(d, _)| d == dtype)
        .map_or(dtype.as_str(), |(_, spellings)| spellings[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_parses_to_the_dtype_its_name_names() {
        for (spelling, name) in spellings() {
            assert_eq!(parse(spelling).unwrap(), parse(name).unwrap());
            assert_eq!(super::name(parse(&spelling.to_uppercase()).unwrap()), name);
        }
        assert_eq!(
            names().collect::<Vec<_>>(),
            ["float32", "float16", "bfloat16"]
        );
    }

    #[test]
    fn an_unknown_name_lists_the_names() {
        let err = parse("float64").unwrap_err().to_string();
        assert!(
            err.contains("\"float64\"") && err.contains("float32, float16, bfloat16"),
            "{err}"
        );
        assert_eq!(name(DType::F64), "f64");
    }
}
