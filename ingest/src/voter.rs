//! Who is voting: the signed voter cookie, and ids derived from an `Idempotency-Key`.
//!
//! A cookie that fails verification or parsing is ignored: the request is a new voter. It is never
//! an error (the vote still counts, once) and never another voter (the signature binds the id).
//!
//! A key never makes a voter on its own: the voter of a cookie-less request with a key is derived
//! from the key *and* the client address, and a key must be long enough to be random
//! ([`MIN_KEY_LEN`]). Found by trying it: two clients that both sent
//! `Idempotency-Key: 1` without a cookie were one voter, so either could change the other's
//! ballot, and anyone who guessed a client's key could. The price: a cookie-less retry from
//! another address is another voter (API.md, "Idempotency-Key without the cookie").

use axum::http::{HeaderMap, header};
use axum_extra::extract::SignedCookieJar;
use axum_extra::extract::cookie::{Cookie, Key, SameSite};
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use landslide_schema::cookie::{Binding, VoterCookie};
use landslide_schema::{Choice, EventId, PollId, VoterId};
use secrecy::ExposeSecret as _;
use sha2::Sha256;
use uuid::Uuid;

use crate::{CookieKeys, HmacKey, VoterIdKey};
use landslide_edge::Client;

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

/// The shortest `Idempotency-Key`: 16 visible ASCII characters hold up to 104 bits, room for a
/// random value (a UUID is 36, 122 bits random). A short key is a counter or a constant, which
/// another client sends too, or the same client for another vote. Once allowed with the voter
/// cookie, where `1` and `2` were used as "the first vote" and "the second".
pub const MIN_KEY_LEN: usize = 16;

/// The node's keys of voters: the cookie keys ([`CookieKeys`]: the first signs, every one
/// verifies) and the voter-id key. A cookie that a verify-only key signed is the same voter, and
/// is signed again with the signing key ([`VoterKeys::voter`]), so that the old key can go once
/// the polls it served have closed.
///
/// The ids of cookie-less keyed votes derive from a key of their own, which a rotation of the
/// cookie keys leaves alone: they were once derived from the oldest cookie key listed, so nodes
/// that listed different keys during a rotation derived different ids for one retry, which then
/// counted as two voters.
///
/// It holds keys derived from the [`HmacKey`]s, in the types that use them: neither cookie's
/// `Key` nor `Hmac` shows its key in `Debug`, so this one derives it (and neither is `Zeroize`,
/// which a `SecretBox` would need).
#[derive(Debug, Clone)]
pub struct VoterKeys {
    pub cookie: Key,
    verify_only: Vec<Key>,
    ids: Hmac<Sha256>,
}

impl VoterKeys {
    pub fn new(cookies: &CookieKeys, ids: &VoterIdKey) -> Self {
        // A `HmacKey` holds at least 32 bytes, the minimum `derive_from` needs, so it cannot panic.
        let derive = |key: &HmacKey| Key::derive_from(key.expose_secret().as_bytes());
        let ids = <Hmac<Sha256> as Mac>::new_from_slice(ids.0.expose_secret().as_bytes())
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
        Self {
            cookie: derive(cookies.signing()),
            verify_only: cookies.verify_only().iter().map(derive).collect(),
            ids,
        }
    }

    /// The voter cookie of a request ([`read`], `jar` verified with the signing key), and `jar`;
    /// when the signing key verifies none, the one a verify-only key signed, and `jar` with it
    /// signed again with the signing key: the response then carries it, so the voter moves to
    /// the signing key on their next request.
    pub fn voter(
        &self,
        jar: SignedCookieJar,
        headers: &HeaderMap,
        rule: CookieRule,
    ) -> (SignedCookieJar, Result<Option<VoterCookie>, Conflict>) {
        match read(&jar, headers, rule) {
            Ok(None) if !self.verify_only.is_empty() => {}
            known => return (jar, known),
        }
        let other = self.verify_only.iter().find_map(|key| {
            read(
                &SignedCookieJar::from_headers(headers, key.clone()),
                headers,
                rule,
            )
            .ok()
            .flatten()
        });
        match other {
            Some(payload) => {
                metrics::counter!("landslide_cookies_resigned_total").increment(1);
                (write(jar, &payload, rule.secure), Ok(Some(payload)))
            }
            None => (jar, Ok(None)),
        }
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

    /// The voter of a cookie-less request that carries `key`, from `client`: a retry without
    /// the cookie (the first answer was lost) from the same address is the same voter, so it
    /// cannot count twice; the same key from another client is another voter.
    pub fn voter_for_key(&self, key: &str, client: Client) -> VoterId {
        VoterId(self.derive(&[b"voter", key.as_bytes(), &client.to_bytes()]))
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

/// Which voter cookie a node reads: the one it writes, and nothing the client could choose.
///
/// Found by trying it: nodes read both names and kept the cookie with the later floor, so a
/// value planted under the plain name (`Domain=` the parent domain, from a sibling subdomain or
/// any plain-HTTP answer on a hostile network) took the voter over even with `__Host-` cookies
/// on: the victim's next vote landed on the attacker's voter, and the answer rewrote the
/// victim's own cookie to the attacker's identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CookieRule {
    /// `LANDSLIDE_SECURE_COOKIE`: only `__Host-landslide_voter` is read and written.
    pub secure: bool,
    /// `LANDSLIDE_PLAIN_COOKIE_UNTIL`: with `secure`, until this moment the plain name is still
    /// read when no `__Host-` cookie is present, so that a site that turned HTTPS cookies on
    /// during a poll keeps its earlier voters (each is written the `__Host-` cookie with their
    /// next vote). Set it to the close of the polls that were open at the switch.
    pub plain_until: Option<DateTime<Utc>>,
}

/// Two voter cookies of one name in one request: a browser holds two only when another site
/// (a sibling subdomain, a plain-HTTP answer) planted one beside the site's own, and nothing in
/// the request tells which is which (the order is the planter's to choose, by path and
/// creation time). The vote is refused rather than given to either.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conflict;

/// How many cookies called `name` the request carries, verified or not.
fn count(headers: &HeaderMap, name: &str) -> usize {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter(|pair| pair.split_once('=').is_some_and(|(n, _)| n.trim() == name))
        .count()
}

/// The payload of the one cookie called `name`, if present, authentic and written for it.
fn one(
    jar: &SignedCookieJar,
    headers: &HeaderMap,
    name: &str,
    binding: Binding,
) -> Result<Option<VoterCookie>, Conflict> {
    match count(headers, name) {
        0 => Ok(None),
        1 => Ok(jar
            .get(name)
            .and_then(|cookie| VoterCookie::parse(cookie.value(), binding))),
        _ => Err(Conflict),
    }
}

/// The voter cookie's payload, by `rule`: the `__Host-` cookie when secure (the plain one only
/// within the migration window, and never beside a `__Host-` one), the plain one otherwise; a
/// cookie that does not verify, or was written for the other name, is none (a new voter); two of
/// the name read are a [`Conflict`].
pub fn read(
    jar: &SignedCookieJar,
    headers: &HeaderMap,
    rule: CookieRule,
) -> Result<Option<VoterCookie>, Conflict> {
    if !rule.secure {
        return one(jar, headers, COOKIE_NAME, Binding::Plain);
    }
    if count(headers, SECURE_COOKIE_NAME) > 0 {
        return one(jar, headers, SECURE_COOKIE_NAME, Binding::Host);
    }
    if rule.plain_until.is_some_and(|until| Utc::now() < until) {
        return one(jar, headers, COOKIE_NAME, Binding::Plain);
    }
    Ok(None)
}

/// The jar with the voter cookie set to `payload`: under the `__Host-` name when `secure`, which
/// also expires a cookie left under the plain name.
pub fn write(jar: SignedCookieJar, payload: &VoterCookie, secure: bool) -> SignedCookieJar {
    let (name, binding) = if secure {
        (SECURE_COOKIE_NAME, Binding::Host)
    } else {
        (COOKIE_NAME, Binding::Plain)
    };
    let cookie = Cookie::build((name, payload.format(binding)))
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

/// The cookie that carries the receipt of a vote cast through the form to the page the answer
/// redirects to: one minute, signed like the voter cookie, read once. The receipt used to travel
/// in the redirect's address (`/?receipt=…`), which every access log on the way keeps, and a
/// receipt tells whoever holds it what became of the vote.
pub const RECEIPT_COOKIE_NAME: &str = "landslide_receipt";
/// Its name with `LANDSLIDE_SECURE_COOKIE`.
pub const SECURE_RECEIPT_COOKIE_NAME: &str = "__Host-landslide_receipt";

fn receipt_cookie_name(secure: bool) -> &'static str {
    if secure {
        SECURE_RECEIPT_COOKIE_NAME
    } else {
        RECEIPT_COOKIE_NAME
    }
}

/// The jar with the receipt cookie set to `receipt`.
pub fn write_receipt(jar: SignedCookieJar, receipt: String, secure: bool) -> SignedCookieJar {
    jar.add(
        Cookie::build((receipt_cookie_name(secure), receipt))
            .path("/")
            .http_only(true)
            .secure(secure)
            .same_site(SameSite::Strict)
            .max_age(cookie::time::Duration::minutes(1)),
    )
}

/// The receipt the cookie carries, if any, and the jar without it: shown once.
pub fn take_receipt(jar: SignedCookieJar, secure: bool) -> (SignedCookieJar, Option<String>) {
    let name = receipt_cookie_name(secure);
    match jar.get(name) {
        Some(cookie) => {
            let receipt = cookie.value().to_owned();
            (jar.remove(Cookie::build(name).path("/")), Some(receipt))
        }
        None => (jar, None),
    }
}

/// Checks an `Idempotency-Key` header value: [`MIN_KEY_LEN`] to 255 visible ASCII characters.
pub fn check_idempotency_key(key: &str) -> Result<(), String> {
    if key.len() < MIN_KEY_LEN || key.len() > MAX_IDEMPOTENCY_KEY_LEN {
        return Err(format!(
            "Idempotency-Key must hold {MIN_KEY_LEN} to {MAX_IDEMPOTENCY_KEY_LEN} characters: \
             use a random key, such as a UUID"
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

    fn secret(c: &str) -> HmacKey {
        HmacKey::new(c.repeat(32)).unwrap()
    }

    fn keys_of(cookies: CookieKeys, ids: &str) -> VoterKeys {
        VoterKeys::new(&cookies, &VoterIdKey(secret(ids)))
    }

    fn keys() -> VoterKeys {
        keys_of(CookieKeys::new(secret("x"), vec![]), "i")
    }

    fn client(ip: &str) -> Client {
        Client::of(ip.parse().unwrap())
    }

    #[test]
    fn the_same_key_gives_the_same_ids() {
        let k = keys();
        let pets = PollId::parse("pets").unwrap();
        let cats = Choice::parse("cats").unwrap();
        let dogs = Choice::parse("dogs").unwrap();
        let here = client("192.0.2.1");
        let v = k.voter_for_key("abc", here);
        assert_eq!(v, k.voter_for_key("abc", here));
        assert_ne!(v, k.voter_for_key("abd", here));
        let event = k.event_for_key(v, &pets, &cats, "abc");
        assert_eq!(event, k.event_for_key(v, &pets, &cats, "abc"));
        assert_ne!(
            event,
            k.event_for_key(VoterId(Uuid::nil()), &pets, &cats, "abc")
        );
        assert_ne!(event, k.event_for_key(v, &pets, &dogs, "abc"));
    }

    #[test]
    fn the_same_key_from_another_client_is_another_voter() {
        let k = keys();
        let key = "2c1e6f0a-9d4b-4e8f-a1b2-c3d4e5f60718";
        assert_ne!(
            k.voter_for_key(key, client("192.0.2.1")),
            k.voter_for_key(key, client("192.0.2.2"))
        );
        // One phone's IPv6 addresses share its /64: a retry from a rotated address is the same.
        assert_eq!(
            k.voter_for_key(key, client("2001:db8:0:1::a")),
            k.voter_for_key(key, client("2001:db8:0:1::b"))
        );
    }

    #[test]
    fn ids_depend_on_the_voter_id_key_alone() {
        let here = client("192.0.2.1");
        let other = keys_of(CookieKeys::new(secret("x"), vec![]), "j");
        assert_ne!(
            keys().voter_for_key("abc", here),
            other.voter_for_key("abc", here)
        );
        // A keyed retry sent across any step of a cookie-key rotation is one voter and one event.
        let voter = keys().voter_for_key("abc", here);
        let (poll, choice) = (
            PollId::parse("pets").unwrap(),
            Choice::parse("cats").unwrap(),
        );
        let event = keys().event_for_key(voter, &poll, &choice, "abc");
        for step in [
            CookieKeys::new(secret("x"), vec![secret("y")]),
            CookieKeys::new(secret("y"), vec![secret("x")]),
            CookieKeys::new(secret("y"), vec![]),
        ] {
            let rotated = keys_of(step, "i");
            assert_eq!(rotated.voter_for_key("abc", here), voter);
            assert_eq!(rotated.event_for_key(voter, &poll, &choice, "abc"), event);
        }
    }

    #[test]
    fn idempotency_keys_are_checked() {
        assert!(check_idempotency_key("3f2a-retry_1-4b0e9c8e").is_ok());
        assert!(check_idempotency_key("").is_err());
        assert!(check_idempotency_key("a b c d e f g h i j").is_err());
        assert!(check_idempotency_key(&"k".repeat(256)).is_err());
        // Long enough to be random, cookie or not.
        let short = check_idempotency_key("1").unwrap_err();
        assert!(short.contains("UUID"), "{short}");
        assert!(check_idempotency_key(&"k".repeat(15)).is_err());
        assert!(check_idempotency_key(&"k".repeat(16)).is_ok());
    }
}
