//! `VoterCookie::parse` reads the payload of a cookie the browser sends back. Its signature is
//! checked first, but the parser must still take any text without panicking. It accepts only
//! what `format` writes: `format(parse(text)) == text`.
#![no_main]

use landslide_schema::cookie::{MAX_POLLS, VoterCookie};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Some(cookie) = VoterCookie::parse(text) else {
        return;
    };
    assert!(cookie.choices.len() <= MAX_POLLS, "too many polls accepted");
    let canonical = cookie.format();
    // The text goes into a Set-Cookie header unquoted.
    assert!(
        canonical
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._~-".contains(&b)),
        "{canonical:?} needs quoting in a cookie"
    );
    assert_eq!(canonical, text, "parse accepted another spelling of a cookie");
});
