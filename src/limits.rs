//! The limit on what one call may allocate. Rust aborts the process when an allocation fails, so sizes a
//! caller or a checkpoint controls (beams, image and window sizes, token counts) are checked against this
//! limit before anything that large is allocated, and a request over it is an [`Error::TooLarge`] that names
//! the setting, instead of an abort.
//!
//! The limit is the machine's physical memory, or `FLORENCE2_MAX_ALLOC_BYTES` (a byte count) when set; it is
//! read once per process.

use std::sync::OnceLock;

use crate::{Error, Result};

/// The environment variable that sets the limit, in bytes.
pub const MAX_ALLOC_ENV: &str = "FLORENCE2_MAX_ALLOC_BYTES";

/// Where the machine's memory cannot be read.
const FALLBACK_LIMIT: u128 = 64 << 30;

/// The limit in bytes.
pub fn max_alloc_bytes() -> u128 {
    static LIMIT: OnceLock<u128> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        std::env::var(MAX_ALLOC_ENV)
            .ok()
            .and_then(|v| v.trim().parse::<u128>().ok())
            .unwrap_or_else(physical_memory)
    })
}

#[cfg(unix)]
fn physical_memory() -> u128 {
    // SAFETY: sysconf only reads system settings.
    let (pages, page_size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    match (u128::try_from(pages), u128::try_from(page_size)) {
        (Ok(pages), Ok(size)) if pages > 0 && size > 0 => pages * size,
        _ => FALLBACK_LIMIT,
    }
}

#[cfg(not(unix))]
fn physical_memory() -> u128 {
    FALLBACK_LIMIT
}

/// Refuses `bytes` for `what` over the limit. `what` names the setting and what the memory is for, e.g.
/// "num_beams=1000000 (the decoder cache and scores of 1000000 rows)".
pub fn check_alloc(what: &str, bytes: u128) -> Result<()> {
    let limit = max_alloc_bytes();
    if bytes <= limit {
        return Ok(());
    }
    Err(Error::TooLarge(format!(
        "{what} needs {} of memory, more than the {} one call may allocate here; use a smaller value (or \
         raise the limit with the environment variable {MAX_ALLOC_ENV}, in bytes)",
        human(bytes),
        human(limit),
    )))
}

/// The product of `factors`, saturating: a size past u128 is over any limit anyway.
pub fn product(factors: &[u128]) -> u128 {
    factors.iter().fold(1u128, |acc, &f| acc.saturating_mul(f))
}

fn human(bytes: u128) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn over_the_limit_names_the_setting() {
        let err = check_alloc("num_beams=7", u128::MAX).unwrap_err();
        assert!(matches!(err, Error::TooLarge(_)));
        assert!(err.to_string().contains("num_beams=7"), "{err}");
        assert!(check_alloc("a byte", 1).is_ok());
    }

    #[test]
    fn product_saturates() {
        assert_eq!(product(&[3, 4]), 12);
        assert_eq!(product(&[1 << 64, 1 << 64]), u128::MAX);
    }
}
