//! Polls: the question and the options a vote may name.
//!
//! The default is poll `pets`, "Cats or dogs?", with options `cats` and `dogs`. A TOML file can
//! define others. A deployment keeps its definitions in the polls bucket, one immutable revision
//! each ([`PollBook`]): an ingest node stamps every vote with the revision it accepted the vote
//! under, and the workers and audit judge the vote by that same revision. The file format:
//!
//! ```toml
//! default = "pets"
//!
//! [[poll]]
//! id = "pets"
//! question = "Cats or dogs?"
//! options = [{ id = "cats", label = "Cats" }, { id = "dogs", label = "Dogs" }]
//! ```

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ts::{StampAhead, judge_stamp};
use crate::{Choice, PollId, VoteEvent};

/// One option of a poll.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PollOption {
    pub id: Choice,
    pub label: String,
}

/// One poll.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Poll {
    pub id: PollId,
    pub question: String,
    pub options: Vec<PollOption>,
    /// When votes start to count (RFC 3339, e.g. `"2026-12-06T18:00:00Z"`); open from the start
    /// when absent.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "rfc3339"
    )]
    pub opens_at: Option<DateTime<Utc>>,
    /// When votes stop counting; never when absent. A vote counts when the stream stored it at
    /// or after `opens_at` and before `closes_at` ([`Poll::window_at`]).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "rfc3339"
    )]
    pub closes_at: Option<DateTime<Utc>>,
    /// The public key of the poll's owner (`"ed25519:<64 hex digits>"`, from `landslide
    /// keygen`), published with the poll before it opens: `landslide verify` accepts the poll's
    /// record ([`crate::record`]) only if this key signed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_key: Option<crate::record::OwnerKey>,
}

/// A moment in a polls file: TOML's own offset date-time (`closes_at = 2026-12-06T20:00:00Z`)
/// or the same as a string. A date-time without an offset is refused: it names no one moment.
fn rfc3339<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<DateTime<Utc>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum When {
        Text(String),
        Toml(toml::value::Datetime),
    }
    let text = match When::deserialize(deserializer)? {
        When::Text(text) => text,
        When::Toml(datetime) => datetime.to_string(),
    };
    DateTime::parse_from_rfc3339(&text)
        .map(|t| Some(t.with_timezone(&Utc)))
        .map_err(|e| {
            serde::de::Error::custom(format!(
                "{text:?} is not an RFC 3339 date-time with an offset (like 2026-12-06T20:00:00Z): {e}"
            ))
        })
}

/// Where a moment falls in a poll's window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    NotOpenYet,
    Open,
    Closed,
}

impl Poll {
    pub fn has_option(&self, choice: &Choice) -> bool {
        self.options.iter().any(|o| &o.id == choice)
    }

    /// The window at `t`: open from `opens_at` (included) to `closes_at` (excluded).
    pub fn window_at(&self, t: DateTime<Utc>) -> Window {
        if self.opens_at.is_some_and(|opens| t < opens) {
            Window::NotOpenYet
        } else if self.closes_at.is_some_and(|closes| t >= closes) {
            Window::Closed
        } else {
            Window::Open
        }
    }

    /// Whether a vote stored at `stored_at` counts, by the window alone: the rule at the
    /// boundary, which the workers, audit and replay apply to the time the stream stored the
    /// vote (one clock, the stream leader's, rather than the many clocks of ingest nodes), and
    /// which ingest checks before it answers a vote near the boundary.
    pub fn judge_time(&self, stored_at: DateTime<Utc>) -> Result<(), NotCounted> {
        match self.window_at(stored_at) {
            Window::Open => Ok(()),
            Window::NotOpenYet => Err(NotCounted::NotOpenYet {
                poll: self.id.clone(),
                opens_at: self.opens_at.unwrap_or(stored_at),
            }),
            Window::Closed => Err(NotCounted::Closed {
                poll: self.id.clone(),
                closes_at: self.closes_at.unwrap_or(stored_at),
            }),
        }
    }
}

/// The polls of a deployment, with the one the form shows by default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Polls {
    default: PollId,
    polls: BTreeMap<PollId, Poll>,
}

/// The number of a poll definition in the polls bucket: 1 for the first, then 2, 3, … Revisions
/// never change once written, so a vote judged by its revision is judged the same everywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Revision(pub u64);

impl std::fmt::Display for Revision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The SHA-256 of a revision's text as the polls bucket holds it (its UTF-8 bytes), written as
/// 64 lowercase hex digits. An event names its revision by number and by this hash
/// ([`VoteEvent::rev_hash`]), so a vote is judged by the exact text it was accepted under, or not
/// at all: a role whose text of that revision differs waits, as for a revision it has not seen.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RevisionHash([u8; 32]);

impl RevisionHash {
    /// The hash of `text`, a revision as written.
    pub fn of(text: &str) -> Self {
        use sha2::Digest as _;
        Self(sha2::Sha256::digest(text.as_bytes()).into())
    }
}

impl std::fmt::Display for RevisionHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::hex::encode(&self.0))
    }
}

crate::hex::text_value!(RevisionHash);

impl TryFrom<String> for RevisionHash {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        crate::hex::decode(&text)
            .map(Self)
            .ok_or_else(|| format!("a revision hash is 64 lowercase hex digits, not {text:?}"))
    }
}

/// Every revision of the poll definitions that a role has seen, the latest being what ingest
/// accepts votes by, with the hash of each one's text and the time the polls bucket stored it,
/// where the role read them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PollBook {
    revisions: BTreeMap<Revision, Polls>,
    hashes: BTreeMap<Revision, RevisionHash>,
    written: BTreeMap<Revision, DateTime<Utc>>,
}

/// How long a revision stays live once the next one is written (by the time the polls bucket
/// stored each, the clock of its stream's leader): a vote accepted under it and stored later
/// than that is a dead letter ([`Unjudged::Superseded`]). Every role reads a new revision within
/// seconds, and an ingest node takes no vote while it cannot confirm that it holds the latest
/// (`landslide_nats::polls`), nor answers one whose answer came too late to be sure: no honest
/// node's accepted vote is refused by this. It is what lets a poll's close be judged at all
/// ([`PollBook::closes_for_good`]): without a bound, a node that had not seen that revision 2
/// moved the close earlier could store votes under revision 1 that count, after `final`.
///
/// Its length trades how long after a revision is written a poll's close may still move (the
/// poll is final only once every revision's votes have stopped) against how long an ingest node
/// may wait for an ack before it answers 503 instead (`landslide_nats::polls::covers`).
pub const REVISION_OVERLAP: std::time::Duration = std::time::Duration::from_secs(15);

/// How long after its last close by the stream leader's clock ([`PollBook::closes_for_good`]) a
/// poll is final at the earliest (with nothing of it pending): the stream's leader can change,
/// and a new leader whose clock is behind the old one's would store a vote with a time before
/// the close after the old leader's clock had passed it. Tally and `landslide status` alarm
/// when the servers they read differ by more than half of this (`landslide_nats`'
/// `MAX_CLOCK_SKEW`).
pub const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// How long after the stream stored an event naming a revision (with its text's hash) that the
/// polls bucket lacks the event waits before it is a dead letter. No honest ingest node accepts
/// a vote under a revision it has not read from the bucket, and every role reads a new revision
/// within seconds, while a revision once written is never removed: such an event could not have
/// been accepted by an honest node. Waiting for ever instead let one forged event keep every
/// result from becoming final (`pending` never 0), and 20,000 of them stop all counting.
pub const UNKNOWN_REVISION_BOUND: std::time::Duration = std::time::Duration::from_secs(300);

/// Whether an event the stream stored at `stored_at` has waited out `bound`
/// ([`UNKNOWN_REVISION_BOUND`]) by `now`: the one rule of the workers, audit and replay.
pub fn waited_out(
    stored_at: DateTime<Utc>,
    now: DateTime<Utc>,
    bound: std::time::Duration,
) -> bool {
    now - stored_at > chrono::Duration::from_std(bound).unwrap_or(chrono::Duration::MAX)
}

/// A revision as a role read it: its polls, the hash of its text, and when the polls bucket
/// stored it (when that is known).
#[derive(Debug, Clone)]
pub struct ReadRevision {
    pub revision: Revision,
    pub polls: Polls,
    pub hash: RevisionHash,
    pub written: Option<DateTime<Utc>>,
}

/// What [`PollBook::insert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// The revision was new, and is in the book now.
    New,
    /// The book held the revision with the same polls already.
    Known,
    /// The book holds the revision with other polls, and kept them.
    Differs,
}

/// Why an event cannot be judged, or does not count.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unjudged {
    /// A dead letter: no ingest node could have accepted it.
    #[error(transparent)]
    NotCounted(#[from] NotCounted),
    /// A dead letter: no ingest node could have stamped it, so far ahead of the time the stream
    /// stored it ([`crate::ts::judge_stamp`]).
    #[error(transparent)]
    StampAhead(#[from] StampAhead),
    /// A configuration alarm, never a dead letter: the event names a revision this role has not
    /// seen (yet), or a text of it (by hash) other than the one this role read. It must wait,
    /// not be judged by another revision or another text.
    #[error(
        "the vote names poll definition revision {0} (with the hash of its text), which this \
         process has not seen"
    )]
    UnknownRevision(Revision),
    /// A dead letter: stored when the revision it names had been superseded for longer than
    /// [`REVISION_OVERLAP`]; no honest node accepted it.
    #[error(
        "the vote names poll definition revision {revision}, which revision {by} superseded; \
         votes under it count only when stored before {}",
        live_until.to_rfc3339()
    )]
    Superseded {
        revision: Revision,
        by: Revision,
        live_until: DateTime<Utc>,
    },
}

impl Unjudged {
    /// The reason, as the dead letters' metric and the published record name it; `None` for an
    /// event that waits.
    pub fn label(&self) -> Option<&'static str> {
        match self {
            Self::NotCounted(why) => Some(why.label()),
            Self::StampAhead(_) => Some("stamp_ahead"),
            Self::Superseded { .. } => Some("superseded"),
            Self::UnknownRevision(_) => None,
        }
    }
}

/// When votes of one poll are stored and count under one revision: from its opening to the
/// earlier of its close and the end of the revision's life; `None` where unbounded.
type Span = (Option<DateTime<Utc>>, Option<DateTime<Utc>>);

impl PollBook {
    /// A book of one revision.
    pub fn new(revision: Revision, polls: Polls) -> Self {
        Self {
            revisions: BTreeMap::from([(revision, polls)]),
            hashes: BTreeMap::new(),
            written: BTreeMap::new(),
        }
    }

    /// Records when the polls bucket stored a revision, as first read.
    pub fn set_written(&mut self, revision: Revision, at: DateTime<Utc>) {
        self.written.entry(revision).or_insert(at);
    }

    /// When the polls bucket stored a revision, if this book read it.
    pub fn written(&self, revision: Revision) -> Option<DateTime<Utc>> {
        self.written.get(&revision).copied()
    }

    /// The revision after `revision` in this book and the moment votes under `revision` stop
    /// counting: [`REVISION_OVERLAP`] after the next was written. `None` for the latest (and
    /// where the next one's write time is unknown: a book built without them).
    pub fn superseded(&self, revision: Revision) -> Option<(Revision, DateTime<Utc>)> {
        use std::ops::Bound;
        let (next, _) = self
            .revisions
            .range((Bound::Excluded(revision), Bound::Unbounded))
            .next()?;
        let overlap = chrono::Duration::from_std(REVISION_OVERLAP).unwrap_or_default();
        Some((*next, self.written(*next)? + overlap))
    }

    /// Each revision that defines `poll`, oldest first, with when votes of the poll stored under
    /// it count ([`Span`]: from its opening to the earlier of its close and the end of the
    /// revision's life); or, for a revision written once the poll was over by the revisions
    /// before it ([`PollBook::is_over`] at its write time), the moment it was over: a poll once
    /// over stays over, and such a revision counts none of its votes. Without that rule the
    /// polls' owner could reopen a poll whose result was final.
    fn lives<'a>(
        &'a self,
        poll: &'a PollId,
    ) -> impl Iterator<Item = (Revision, Result<Span, DateTime<Utc>>)> + 'a {
        let grace = chrono::Duration::from_std(CLOSE_GRACE).unwrap_or_default();
        // The latest end of the spans so far: `None` before the first, `Some(None)` unbounded.
        let mut ends: Option<Option<DateTime<Utc>>> = None;
        self.revisions.iter().filter_map(move |(revision, polls)| {
            let definition = polls.get(poll.as_str())?;
            if let (Some(Some(over)), Some(written)) = (ends, self.written(*revision))
                && written >= over + grace
            {
                return Some((*revision, Err(over)));
            }
            let live = self.superseded(*revision).map(|(_, until)| until);
            let end = match (definition.closes_at, live) {
                (Some(closes), Some(live)) => Some(closes.min(live)),
                (closes, live) => closes.or(live),
            };
            let empty = matches!((definition.opens_at, end), (Some(s), Some(e)) if e <= s);
            if !empty {
                ends = Some(match (ends, end) {
                    (None, end) => end,
                    (Some(Some(a)), Some(b)) => Some(a.max(b)),
                    (Some(None), _) | (_, None) => None,
                });
            }
            Some((*revision, Ok((definition.opens_at, end))))
        })
    }

    /// When votes of `poll` can be stored and count: one span per revision that counts any.
    fn spans<'a>(&'a self, poll: &'a PollId) -> impl Iterator<Item = Span> + 'a {
        self.lives(poll).filter_map(|(_, span)| {
            span.ok()
                .filter(|span| !matches!(span, (Some(s), Some(e)) if e <= s))
        })
    }

    /// Whether a vote for `poll` (as `revision` defines it) stored at `t` counts by its window:
    /// [`Poll::judge_time`], and closed whatever the time when `revision` came after the poll
    /// was over ([`PollBook::lives`]). Ingest checks this before it answers a vote.
    pub fn judge_time(
        &self,
        revision: Revision,
        poll: &Poll,
        t: DateTime<Utc>,
    ) -> Result<(), NotCounted> {
        let late = self
            .lives(&poll.id)
            .find(|(r, _)| *r == revision)
            .and_then(|(_, life)| life.err());
        match late {
            Some(over) => Err(NotCounted::Closed {
                poll: poll.id.clone(),
                closes_at: over,
            }),
            None => poll.judge_time(t),
        }
    }

    /// Where `poll`, as `revision` defines it, is at `t` for a vote taken under `revision`
    /// ([`PollBook::judge_time`]): what the voting form shows.
    pub fn window_under(&self, revision: Revision, poll: &Poll, t: DateTime<Utc>) -> Window {
        match self.judge_time(revision, poll, t) {
            Ok(()) => Window::Open,
            Err(NotCounted::NotOpenYet { .. }) => Window::NotOpenYet,
            Err(_) => Window::Closed,
        }
    }

    /// Where `poll` is at `t` by every revision that defines it, each judging the votes
    /// accepted under it ([`PollBook::judge`]): open while any revision would count a vote
    /// stored at `t`, not open yet while one will later, closed otherwise. `None` when no
    /// revision defines it.
    pub fn window_of(&self, poll: &PollId, t: DateTime<Utc>) -> Option<Window> {
        let (mut any, mut later) = (false, false);
        for (opens, ends) in self.spans(poll) {
            any = true;
            if opens.is_some_and(|opens| t < opens) {
                later = true;
            } else if ends.is_none_or(|ends| t < ends) {
                return Some(Window::Open);
            }
        }
        any.then_some(if later {
            Window::NotOpenYet
        } else {
            Window::Closed
        })
    }

    /// The moment from which no vote of `poll` that the stream stores can count, by any
    /// revision: the latest close among every revision that defines it, each cut short by the
    /// end of that revision's life. `None` while some revision leaves the poll open for good
    /// (or none defines it).
    pub fn closes_for_good(&self, poll: &PollId) -> Option<DateTime<Utc>> {
        let mut last: Option<DateTime<Utc>> = None;
        for (_, ends) in self.spans(poll) {
            let ends = ends?;
            last = Some(last.map_or(ends, |last| last.max(ends)));
        }
        last
    }

    /// Whether `poll` is over by `stream_now`, the stream leader's clock: past
    /// [`PollBook::closes_for_good`] by [`CLOSE_GRACE`]. Its result is final once nothing of it
    /// is pending.
    pub fn is_over(&self, poll: &PollId, stream_now: DateTime<Utc>) -> bool {
        let grace = chrono::Duration::from_std(CLOSE_GRACE).unwrap_or_default();
        self.closes_for_good(poll)
            .is_some_and(|closes| stream_now >= closes + grace)
    }

    /// The book of `revisions`; `None` when there are none.
    pub fn of(revisions: impl IntoIterator<Item = ReadRevision>) -> Option<Self> {
        let mut book: Option<Self> = None;
        for read in revisions {
            let book = book.get_or_insert_with(|| Self {
                revisions: BTreeMap::new(),
                hashes: BTreeMap::new(),
                written: BTreeMap::new(),
            });
            book.add(read);
        }
        book
    }

    /// Adds a revision with the hash of its text and its write time, unless the book holds the
    /// revision already ([`PollBook::insert`]: another text is kept out, and said so).
    pub fn add(&mut self, read: ReadRevision) -> Inserted {
        let inserted = self.insert(read.revision, read.polls);
        if inserted == Inserted::New {
            self.set_hash(read.revision, read.hash);
            if let Some(at) = read.written {
                self.set_written(read.revision, at);
            }
        }
        inserted
    }

    /// Records the hash of a revision's text, as first read; a later one is ignored, like a
    /// second text of a known revision ([`PollBook::insert`]).
    pub fn set_hash(&mut self, revision: Revision, hash: RevisionHash) {
        self.hashes.entry(revision).or_insert(hash);
    }

    /// The hash of a revision's text, if this book read the text.
    pub fn hash(&self, revision: Revision) -> Option<RevisionHash> {
        self.hashes.get(&revision).copied()
    }

    /// Adds a revision unless the book holds it already. A known revision is never replaced:
    /// revisions are written once (the polls bucket refuses a second write of a key), so another
    /// text under a known number is a rewrite that the book must not adopt, only report.
    pub fn insert(&mut self, revision: Revision, polls: Polls) -> Inserted {
        match self.revisions.entry(revision) {
            std::collections::btree_map::Entry::Vacant(slot) => {
                slot.insert(polls);
                Inserted::New
            }
            std::collections::btree_map::Entry::Occupied(known) if *known.get() == polls => {
                Inserted::Known
            }
            std::collections::btree_map::Entry::Occupied(_) => Inserted::Differs,
        }
    }

    /// The newest revision, by which ingest accepts votes.
    pub fn latest(&self) -> (Revision, &Polls) {
        // `new` puts one in, and nothing takes any out.
        let (revision, polls) = self
            .revisions
            .last_key_value()
            .unwrap_or_else(|| unreachable!("a poll book holds at least one revision"));
        (*revision, polls)
    }

    pub fn get(&self, revision: Revision) -> Option<&Polls> {
        self.revisions.get(&revision)
    }

    pub fn revisions(&self) -> impl Iterator<Item = (Revision, &Polls)> {
        self.revisions.iter().map(|(r, p)| (*r, p))
    }

    /// Whether an event that the stream stored at `stored_at` counts: its stamp no further ahead
    /// of `stored_at` than an ingest node may stamp ([`judge_stamp`]), its poll and option by the
    /// revision it names ([`VoteEvent::rev`]; an event of wire version 1 names none and is
    /// judged by the latest, as before revisions existed), that revision still live at
    /// `stored_at` ([`PollBook::superseded`]), and `stored_at` within the poll's window
    /// ([`Poll::judge_time`]). The workers, audit and replay all judge by this, so they
    /// agree on every event.
    pub fn judge_event(
        &self,
        event: &VoteEvent,
        stored_at: DateTime<Utc>,
    ) -> Result<&Poll, Unjudged> {
        self.judge(&event.terms(), stored_at)
    }

    /// [`PollBook::judge_event`] of what it judges an event by: the same rule for an event read
    /// from the stream and for a line of a poll's published record ([`crate::record`]).
    pub fn judge(&self, terms: &Terms<'_>, stored_at: DateTime<Utc>) -> Result<&Poll, Unjudged> {
        // First: the stamp needs no poll definition, so an event no node could have stamped is a
        // dead letter even when it names a revision nobody has (it would wait for ever).
        judge_stamp(terms.ts, stored_at)?;
        let (revision, polls) = match terms.rev {
            None => self.latest(),
            Some(revision) => {
                let other_text = matches!(
                    (terms.rev_hash, self.hash(revision)),
                    (Some(named), Some(read)) if named != read
                );
                let polls = self
                    .get(revision)
                    .filter(|_| !other_text)
                    .ok_or(Unjudged::UnknownRevision(revision))?;
                if let Some((by, live_until)) = self.superseded(revision)
                    && stored_at >= live_until
                {
                    return Err(Unjudged::Superseded {
                        revision,
                        by,
                        live_until,
                    });
                }
                (revision, polls)
            }
        };
        let (poll, _) = polls.judge(terms.poll.as_str(), terms.choice.as_str())?;
        self.judge_time(revision, poll, stored_at)?;
        Ok(poll)
    }
}

/// What a vote is judged by ([`PollBook::judge`]): its poll and option, its stamp, and the
/// revision (number and hash of its text) it was accepted under. Not its voter.
#[derive(Debug, Clone, Copy)]
pub struct Terms<'a> {
    pub poll: &'a PollId,
    pub choice: &'a Choice,
    pub ts: crate::Timestamp,
    pub rev: Option<Revision>,
    pub rev_hash: Option<RevisionHash>,
}

impl VoteEvent {
    /// What this event is judged by.
    pub fn terms(&self) -> Terms<'_> {
        Terms {
            poll: &self.poll,
            choice: &self.choice,
            ts: self.ts,
            rev: self.rev,
            rev_hash: self.rev_hash,
        }
    }
}

/// Why a vote does not count: the one rule that ingest (before it accepts a vote), the workers
/// (before they count an event) and audit (when it folds the stream) all apply, through
/// [`Polls::judge`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotCounted {
    #[error("there is no poll {0:?}")]
    UnknownPoll(String),
    #[error("poll {poll} has no option {option:?}")]
    UnknownOption { poll: PollId, option: String },
    #[error("poll {poll} opens at {}", opens_at.to_rfc3339())]
    NotOpenYet {
        poll: PollId,
        opens_at: DateTime<Utc>,
    },
    #[error("poll {poll} closed at {}", closes_at.to_rfc3339())]
    Closed {
        poll: PollId,
        closes_at: DateTime<Utc>,
    },
}

impl NotCounted {
    /// A short name of the kind, for metric labels (`landslide_votes_rejected_total{reason}` at
    /// ingest, `landslide_dead_letters_total{reason}` at the workers).
    pub fn label(&self) -> &'static str {
        match self {
            Self::UnknownPoll(_) => "unknown_poll",
            Self::UnknownOption { .. } => "unknown_option",
            Self::NotOpenYet { .. } => "not_open",
            Self::Closed { .. } => "closed",
        }
    }
}

/// Why a polls file was refused.
#[derive(Debug, thiserror::Error)]
pub enum PollsError {
    #[error("polls file is not valid TOML of the expected shape: {0}")]
    Syntax(#[from] toml::de::Error),
    #[error("the polls file defines no poll")]
    NoPolls,
    #[error("poll {0} is defined twice")]
    DuplicatePoll(PollId),
    #[error("poll {0} has fewer than two options")]
    TooFewOptions(PollId),
    #[error("poll {poll} lists option {option} twice")]
    DuplicateOption { poll: PollId, option: Choice },
    #[error("the default poll {0} is not defined")]
    UnknownDefault(PollId),
    #[error("poll {0} closes before it opens")]
    ClosesBeforeOpening(PollId),
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PollsFile {
    default: Option<PollId>,
    poll: Vec<Poll>,
}

impl Polls {
    /// Builds the set, checking that ids are unique, each poll has two options or more, and the
    /// default exists.
    pub fn new(default: PollId, polls: Vec<Poll>) -> Result<Self, PollsError> {
        if polls.is_empty() {
            return Err(PollsError::NoPolls);
        }
        let mut map = BTreeMap::new();
        for poll in polls {
            if poll.options.len() < 2 {
                return Err(PollsError::TooFewOptions(poll.id));
            }
            if let (Some(opens), Some(closes)) = (poll.opens_at, poll.closes_at)
                && closes <= opens
            {
                return Err(PollsError::ClosesBeforeOpening(poll.id));
            }
            let mut seen = std::collections::BTreeSet::new();
            for option in &poll.options {
                if !seen.insert(&option.id) {
                    return Err(PollsError::DuplicateOption {
                        poll: poll.id.clone(),
                        option: option.id.clone(),
                    });
                }
            }
            if let Some(old) = map.insert(poll.id.clone(), poll) {
                return Err(PollsError::DuplicatePoll(old.id));
            }
        }
        if !map.contains_key(&default) {
            return Err(PollsError::UnknownDefault(default));
        }
        Ok(Self {
            default,
            polls: map,
        })
    }

    /// Parses a polls file (see the module doc). Without `default`, the first poll is the default.
    pub fn from_toml(text: &str) -> Result<Self, PollsError> {
        let file: PollsFile = toml::from_str(text)?;
        let default = match file.default {
            Some(d) => d,
            None => file.poll.first().ok_or(PollsError::NoPolls)?.id.clone(),
        };
        Self::new(default, file.poll)
    }

    /// The polls as a polls file, which [`Polls::from_toml`] reads back to the same polls.
    pub fn to_toml(&self) -> String {
        let file = PollsFile {
            default: Some(self.default.clone()),
            poll: self.polls.values().cloned().collect(),
        };
        // Strings and lists of tables: nothing here that TOML cannot hold.
        toml::to_string(&file).unwrap_or_default()
    }

    /// The default poll `pets`: "Cats or dogs?".
    pub fn pets() -> Self {
        let id =
            |s: &str| Choice::parse(s).unwrap_or_else(|_| unreachable!("literal ids are valid"));
        let pets = PollId::parse("pets").unwrap_or_else(|_| unreachable!("literal ids are valid"));
        let poll = Poll {
            id: pets.clone(),
            question: "Cats or dogs?".to_owned(),
            options: vec![
                PollOption {
                    id: id("cats"),
                    label: "Cats".to_owned(),
                },
                PollOption {
                    id: id("dogs"),
                    label: "Dogs".to_owned(),
                },
            ],
            opens_at: None,
            closes_at: None,
            owner_key: None,
        };
        let mut polls = BTreeMap::new();
        polls.insert(pets.clone(), poll);
        Self {
            default: pets,
            polls,
        }
    }

    pub fn default_poll(&self) -> &Poll {
        // `new` checked that the default exists, and the map is never changed afterwards.
        &self.polls[&self.default]
    }

    /// Whether a vote for `option` in poll `poll` counts: the poll's definition when it does,
    /// why not when it does not. Takes text, so that ingest judges what a voter sent with the
    /// same rule the workers and audit apply to a decoded event ([`PollBook::judge`]).
    pub fn judge(&self, poll: &str, option: &str) -> Result<(&Poll, Choice), NotCounted> {
        let found = self
            .get(poll)
            .ok_or_else(|| NotCounted::UnknownPoll(poll.to_owned()))?;
        match Choice::parse(option) {
            Ok(choice) if found.has_option(&choice) => Ok((found, choice)),
            _ => Err(NotCounted::UnknownOption {
                poll: found.id.clone(),
                option: option.to_owned(),
            }),
        }
    }

    pub fn get(&self, id: &str) -> Option<&Poll> {
        let id = PollId::parse(id).ok()?;
        self.polls.get(&id)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Poll> {
        self.polls.values()
    }
}

impl Default for Polls {
    fn default() -> Self {
        Self::pets()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_poll_is_cats_or_dogs() {
        let polls = Polls::default();
        let pets = polls.default_poll();
        assert_eq!(pets.question, "Cats or dogs?");
        assert!(pets.has_option(&Choice::parse("cats").unwrap()));
        assert!(polls.get("pets").is_some());
        assert!(polls.get("nope").is_none());
        assert!(polls.get("bad.id").is_none());
    }

    #[test]
    fn a_polls_file_parses_and_is_checked() {
        let text = r#"
            default = "lunch"
            [[poll]]
            id = "lunch"
            question = "Lunch?"
            options = [{ id = "pizza", label = "Pizza" }, { id = "salad", label = "Salad" }]
        "#;
        let polls = Polls::from_toml(text).unwrap();
        assert_eq!(polls.default_poll().id.as_str(), "lunch");

        let one_option = text.replace(r#", { id = "salad", label = "Salad" }"#, "");
        assert!(matches!(
            Polls::from_toml(&one_option),
            Err(PollsError::TooFewOptions(_))
        ));
        let bad_default = text.replace(r#"default = "lunch""#, r#"default = "x""#);
        assert!(matches!(
            Polls::from_toml(&bad_default),
            Err(PollsError::UnknownDefault(_))
        ));
        let bad_id = text.replace(r#"id = "pizza""#, r#"id = "pi zza""#);
        assert!(Polls::from_toml(&bad_id).is_err());
    }

    #[test]
    fn polls_round_trip_through_their_file() {
        let polls = Polls::default();
        assert_eq!(Polls::from_toml(&polls.to_toml()).unwrap(), polls);
    }

    fn now() -> DateTime<Utc> {
        "2026-12-01T12:00:00Z".parse().unwrap()
    }

    #[test]
    fn a_vote_counts_when_the_stream_stored_it_inside_the_window() {
        let text = r#"
            [[poll]]
            id = "pets"
            question = "Cats or dogs?"
            options = [{ id = "cats", label = "Cats" }, { id = "dogs", label = "Dogs" }]
            opens_at = "2026-12-01T10:00:00Z"
            closes_at = "2026-12-01T12:00:00Z"
        "#;
        let polls = Polls::from_toml(text).unwrap();
        assert_eq!(Polls::from_toml(&polls.to_toml()).unwrap(), polls);
        let poll = polls.default_poll();
        let at = |t: &str| t.parse::<DateTime<Utc>>().unwrap();
        assert_eq!(
            poll.window_at(at("2026-12-01T09:59:59.999Z")),
            Window::NotOpenYet
        );
        assert_eq!(poll.window_at(at("2026-12-01T10:00:00Z")), Window::Open);
        assert_eq!(poll.window_at(at("2026-12-01T11:59:59.999Z")), Window::Open);
        assert_eq!(poll.window_at(at("2026-12-01T12:00:00Z")), Window::Closed);
        let late = poll.judge_time(at("2026-12-01T12:00:00Z")).unwrap_err();
        assert_eq!(
            late.to_string(),
            "poll pets closed at 2026-12-01T12:00:00+00:00"
        );
        let early = poll.judge_time(at("2026-12-01T09:00:00Z")).unwrap_err();
        assert!(matches!(early, NotCounted::NotOpenYet { .. }));

        let backwards = text.replace("12:00:00Z", "09:00:00Z");
        assert!(matches!(
            Polls::from_toml(&backwards),
            Err(PollsError::ClosesBeforeOpening(_))
        ));
        let not_a_time = text.replace("2026-12-01T12:00:00Z", "tomorrow");
        assert!(Polls::from_toml(&not_a_time).is_err());
        let native = text.replace("\"2026-12-01T10:00:00Z\"", "2026-12-01T11:00:00+01:00");
        assert_eq!(Polls::from_toml(&native).unwrap(), polls, "{native}");
        let local = text.replace("\"2026-12-01T10:00:00Z\"", "2026-12-01T10:00:00");
        assert!(
            Polls::from_toml(&local).is_err(),
            "a time without an offset was taken"
        );
    }

    #[test]
    fn a_vote_is_judged_by_the_revision_it_names() {
        let lunch = Polls::from_toml(
            r#"
            [[poll]]
            id = "pets"
            question = "Cats, dogs or birds?"
            options = [{ id = "cats", label = "Cats" }, { id = "dogs", label = "Dogs" }, { id = "birds", label = "Birds" }]
        "#,
        )
        .unwrap();
        let mut book = PollBook::new(Revision(1), Polls::default());
        let birds = |rev| VoteEvent {
            event_id: crate::EventId(uuid::Uuid::from_u128(1)),
            poll: PollId::parse("pets").unwrap(),
            voter: crate::VoterId(uuid::Uuid::from_u128(2)),
            choice: Choice::parse("birds").unwrap(),
            ts: crate::Timestamp(1),
            node: crate::NodeId::parse("web1").unwrap(),
            rev,
            after: None,
            rev_hash: None,
        };
        assert_eq!(
            book.judge_event(&birds(Some(Revision(2))), now()),
            Err(Unjudged::UnknownRevision(Revision(2)))
        );
        assert!(matches!(
            book.judge_event(&birds(Some(Revision(1))), now()),
            Err(Unjudged::NotCounted(NotCounted::UnknownOption { .. }))
        ));
        assert_eq!(book.insert(Revision(2), lunch.clone()), Inserted::New);
        assert_eq!(book.insert(Revision(2), lunch.clone()), Inserted::Known);
        // A rewrite of a known revision is reported and never adopted.
        assert_eq!(book.insert(Revision(1), lunch.clone()), Inserted::Differs);
        assert_eq!(book.get(Revision(1)), Some(&Polls::default()));
        // An event names the text too: another text of a known revision is not this one.
        book.set_hash(Revision(1), RevisionHash::of("the text read"));
        let named = |hash: Option<&str>| VoteEvent {
            choice: Choice::parse("cats").unwrap(),
            rev_hash: hash.map(RevisionHash::of),
            ..birds(Some(Revision(1)))
        };
        assert!(
            book.judge_event(&named(Some("the text read")), now())
                .is_ok()
        );
        assert!(book.judge_event(&named(None), now()).is_ok());
        assert_eq!(
            book.judge_event(&named(Some("a rewrite")), now()),
            Err(Unjudged::UnknownRevision(Revision(1)))
        );
        assert_eq!(book.latest().0, Revision(2));
        assert!(book.judge_event(&birds(Some(Revision(2))), now()).is_ok());
        // Revision 1 still judges the votes accepted under it.
        assert!(book.judge_event(&birds(Some(Revision(1))), now()).is_err());
        // Wire version 1 names no revision: the latest judges it.
        assert!(book.judge_event(&birds(None), now()).is_ok());
    }

    /// A vote for cats in poll `pets`, accepted under `revision`.
    fn cats_under(revision: Revision) -> VoteEvent {
        VoteEvent {
            event_id: crate::EventId(uuid::Uuid::from_u128(1)),
            poll: PollId::parse("pets").unwrap(),
            voter: crate::VoterId(uuid::Uuid::from_u128(2)),
            choice: Choice::parse("cats").unwrap(),
            ts: crate::Timestamp::from_millis(1),
            node: crate::NodeId::parse("web1").unwrap(),
            rev: Some(revision),
            after: None,
            rev_hash: None,
        }
    }

    /// Poll `pets` closing at `closes`, as a revision's polls.
    fn closing(closes: &str) -> Polls {
        Polls::from_toml(&format!(
            "[[poll]]\nid = \"pets\"\nquestion = \"Cats or dogs?\"\n\
             options = [{{ id = \"cats\", label = \"Cats\" }}, {{ id = \"dogs\", label = \"Dogs\" }}]\n\
             closes_at = \"{closes}\"\n"
        ))
        .unwrap()
    }

    #[test]
    fn each_revision_decides_its_own_votes_until_a_moment_after_the_next_is_written() {
        let at = |t: &str| t.parse::<DateTime<Utc>>().unwrap();
        let pets = PollId::parse("pets").unwrap();
        // Revision 1 closes at 21:00; revision 2, written at 19:00, moves the close to 20:00.
        let mut book = PollBook::new(Revision(1), closing("2026-12-06T21:00:00Z"));
        book.set_written(Revision(1), at("2026-12-06T12:00:00Z"));
        assert_eq!(book.superseded(Revision(1)), None);
        assert_eq!(
            book.closes_for_good(&pets),
            Some(at("2026-12-06T21:00:00Z"))
        );
        book.insert(Revision(2), closing("2026-12-06T20:00:00Z"));
        book.set_written(Revision(2), at("2026-12-06T19:00:00Z"));
        let live_until = at("2026-12-06T19:00:15Z");
        assert_eq!(
            book.superseded(Revision(1)),
            Some((Revision(2), live_until))
        );
        let vote = |rev: u64| cats_under(Revision(rev));
        let before_limit = live_until - chrono::Duration::milliseconds(1);
        assert!(book.judge_event(&vote(1), before_limit).is_ok());
        let late = book.judge_event(&vote(1), live_until).unwrap_err();
        assert_eq!(late.label(), Some("superseded"));
        assert!(late.to_string().contains("revision 2 superseded"), "{late}");
        // The latest lives on; each revision's close still applies to its own votes.
        assert!(
            book.judge_event(&vote(2), at("2026-12-06T19:30:00Z"))
                .is_ok()
        );
        assert!(
            book.judge_event(&vote(2), at("2026-12-06T20:00:00Z"))
                .is_err()
        );
        // The poll is closed for good by 20:00: revision 1's votes stopped at 19:00:15.
        assert_eq!(
            book.closes_for_good(&pets),
            Some(at("2026-12-06T20:00:00Z"))
        );
        assert_eq!(
            book.window_of(&pets, at("2026-12-06T19:59:59Z")),
            Some(Window::Open)
        );
        assert_eq!(
            book.window_of(&pets, at("2026-12-06T20:00:00Z")),
            Some(Window::Closed)
        );
        assert!(!book.is_over(&pets, at("2026-12-06T20:00:01Z")));
        assert!(book.is_over(&pets, at("2026-12-06T20:00:02Z")));

        // The other way round: revision 2, written at 20:59:50, moves the close from 21:00 to
        // 20:30. Revision 1 still counts votes until 21:00, the end of its life being later.
        let mut book = PollBook::new(Revision(1), closing("2026-12-06T21:00:00Z"));
        book.insert(Revision(2), closing("2026-12-06T20:30:00Z"));
        book.set_written(Revision(2), at("2026-12-06T20:59:50Z"));
        assert_eq!(
            book.window_of(&pets, at("2026-12-06T20:45:00Z")),
            Some(Window::Open)
        );
        assert_eq!(
            book.closes_for_good(&pets),
            Some(at("2026-12-06T21:00:00Z"))
        );
        // Its write time unknown (a book built without them), revision 1 never ends.
        let mut unknown = PollBook::new(Revision(1), Polls::default());
        unknown.insert(Revision(2), closing("2026-12-06T20:30:00Z"));
        assert_eq!(unknown.superseded(Revision(1)), None);
        assert_eq!(unknown.closes_for_good(&pets), None);
        assert_eq!(
            unknown.window_of(&PollId::parse("lunch").unwrap(), now()),
            None
        );
    }

    #[test]
    fn a_poll_once_over_stays_over_whatever_a_later_revision_says() {
        let at = |t: &str| t.parse::<DateTime<Utc>>().unwrap();
        let pets = PollId::parse("pets").unwrap();
        let reopened = |written: &str| {
            let mut book = PollBook::new(Revision(1), closing("2026-12-06T20:00:00Z"));
            book.set_written(Revision(1), at("2026-12-06T12:00:00Z"));
            book.insert(Revision(2), closing("2026-12-06T22:00:00Z"));
            book.set_written(Revision(2), at(written));
            book
        };
        let vote = cats_under(Revision(2));
        let late = at("2026-12-06T21:30:00Z");
        // Written at 21:00, when the poll had been over (closed at 20:00, plus the grace) for an
        // hour: it reopens nothing.
        let book = reopened("2026-12-06T21:00:00Z");
        let closed = NotCounted::Closed {
            poll: pets.clone(),
            closes_at: at("2026-12-06T20:00:00Z"),
        };
        assert_eq!(
            book.judge_event(&vote, late),
            Err(Unjudged::NotCounted(closed))
        );
        let definition = book.latest().1.default_poll();
        assert_eq!(
            book.window_under(Revision(2), definition, late),
            Window::Closed
        );
        assert_eq!(book.window_of(&pets, late), Some(Window::Closed));
        assert_eq!(
            book.closes_for_good(&pets),
            Some(at("2026-12-06T20:00:00Z"))
        );
        assert!(book.is_over(&pets, late));
        // Written within the grace, before the poll was over: it moves the close to 22:00.
        let book = reopened("2026-12-06T20:00:01Z");
        assert!(book.judge_event(&vote, late).is_ok());
        assert_eq!(
            book.window_under(Revision(2), definition, late),
            Window::Open
        );
        assert_eq!(
            book.closes_for_good(&pets),
            Some(at("2026-12-06T22:00:00Z"))
        );
    }

    #[test]
    fn a_vote_stamped_beyond_the_tolerance_is_judged_a_dead_letter_before_its_revision() {
        let book = PollBook::new(Revision(1), Polls::default());
        let stored_ms = u64::try_from(now().timestamp_millis()).unwrap();
        let vote = |ms: u64, rev| VoteEvent {
            event_id: crate::EventId(uuid::Uuid::from_u128(1)),
            poll: PollId::parse("pets").unwrap(),
            voter: crate::VoterId(uuid::Uuid::from_u128(2)),
            choice: Choice::parse("cats").unwrap(),
            ts: crate::Timestamp::from_millis(ms),
            node: crate::NodeId::parse("web1").unwrap(),
            rev,
            after: None,
            rev_hash: None,
        };
        let tolerance = u64::try_from(crate::ts::MAX_TS_AHEAD.as_millis()).unwrap();
        assert!(
            book.judge_event(&vote(stored_ms + tolerance, None), now())
                .is_ok()
        );
        for rev in [None, Some(Revision(1)), Some(Revision(9))] {
            assert!(
                matches!(
                    book.judge_event(&vote(stored_ms + tolerance + 1, rev), now()),
                    Err(Unjudged::StampAhead(_))
                ),
                "{rev:?}"
            );
        }
    }

    #[test]
    fn a_vote_counts_only_for_a_defined_poll_and_option() {
        let polls = Polls::default();
        let (poll, choice) = polls.judge("pets", "cats").unwrap();
        assert_eq!((poll.id.as_str(), choice.as_str()), ("pets", "cats"));
        assert_eq!(
            polls.judge("lunch", "cats").unwrap_err(),
            NotCounted::UnknownPoll("lunch".to_owned())
        );
        assert_eq!(
            polls.judge("bad.id", "cats").unwrap_err().to_string(),
            "there is no poll \"bad.id\""
        );
        for option in ["birds", "", "Cats", "cats "] {
            assert!(
                matches!(
                    polls.judge("pets", option),
                    Err(NotCounted::UnknownOption { .. })
                ),
                "{option:?} was counted"
            );
        }
    }
}
