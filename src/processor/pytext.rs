//! Python's string semantics where the reference relies on them: `str.strip()` and the regex `\s`
//! class treat a few more characters as whitespace than Rust's `char::is_whitespace`.

/// Whether Python's `str.isspace()` (and the `re` module's `\s`) is true for `c`.
///
/// Python counts the information separators U+001C..U+001F as whitespace; Rust does not.
pub(crate) fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `s.strip()` with no argument.
pub(crate) fn py_strip(s: &str) -> &str {
    s.trim_matches(is_py_space)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_what_python_strips() {
        assert_eq!(py_strip("\u{1c} a b\u{a0}\n"), "a b");
        assert_eq!(py_strip("\u{200b}x"), "\u{200b}x"); // zero-width space is not whitespace in Python
    }
}
