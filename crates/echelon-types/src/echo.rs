//! Bounding what a client chose before the gateway repeats or stores it.
//!
//! A route name (the request's `model`) is client input of any length. The gateway echoes
//! it in an unknown-route error and stores it in the ledger's `route` column; both keep at
//! most [`MAX_ECHOED_NAME_BYTES`] of it (issue 14, item 11: a 7 MiB name used to come
//! back whole in the 404 and sit whole in the ledger).

use std::borrow::Cow;

/// Most bytes of a client-chosen name kept in an error message or a ledger row, before
/// the `…(N bytes)` marker [`bounded_name`] appends.
pub const MAX_ECHOED_NAME_BYTES: usize = 256;

/// `name` as the gateway may echo or store it: unchanged when it has at most
/// [`MAX_ECHOED_NAME_BYTES`] bytes; else its first bytes up to that bound (cut on a
/// UTF-8 character boundary, so never more) followed by `…(N bytes)`, N being the
/// whole name's length in bytes.
///
/// The result is at most `MAX_ECHOED_NAME_BYTES` + 31 bytes long (the marker: `…`, 3 bytes, and at most
/// 20 digits in `(N bytes)`), whatever `name` is.
pub fn bounded_name(name: &str) -> Cow<'_, str> {
    bounded_to(name, MAX_ECHOED_NAME_BYTES)
}

/// [`bounded_name`] with a bound of `max_bytes` bytes instead of the default.
pub fn bounded_to(name: &str, max_bytes: usize) -> Cow<'_, str> {
    if name.len() <= max_bytes {
        return Cow::Borrowed(name);
    }
    let mut end = max_bytes;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}…({} bytes)", &name[..end], name.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_are_kept_as_they_are() {
        assert!(matches!(bounded_name("grp"), Cow::Borrowed("grp")));
        let exact = "a".repeat(MAX_ECHOED_NAME_BYTES);
        assert_eq!(bounded_name(&exact), exact.as_str());
    }

    #[test]
    fn long_names_are_cut_and_say_their_length() {
        let long = "m".repeat(7 * 1024 * 1024);
        let b = bounded_name(&long);
        assert_eq!(
            b,
            format!("{}…(7340032 bytes)", "m".repeat(MAX_ECHOED_NAME_BYTES))
        );
        assert!(b.len() <= MAX_ECHOED_NAME_BYTES + 31);
    }

    #[test]
    fn the_cut_falls_on_a_character_boundary() {
        // 'é' is two bytes: 255 'a's then 'é' straddles byte 256.
        let s = format!("{}é{}", "a".repeat(255), "z".repeat(100));
        let b = bounded_name(&s);
        assert_eq!(b, format!("{}…(357 bytes)", "a".repeat(255)));
        for max in 0..8 {
            let cut = bounded_to("ééééé", max);
            assert!(cut.starts_with(&"é".repeat(max / 2)), "{max}: {cut}");
        }
        assert_eq!(bounded_to("ééééé", 3), "é…(10 bytes)");
        assert_eq!(bounded_to("abc", 0), "…(3 bytes)");
    }
}
