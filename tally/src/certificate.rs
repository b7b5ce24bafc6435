//! The certified result of one poll: `landslide audit --poll ID` prints it, and `landslide export
//! --poll ID --out DIR` writes it as `certificate.json` beside the ballots it certifies,
//! `ballots.csv`.
//!
//! # What anyone can recompute from the export
//!
//! `ballots.csv` is one header line, `voter,choice,event_id,ts`, then one line per ballot, sorted
//! by `voter`, each ending in `\n`, nothing quoted (every field is an identifier, a UUID or a
//! number). `voter` is a pseudonym: the hex HMAC-SHA256, keyed with `LANDSLIDE_EXPORT_KEY`, of
//! `landslide-export-v1`, the poll id, a `\0` and the voter id's 16 bytes; the key stays with the
//! poll's owner, so the file names no voter, and the same voter gets the same pseudonym in every
//! export made with that key. `event_id` is the vote's receipt: a voter finds their own line by
//! it. The certificate's `digest` is `sha256:` and the hex SHA-256 of the file's bytes, so
//! `sha256sum ballots.csv` checks it, and counting the lines per choice checks `counts`.

use std::collections::BTreeMap;
use std::fmt;

use anyhow::Context as _;
use chrono::{SecondsFormat, Utc};
use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Text, Uuid as SqlUuid};
use diesel_async::RunQueryDsl as _;
use hmac::{Hmac, Mac as _};
use landslide_schema::poll::Window;
use landslide_schema::{Choice, PollId};
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::audit::{AuditConfig, AuditReport, audit_with_polls};

/// The key that pseudonymises voter ids in an export (`LANDSLIDE_EXPORT_KEY`): at least 32
/// bytes, never written anywhere.
#[derive(Clone)]
pub struct ExportKey(Vec<u8>);

impl fmt::Debug for ExportKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ExportKey(…)")
    }
}

impl ExportKey {
    pub const MIN_LEN: usize = 32;

    pub fn new(key: impl Into<Vec<u8>>) -> anyhow::Result<Self> {
        let key = key.into();
        anyhow::ensure!(
            key.len() >= Self::MIN_LEN,
            "LANDSLIDE_EXPORT_KEY must be at least {} bytes long (it pseudonymises the voters of \
             an export)",
            Self::MIN_LEN
        );
        Ok(Self(key))
    }

    /// The pseudonym of `voter` in poll `poll`.
    fn pseudonym(&self, poll: &PollId, voter: uuid::Uuid) -> String {
        // Any key length is valid for HMAC.
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(b"landslide-export-v1");
        mac.update(poll.as_str().as_bytes());
        mac.update(b"\0");
        mac.update(voter.as_bytes());
        format!("{:x}", mac.finalize().into_bytes())
    }
}

/// What is certified about one poll.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Certificate {
    pub poll: PollId,
    pub question: String,
    /// `final`: closed by the NATS server's clock, nothing pending, and the audit consistent.
    /// Otherwise why not: `open`, `not_open`, `inconsistent`.
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub closes_at: Option<String>,
    /// Ballots per option, every option present.
    pub counts: BTreeMap<String, i64>,
    pub ballots: u64,
    /// Messages of the votes stream read by the audit (every poll's), and their sequences.
    pub events_read: u64,
    pub stream: String,
    pub first_sequence: u64,
    pub last_sequence: u64,
    /// Messages in the dead-letter stream (every poll's): none of them is a vote an ingest node
    /// accepted, or the audit would not be consistent.
    pub dead_letters: u64,
    /// `sha256:` and the hex SHA-256 of `ballots.csv` (see the module documentation).
    pub digest: String,
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
        writeln!(f, "digest of ballots.csv: {}", self.digest)?;
        write!(f, "audited at: {}", self.audited_at)
    }
}

#[derive(QueryableByName)]
struct Row {
    #[diesel(sql_type = SqlUuid)]
    voter: uuid::Uuid,
    #[diesel(sql_type = Text)]
    choice: String,
    #[diesel(sql_type = SqlUuid)]
    event_id: uuid::Uuid,
    #[diesel(sql_type = BigInt)]
    ts: i64,
}

/// Audits the whole stream and database, then certifies poll `poll`: the audit's report, the
/// certificate, and the `ballots.csv` it certifies.
pub async fn certify(
    config: &AuditConfig,
    poll: &str,
    key: &ExportKey,
) -> anyhow::Result<(AuditReport, Certificate, String)> {
    let (report, book) = audit_with_polls(config).await?;
    let definition = book
        .latest()
        .1
        .get(poll)
        .with_context(|| format!("there is no poll {poll:?} in the latest poll definitions"))?
        .clone();

    let mut conn =
        landslide_schema::postgres::connect_current(config.connections.database()?).await?;
    let rows: Vec<Row> =
        diesel::sql_query("SELECT voter, choice, event_id, ts FROM ballots WHERE poll = $1")
            .bind::<Text, _>(definition.id.as_str())
            .load(&mut conn)
            .await
            .context("cannot read the ballots")?;
    let mut counts: BTreeMap<String, i64> = definition
        .options
        .iter()
        .map(|o| (o.id.to_string(), 0))
        .collect();
    let mut lines = Vec::with_capacity(rows.len());
    for row in &rows {
        // A ballot whose choice is no identifier would break the file's format; the audit
        // reports such a row as inconsistent too.
        let choice = Choice::parse(row.choice.as_str()).with_context(|| {
            format!("a ballot of poll {poll} holds the choice {:?}", row.choice)
        })?;
        *counts.entry(choice.to_string()).or_default() += 1;
        let voter = key.pseudonym(&definition.id, row.voter);
        lines.push(format!("{voter},{choice},{},{}\n", row.event_id, row.ts));
    }
    lines.sort_unstable();
    let mut csv = String::from("voter,choice,event_id,ts\n");
    csv.extend(lines);
    let digest = format!("sha256:{:x}", Sha256::digest(csv.as_bytes()));

    let closed = report
        .server_now
        .is_some_and(|now| definition.window_at(now) == Window::Closed);
    let status = match report.server_now.map(|now| definition.window_at(now)) {
        _ if !report.is_consistent() => "inconsistent",
        Some(Window::NotOpenYet) => "not_open",
        _ if closed => "final",
        _ => "open",
    };
    let certificate = Certificate {
        poll: definition.id.clone(),
        question: definition.question.clone(),
        status,
        closes_at: definition
            .closes_at
            .map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true)),
        counts,
        ballots: rows.len() as u64,
        events_read: report.events_read,
        stream: config.connections.topology.votes_stream.clone(),
        first_sequence: report.first_sequence,
        last_sequence: report.last_sequence,
        dead_letters: report.dead_letters,
        digest,
        audited_at: report
            .server_now
            .unwrap_or_else(Utc::now)
            .to_rfc3339_opts(SecondsFormat::Millis, true),
    };
    Ok((report, certificate, csv))
}
