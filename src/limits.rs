//! The most one allocation may take, checked before allocating: a failed allocation aborts a Rust program
//! (and the Python interpreter around it), so sizes that come from a caller or a checkpoint are checked
//! here first and refused with an error that names the setting.
//!
//! The limit is `FLORENCE2_MAX_ALLOC_BYTES` where set (a whole number of bytes; a suffix `K`, `M`, `G` or `T`
//! counts in binary units), else the smaller of [`DEFAULT_MAX_ALLOC_BYTES`] and the machine's physical memory;
//! set to nothing (`FLORENCE2_MAX_ALLOC_BYTES=`) it counts as unset, as an empty variable does for most tools.
//! It is read once, on the first check; a value that is not such a size makes every check an error that says
//! so (a limit other than the one asked for would be a silent surprise).

use std::sync::OnceLock;

use crate::{Error, Result};

/// The environment variable that sets the limit.
pub const MAX_ALLOC_ENV: &str = "FLORENCE2_MAX_ALLOC_BYTES";
/// The limit without the variable, where the machine has more memory (or its memory is not known).
pub const DEFAULT_MAX_ALLOC_BYTES: u128 = 64 << 30;

/// The limit in bytes and where it came from (for the error message), or why the variable cannot be used.
fn limit() -> Result<&'static (u128, String)> {
    static LIMIT: OnceLock<std::result::Result<(u128, String), String>> = OnceLock::new();
    LIMIT
        .get_or_init(|| from_setting(std::env::var_os(MAX_ALLOC_ENV)))
        .as_ref()
        .map_err(|msg| Error::invalid(msg.clone()))
}

/// The limit for the variable's value `setting` (`None`: not set; empty counts as not set).
fn from_setting(
    setting: Option<std::ffi::OsString>,
) -> std::result::Result<(u128, String), String> {
    let Some(setting) = setting.filter(|s| !s.is_empty()) else {
        return Ok(match physical_memory() {
            Some(bytes) if bytes < DEFAULT_MAX_ALLOC_BYTES => {
                (bytes, "the machine's memory".to_string())
            }
            _ => (DEFAULT_MAX_ALLOC_BYTES, "the default limit".to_string()),
        });
    };
    let bytes = setting.to_str().and_then(parse_bytes).ok_or_else(|| {
        format!(
            "{MAX_ALLOC_ENV}={setting:?} is not a size: set it to a whole number of bytes, optionally with a K, \
             M, G or T suffix in binary units (for example {MAX_ALLOC_ENV}=200G), or unset it for the default \
             limit (the smaller of {} and the machine's memory)",
            human(DEFAULT_MAX_ALLOC_BYTES)
        )
    })?;
    Ok((
        bytes,
        format!("{MAX_ALLOC_ENV}={}", setting.to_string_lossy()),
    ))
}

/// Fails when `FLORENCE2_MAX_ALLOC_BYTES` is set to something that is not a size: checked where a model or a
/// processor is loaded, so that a mistyped setting is reported before any work rather than at the first
/// size check.
pub fn check_setting() -> Result<()> {
    limit().map(|_| ())
}

/// Refuses an allocation of `bytes` for `what` that is over the limit. `what` names the setting and its
/// value ("size 100000x100000", "num_beams 1000000"), and the message says how to raise the limit. An
/// unusable `FLORENCE2_MAX_ALLOC_BYTES` is an [`Error::InvalidInput`].
pub fn check_alloc(what: &str, bytes: u128) -> Result<()> {
    let (max, source) = limit()?;
    check(what, bytes, *max, source)
}

fn check(what: &str, bytes: u128, max: u128, source: &str) -> Result<()> {
    if bytes <= max {
        return Ok(());
    }
    Err(Error::TooLarge(format!(
        "{what} needs {} of memory, more than the {} one allocation may take here ({source}); use a smaller \
         value, or set {MAX_ALLOC_ENV} (bytes, or with a K/M/G/T suffix) to allow more",
        human(bytes),
        human(max),
    )))
}

/// The product of `factors` (a count of items and the bytes of one, ...), saturating: a size past u128 is over
/// any limit anyway.
pub fn product(factors: &[u128]) -> u128 {
    factors.iter().fold(1u128, |acc, &f| acc.saturating_mul(f))
}

/// "1234", "64G", "512 M" → bytes; `None` for anything else.
fn parse_bytes(text: &str) -> Option<u128> {
    let text = text.trim();
    let (digits, shift) = match text.char_indices().last()? {
        (i, 'K' | 'k') => (&text[..i], 10),
        (i, 'M' | 'm') => (&text[..i], 20),
        (i, 'G' | 'g') => (&text[..i], 30),
        (i, 'T' | 't') => (&text[..i], 40),
        _ => (text, 0),
    };
    digits.trim().parse::<u128>().ok()?.checked_mul(1 << shift)
}

/// Total physical memory (Linux: `MemTotal` of /proc/meminfo); `None` elsewhere.
fn physical_memory() -> Option<u128> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib = line.split_whitespace().nth(1)?.parse::<u128>().ok()?;
    kib.checked_mul(1024)
}

/// Bytes in the largest binary unit that keeps a number of at least 1 ("120.0 GiB").
fn human(bytes: u128) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} bytes");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_bytes("1234"), Some(1234));
        assert_eq!(parse_bytes("64G"), Some(64 << 30));
        assert_eq!(parse_bytes(" 512 m "), Some(512 << 20));
        assert_eq!(parse_bytes("2T"), Some(2 << 40));
        for bad in ["", "G", "-1", "1.5G", "lots"] {
            assert_eq!(parse_bytes(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_setting_that_is_not_a_size_is_an_error_naming_it() {
        assert_eq!(
            from_setting(Some("16G".into())).unwrap(),
            (16 << 30, format!("{MAX_ALLOC_ENV}=16G"))
        );
        for bad in [" ", "1.5G", "lots", "-1", "16GB"] {
            let err = from_setting(Some(bad.into())).unwrap_err();
            assert!(err.contains(MAX_ALLOC_ENV) && err.contains("200G"), "{err}");
            assert!(err.contains(&human(DEFAULT_MAX_ALLOC_BYTES)), "{err}");
        }
        assert!(from_setting(None).unwrap().0 <= DEFAULT_MAX_ALLOC_BYTES);
        // Set to nothing is unset.
        assert_eq!(from_setting(Some("".into())), from_setting(None));
    }

    #[test]
    fn over_the_limit_is_refused_with_the_setting_named() {
        let max = DEFAULT_MAX_ALLOC_BYTES;
        assert!(check("a small buffer", 1024, max, "test").is_ok());
        assert!(check("exactly the limit", max, max, "test").is_ok());
        let err = check(
            "size 100000x100000",
            product(&[100_000 * 100_000, 12]),
            max,
            "test",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("size 100000x100000 needs 111.8 GiB"), "{err}");
        assert!(err.contains("64.0 GiB"), "{err}");
        assert!(err.contains(MAX_ALLOC_ENV), "{err}");
        // Without the variable, whatever the machine, nothing may take more than the default limit.
        if std::env::var_os(MAX_ALLOC_ENV).is_none() {
            assert!(check_alloc("more than the default", DEFAULT_MAX_ALLOC_BYTES + 1).is_err());
        }
    }

    #[test]
    fn product_saturates() {
        assert_eq!(product(&[3, 4]), 12);
        assert_eq!(product(&[1 << 64, 1 << 64]), u128::MAX);
    }

    #[test]
    fn units_read_naturally() {
        assert_eq!(human(512), "512 bytes");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(64 << 30), "64.0 GiB");
    }
}
