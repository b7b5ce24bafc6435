//! Who is voting: the signed voter cookie, and ids derived from an `Idempotency-Key`.
//!
//! A cookie that fails verification or parsing is ignored: the request is a new voter. It is never
//! an error (the vote still counts, once) and never another voter (the signature binds the id).

use axum_extra::extract::SignedCookieJar;
use axum_extra::extract::cookie::{Cookie, Key, SameSite};
use hmac::{Hmac, Mac};
use landslide_schema::cookie::VoterCookie;
use landslide_schema::{Choice, EventId, PollId, VoterId};
use sha2::Sha256;
use uuid::Uuid;

use crate::Secret;

/// The voter cookie's name.
pub const COOKIE_NAME: &str = "landslide_voter";
/// Its name with `LANDSLIDE_SECURE_COOKIE`: the `__Host-` prefix makes browsers accept it only
/// when `Secure`, for `Path=/` and without a `Domain`, so no other host of the site (a sibling
/// subdomain, a plain-HTTP page) can set or overwrite it.
pub const SECURE_COOKIE_NAME: &str = "__Host-landslide_voter";

/// How long a browser keeps the voter cookie, in days: longer than any poll.
const COOKIE_MAX_AGE_DAYS: i64 = 400;

/// The longest `Idempotency-Key` accepted.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// Keys derived from `LANDSLIDE_SECRET`: one signs cookies, one derives ids.
#[derive(Clone)]
pub struct Keys {
    pub cookie: Key,
    ids: Hmac<Sha256>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(***)")
    }
}

impl Keys {
    pub fn new(secret: &Secret) -> Self {
        let master = secret.expose().as_bytes();
        // `Secret` holds at least 32 bytes, the minimum `derive_from` needs, so it cannot panic.
        let cookie = Key::derive_from(master);
        let ids = <Hmac<Sha256> as Mac>::new_from_slice(master)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
        Self { cookie, ids }
    }

    fn derive(&self, parts: &[&[u8]]) -> Uuid {
        let mut mac = self.ids.clone();
        for part in parts {
            // Length-prefix each part so that ("ab", "c") and ("a", "bc") differ.
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        let digest = mac.finalize().into_bytes();
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&digest[..16]);
        uuid::Builder::from_custom_bytes(bytes).into_uuid()
    }

    /// The voter of a cookie-less request that carries `key`: a retry without the cookie (the
    /// first answer was lost) is the same voter, so it cannot count twice.
    pub fn voter_for_key(&self, key: &str) -> VoterId {
        VoterId(self.derive(&[b"voter", key.as_bytes()]))
    }

    /// The event id of a request that carries `key`: a retry of the same vote is the same event.
    /// The choice is part of it, so a key reused for another choice is another event, and one
    /// event id never names two choices.
    pub fn event_for_key(
        &self,
        voter: VoterId,
        poll: &PollId,
        choice: &Choice,
        key: &str,
    ) -> EventId {
        EventId(self.derive(&[
            b"event",
            voter.0.as_bytes(),
            poll.as_str().as_bytes(),
            choice.as_str().as_bytes(),
            key.as_bytes(),
        ]))
    }
}

/// The voter cookie's payload, if a cookie is present, authentic and well-formed. Both names are
/// read, so that turning `LANDSLIDE_SECURE_COOKIE` on mid-poll keeps every voter the same voter;
/// with both present, the one with the later floor wins.
pub fn read(jar: &SignedCookieJar) -> Option<VoterCookie> {
    [SECURE_COOKIE_NAME, COOKIE_NAME]
        .into_iter()
        .filter_map(|name| jar.get(name))
        .filter_map(|cookie| VoterCookie::parse(cookie.value()))
        .max_by_key(|cookie| cookie.last_ts)
}

/// The jar with the voter cookie set to `payload`: under the `__Host-` name when `secure`, which
/// also expires a cookie left under the plain name.
pub fn write(jar: SignedCookieJar, payload: &VoterCookie, secure: bool) -> SignedCookieJar {
    let name = if secure {
        SECURE_COOKIE_NAME
    } else {
        COOKIE_NAME
    };
    let cookie = Cookie::build((name, payload.format()))
        .path("/")
        .http_only(true)
        .secure(secure)
        .same_site(SameSite::Lax)
        .max_age(cookie::time::Duration::days(COOKIE_MAX_AGE_DAYS));
    let jar = jar.add(cookie);
    if secure && jar.get(COOKIE_NAME).is_some() {
        jar.remove(Cookie::build(COOKIE_NAME).path("/"))
    } else {
        jar
    }
}

/// Checks an `Idempotency-Key` header value: 1 to 255 visible ASCII characters.
pub fn check_idempotency_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_LEN {
        return Err(format!(
            "Idempotency-Key must hold 1 to {MAX_IDEMPOTENCY_KEY_LEN} characters"
        ));
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("Idempotency-Key may only hold visible ASCII characters".to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Keys {
        Keys::new(&Secret::new("x".repeat(32)).unwrap())
    }

    #[test]
    fn the_same_key_gives_the_same_ids() {
        let k = keys();
        let pets = PollId::parse("pets").unwrap();
        let cats = Choice::parse("cats").unwrap();
        let dogs = Choice::parse("dogs").unwrap();
        let v = k.voter_for_key("abc");
        assert_eq!(v, k.voter_for_key("abc"));
        assert_ne!(v, k.voter_for_key("abd"));
        let event = k.event_for_key(v, &pets, &cats, "abc");
        assert_eq!(event, k.event_for_key(v, &pets, &cats, "abc"));
        assert_ne!(
            event,
            k.event_for_key(VoterId(Uuid::nil()), &pets, &cats, "abc")
        );
        assert_ne!(event, k.event_for_key(v, &pets, &dogs, "abc"));
    }

    #[test]
    fn ids_depend_on_the_secret() {
        let other = Keys::new(&Secret::new("y".repeat(32)).unwrap());
        assert_ne!(keys().voter_for_key("abc"), other.voter_for_key("abc"));
    }

    #[test]
    fn idempotency_keys_are_checked() {
        assert!(check_idempotency_key("3f2a-retry_1").is_ok());
        assert!(check_idempotency_key("").is_err());
        assert!(check_idempotency_key("a b").is_err());
        assert!(check_idempotency_key(&"k".repeat(256)).is_err());
    }
}
