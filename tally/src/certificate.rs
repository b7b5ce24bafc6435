//! The certified result of one poll: `landslide audit --poll ID` prints its certificate, and
//! `landslide export --poll ID --out DIR` writes its published record, signed by the poll's
//! owner: the event log, the ballots, the revisions and the certificate that binds them, in the
//! format that [`landslide_schema::record`] documents and `landslide verify` checks.
//!
//! The event log is written as the audit reads the stream (one line per event of the poll,
//! never all in memory); the ballots are read from PostgreSQL, so that `verify`, folding the
//! log, checks what the workers committed, not a second copy of the audit's own fold.
//!
//! Pseudonyms: the hex HMAC-SHA256, keyed with `LANDSLIDE_EXPORT_KEY`, of `landslide-export-v1`,
//! the poll id, a `\0` and the voter id's 16 bytes. The key stays with the poll's owner, so the
//! files name no voter, and the same voter gets the same pseudonym in every export made with
//! that key.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write as _};
use std::path::Path;

use anyhow::Context as _;
use chrono::{DateTime, SecondsFormat, Utc};
use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Text, Uuid as SqlUuid};
use diesel_async::RunQueryDsl as _;
use hmac::{Hmac, Mac as _};
use landslide_nats::{Access, User, polls};
use landslide_schema::poll::Window;
use landslide_schema::record::{
    self, BALLOTS_FILE, CERTIFICATE_FILE, Certificate, CertifiedRevision, Chain, EVENTS_FILE,
    EVENTS_HEADER, OwnerSigningKey, Pseudonym, REVISIONS_DIR, RecordFiles, RecordedEvent,
    SIGNATURE_FILE,
};
use landslide_schema::{
    Choice, EventId, PollBook, PollId, Revision, RevisionHash, Timestamp, VoteEvent,
};
use secrecy::{ExposeSecret as _, SecretSlice};
use sha2::Sha256;

use crate::audit::{AuditConfig, AuditReport, audit_with_polls};

/// The key that pseudonymises voter ids in an export (`LANDSLIDE_EXPORT_KEY`): at least 32
/// bytes, never written anywhere (a [`SecretSlice`]: its `Debug` shows none of it).
#[derive(Debug, Clone)]
pub struct ExportKey(SecretSlice<u8>);

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
        Ok(Self(key.into()))
    }

    /// The pseudonym of `voter` in poll `poll`.
    fn pseudonym(&self, poll: &PollId, voter: uuid::Uuid) -> Pseudonym {
        // Any key length is valid for HMAC.
        let mut mac = Hmac::<Sha256>::new_from_slice(self.0.expose_secret())
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(b"landslide-export-v1");
        mac.update(poll.as_str().as_bytes());
        mac.update(b"\0");
        mac.update(voter.as_bytes());
        Pseudonym::from_mac(&mac.finalize().into_bytes().into())
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

/// Where and how to write a poll's record.
#[derive(Debug, Clone, Copy)]
pub struct Export<'a> {
    /// The folder (created if missing).
    pub out: &'a Path,
    /// The owner's key, required when the poll names an owner key (it must be that key's).
    pub signing: Option<&'a OwnerSigningKey>,
}

/// The events of one poll as the audit reads them: chained, and written to `events.csv` when
/// exporting.
pub(crate) struct EventLog {
    poll: PollId,
    key: ExportKey,
    chain: Chain,
    out: Option<BufWriter<File>>,
}

impl EventLog {
    /// Adds `event` if it is of this log's poll.
    pub(crate) fn push(
        &mut self,
        sequence: u64,
        stored_at: DateTime<Utc>,
        event: &VoteEvent,
    ) -> anyhow::Result<()> {
        if event.poll != self.poll {
            return Ok(());
        }
        let line = RecordedEvent {
            sequence,
            stored_ns: stored_at.timestamp_nanos_opt().unwrap_or(i64::MAX),
            voter: self.key.pseudonym(&self.poll, event.voter.0),
            choice: event.choice.clone(),
            ts: event.ts,
            after: event.after,
            rev: event.rev,
            rev_hash: event.rev_hash,
            event_id: event.event_id,
        }
        .line();
        self.chain.push(&line);
        if let Some(out) = &mut self.out {
            out.write_all(line.as_bytes())
                .with_context(|| format!("cannot write {EVENTS_FILE}"))?;
        }
        Ok(())
    }
}

/// Audits the whole stream and database, then certifies poll `poll`: the audit's report and the
/// certificate; with `export`, writes the poll's record too (and signs it).
pub async fn certify(
    config: &AuditConfig,
    poll: &str,
    key: &ExportKey,
    export: Option<Export<'_>>,
) -> anyhow::Result<(AuditReport, Certificate)> {
    let poll_id = PollId::parse(poll).with_context(|| format!("{poll:?} is no poll id"))?;
    // A signing key that cannot sign this poll's record is refused before the audit reads the
    // whole stream (and again after, by the revisions the audit judged by).
    if let Some(export) = &export {
        let client =
            landslide_nats::connect(&config.connections.nats, User::Audit, "landslide-export")
                .await?;
        let js = async_nats::jetstream::new(client);
        let store =
            polls::ensure_bucket(&js, &config.connections.topology, Access::ReadOnly).await?;
        let book = polls::load(&store, &config.connections.polls, Access::ReadOnly).await?;
        can_sign(&book, &poll_id, export.signing)?;
    }
    let mut log = EventLog {
        poll: poll_id.clone(),
        key: key.clone(),
        chain: Chain::start(&poll_id),
        out: None,
    };
    if let Some(export) = export {
        let dir = export.out.join(REVISIONS_DIR);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let path = export.out.join(EVENTS_FILE);
        let file =
            File::create(&path).with_context(|| format!("cannot write {}", path.display()))?;
        let mut out = BufWriter::new(file);
        writeln!(out, "{EVENTS_HEADER}").with_context(|| format!("cannot write {EVENTS_FILE}"))?;
        log.out = Some(out);
    }
    let (report, book) = audit_with_polls(config, Some(&mut log)).await?;
    if let Some(mut out) = log.out.take() {
        out.flush()
            .with_context(|| format!("cannot write {EVENTS_FILE}"))?;
    }
    let definition = book
        .latest()
        .1
        .get(poll)
        .with_context(|| format!("there is no poll {poll:?} in the latest poll definitions"))?
        .clone();
    let owner_key = record::owner_key(&book, &poll_id)?.map(|(key, _)| key);
    if let Some(export) = &export {
        can_sign(&book, &poll_id, export.signing)?;
    }

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
        lines.push(record::ballot_line(
            &voter,
            &choice,
            EventId(row.event_id),
            Timestamp::from_i64(row.ts),
        ));
    }
    let ballots = record::ballots_file(lines);

    let mut revisions = BTreeMap::new();
    for (revision, _) in book.revisions() {
        let read = |what| format!("the {what} of revision {revision} was not read");
        let certified = CertifiedRevision {
            hash: book.hash(revision).with_context(|| read("text"))?,
            written_ns: book
                .written(revision)
                .and_then(|at| at.timestamp_nanos_opt())
                .with_context(|| read("write time"))?,
        };
        revisions.insert(revision, certified);
    }

    // Tally's rule ([`crate::snapshot::Status::of`]), with nothing pending: the audit waited
    // until the workers had drained.
    let status = match report.server_now {
        _ if !report.is_consistent() => "inconsistent",
        Some(now) if book.window_of(&poll_id, now) == Some(Window::NotOpenYet) => "not_open",
        Some(now) if book.is_over(&poll_id, now) => "final",
        _ => "open",
    };
    // One stream: the audit refuses to write the record of more (`audit_with_polls`).
    let (first_sequence, last_sequence) = match report.streams.as_slice() {
        [read, ..] => (read.first_sequence, read.last_sequence),
        [] => (0, 0),
    };
    let certificate = Certificate {
        format: record::FORMAT.to_owned(),
        poll: definition.id.clone(),
        question: definition.question.clone(),
        status: status.to_owned(),
        closes_at: definition
            .closes_at
            .map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true)),
        counts,
        ballots: rows.len() as u64,
        digest: record::digest(ballots.as_bytes()),
        events: log.chain.lines(),
        event_log_head: log.chain.head(),
        revisions,
        owner_key,
        events_read: report.events_read,
        stream: config.connections.topology.votes_stream.clone(),
        first_sequence,
        last_sequence,
        dead_letters: report.dead_letters,
        audited_at: report
            .server_now
            .unwrap_or_else(Utc::now)
            .to_rfc3339_opts(SecondsFormat::Millis, true),
    };
    if let Some(export) = export {
        write_record(config, &book, &certificate, &ballots, export).await?;
    }
    Ok((report, certificate))
}

/// Whether `signing` (or no key) signs the record of `poll` as `book` says its owner does.
fn can_sign(
    book: &PollBook,
    poll: &PollId,
    signing: Option<&OwnerSigningKey>,
) -> anyhow::Result<()> {
    match (record::owner_key(book, poll)?.map(|(key, _)| key), signing) {
        (Some(named), Some(signing)) if signing.public() != named => anyhow::bail!(
            "the signing key is not the owner key that poll {poll} names ({named}): the record \
             would not verify"
        ),
        (Some(named), None) => anyhow::bail!(
            "poll {poll} names owner key {named}: sign its record with that key's file \
             (--signing-key or LANDSLIDE_SIGNING_KEY_FILE)"
        ),
        (None, Some(_)) => anyhow::bail!(
            "poll {poll} names no owner key, so a signature would prove nothing: put owner_key \
             in its definition (landslide polls put) before it opens"
        ),
        _ => Ok(()),
    }
}

/// Writes the rest of the record beside `events.csv`: the revision texts (as the bucket holds
/// them, each checked against the hash the audit judged by), the ballots, the certificate and
/// its signature.
async fn write_record(
    config: &AuditConfig,
    book: &PollBook,
    certificate: &Certificate,
    ballots: &str,
    export: Export<'_>,
) -> anyhow::Result<()> {
    let write = |name: &str, bytes: &[u8]| {
        let path = export.out.join(name);
        std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))
    };
    let client =
        landslide_nats::connect(&config.connections.nats, User::Audit, "landslide-export").await?;
    let js = async_nats::jetstream::new(client);
    let store = polls::ensure_bucket(&js, &config.connections.topology, Access::ReadOnly).await?;
    let stored = polls::read_all(&store).await?;
    for (revision, _) in book.revisions() {
        let text = stored
            .revisions
            .iter()
            .find(|s| {
                s.revision == revision && book.hash(revision) == Some(RevisionHash::of(&s.text))
            })
            .with_context(|| {
                format!(
                    "the polls bucket no longer holds the text of revision {revision} that the \
                     audit judged by"
                )
            })?;
        write(
            &format!("{REVISIONS_DIR}/{}", record::revision_file(revision)),
            text.text.as_bytes(),
        )?;
    }
    write(BALLOTS_FILE, ballots.as_bytes())?;
    let json = format!("{}\n", serde_json::to_string_pretty(certificate)?);
    write(CERTIFICATE_FILE, json.as_bytes())?;
    if let Some(signing) = export.signing {
        write(SIGNATURE_FILE, signing.sign(json.as_bytes()).as_bytes())?;
    }
    Ok(())
}

/// Reads the record in `dir`, as [`certify`] writes it, for [`record::check`].
pub fn read_record(dir: &Path) -> anyhow::Result<RecordFiles> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))
    };
    let text =
        |name: &str| String::from_utf8(read(name)?).with_context(|| format!("{name} is not UTF-8"));
    let signature = match std::fs::read_to_string(dir.join(SIGNATURE_FILE)) {
        Ok(signature) => Some(signature),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
        Err(err) => return Err(err).with_context(|| format!("cannot read {SIGNATURE_FILE}")),
    };
    let mut revisions = BTreeMap::new();
    let folder = dir.join(REVISIONS_DIR);
    for entry in
        std::fs::read_dir(&folder).with_context(|| format!("cannot read {}", folder.display()))?
    {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        let revision = name
            .strip_suffix(".toml")
            .and_then(|n| n.parse::<u64>().ok())
            .map(Revision)
            .filter(|r| record::revision_file(*r) == name)
            .with_context(|| format!("{REVISIONS_DIR}/{name} is not a revision's file"))?;
        revisions.insert(revision, text(&format!("{REVISIONS_DIR}/{name}"))?);
    }
    Ok(RecordFiles {
        certificate: read(CERTIFICATE_FILE)?,
        signature,
        events: {
            let path = dir.join(EVENTS_FILE);
            let file =
                File::open(&path).with_context(|| format!("cannot read {}", path.display()))?;
            Box::new(std::io::BufReader::new(file))
        },
        ballots: text(BALLOTS_FILE)?,
        revisions,
    })
}
