//! The payload of the signed voter cookie.
//!
//! The cookie says who the voter is, the stamp of their last accepted vote (the floor of design rule
//! 2) and, per poll, their current choice so that the form can show it. Its text is
//! `2.<binding>.<voter uuid, 32 hex digits>.<last ts>` followed by `.<poll>~<choice>~<ts>` per
//! poll, `<ts>` being the stamp of the answered vote that made the choice:
//! only characters that need no quoting in a cookie. `<binding>` names the cookie the text was
//! written for ([`Binding`]): the node signs the value only, so the name travels inside it.
//! Version 1 (no binding) is still read, under either name, and written again as version 2 with
//! the next answer. Signing and verifying are the ingest node's job; this module only turns the
//! payload into text and back, and refuses anything else without panicking.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use uuid::Uuid;

use crate::{Choice, PollId, Timestamp, VoterId};

/// At most this many polls' choices are kept, so the cookie stays far below browser limits.
pub const MAX_POLLS: usize = 16;

const VERSION: &str = "2";
/// The version before payloads named their cookie.
const UNBOUND_VERSION: &str = "1";

/// The cookie a payload was written for: the voter cookie under its `__Host-` name (a site on
/// HTTPS) or under its plain name. A value written for one is no voter under the other, so a
/// value taken from one deployment's plain cookie cannot be planted as another's, nor a plain
/// one passed off as what only the host itself can set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binding {
    Host,
    Plain,
}

impl Binding {
    fn tag(self) -> &'static str {
        match self {
            Self::Host => "host",
            Self::Plain => "plain",
        }
    }
}

/// What the voter cookie says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VoterCookie {
    pub voter: VoterId,
    /// The stamp of the voter's last accepted vote, in any poll.
    pub last_ts: Timestamp,
    /// The voter's current choice per poll, as far as this browser knows.
    pub choices: BTreeMap<PollId, Choice>,
    /// The stamp of the answered vote that made each poll's choice (0 where a version-1 cookie
    /// did not say). Unlike `last_ts`, a vote without an answer never raises it: it tells a
    /// later answered vote from a retried, unanswered one (`Idempotency-Key`).
    pub answered: BTreeMap<PollId, Timestamp>,
}

impl VoterCookie {
    /// A voter who has not voted yet.
    pub fn new(voter: VoterId) -> Self {
        Self {
            voter,
            last_ts: Timestamp(0),
            choices: BTreeMap::new(),
            answered: BTreeMap::new(),
        }
    }

    /// Records an accepted vote: raises the floor and remembers the choice.
    pub fn record(&mut self, poll: PollId, choice: Choice, ts: Timestamp) {
        self.last_ts = self.last_ts.max(ts);
        if !self.choices.contains_key(&poll) && self.choices.len() >= MAX_POLLS {
            // Forget one other poll's choice: only the form's display depends on it.
            if let Some(first) = self.choices.keys().next().cloned() {
                self.choices.remove(&first);
                self.answered.remove(&first);
            }
        }
        self.answered.insert(poll.clone(), ts);
        self.choices.insert(poll, choice);
    }

    /// The cookie text, for the cookie `binding` names.
    pub fn format(&self, binding: Binding) -> String {
        let mut out = format!(
            "{VERSION}.{}.{}.{}",
            binding.tag(),
            self.voter.0.simple(),
            self.last_ts.0
        );
        for (poll, choice) in &self.choices {
            let answered = self.answered.get(poll).copied().unwrap_or(Timestamp(0));
            // Writing to a `String` cannot fail.
            let _ = write!(out, ".{poll}~{choice}~{}", answered.0);
        }
        out
    }

    /// Parses the text of the cookie `binding` names; `None` for anything that is not exactly
    /// what [`format`](Self::format) writes for it (another binding, another version, a bad id,
    /// too many polls, another spelling of the same cookie), so that
    /// `format(parse(text, b), b) == text`; and version 1, which names no cookie, under either.
    pub fn parse(text: &str, binding: Binding) -> Option<Self> {
        let mut parts = text.split('.');
        let bound = match parts.next()? {
            VERSION if parts.next()? == binding.tag() => true,
            UNBOUND_VERSION => false,
            _ => return None,
        };
        // `Uuid::simple` and `u64` formatting: lower-case hex, digits without a sign or zero pad.
        let voter = parts.next()?;
        if voter.len() != 32
            || !voter
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return None;
        }
        let voter = VoterId(Uuid::try_parse(voter).ok()?);
        let last_ts = stamp(parts.next()?)?;
        let mut choices = BTreeMap::new();
        let mut answered = BTreeMap::new();
        for part in parts {
            let (poll, rest) = part.split_once('~')?;
            let (choice, ts) = match (bound, rest.split_once('~')) {
                (true, Some((choice, ts))) => (choice, stamp(ts)?),
                (false, None) => (rest, Timestamp(0)),
                _ => return None,
            };
            let poll = PollId::parse(poll).ok()?;
            let choice = Choice::parse(choice).ok()?;
            // `format` writes the polls in order, each once.
            if choices
                .last_key_value()
                .is_some_and(|(last, _)| *last >= poll)
            {
                return None;
            }
            answered.insert(poll.clone(), ts);
            choices.insert(poll, choice);
            if choices.len() > MAX_POLLS {
                return None;
            }
        }
        Some(Self {
            voter,
            last_ts,
            choices,
            answered,
        })
    }
}

/// A stamp as the cookie writes it: decimal digits, without a sign or a zero pad.
fn stamp(text: &str) -> Option<Timestamp> {
    if text.is_empty()
        || !text.bytes().all(|b| b.is_ascii_digit())
        || (text.len() > 1 && text.starts_with('0'))
    {
        return None;
    }
    text.parse().ok().map(Timestamp)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_cookie_round_trips() {
        let mut cookie = VoterCookie::new(VoterId(Uuid::from_u128(42)));
        cookie.record(
            PollId::parse("pets").unwrap(),
            Choice::parse("cats").unwrap(),
            Timestamp(99),
        );
        let text = cookie.format(Binding::Host);
        assert_eq!(
            text,
            "2.host.0000000000000000000000000000002a.99.pets~cats~99"
        );
        assert_eq!(
            VoterCookie::parse(&text, Binding::Host),
            Some(cookie.clone())
        );
        // Written for one name, it is no voter under the other.
        assert_eq!(VoterCookie::parse(&text, Binding::Plain), None);
        let plain = cookie.format(Binding::Plain);
        assert_eq!(
            VoterCookie::parse(&plain, Binding::Plain),
            Some(cookie.clone())
        );
        assert_eq!(VoterCookie::parse(&plain, Binding::Host), None);
        // Version 1 named no cookie, nor when a choice was made: read under either, until the
        // next answer rewrites it.
        let unbound = "1.0000000000000000000000000000002a.99.pets~cats";
        let mut unknown_answer = cookie.clone();
        unknown_answer
            .answered
            .insert(PollId::parse("pets").unwrap(), Timestamp(0));
        for binding in [Binding::Host, Binding::Plain] {
            assert_eq!(
                VoterCookie::parse(unbound, binding),
                Some(unknown_answer.clone())
            );
        }
    }

    #[test]
    fn the_floor_never_goes_down() {
        let mut cookie = VoterCookie::new(VoterId(Uuid::from_u128(1)));
        let pets = PollId::parse("pets").unwrap();
        cookie.record(pets.clone(), Choice::parse("cats").unwrap(), Timestamp(10));
        cookie.record(pets, Choice::parse("dogs").unwrap(), Timestamp(5));
        assert_eq!(cookie.last_ts, Timestamp(10));
    }

    #[test]
    fn choices_are_capped() {
        let mut cookie = VoterCookie::new(VoterId(Uuid::from_u128(1)));
        for i in 0..(MAX_POLLS + 5) {
            cookie.record(
                PollId::parse(format!("p{i}")).unwrap(),
                Choice::parse("x").unwrap(),
                Timestamp(i as u64),
            );
        }
        assert_eq!(cookie.choices.len(), MAX_POLLS);
        assert!(VoterCookie::parse(&cookie.format(Binding::Plain), Binding::Plain).is_some());
    }

    #[test]
    fn near_misses_are_refused() {
        for bad in [
            "",
            "2.0000000000000000000000000000002a.99",
            "3.plain.0000000000000000000000000000002a.99",
            "2.host.0000000000000000000000000000002a.99",
            "2.Plain.0000000000000000000000000000002a.99",
            "1.2a.99",
            "1.0000000000000000000000000000002a",
            "1.0000000000000000000000000000002a.-1",
            "1.0000000000000000000000000000002a.99.pets",
            "1.0000000000000000000000000000002a.99.pets~ca ts",
            "1.0000000000000000000000000000002a.99.pets~cats.pets~dogs",
            // Other spellings of a valid cookie (found by the cookie_parse fuzz target).
            "1.0000000000000000000000000000002A.99",
            "1.0000000000000000000000000000002a.099",
            "1.0000000000000000000000000000002a.+99",
            "1.0000000000000000000000000000002a.99.pets~cats.lunch~pizza",
            "1.0000000000000000000000000000002a.99.pets~cats~5",
            "2.plain.0000000000000000000000000000002a.99.pets~cats",
            "2.plain.0000000000000000000000000000002a.99.pets~cats~07",
            "2.plain.0000000000000000000000000000002a.99.pets~cats~",
        ] {
            assert_eq!(
                VoterCookie::parse(bad, Binding::Plain),
                None,
                "{bad:?} parsed"
            );
        }
    }

    proptest! {
        #[test]
        fn garbage_never_panics(text in ".{0,200}") {
            let _ = VoterCookie::parse(&text, Binding::Plain);
        }
    }
}
