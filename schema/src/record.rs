//! The published record of one poll: what `landslide export` writes at the close, and what
//! `landslide verify` (or anyone's own verifier, from this description alone) checks with no
//! server and no secret.
//!
//! # The files
//!
//! All text is UTF-8, every line ends in `\n`, nothing is quoted: every field is a number, an
//! identifier (letters, digits, `-`, `_`), a UUID or lowercase hex. Numbers are decimal.
//!
//! - `revisions/<N>.toml`: every revision of the poll definitions, N = 1, 2, … with no gap,
//!   byte for byte as the polls bucket holds it. Its SHA-256 is the revision hash that events
//!   name (`rev_hash`).
//! - `events.csv`: the header `sequence,stored_ns,voter,choice,ts,after,rev,rev_hash,event_id`,
//!   then one line per vote event of the poll that the votes stream holds, counted or not, in
//!   stream order: `sequence` is the stream's sequence of the message; `stored_ns` when the
//!   stream stored it (nanoseconds since the Unix epoch, by the stream leader's clock); `voter`
//!   the voter's pseudonym (64 hex digits, see `ballots.csv`); `choice` the option as sent; `ts`
//!   the ingest node's stamp (a hybrid logical clock: milliseconds since the epoch shifted left
//!   by 16 bits, plus a counter); `after` the stamp of the voter's last vote whose answer reached
//!   them (empty for events of wire versions 1 and 2); `rev` and `rev_hash` the revision the vote
//!   was accepted under, by number and by hash (empty when the event names none); `event_id` the
//!   vote's id as a hyphenated UUID, which its receipt names.
//! - `ballots.csv`: the header `voter,choice,event_id,ts`, then one line per voter: their counted
//!   vote. Sorted as byte strings (so by pseudonym). The pseudonym is the hex HMAC-SHA256, keyed
//!   with the owner's export key, of `landslide-export-v1`, the poll id, a 0 byte and the voter
//!   id's 16 bytes: the file names no voter, but one pseudonym links one voter's events.
//! - `certificate.json`: the [`Certificate`]: the counts, the digests that bind every other file
//!   to it, and the stream range the audit read.
//! - `certificate.sig`: `ed25519:` and the 128 hex digits of the Ed25519 signature (RFC 8032) of
//!   `certificate.json`'s exact bytes, by the poll's owner.
//!
//! # Checking it
//!
//! 1. **Who signed.** The owner's key is the `owner_key` of the poll in the earliest revision
//!    that names one; every later revision that defines the poll must name the same key, and
//!    every counted vote must have been accepted under a revision that names it (step 5).
//!    Compare it with the key the owner published before the poll opened: a record that verifies
//!    under a key nobody published proves nothing.
//! 2. **The signature** of `certificate.json`'s bytes under that key (strict verification).
//! 3. **The revisions**: the SHA-256 of each file is the `hash` of the certificate's `revisions`
//!    entry, the same set of numbers, 1 to N. Each entry's `written_ns` is when the polls bucket
//!    stored that revision (nanoseconds since the Unix epoch, by its stream leader's clock).
//! 4. **The event log**: `h₀ = SHA-256("landslide-record-v1" ‖ 0x00 ‖ poll id)`, then for every
//!    line after the header, `\n` included, `h = SHA-256(h ‖ line)`: the last `h` is
//!    `event_log_head` (`sha256:` and hex), the number of lines is `events`, and the sequences
//!    rise strictly, within `first_sequence` to `last_sequence`. A hash chain: a log published
//!    in parts can be checked to extend an earlier part.
//! 5. **The judge** ([`crate::PollBook::judge`]), for each event: its stamp's milliseconds at most
//!    five minutes ([`crate::MAX_TS_AHEAD`]) after `stored_ns`; the revision it names with that
//!    hash among the record's (none named: the latest), or it is not counted; that revision
//!    still live: when a later revision exists, `stored_ns` before the next one's `written_ns`
//!    plus 15 seconds ([`crate::poll::REVISION_OVERLAP`]); the poll and the option defined in
//!    that revision; that revision not written once the poll was over: of the revisions that
//!    define the poll, in order, each counts votes from its `opens_at` to the earlier of its
//!    `closes_at` and its end of life (either may be absent: unbounded), and one whose
//!    `written_ns` is at or after the latest end among the earlier ones (all bounded, empty
//!    spans left out) plus 2 seconds ([`crate::poll::CLOSE_GRACE`]) counts none and is left out
//!    of the later ones' check too; `stored_ns` inside that revision's window of the poll
//!    (`opens_at` ≤ t < `closes_at`). A counted vote under a revision whose definition of the
//!    poll names no owner key (or another) refuses the whole record.
//! 6. **The merge** ([`crate::merge`]): per voter, the counted event with the greatest
//!    `(after, stored_ns, ts, event_id)`, where an event with an empty `after` orders as
//!    `(ts, 0, ts, event_id)`, and event ids compare as their 16 bytes.
//! 7. **The result**: those events, one line each as in `ballots.csv`, sorted, are
//!    `ballots.csv` byte for byte; its SHA-256 is `digest`; the lines per option (every option of
//!    the poll in the latest revision, zeros included) are `counts`, and their number `ballots`.
//!
//! A voter with a receipt finds their vote by its event id in `events.csv`, and in `ballots.csv`
//! if it is the one counted.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use chrono::{DateTime, Utc};
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use secrecy::{ExposeSecret as _, SecretBox};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::merge::OrderKey;
use crate::poll::{ReadRevision, Terms, Unjudged};
use crate::receipt::Receipt;
use crate::{Choice, EventId, PollBook, PollId, Polls, Revision, RevisionHash, Timestamp};

/// The format this module describes, named in the certificate and in the chain's first hash.
pub const FORMAT: &str = "landslide-record-v1";
pub const CERTIFICATE_FILE: &str = "certificate.json";
pub const SIGNATURE_FILE: &str = "certificate.sig";
pub const EVENTS_FILE: &str = "events.csv";
pub const BALLOTS_FILE: &str = "ballots.csv";
pub const REVISIONS_DIR: &str = "revisions";
pub const EVENTS_HEADER: &str = "sequence,stored_ns,voter,choice,ts,after,rev,rev_hash,event_id";
pub const BALLOTS_HEADER: &str = "voter,choice,event_id,ts";

/// The file of revision `revision` inside [`REVISIONS_DIR`].
pub fn revision_file(revision: Revision) -> String {
    format!("{revision}.toml")
}

/// A poll owner's public key, `ed25519:` and 64 hex digits, published with the poll.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct OwnerKey(VerifyingKey);

impl OwnerKey {
    /// Whether `signature` (as [`OwnerSigningKey::sign`] writes it) is this key's over `message`.
    pub fn verify(&self, message: &[u8], signature: &str) -> Result<(), Refused> {
        let bytes = signature
            .trim_end()
            .strip_prefix("ed25519:")
            .and_then(crate::hex::decode::<64>)
            .ok_or_else(|| refused("a signature is ed25519: and 128 hex digits"))?;
        self.0
            .verify_strict(message, &ed25519_dalek::Signature::from_bytes(&bytes))
            .map_err(|_| refused("the signature is not the owner key's over these bytes"))
    }
}

impl fmt::Display for OwnerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ed25519:{}", crate::hex::encode(self.0.as_bytes()))
    }
}

crate::hex::text_value!(OwnerKey);

impl TryFrom<String> for OwnerKey {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.strip_prefix("ed25519:")
            .and_then(crate::hex::decode::<32>)
            .and_then(|bytes| VerifyingKey::from_bytes(&bytes).ok())
            .map(Self)
            .ok_or_else(|| {
                format!("an owner key is ed25519: and 64 hex digits of a public key, not {text:?}")
            })
    }
}

/// A poll owner's private key: 32 random bytes, kept in a file (`landslide keygen`) as
/// `ed25519-secret:` and 64 hex digits. Never printed: the seed is a [`SecretBox`], whose `Debug`
/// shows none of it. The Ed25519 key is made from it for each use (a `SigningKey` cannot be a
/// `SecretBox`'s, which needs `Zeroize`), and wipes itself when dropped.
#[derive(Debug)]
pub struct OwnerSigningKey(SecretBox<[u8; 32]>);

impl OwnerSigningKey {
    const PREFIX: &str = "ed25519-secret:";

    /// The key of a 32-byte secret seed (from a cryptographic random source).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self(SecretBox::new(Box::new(seed)))
    }

    fn signing_key(&self) -> SigningKey {
        SigningKey::from_bytes(self.0.expose_secret())
    }

    /// Reads what [`OwnerSigningKey::to_file_text`] writes.
    pub fn from_file_text(text: &str) -> Result<Self, String> {
        text.trim()
            .strip_prefix(Self::PREFIX)
            .and_then(crate::hex::decode::<32>)
            .map(Self::from_seed)
            .ok_or_else(|| format!("a signing key file holds {}and 64 hex digits", Self::PREFIX))
    }

    /// The key file's content.
    pub fn to_file_text(&self) -> String {
        format!(
            "{}{}\n",
            Self::PREFIX,
            crate::hex::encode(self.0.expose_secret())
        )
    }

    pub fn public(&self) -> OwnerKey {
        OwnerKey(self.signing_key().verifying_key())
    }

    /// The signature of `message`, as `certificate.sig` holds it.
    pub fn sign(&self, message: &[u8]) -> String {
        format!(
            "ed25519:{}\n",
            crate::hex::encode(&self.signing_key().sign(message).to_bytes())
        )
    }
}

/// A voter's pseudonym in a record: 64 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pseudonym(String);

impl Pseudonym {
    pub fn from_mac(mac: &[u8; 32]) -> Self {
        Self(crate::hex::encode(mac))
    }

    fn parse(text: &str) -> Option<Self> {
        crate::hex::decode::<32>(text).map(|mac| Self::from_mac(&mac))
    }
}

impl fmt::Display for Pseudonym {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One line of `events.csv`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedEvent {
    pub sequence: u64,
    pub stored_ns: i64,
    pub voter: Pseudonym,
    pub choice: Choice,
    pub ts: Timestamp,
    pub after: Option<Timestamp>,
    pub rev: Option<Revision>,
    pub rev_hash: Option<RevisionHash>,
    pub event_id: EventId,
}

impl RecordedEvent {
    /// The line, `\n` included.
    pub fn line(&self) -> String {
        let opt = |v: Option<String>| v.unwrap_or_default();
        format!(
            "{},{},{},{},{},{},{},{},{}\n",
            self.sequence,
            self.stored_ns,
            self.voter,
            self.choice,
            self.ts,
            opt(self.after.map(|t| t.to_string())),
            opt(self.rev.map(|r| r.to_string())),
            opt(self.rev_hash.map(|h| h.to_string())),
            self.event_id
        )
    }

    /// Reads exactly what [`RecordedEvent::line`] writes (without its `\n`).
    pub fn parse(line: &str) -> Result<Self, String> {
        let fields: Vec<&str> = line.split(',').collect();
        let [
            sequence,
            stored_ns,
            voter,
            choice,
            ts,
            after,
            rev,
            rev_hash,
            event_id,
        ] = fields.as_slice()
        else {
            return Err(format!("{} fields, not 9", fields.len()));
        };
        let number = |name: &str, text: &str| {
            // One spelling per value: no sign, no leading zero.
            if text.starts_with('+') || (text.len() > 1 && text.starts_with('0')) {
                return Err(format!("{name} {text:?} is not a plain decimal number"));
            }
            text.parse::<u64>()
                .map_err(|_| format!("{name} {text:?} is not a number"))
        };
        let optional =
            |name: &str, text: &str| (!text.is_empty()).then(|| number(name, text)).transpose();
        let event_id = uuid::Uuid::try_parse(event_id)
            .ok()
            .filter(|id| id.hyphenated().to_string() == *event_id)
            .ok_or_else(|| format!("event_id {event_id:?} is not a hyphenated lowercase UUID"))?;
        Ok(Self {
            sequence: number("sequence", sequence)?,
            stored_ns: i64::try_from(number("stored_ns", stored_ns)?)
                .map_err(|_| format!("stored_ns {stored_ns:?} is out of range"))?,
            voter: Pseudonym::parse(voter)
                .ok_or_else(|| format!("voter {voter:?} is not 64 hex digits"))?,
            choice: Choice::parse(*choice).map_err(|e| format!("choice {choice:?}: {e}"))?,
            ts: Timestamp(number("ts", ts)?),
            after: optional("after", after)?.map(Timestamp),
            rev: optional("rev", rev)?.map(Revision),
            rev_hash: (!rev_hash.is_empty())
                .then(|| RevisionHash::try_from((*rev_hash).to_owned()))
                .transpose()?,
            event_id: EventId(event_id),
        })
    }

    pub fn stored_at(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_nanos(self.stored_ns)
    }

    pub fn order_key(&self) -> OrderKey {
        OrderKey::of(self.after, self.ts, self.event_id, self.stored_at())
    }

    fn terms<'a>(&'a self, poll: &'a PollId) -> Terms<'a> {
        Terms {
            poll,
            choice: &self.choice,
            ts: self.ts,
            rev: self.rev,
            rev_hash: self.rev_hash,
        }
    }
}

/// One line of `ballots.csv`, `\n` included.
pub fn ballot_line(voter: &Pseudonym, choice: &Choice, event_id: EventId, ts: Timestamp) -> String {
    format!("{voter},{choice},{event_id},{ts}\n")
}

/// `ballots.csv` of these lines: the header, then the lines sorted.
pub fn ballots_file(mut lines: Vec<String>) -> String {
    lines.sort_unstable();
    let mut file = format!("{BALLOTS_HEADER}\n");
    file.extend(lines);
    file
}

/// `sha256:` and the hex SHA-256 of `bytes`.
pub fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", crate::hex::encode(&Sha256::digest(bytes)))
}

/// The hash chain over `events.csv`'s lines (step 4 of the module's checks).
#[derive(Debug, Clone)]
pub struct Chain {
    head: [u8; 32],
    lines: u64,
}

impl Chain {
    pub fn start(poll: &PollId) -> Self {
        let mut hash = Sha256::new();
        hash.update(FORMAT.as_bytes());
        hash.update([0]);
        hash.update(poll.as_str().as_bytes());
        Self {
            head: hash.finalize().into(),
            lines: 0,
        }
    }

    /// Adds one line, `\n` included.
    pub fn push(&mut self, line: &str) {
        let mut hash = Sha256::new();
        hash.update(self.head);
        hash.update(line.as_bytes());
        self.head = hash.finalize().into();
        self.lines += 1;
    }

    /// `sha256:` and the hex of the last hash.
    pub fn head(&self) -> String {
        format!("sha256:{}", crate::hex::encode(&self.head))
    }

    pub fn lines(&self) -> u64 {
        self.lines
    }
}

/// What is certified about one poll: `certificate.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificate {
    /// [`FORMAT`].
    pub format: String,
    pub poll: PollId,
    pub question: String,
    /// `final`: past the poll's last close over all its revisions by the NATS server's clock
    /// ([`PollBook::is_over`]), nothing pending, and the audit consistent.
    /// Otherwise why not: `open`, `not_open`, `inconsistent`.
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closes_at: Option<String>,
    /// Ballots per option, every option present.
    pub counts: BTreeMap<String, i64>,
    pub ballots: u64,
    /// [`digest`] of `ballots.csv`.
    pub digest: String,
    /// Lines of `events.csv` (this poll's events), and the head of their [`Chain`].
    pub events: u64,
    pub event_log_head: String,
    /// Every revision, by number: the hash of its text and when the polls bucket stored it.
    pub revisions: BTreeMap<Revision, CertifiedRevision>,
    /// The key that signed `certificate.sig`; none when the poll names no owner key (the record
    /// is then unsigned, and `landslide verify` refuses it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_key: Option<OwnerKey>,
    /// Messages of the votes stream read by the audit (every poll's), and their sequences.
    pub events_read: u64,
    pub stream: String,
    pub first_sequence: u64,
    pub last_sequence: u64,
    /// Messages in the dead-letter stream (every poll's).
    pub dead_letters: u64,
    pub audited_at: String,
}

impl fmt::Display for Certificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "certificate of poll {} ({}): {}",
            self.poll, self.question, self.status
        )?;
        if let Some(closes) = &self.closes_at {
            writeln!(f, "closed at: {closes}")?;
        }
        for (option, count) in &self.counts {
            writeln!(f, "  {option}: {count}")?;
        }
        writeln!(f, "ballots: {}", self.ballots)?;
        writeln!(
            f,
            "events read: {} (stream {}, sequences {} to {}); dead letters: {}",
            self.events_read,
            self.stream,
            self.first_sequence,
            self.last_sequence,
            self.dead_letters
        )?;
        writeln!(
            f,
            "events of this poll: {}; event log head: {}",
            self.events, self.event_log_head
        )?;
        writeln!(f, "digest of ballots.csv: {}", self.digest)?;
        match &self.owner_key {
            Some(key) => writeln!(f, "owner key: {key}")?,
            None => writeln!(
                f,
                "owner key: none (the poll names none: the record is unsigned)"
            )?,
        }
        write!(f, "audited at: {}", self.audited_at)
    }
}

/// One revision, as the certificate names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertifiedRevision {
    pub hash: RevisionHash,
    /// When the polls bucket stored it, nanoseconds since the Unix epoch, by the clock of its
    /// stream's leader: the next revision's time ends a revision's life
    /// ([`PollBook::superseded`]).
    pub written_ns: i64,
}

/// A published record's files, as read: `events.csv` as a reader, since it can be large.
pub struct RecordFiles {
    pub certificate: Vec<u8>,
    /// `None` when there is no `certificate.sig`.
    pub signature: Option<String>,
    pub events: Box<dyn std::io::BufRead>,
    pub ballots: String,
    pub revisions: BTreeMap<Revision, String>,
}

impl fmt::Debug for RecordFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordFiles")
            .field("certificate", &String::from_utf8_lossy(&self.certificate))
            .field("signature", &self.signature)
            .field("events", &"(a reader)")
            .field("ballots", &self.ballots)
            .field("revisions", &self.revisions)
            .finish()
    }
}

/// Why a record does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

fn refused(why: impl Into<String>) -> Refused {
    Refused(why.into())
}

/// What became of the vote a receipt names, by the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiptFinding {
    /// No event of the record has the receipt's event id.
    Missing,
    /// The record's event with that id has another stamp than the receipt.
    Differs { sequence: u64 },
    /// It is its voter's counted vote.
    Counted { sequence: u64 },
    /// It counts, and a later vote of the same voter replaced it.
    Superseded { sequence: u64 },
    /// The judge refused it (the reason's label, as the dead letters give it).
    NotCounted { sequence: u64, reason: &'static str },
}

impl fmt::Display for ReceiptFinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing => f.write_str(
                "NOT IN THE RECORD: no event of the record has this receipt's event id; report it \
                 with the receipt",
            ),
            Self::Differs { sequence } => write!(
                f,
                "DIFFERS: the record's event with this id (sequence {sequence}) has another \
                 stamp than the receipt; report it with the receipt"
            ),
            Self::Counted { sequence } => {
                write!(f, "in the record (sequence {sequence}): counted")
            }
            Self::Superseded { sequence } => write!(
                f,
                "in the record (sequence {sequence}): replaced by a later vote of the same voter"
            ),
            Self::NotCounted { sequence, reason } => {
                write!(
                    f,
                    "in the record (sequence {sequence}): not counted ({reason})"
                )
            }
        }
    }
}

/// A record that verified: every step of the module's checks passed.
#[derive(Debug, Clone)]
pub struct Verified {
    pub certificate: Certificate,
    pub owner_key: OwnerKey,
    /// The earliest revision that defines the poll with [`Verified::owner_key`].
    pub key_revision: Revision,
    /// Events the judge refused, by reason.
    pub not_counted: BTreeMap<&'static str, u64>,
    /// What became of the receipt's vote, when one was given.
    pub receipt: Option<ReceiptFinding>,
}

impl fmt::Display for Verified {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.certificate;
        writeln!(f, "record of poll {} ({}): VERIFIED", c.poll, c.question)?;
        writeln!(
            f,
            "signed by {} (the owner key of the poll since revision {}; compare it with the \
             key the owner published)",
            self.owner_key, self.key_revision
        )?;
        writeln!(
            f,
            "status: {}{}",
            c.status,
            c.closes_at
                .as_ref()
                .map(|t| format!(", closed at {t}"))
                .unwrap_or_default()
        )?;
        let refused: u64 = self.not_counted.values().sum();
        let reasons: Vec<String> = self
            .not_counted
            .iter()
            .map(|(reason, n)| format!("{reason} {n}"))
            .collect();
        writeln!(
            f,
            "events: {} (stream {}, sequences {} to {}), chained to {}; not counted: {refused}{}",
            c.events,
            c.stream,
            c.first_sequence,
            c.last_sequence,
            c.event_log_head,
            if reasons.is_empty() {
                String::new()
            } else {
                format!(" ({})", reasons.join(", "))
            }
        )?;
        let counts: Vec<String> = c.counts.iter().map(|(o, n)| format!("{o} {n}")).collect();
        write!(
            f,
            "ballots: {}; counts: {}: recomputed from the events, as certified",
            c.ballots,
            counts.join(", ")
        )?;
        if let Some(receipt) = &self.receipt {
            write!(f, "\nreceipt: {receipt}")?;
        }
        Ok(())
    }
}

/// Checks a record, every step of the module's list, and what became of `receipt`'s vote.
/// `events.csv` is read line by line from `files.events`, never whole: a poll of millions of
/// events needs memory for its ballots only.
pub fn check(files: RecordFiles, receipt: Option<&Receipt>) -> Result<Verified, Refused> {
    let RecordFiles {
        certificate: certificate_bytes,
        signature,
        events,
        ballots,
        revisions: texts,
    } = files;
    let certificate: Certificate = serde_json::from_slice(&certificate_bytes)
        .map_err(|e| refused(format!("{CERTIFICATE_FILE} is not a certificate: {e}")))?;
    if certificate.format != FORMAT {
        return Err(refused(format!(
            "{CERTIFICATE_FILE} is of format {:?}; this release reads {FORMAT:?}",
            certificate.format
        )));
    }
    // 3. The revisions, bound by hash; then the book the judge reads.
    let book = revisions(&texts, &certificate)?;
    // 1, 2. Who signed, and the signature.
    let (owner_key, key_revision) = signer(
        &book,
        &certificate,
        &certificate_bytes,
        signature.as_deref(),
    )?;
    // 4–6. The event log: chained, in order, judged and folded.
    let fold = fold(events, &certificate, &book, owner_key, receipt)?;
    // 7. The result.
    let receipt = fold.receipt_finding(receipt);
    result(&certificate, &book, &fold.ballots, &ballots)?;
    Ok(Verified {
        certificate,
        owner_key,
        key_revision,
        not_counted: fold.not_counted,
        receipt,
    })
}

/// Steps 1 and 2: the owner key the revisions name for the certificate's poll, the earliest
/// revision that names it, and its signature of the certificate's bytes.
fn signer(
    book: &PollBook,
    certificate: &Certificate,
    certificate_bytes: &[u8],
    signature: Option<&str>,
) -> Result<(OwnerKey, Revision), Refused> {
    let poll = &certificate.poll;
    let (owner_key, key_revision) = owner_key(book, poll)?.ok_or_else(|| {
        refused(format!(
            "no revision of the poll definitions names an owner key for poll {poll}: nothing \
             says who may sign its record"
        ))
    })?;
    if certificate.owner_key != Some(owner_key) {
        return Err(refused(format!(
            "{CERTIFICATE_FILE} names owner key {}, the poll's definitions {owner_key}",
            certificate
                .owner_key
                .map_or_else(|| "none".to_owned(), |k| k.to_string())
        )));
    }
    let signature = signature.ok_or_else(|| {
        refused(format!(
            "there is no {SIGNATURE_FILE}: the record is unsigned"
        ))
    })?;
    owner_key
        .verify(certificate_bytes, signature)
        .map_err(|e| refused(format!("{SIGNATURE_FILE}: {e}")))?;
    Ok((owner_key, key_revision))
}

/// What steps 4 to 6 found in the event log.
struct Folded {
    /// Each voter's counted event.
    ballots: HashMap<Pseudonym, RecordedEvent>,
    not_counted: BTreeMap<&'static str, u64>,
    /// The receipt's event: its sequence and how the judge took it; `None` when absent.
    receipt: Option<(u64, Result<(), &'static str>)>,
    /// The receipt's event has another stamp or poll than the receipt.
    receipt_differs: bool,
}

impl Folded {
    /// What became of the receipt's vote, by the folded log.
    fn receipt_finding(&self, receipt: Option<&Receipt>) -> Option<ReceiptFinding> {
        let receipt = receipt?;
        Some(match self.receipt {
            None => ReceiptFinding::Missing,
            Some((sequence, _)) if self.receipt_differs => ReceiptFinding::Differs { sequence },
            Some((sequence, Err(reason))) => ReceiptFinding::NotCounted { sequence, reason },
            Some((sequence, Ok(()))) => {
                if self
                    .ballots
                    .values()
                    .any(|b| b.event_id == receipt.event_id)
                {
                    ReceiptFinding::Counted { sequence }
                } else {
                    ReceiptFinding::Superseded { sequence }
                }
            }
        })
    }
}

/// Steps 4 to 6: reads `events.csv` line by line, chains every line, checks the order, judges
/// each event and keeps each voter's greatest counted one.
fn fold(
    mut events: impl std::io::BufRead,
    certificate: &Certificate,
    book: &PollBook,
    owner_key: OwnerKey,
    receipt: Option<&Receipt>,
) -> Result<Folded, Refused> {
    let poll = &certificate.poll;
    let mut chain = Chain::start(poll);
    let mut line = String::new();
    let mut read = |line: &mut String, at: &dyn Fn() -> String| {
        line.clear();
        events
            .read_line(line)
            .map_err(|e| refused(format!("{}: cannot be read as UTF-8 text: {e}", at())))
    };
    read(&mut line, &|| format!("{EVENTS_FILE} line 1"))?;
    if line != format!("{EVENTS_HEADER}\n") {
        return Err(refused(format!(
            "{EVENTS_FILE} does not start with the header {EVENTS_HEADER}"
        )));
    }
    let mut folded = Folded {
        ballots: HashMap::new(),
        not_counted: BTreeMap::new(),
        receipt: None,
        receipt_differs: false,
    };
    let mut previous = None;
    for n in 2.. {
        let at = || format!("{EVENTS_FILE} line {n}");
        if read(&mut line, &at)? == 0 {
            break;
        }
        let text = line
            .strip_suffix('\n')
            .ok_or_else(|| refused(format!("{} does not end in a newline", at())))?;
        let event = RecordedEvent::parse(text).map_err(|e| refused(format!("{}: {e}", at())))?;
        if previous.is_some_and(|p| event.sequence <= p)
            || event.sequence < certificate.first_sequence
            || event.sequence > certificate.last_sequence
        {
            return Err(refused(format!(
                "{}: sequence {} is out of order or outside {} to {}",
                at(),
                event.sequence,
                certificate.first_sequence,
                certificate.last_sequence
            )));
        }
        previous = Some(event.sequence);
        chain.push(&line);
        let judged = book.judge(&event.terms(poll), event.stored_at());
        if let Some(receipt) = receipt.filter(|r| r.event_id == event.event_id) {
            folded.receipt = Some((event.sequence, judged.as_ref().map(|_| ()).map_err(label)));
            folded.receipt_differs = receipt.ts != event.ts || &receipt.poll != poll;
        }
        match judged {
            Err(why) => *folded.not_counted.entry(label(&why)).or_default() += 1,
            // A vote accepted before the poll named its owner: the owner cannot vouch for it.
            Ok(definition) if definition.owner_key != Some(owner_key) => {
                return Err(refused(format!(
                    "{}: the vote counts under a revision that names no owner key {owner_key} \
                     for poll {poll}; the key must be published before the poll opens",
                    at()
                )));
            }
            Ok(_) => match folded.ballots.entry(event.voter.clone()) {
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(event);
                }
                std::collections::hash_map::Entry::Occupied(mut slot) => {
                    if event.order_key() > slot.get().order_key() {
                        slot.insert(event);
                    }
                }
            },
        }
    }
    if chain.lines() != certificate.events || chain.head() != certificate.event_log_head {
        return Err(refused(format!(
            "{EVENTS_FILE} is not the certified event log: {} lines chained to {}, the \
             certificate says {} lines chained to {}",
            chain.lines(),
            chain.head(),
            certificate.events,
            certificate.event_log_head
        )));
    }
    Ok(folded)
}

/// Step 7: the ballots the events fold into are `ballots.csv`, its digest and the counts the
/// certificate's.
fn result(
    certificate: &Certificate,
    book: &PollBook,
    ballots: &HashMap<Pseudonym, RecordedEvent>,
    ballots_csv: &str,
) -> Result<(), Refused> {
    let poll = &certificate.poll;
    let options = book
        .latest()
        .1
        .get(poll.as_str())
        .ok_or_else(|| refused(format!("the latest revision does not define poll {poll}")))?
        .options
        .iter()
        .map(|o| (o.id.to_string(), 0));
    let mut counts: BTreeMap<String, i64> = options.collect();
    let lines: Vec<String> = ballots
        .values()
        .map(|b| {
            *counts.entry(b.choice.to_string()).or_default() += 1;
            ballot_line(&b.voter, &b.choice, b.event_id, b.ts)
        })
        .collect();
    if ballots_file(lines) != ballots_csv {
        return Err(refused(format!(
            "{BALLOTS_FILE} is not the ballots the events fold into ({} ballots recomputed)",
            ballots.len()
        )));
    }
    if digest(ballots_csv.as_bytes()) != certificate.digest {
        return Err(refused(format!(
            "{BALLOTS_FILE} is not the certified one: its digest differs"
        )));
    }
    if counts != certificate.counts || ballots.len() as u64 != certificate.ballots {
        return Err(refused(format!(
            "the certificate's counts ({:?}, {} ballots) are not the events' ({counts:?}, {} \
             ballots)",
            certificate.counts,
            certificate.ballots,
            ballots.len()
        )));
    }
    Ok(())
}

/// The reason an event is not counted, as the dead letters name it.
fn label(why: &Unjudged) -> &'static str {
    why.label().unwrap_or("unknown_revision")
}

/// Step 3: the revision files, each the text the certificate names by hash, 1 to N.
fn revisions(
    texts: &BTreeMap<Revision, String>,
    certificate: &Certificate,
) -> Result<PollBook, Refused> {
    let numbers: Vec<Revision> = texts.keys().copied().collect();
    let certified: Vec<Revision> = certificate.revisions.keys().copied().collect();
    if numbers != certified {
        return Err(refused(format!(
            "{REVISIONS_DIR}/ holds revisions {numbers:?}, the certificate names {certified:?}"
        )));
    }
    if numbers
        .iter()
        .zip(1..)
        .any(|(revision, expected)| revision.0 != expected)
    {
        return Err(refused(format!(
            "the revisions are not 1 to N without a gap: {numbers:?}"
        )));
    }
    let mut read = Vec::with_capacity(texts.len());
    for (revision, text) in texts {
        let hash = RevisionHash::of(text);
        let Some(certified) = certificate
            .revisions
            .get(revision)
            .filter(|c| c.hash == hash)
        else {
            return Err(refused(format!(
                "{REVISIONS_DIR}/{} is not the certified text of revision {revision}",
                revision_file(*revision)
            )));
        };
        let polls = Polls::from_toml(text).map_err(|e| {
            refused(format!(
                "{REVISIONS_DIR}/{} is not a polls file: {e}",
                revision_file(*revision)
            ))
        })?;
        read.push(ReadRevision {
            revision: *revision,
            polls,
            hash,
            written: Some(DateTime::from_timestamp_nanos(certified.written_ns)),
        });
    }
    PollBook::of(read).ok_or_else(|| refused(format!("{REVISIONS_DIR}/ holds no revision")))
}

/// Step 1: the poll's owner key and the earliest revision that names it; `None` when no
/// revision names one. Every later revision that defines the poll must name the same key.
pub fn owner_key(book: &PollBook, poll: &PollId) -> Result<Option<(OwnerKey, Revision)>, Refused> {
    let mut key: Option<(OwnerKey, Revision)> = None;
    for (revision, polls) in book.revisions() {
        let Some(definition) = polls.get(poll.as_str()) else {
            continue;
        };
        match (key, definition.owner_key) {
            (None, named) => key = named.map(|named| (named, revision)),
            (Some((first, _)), named) if named != Some(first) => {
                return Err(refused(format!(
                    "revision {revision} of the poll definitions names {} as the owner key of \
                     poll {poll}, not {first} as the earlier revisions",
                    named.map_or_else(|| "none".to_owned(), |k| k.to_string())
                )));
            }
            (Some(_), _) => {}
        }
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> RecordedEvent {
        RecordedEvent {
            sequence: 7,
            stored_ns: 1_765_000_000_123_456_789,
            voter: Pseudonym::from_mac(&[0xab; 32]),
            choice: Choice::parse("cats").unwrap(),
            ts: Timestamp(115_000_000_000_000_001),
            after: Some(Timestamp(114_000_000_000_000_000)),
            rev: Some(Revision(2)),
            rev_hash: Some(RevisionHash::of("text")),
            event_id: EventId(uuid::Uuid::from_u128(0x1234)),
        }
    }

    #[test]
    fn an_event_line_reads_back_as_written_and_refuses_other_spellings() {
        for event in [
            event(),
            RecordedEvent {
                after: None,
                rev: None,
                rev_hash: None,
                ..event()
            },
        ] {
            let line = event.line();
            assert_eq!(
                RecordedEvent::parse(line.strip_suffix('\n').unwrap()),
                Ok(event)
            );
        }
        let line = event().line();
        let line = line.trim_end();
        for bad in [
            line.replacen("7,", "07,", 1),
            line.replacen("7,", "+7,", 1),
            line.replacen(",cats,", ",ca ts,", 1),
            line.replacen("abab", "ABAB", 1),
            format!("{line},"),
            line.replace(
                "00000000-0000-0000-0000-000000001234",
                "00000000000000000000000000001234",
            ),
        ] {
            assert!(RecordedEvent::parse(&bad).is_err(), "{bad:?} was read");
        }
    }

    #[test]
    fn a_signature_verifies_under_its_key_only_and_over_its_bytes_only() {
        let owner = OwnerSigningKey::from_seed([7; 32]);
        let other = OwnerSigningKey::from_seed([8; 32]);
        let signature = owner.sign(b"certificate");
        assert!(owner.public().verify(b"certificate", &signature).is_ok());
        assert!(owner.public().verify(b"certificatE", &signature).is_err());
        assert!(other.public().verify(b"certificate", &signature).is_err());
        let text = owner.to_file_text();
        assert_eq!(
            OwnerSigningKey::from_file_text(&text).unwrap().public(),
            owner.public()
        );
        assert!(
            !format!("{owner:?}").contains(&text[15..]),
            "the secret is printed"
        );
        let public = owner.public().to_string();
        assert_eq!(OwnerKey::try_from(public.clone()).unwrap(), owner.public());
        assert!(OwnerKey::try_from(public.to_uppercase()).is_err());
    }

    const KEYLESS: &str = "[[poll]]\nid = \"pets\"\nquestion = \"Cats or dogs?\"\n\
        options = [{ id = \"cats\", label = \"Cats\" }, { id = \"dogs\", label = \"Dogs\" }]\n";

    fn owned(key: &OwnerSigningKey) -> String {
        format!("{KEYLESS}owner_key = \"{}\"\n", key.public())
    }

    /// When the bucket stored revision `n` in these records: a second before the first vote.
    fn written_ns(n: u64) -> i64 {
        EVENTS_FROM_NS - 1_000_000_000 + i64::try_from(n).unwrap()
    }

    /// When the stream stored the vote of sequence 0 in these records.
    const EVENTS_FROM_NS: i64 = 1_765_000_000_000_000_000;

    /// A vote of `voter` (one byte of pseudonym) under revision `rev`.
    fn vote(
        sequence: u64,
        voter: u8,
        choice: &str,
        after: u64,
        rev: u64,
        text: &str,
    ) -> RecordedEvent {
        RecordedEvent {
            sequence,
            stored_ns: EVENTS_FROM_NS + i64::try_from(sequence).unwrap(),
            voter: Pseudonym::from_mac(&[voter; 32]),
            choice: Choice::parse(choice).unwrap(),
            ts: Timestamp::from_millis(1_765_000_000_000 - sequence * 10_000),
            after: Some(Timestamp(after)),
            rev: Some(Revision(rev)),
            rev_hash: Some(RevisionHash::of(text)),
            event_id: EventId(uuid::Uuid::from_u128(u128::from(sequence))),
        }
    }

    /// The record of `events` under `revisions`, with `ballots` (event indexes) as its ballots,
    /// signed by `key`.
    fn record(
        revisions: &[&str],
        events: &[RecordedEvent],
        ballots: &[usize],
        key: &OwnerSigningKey,
    ) -> RecordFiles {
        let poll = PollId::parse("pets").unwrap();
        let mut chain = Chain::start(&poll);
        let mut log = format!("{EVENTS_HEADER}\n");
        for event in events {
            chain.push(&event.line());
            log.push_str(&event.line());
        }
        let mut counts = BTreeMap::from([("cats".to_owned(), 0), ("dogs".to_owned(), 0)]);
        let lines = ballots
            .iter()
            .map(|&i| {
                let e = &events[i];
                *counts.get_mut(e.choice.as_str()).unwrap() += 1;
                ballot_line(&e.voter, &e.choice, e.event_id, e.ts)
            })
            .collect();
        let ballots_csv = ballots_file(lines);
        let certificate = Certificate {
            format: FORMAT.to_owned(),
            poll,
            question: "Cats or dogs?".to_owned(),
            status: "final".to_owned(),
            closes_at: None,
            counts,
            ballots: ballots.len() as u64,
            digest: digest(ballots_csv.as_bytes()),
            events: chain.lines(),
            event_log_head: chain.head(),
            revisions: (1..)
                .zip(revisions)
                .map(|(n, text)| {
                    let certified = CertifiedRevision {
                        hash: RevisionHash::of(text),
                        written_ns: written_ns(n),
                    };
                    (Revision(n), certified)
                })
                .collect(),
            owner_key: Some(key.public()),
            events_read: events.len() as u64,
            stream: "VOTES".to_owned(),
            first_sequence: 1,
            last_sequence: events.len() as u64,
            dead_letters: 0,
            audited_at: "2026-12-06T20:00:00.000Z".to_owned(),
        };
        let json = serde_json::to_vec_pretty(&certificate).unwrap();
        RecordFiles {
            signature: Some(key.sign(&json)),
            certificate: json,
            events: Box::new(std::io::Cursor::new(log.into_bytes())),
            ballots: ballots_csv,
            revisions: (1..)
                .zip(revisions)
                .map(|(n, text)| (Revision(n), (*text).to_owned()))
                .collect(),
        }
    }

    #[test]
    fn a_record_verifies_with_the_voters_latest_vote_lost_answers_included() {
        let key = OwnerSigningKey::from_seed([1; 32]);
        let text = owned(&key);
        // Voter 1: cats, then dogs without having seen the first answer (the same `after`),
        // stamped lower by a node whose clock is behind: the later stored wins. Voter 2: one vote
        // of an option the poll lacks, not counted.
        let events = [
            vote(1, 1, "cats", 0, 1, &text),
            vote(2, 1, "dogs", 0, 1, &text),
            vote(3, 2, "birds", 0, 1, &text),
        ];
        let files = record(&[&text], &events, &[1], &key);
        let verified = check(files, None).unwrap();
        assert_eq!(verified.certificate.counts["dogs"], 1);
        assert_eq!(
            verified.not_counted,
            BTreeMap::from([("unknown_option", 1)])
        );
        assert_eq!(verified.key_revision, Revision(1));
        // The earlier vote as the ballot: refused.
        let files = record(&[&text], &events, &[0], &key);
        assert!(check(files, None).unwrap_err().0.contains("ballots.csv"));
        // The log read as a stream: a last line cut short, or bytes that are no text.
        let log = |files: &mut RecordFiles| {
            let mut text = String::new();
            files.events.read_to_string(&mut text).unwrap();
            text
        };
        let mut cut = record(&[&text], &events, &[1], &key);
        let whole = log(&mut cut);
        cut.events = Box::new(std::io::Cursor::new(whole.trim_end().to_owned()));
        let refused = check(cut, None).unwrap_err().0;
        assert!(
            refused.contains("line 4 does not end in a newline"),
            "{refused}"
        );
        let mut binary = record(&[&text], &events, &[1], &key);
        let mut bytes = log(&mut binary).into_bytes();
        bytes.extend([0xff, b'\n']);
        binary.events = Box::new(std::io::Cursor::new(bytes));
        let refused = check(binary, None).unwrap_err().0;
        assert!(refused.contains("line 5: cannot be read"), "{refused}");
        // Signed by another key than the poll's.
        let files = record(
            &[&text],
            &events,
            &[1],
            &OwnerSigningKey::from_seed([2; 32]),
        );
        assert!(check(files, None).is_err());
    }

    #[test]
    fn the_owner_must_be_named_before_a_vote_counts_and_never_changed() {
        let key = OwnerSigningKey::from_seed([1; 32]);
        let owned = owned(&key);
        // A vote counted under revision 1, which names no owner: the owner cannot vouch for it.
        let files = record(
            &[KEYLESS, &owned],
            &[
                vote(1, 1, "cats", 0, 1, KEYLESS),
                vote(2, 2, "dogs", 0, 2, &owned),
            ],
            &[0, 1],
            &key,
        );
        let refused = check(files, None).unwrap_err().0;
        assert!(refused.contains("names no owner key"), "{refused}");
        // Named from revision 2 on, every counted vote under it: verified.
        let files = record(
            &[KEYLESS, &owned],
            &[vote(1, 2, "dogs", 0, 2, &owned)],
            &[0],
            &key,
        );
        assert_eq!(check(files, None).unwrap().key_revision, Revision(2));
        // A later revision that names another owner.
        let other = owned.replace(
            &key.public().to_string(),
            &OwnerSigningKey::from_seed([3; 32]).public().to_string(),
        );
        let files = record(
            &[&owned, &other],
            &[vote(1, 1, "dogs", 0, 1, &owned)],
            &[0],
            &key,
        );
        let refused = check(files, None).unwrap_err().0;
        assert!(refused.contains("not ed25519"), "{refused}");
    }

    #[test]
    fn a_vote_under_a_revision_superseded_for_longer_than_the_overlap_is_not_counted() {
        let key = OwnerSigningKey::from_seed([1; 32]);
        let (one, two) = (owned(&key), format!("{}# the second\n", owned(&key)));
        let overlap = i64::try_from(crate::poll::REVISION_OVERLAP.as_nanos()).unwrap();
        let mut late = vote(2, 2, "dogs", 0, 1, &one);
        late.stored_ns = written_ns(2) + overlap;
        let mut last_moment = vote(3, 3, "dogs", 0, 1, &one);
        last_moment.stored_ns = written_ns(2) + overlap - 1;
        let events = [vote(1, 1, "cats", 0, 2, &two), late, last_moment];
        let verified = check(record(&[&one, &two], &events, &[0, 2], &key), None).unwrap();
        assert_eq!(verified.not_counted, BTreeMap::from([("superseded", 1)]));
        // Counting it anyway is refused.
        let counted = record(&[&one, &two], &events, &[0, 1, 2], &key);
        assert!(check(counted, None).unwrap_err().0.contains("ballots.csv"));
        // So is moving revision 2's write time, which the signature covers.
        let mut moved = record(&[&one, &two], &events, &[0, 2], &key);
        let text = String::from_utf8(moved.certificate.clone()).unwrap();
        moved.certificate = text
            .replace(&written_ns(2).to_string(), &written_ns(3).to_string())
            .into_bytes();
        assert!(check(moved, None).unwrap_err().0.contains("signature"));
    }

    #[test]
    fn the_chain_depends_on_the_poll_every_line_and_their_order() {
        let poll = PollId::parse("pets").unwrap();
        let chained = |lines: &[&str], poll: &PollId| {
            let mut chain = Chain::start(poll);
            lines.iter().for_each(|l| chain.push(l));
            chain.head()
        };
        let head = chained(&["a\n", "b\n"], &poll);
        assert_ne!(head, chained(&["b\n", "a\n"], &poll));
        assert_ne!(head, chained(&["a\n", "c\n"], &poll));
        assert_ne!(
            head,
            chained(&["a\n", "b\n"], &PollId::parse("birds").unwrap())
        );
        assert_eq!(head, chained(&["a\n", "b\n"], &poll));
    }
}
