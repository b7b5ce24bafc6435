//! Lowercase hex, the one spelling of bytes in our text formats (revision hashes, the record's
//! keys, signatures and digests).

/// `bytes` as lowercase hex digits.
pub(crate) fn encode(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
            // Writing to a String cannot fail.
            let _ = write!(out, "{b:02x}");
            out
        })
}

/// Exactly `2 * N` lowercase hex digits as `N` bytes; `None` for anything else (uppercase
/// included, so that each value has one spelling).
pub(crate) fn decode<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N || !text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut bytes = [0u8; N];
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(bytes)
}

/// For a value whose one spelling is its `Display` (a hash, a key): `Debug` as `Name(text)`,
/// and into `String` through it, for `#[serde(try_from = "String", into = "String")]`.
macro_rules! text_value {
    ($name:ident) => {
        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}({self})", stringify!($name))
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> Self {
                value.to_string()
            }
        }
    };
}
pub(crate) use text_value;

#[cfg(test)]
mod tests {
    #[test]
    fn round_trips_and_refuses_other_spellings() {
        assert_eq!(super::encode(&[0, 0xab, 0x10]), "00ab10");
        assert_eq!(super::decode::<3>("00ab10"), Some([0, 0xab, 0x10]));
        for bad in ["00AB10", "00ab1", "00ab100", "00ab1g", "+0ab10"] {
            assert_eq!(super::decode::<3>(bad), None, "{bad:?}");
        }
    }
}
