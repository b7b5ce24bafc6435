//! JetStream for Landslide: the stream and consumer definitions of `nats/*.json`, the code that
//! ensures them at startup, connecting, and trace context carried in message headers.
//!
//! The JSON files in this folder are the single source of the definitions: operators feed them to
//! `nats stream add --config`, and the roles compile them in. [`Topology`] may rename streams and
//! subjects (tests need their own) and set the replica count, nothing else.
//!
//! Never change a definition silently: an existing stream or consumer that differs from its file in
//! any field the file sets stops the role with a message naming each difference.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer, stream};
use async_nats::{HeaderMap, ServerAddr};
use landslide_schema::subject::{DEFAULT_DLQ_PREFIX, DEFAULT_VOTES_PREFIX};
use serde_json::Value;

pub mod auth;
pub mod batch;
pub mod partitions;
pub mod polls;
pub mod rollback;

pub use auth::{Credentials, NatsConfig, User};

/// The broker a role connects to unless told otherwise (`NATS_URL`): one nats-server on this host.
pub const DEFAULT_URL: &str = "nats://127.0.0.1:4222";

/// `nats/votes-stream.json`.
pub const VOTES_STREAM_JSON: &str = include_str!("../votes-stream.json");
/// `nats/votes-dlq-stream.json`.
pub const DLQ_STREAM_JSON: &str = include_str!("../votes-dlq-stream.json");
/// `nats/dedup-worker-consumer.json`.
pub const CONSUMER_JSON: &str = include_str!("../dedup-worker-consumer.json");

/// `nats/nats-server.release`: the pinned nats-server release and the oldest one supported.
pub const RELEASE_FILE: &str = include_str!("../nats-server.release");

/// A nats-server version, `major.minor.patch` (a pre-release suffix is ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServerVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl ServerVersion {
    /// Parses `2.15.1`, `v2.15.1`, `2.12.0-RC.3` or `nats-server: v2.15.1` (what `--version` prints).
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        let text = text.rsplit(' ').next()?.trim_start_matches('v');
        let core = text.split(['-', '+']).next()?;
        let mut parts = core.split('.').map(|p| p.parse::<u32>().ok());
        let version = Self {
            major: parts.next()??,
            minor: parts.next()??,
            patch: parts.next().unwrap_or(Some(0))?,
        };
        parts.next().is_none().then_some(version)
    }

    /// The release every deployment runs (`NATS_SERVER_VERSION`).
    pub fn pinned() -> Self {
        release_value("NATS_SERVER_VERSION")
    }

    /// The oldest release Landslide runs on (`NATS_SERVER_MIN_VERSION`).
    pub fn minimum() -> Self {
        release_value("NATS_SERVER_MIN_VERSION")
    }
}

impl std::fmt::Display for ServerVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

fn release_value(key: &str) -> ServerVersion {
    RELEASE_FILE
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
        .and_then(ServerVersion::parse)
        // The file is compiled in, and a unit test parses both keys.
        .unwrap_or(ServerVersion {
            major: 0,
            minor: 0,
            patch: 0,
        })
}

/// Why a nats-server is refused: older than [`ServerVersion::minimum`].
#[derive(Debug, thiserror::Error)]
#[error(
    "{what} is nats-server {found}, older than {}, the oldest Landslide runs on (it must fsync \
     before it acks, and publish atomic batches); install nats-server {} (scripts/install does, \
     from the official build)",
    ServerVersion::minimum(),
    ServerVersion::pinned()
)]
pub struct TooOld {
    pub what: String,
    pub found: String,
}

/// `Err(TooOld)` unless `found` (as the server or `--version` reports it) is at least the minimum.
pub fn check_version(what: &str, found: &str) -> Result<ServerVersion, TooOld> {
    match ServerVersion::parse(found) {
        Some(version) if version >= ServerVersion::minimum() => Ok(version),
        _ => Err(TooOld {
            what: what.to_owned(),
            found: found.trim().to_owned(),
        }),
    }
}

/// The names a deployment uses. The defaults are those of the JSON files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// The votes stream, `VOTES`.
    pub votes_stream: String,
    /// The first token of vote subjects, `votes` (subjects `votes.<node>`).
    pub votes_prefix: String,
    /// The durable consumer shared by the workers, `dedup-worker`.
    pub consumer: String,
    /// The dead-letter stream, `VOTES_DLQ`.
    pub dlq_stream: String,
    /// The first tokens of dead-letter subjects, `dlq.votes`.
    pub dlq_prefix: String,
    /// Replicas of both streams: 1 on one server, 3 in a cluster (never 2).
    pub replicas: usize,
    /// Overrides the consumer's `ack_wait`: how long an unacked message waits before it is
    /// redelivered to another worker. Tests shorten it to see a crashed worker's messages again.
    pub ack_wait: Option<Duration>,
    /// The key-value bucket of the poll definitions, `LANDSLIDE_POLLS` ([`polls`]).
    pub polls_bucket: String,
    /// How many streams the votes are split over (`--vote-partitions`), 1 to
    /// [`MAX_VOTE_PARTITIONS`]: ingest nodes publish to one each ([`partitions`]).
    pub vote_partitions: u16,
    /// Which partition `votes_stream` and `votes_prefix` name: 0 for the deployment's own names
    /// (`VOTES` on `votes.*`), `i` for [`Topology::partition`]`(i)` (`VOTES_P<i>` on
    /// `votes.p<i>.*`).
    pub partition: u16,
}

/// The most streams the votes may be split over. Each role's NATS permissions name every
/// partition's stream up to it ([`auth`]): a subject permission matches whole tokens, so none
/// can say "every stream whose name begins with VOTES".
pub const MAX_VOTE_PARTITIONS: u16 = 16;

impl Default for Topology {
    fn default() -> Self {
        Self {
            votes_stream: "VOTES".to_owned(),
            votes_prefix: DEFAULT_VOTES_PREFIX.to_owned(),
            consumer: "dedup-worker".to_owned(),
            dlq_stream: "VOTES_DLQ".to_owned(),
            dlq_prefix: DEFAULT_DLQ_PREFIX.to_owned(),
            replicas: 1,
            ack_wait: None,
            polls_bucket: "LANDSLIDE_POLLS".to_owned(),
            vote_partitions: 1,
            partition: 0,
        }
    }
}

impl Topology {
    /// Names of their own for one test or one tenant on a shared server: `<tag>_VOTES` on
    /// `<tag>.votes.*` and so on. `tag` must be a valid subject token and stream-name part.
    pub fn isolated(tag: &str) -> Self {
        Self {
            votes_stream: format!("{tag}_VOTES"),
            votes_prefix: format!("{tag}.votes"),
            consumer: format!("{tag}_dedup-worker"),
            dlq_stream: format!("{tag}_VOTES_DLQ"),
            dlq_prefix: format!("{tag}.dlq.votes"),
            replicas: 1,
            ack_wait: None,
            polls_bucket: format!("{tag}_POLLS"),
            vote_partitions: 1,
            partition: 0,
        }
    }

    /// The names of vote partition `index`: this topology for 0; `<votes stream>_P<index>` on
    /// `<votes prefix>.p<index>.*` otherwise, with the same consumer name and dead-letter stream.
    /// Partition subjects have one token more than partition 0's (`votes.p1.web01` beside
    /// `votes.web01`), so no subject belongs to two streams, whatever a node is called.
    /// `self` must name partition 0.
    pub fn partition(&self, index: u16) -> Self {
        debug_assert_eq!(self.partition, 0, "a partition of a partition");
        if index == 0 {
            return self.clone();
        }
        Self {
            votes_stream: format!("{}_P{index}", self.votes_stream),
            votes_prefix: format!("{}.p{index}", self.votes_prefix),
            partition: index,
            ..self.clone()
        }
    }

    /// Partitions 0 to `count - 1` ([`Topology::partition`]).
    pub fn partitions(&self, count: u16) -> Vec<Self> {
        (0..count).map(|i| self.partition(i)).collect()
    }

    /// The definition of the votes stream: the file with this topology's names.
    pub fn votes_stream_config(&self) -> anyhow::Result<stream::Config> {
        let json = self.votes_stream_value()?;
        serde_json::from_value(json).context("nats/votes-stream.json is not a stream definition")
    }

    /// The definition of the dead-letter stream.
    pub fn dlq_stream_config(&self) -> anyhow::Result<stream::Config> {
        let json = self.dlq_stream_value()?;
        serde_json::from_value(json)
            .context("nats/votes-dlq-stream.json is not a stream definition")
    }

    /// The definition of the workers' durable pull consumer.
    pub fn consumer_config(&self) -> anyhow::Result<consumer::pull::Config> {
        let json = self.consumer_value()?;
        serde_json::from_value(json)
            .context("nats/dedup-worker-consumer.json is not a consumer definition")
    }

    fn votes_stream_value(&self) -> anyhow::Result<Value> {
        let mut json = parse(VOTES_STREAM_JSON, "votes-stream.json")?;
        json["name"] = self.votes_stream.clone().into();
        json["subjects"] = serde_json::json!([format!("{}.*", self.votes_prefix)]);
        json["num_replicas"] = self.replicas.into();
        Ok(json)
    }

    fn dlq_stream_value(&self) -> anyhow::Result<Value> {
        let mut json = parse(DLQ_STREAM_JSON, "votes-dlq-stream.json")?;
        json["name"] = self.dlq_stream.clone().into();
        json["subjects"] = serde_json::json!([format!("{}.*", self.dlq_prefix)]);
        json["num_replicas"] = self.replicas.into();
        Ok(json)
    }

    fn consumer_value(&self) -> anyhow::Result<Value> {
        let mut json = parse(CONSUMER_JSON, "dedup-worker-consumer.json")?;
        json["durable_name"] = self.consumer.clone().into();
        if let Some(ack_wait) = self.ack_wait {
            json["ack_wait"] = u64::try_from(ack_wait.as_nanos())
                .unwrap_or(u64::MAX)
                .into();
        }
        Ok(json)
    }
}

fn parse(text: &str, file: &str) -> anyhow::Result<Value> {
    serde_json::from_str(text).with_context(|| format!("nats/{file} is not valid JSON"))
}

/// One field where an existing definition differs from its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub field: String,
    pub expected: Value,
    pub found: Value,
}

/// An existing stream or consumer that is not what its file says.
#[derive(Debug, thiserror::Error)]
#[error("{kind} {name} exists with an incompatible definition ({}); fix it or remove it (`nats {kind} rm {name}` loses its data) and start again", describe(.differences))]
pub struct Incompatible {
    pub kind: &'static str,
    pub name: String,
    pub differences: Vec<Difference>,
}

fn describe(differences: &[Difference]) -> String {
    differences
        .iter()
        .map(|d| format!("{}: expected {}, found {}", d.field, d.expected, d.found))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Compares `found` with `expected`, both as the JSON API writes them, on the fields that `file`
/// sets (other fields are the server's defaults and additions).
fn differences(file: &Value, expected: &Value, found: &Value) -> Vec<Difference> {
    let Some(fields) = file.as_object() else {
        return Vec::new();
    };
    fields
        .keys()
        .filter(|field| field.as_str() != "description")
        .filter_map(|field| difference(field, expected, found))
        .collect()
}

/// `field` of `expected` and of `found`, if they differ ([`same`]).
fn difference(field: &str, expected: &Value, found: &Value) -> Option<Difference> {
    let e = expected.get(field).cloned().unwrap_or(Value::Null);
    let f = found.get(field).cloned().unwrap_or(Value::Null);
    (!same(&e, &f)).then(|| Difference {
        field: field.to_owned(),
        expected: e,
        found: f,
    })
}

/// How the workers' live consumer differs from its definition, over the whole configuration
/// (every field either side sets, not only those of the file): someone changed it, or made it
/// again otherwise. Left out: what the server fills in (`name`, its `_nats.*` metadata), the
/// description, and a restart from a moment in time (`deliver_policy: by_start_time` with its
/// `opt_start_time`), which the workers make after a rollback or a drift. The workers check
/// this between batches and put the definition back; tally says no result is final meanwhile.
pub fn consumer_drift(
    topology: &Topology,
    found: &consumer::Config,
) -> anyhow::Result<Vec<Difference>> {
    let expected = serde_json::to_value(topology.consumer_config()?)?;
    let found = serde_json::to_value(found)?;
    let (Some(e), Some(f)) = (expected.as_object(), found.as_object()) else {
        anyhow::bail!("a consumer definition is not a JSON object");
    };
    let restarted = f.get("deliver_policy").and_then(Value::as_str) == Some("by_start_time");
    let fields: std::collections::BTreeSet<&String> = e.keys().chain(f.keys()).collect();
    Ok(fields
        .into_iter()
        .filter(|field| {
            let managed = matches!(
                field.as_str(),
                "name" | "description" | "metadata" | "opt_start_time"
            );
            let restart = restarted && field.as_str() == "deliver_policy";
            !(managed || restart)
        })
        .filter_map(|field| difference(field, &expected, &found))
        .collect())
}

/// [`consumer_drift`] as one line, for logs, `/readyz` and the results.
pub fn describe_drift(differences: &[Difference]) -> String {
    format!(
        "the workers' consumer differs from its definition: {}",
        describe(differences)
    )
}

/// Equality that treats a field the serializer skipped (its default) like the default itself.
fn same(a: &Value, b: &Value) -> bool {
    let is_default = |v: &Value| {
        matches!(v, Value::Null)
            || v == &Value::Bool(false)
            || v.as_i64() == Some(0)
            || v.as_str() == Some("")
    };
    a == b || (is_default(a) && is_default(b))
}

/// Fields that an existing stream may lack and that are set in place, without touching a stored
/// vote: `allow_atomic` (group commit), which streams made before nats-server 2.12 lack, and
/// `deny_purge`, which streams made by earlier releases lack (the server lets it turn on, never
/// off again: `stream configuration update can not cancel deny purge`).
const UPDATABLE_STREAM_FIELDS: &[&str] = &["allow_atomic", "deny_purge"];

/// What a role may do about the streams, the consumer and the polls bucket at startup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Create what is missing and bring what is there up to its file (dedup-workers, replay and
    /// the operator: their NATS users may).
    SetUp,
    /// Only check: what is missing is an error to wait out ([`retry_startup`]) until a worker
    /// has set it up (ingest, tally, audit: their users may not create streams).
    ReadOnly,
}

/// Not there yet: a worker has not set it up. Retried at startup.
#[derive(Debug, thiserror::Error)]
#[error("{what} does not exist yet; a dedup-worker creates it when it starts")]
pub struct NotSetUp {
    pub what: String,
}

/// With [`Access::SetUp`], creates the stream if missing and updates it in place where only
/// [`UPDATABLE_STREAM_FIELDS`] differ; with either access, checks it against its definition.
async fn ensure_stream(
    js: &jetstream::Context,
    config: stream::Config,
    file: Value,
    access: Access,
) -> anyhow::Result<stream::Stream> {
    match ensure_stream_once(js, config.clone(), file.clone(), access).await {
        // Another worker (or a test's set-up) created it between our look-up and our create,
        // with a definition of its own (partition 0's record of K, say): check that one.
        Err(err) if err.downcast_ref::<CreatedMeanwhile>().is_some() => {
            ensure_stream_once(js, config, file, access).await
        }
        other => other,
    }
}

/// A stream that someone else created between a look-up that did not find it and our create.
#[derive(Debug, thiserror::Error)]
#[error("stream {0} was created by someone else meanwhile")]
struct CreatedMeanwhile(String);

async fn ensure_stream_once(
    js: &jetstream::Context,
    config: stream::Config,
    file: Value,
    access: Access,
) -> anyhow::Result<stream::Stream> {
    let name = config.name.clone();
    match js.get_stream(&name).await {
        Ok(mut stream) => {
            let info = stream
                .info()
                .await
                .with_context(|| format!("cannot read stream {name}"))?;
            let expected = serde_json::to_value(&config)?;
            let found = serde_json::to_value(&info.config)?;
            let differences = differences(&file, &expected, &found);
            if differences.is_empty() {
                return Ok(stream);
            }
            if !differences
                .iter()
                .all(|d| UPDATABLE_STREAM_FIELDS.contains(&d.field.as_str()))
            {
                return Err(Incompatible {
                    kind: "stream",
                    name,
                    differences,
                }
                .into());
            }
            if access == Access::ReadOnly {
                anyhow::bail!(
                    "stream {name} lacks {}; a dedup-worker brings it up to its file when it starts",
                    describe(&differences)
                );
            }
            // A stream made by an earlier release: bring it up to its file in place. An update
            // replaces the whole definition: keep what the file does not set, such as the vote
            // partitions recorded in its metadata ([`partitions`]).
            let mut config = config;
            partitions::keep_metadata(&mut config, &info.config);
            js.update_stream(config)
                .await
                .with_context(|| format!("cannot update stream {name}"))?;
            tracing::warn!(stream = %name, changes = %describe(&differences), "updated the stream to its definition");
            js.get_stream(&name)
                .await
                .with_context(|| format!("cannot look up stream {name}"))
        }
        Err(err) if is_stream_not_found(&err) && access == Access::ReadOnly => Err(NotSetUp {
            what: format!("stream {name}"),
        }
        .into()),
        Err(err) if is_stream_not_found(&err) => match js.create_stream(config).await {
            Ok(stream) => {
                tracing::info!(stream = %name, "created stream");
                Ok(stream)
            }
            // "Stream name already in use with a different configuration": created meanwhile.
            Err(err)
                if matches!(
                    err.kind(),
                    jetstream::context::CreateStreamErrorKind::JetStream(e)
                        if e.error_code() == jetstream::ErrorCode::STREAM_NAME_EXIST
                ) =>
            {
                Err(CreatedMeanwhile(name).into())
            }
            Err(err) => Err(err).with_context(|| format!("cannot create stream {name}")),
        },
        Err(err) => Err(err).with_context(|| format!("cannot look up stream {name}")),
    }
}

fn is_stream_not_found(err: &jetstream::context::GetStreamError) -> bool {
    matches!(
        err.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(e)
            if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

/// A consumer's info and the clock of the server that answered (the consumer's leader): the
/// response's `ts`, which async-nats' typed info leaves out; `None` from a server that sends none.
/// Not the clock a poll's close is judged by: that is the stream leader's ([`Backlog::server_now`]).
pub async fn consumer_info_at(
    js: &jetstream::Context,
    stream: &str,
    consumer: &str,
) -> anyhow::Result<(consumer::Info, Option<chrono::DateTime<chrono::Utc>>)> {
    let subject = format!("CONSUMER.INFO.{stream}.{consumer}");
    let raw: Value = js
        .request(subject, &serde_json::json!({}))
        .await
        .with_context(|| format!("cannot read consumer {consumer} of {stream}"))?;
    if let Some(error) = raw.get("error") {
        if error["err_code"].as_u64() == Some(jetstream::ErrorCode::CONSUMER_NOT_FOUND.0) {
            return Err(ConsumerMissing {
                stream: stream.to_owned(),
                consumer: consumer.to_owned(),
            }
            .into());
        }
        anyhow::bail!("JetStream refused the info of consumer {consumer} of {stream}: {error}");
    }
    let at = server_ts(&raw);
    let info = serde_json::from_value(raw).context("the consumer info has an unexpected shape")?;
    Ok((info, at))
}

/// A consumer that does not exist: deleted, by someone or by a restart under way.
#[derive(Debug, thiserror::Error)]
#[error("consumer {consumer} of {stream} does not exist")]
pub struct ConsumerMissing {
    pub stream: String,
    pub consumer: String,
}

/// The clock of the server that stores the stream's messages, as it answers the stream's info:
/// the response's `ts` (`None` from a server that sends none). In a cluster only the stream's
/// leader answers a stream info request (nats-server `jsStreamInfoRequest`: "only the stream
/// leader should answer"), and the leader is the server whose clock stamps each message it
/// stores, the time every role judges a vote by (`stored_at`).
pub async fn stream_clock(
    js: &jetstream::Context,
    stream: &str,
) -> anyhow::Result<Option<chrono::DateTime<chrono::Utc>>> {
    Ok(server_ts(&stream_info_raw(js, stream).await?))
}

/// A stream's info as the server sent it (async-nats' typed info leaves out the response's `ts`).
async fn stream_info_raw(js: &jetstream::Context, stream: &str) -> anyhow::Result<Value> {
    let raw: Value = js
        .request(format!("STREAM.INFO.{stream}"), &serde_json::json!({}))
        .await
        .with_context(|| format!("cannot read the info of stream {stream}"))?;
    if let Some(error) = raw.get("error") {
        anyhow::bail!("JetStream refused the info of stream {stream}: {error}");
    }
    Ok(raw)
}

/// The `ts` of a JetStream API response: the answering server's clock.
fn server_ts(raw: &Value) -> Option<chrono::DateTime<chrono::Utc>> {
    raw["ts"]
        .as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&chrono::Utc))
}

/// Votes accepted and not yet counted: messages not yet delivered plus those delivered and not
/// acknowledged (a worker acks only after its commit). The one figure that tally shows as
/// `pending`, audit waits to see at 0, and the harness and the tests drain to 0; [`backlog`]
/// reads what it needs.
///
/// `stream_last_seq` is the stream's last sequence, read *after* `info`. nats-server acknowledges
/// a publish before it tells the consumers that the message is there (stream.go,
/// `processJetStreamMsgWithBatch`: the ack is sent, then the message goes on `sigq`, which
/// `signalConsumersLoop` hands to the consumers on another goroutine), so a consumer's info read
/// just after an ack may leave the message out of `num_pending`. CI caught a test that drained to
/// 0 while its vote was neither delivered nor counted. Every message beyond the last one delivered
/// is pending: the consumer takes every subject of the stream, and no vote is ever deleted.
///
/// A consumer that delivered beyond the stream's last sequence means the stream went backwards
/// (`rollback`): its new messages at the reused sequences would be skipped, so pending is at
/// least 1 until the workers have restarted the consumer.
pub fn pending(info: &jetstream::consumer::Info, stream_last_seq: u64) -> u64 {
    let unacked = u64::try_from(info.num_ack_pending).unwrap_or(u64::MAX);
    let undelivered = stream_last_seq.saturating_sub(info.delivered.stream_sequence);
    let pending = info.num_pending.max(undelivered).saturating_add(unacked);
    if info.delivered.stream_sequence > stream_last_seq {
        pending.max(1)
    } else {
        pending
    }
}

/// The workers' consumer as [`pending`] needs it read.
#[derive(Debug, Clone)]
pub struct Backlog {
    /// The consumer's info.
    pub info: consumer::Info,
    /// The stream leader's clock when it answered the stream's info, after the consumer's
    /// ([`stream_clock`]): the clock that stamps every vote's stored time, by which each vote is
    /// judged inside or outside its poll's window. A poll is final by this clock: every vote
    /// stored before it answered is in `pending` until committed. (It was the consumer leader's,
    /// another server of a cluster, whose clock nobody compared with the stream leader's.)
    pub server_now: Option<chrono::DateTime<chrono::Utc>>,
    /// Accepted votes not yet committed, by [`pending`]: every vote acknowledged before the
    /// consumer's info was read is in it until a worker has committed it.
    pub pending: u64,
    /// The stream's last sequence, read after the consumer's info.
    pub stream_last: u64,
    /// How far the stream leader's clock was ahead of the consumer leader's (two servers of a
    /// cluster, or the same one), from the two answers and this process's monotonic clock:
    /// `None` when either answer had no time.
    pub skew: Option<ClockSkew>,
}

/// The difference between two servers' clocks, measured through their answers to requests sent
/// one after the other: each server read its clock somewhere within its request's round trip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockSkew {
    /// The second server's clock less the first's, at the same instant, in milliseconds.
    pub millis: i64,
    /// How far the true difference may lie from `millis` either way: half of both round trips.
    pub uncertainty_millis: u64,
}

/// The skew between nats-servers beyond which tally and `status` raise an alarm: half the grace
/// a poll waits after its close before it is final (`landslide_tally`'s `CLOSE_GRACE`).
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(1);

impl ClockSkew {
    /// From a first answer with clock `first` to a request sent at `sent_first` and answered at
    /// `got_first` (this process's monotonic clock), and a second likewise.
    fn measure(
        (first, sent_first, got_first): (chrono::DateTime<chrono::Utc>, Instant, Instant),
        (second, sent_second, got_second): (chrono::DateTime<chrono::Utc>, Instant, Instant),
    ) -> Self {
        let mid = |sent: Instant, got: Instant| sent + got.saturating_duration_since(sent) / 2;
        let between =
            mid(sent_second, got_second).saturating_duration_since(mid(sent_first, got_first));
        let half = |sent: Instant, got: Instant| got.saturating_duration_since(sent) / 2;
        let clocks = (second - first).num_milliseconds();
        Self {
            millis: clocks - i64::try_from(between.as_millis()).unwrap_or(i64::MAX),
            uncertainty_millis: u64::try_from(
                (half(sent_first, got_first) + half(sent_second, got_second)).as_millis(),
            )
            .unwrap_or(u64::MAX),
        }
    }

    /// Whether the two clocks surely differ by more than `bound`.
    pub fn beyond(&self, bound: Duration) -> bool {
        let bound = u64::try_from(bound.as_millis()).unwrap_or(u64::MAX);
        self.millis
            .unsigned_abs()
            .saturating_sub(self.uncertainty_millis)
            > bound
    }
}

impl std::fmt::Display for ClockSkew {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the votes stream leader's clock is {} ms {} the workers' consumer leader's (± {} ms)",
            self.millis.unsigned_abs(),
            if self.millis >= 0 {
                "ahead of"
            } else {
                "behind"
            },
            self.uncertainty_millis
        )
    }
}

/// Reads the consumer's info, then the stream's last sequence, in that order: a vote stored
/// before the first answer is then either counted by the consumer or beyond its last delivery,
/// hence pending. (A vote stored between the two answers counts as pending too: it is.)
pub async fn backlog(
    js: &jetstream::Context,
    stream: &str,
    consumer: &str,
) -> anyhow::Result<Backlog> {
    let sent_consumer = Instant::now();
    let (info, consumer_now) = consumer_info_at(js, stream, consumer).await?;
    let got_consumer = Instant::now();
    let raw = stream_info_raw(js, stream).await?;
    let got_stream = Instant::now();
    let server_now = server_ts(&raw);
    let skew = consumer_now
        .zip(server_now)
        .map(|(consumer_now, stream_now)| {
            ClockSkew::measure(
                (consumer_now, sent_consumer, got_consumer),
                (stream_now, got_consumer, got_stream),
            )
        });
    let last_seq = raw["state"]["last_seq"]
        .as_u64()
        .with_context(|| format!("the info of stream {stream} has no state.last_seq"))?;
    Ok(Backlog {
        pending: pending(&info, last_seq),
        stream_last: last_seq,
        info,
        server_now,
        skew,
    })
}

/// Ensures the votes stream (ingest nodes need only this one, [`Access::ReadOnly`]).
pub async fn ensure_votes_stream(
    js: &jetstream::Context,
    topology: &Topology,
    access: Access,
) -> anyhow::Result<stream::Stream> {
    ensure_stream(
        js,
        topology.votes_stream_config()?,
        topology.votes_stream_value()?,
        access,
    )
    .await
}

/// Ensures the dead-letter stream.
pub async fn ensure_dlq_stream(
    js: &jetstream::Context,
    topology: &Topology,
    access: Access,
) -> anyhow::Result<stream::Stream> {
    ensure_stream(
        js,
        topology.dlq_stream_config()?,
        topology.dlq_stream_value()?,
        access,
    )
    .await
}

/// Ensures both streams and the workers' consumer, and returns the consumer. Tally reads the
/// consumer's state with [`Access::ReadOnly`].
pub async fn ensure_consumer(
    js: &jetstream::Context,
    topology: &Topology,
    access: Access,
) -> anyhow::Result<consumer::PullConsumer> {
    let stream = ensure_votes_stream(js, topology, access).await?;
    if access == Access::SetUp {
        ensure_dlq_stream(js, topology, access).await?;
    }
    let config = topology.consumer_config()?;
    let file = topology.consumer_value()?;
    let name = topology.consumer.clone();
    match stream.consumer_info(&name).await {
        Ok(info) => {
            let expected = serde_json::to_value(&config)?;
            let found = serde_json::to_value(&info.config)?;
            let mut differences = differences(&file, &expected, &found);
            // The workers restart their consumer from a moment in time after the stream went
            // backwards (`rollback::restart_consumer`): the file's definition otherwise.
            differences.retain(|d| !(d.field == "deliver_policy" && d.found == "by_start_time"));
            if !differences.is_empty() {
                return Err(Incompatible {
                    kind: "consumer",
                    name,
                    differences,
                }
                .into());
            }
        }
        Err(err)
            if err.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound
                && access == Access::ReadOnly =>
        {
            return Err(NotSetUp {
                what: format!("consumer {name}"),
            }
            .into());
        }
        Err(err) if err.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound => {
            stream
                .create_consumer(config)
                .await
                .with_context(|| format!("cannot create consumer {name}"))?;
            tracing::info!(consumer = %name, "created consumer");
        }
        Err(err) => return Err(err).with_context(|| format!("cannot look up consumer {name}")),
    }
    stream
        .get_consumer(&name)
        .await
        .map_err(|e| anyhow::anyhow!("cannot open consumer {name}: {e}"))
}

/// Runs `step` (ensuring the streams and the consumer, say) until it succeeds, for as long as it
/// takes ([`landslide_telemetry::patience::patiently`]): while a cluster elects leaders, lacks
/// quorum or restarts after a power cut, JetStream answers "temporarily unavailable" or not at
/// all, and a role that exited then would turn an outage into a crash. Meanwhile `condition` is
/// not ready and names the error. An [`Incompatible`] definition, a server [`TooOld`] and
/// [`Refused`] credentials are permanent: returned at once.
pub async fn retry_startup<T, F, Fut>(
    what: &str,
    condition: &landslide_telemetry::readiness::Condition,
    step: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    landslide_telemetry::patience::patiently(what, condition, is_permanent, step).await
}

/// Whether retrying cannot cure `err`: a definition that differs from its file, a server too old,
/// credentials refused.
pub fn is_permanent(err: &anyhow::Error) -> bool {
    err.downcast_ref::<Incompatible>().is_some()
        || err.downcast_ref::<partitions::Differ>().is_some()
        || err.downcast_ref::<TooOld>().is_some()
        || err.downcast_ref::<Refused>().is_some()
}

/// How many times `client` has connected: it changes at every reconnection.
pub fn connects(client: &async_nats::Client) -> u64 {
    client
        .statistics()
        .connects
        .load(std::sync::atomic::Ordering::Relaxed)
}

/// Parses `NATS_URL`: one URL or several separated by commas (a cluster).
pub fn server_addrs(urls: &str) -> anyhow::Result<Vec<ServerAddr>> {
    let addrs = urls
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<ServerAddr>()
                .with_context(|| format!("NATS_URL holds an invalid server address {s:?}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    anyhow::ensure!(!addrs.is_empty(), "NATS_URL is empty");
    Ok(addrs)
}

/// Connects to NATS as `user`'s role. The client reconnects forever after a loss; the first
/// connection must succeed.
pub async fn connect(
    config: &NatsConfig,
    user: User,
    client_name: &str,
) -> anyhow::Result<async_nats::Client> {
    connect_to(server_addrs(&config.urls)?, config, user, client_name).await
}

/// [`connect`] for a role starting up: an invalid `NATS_URL` fails at once, but a server that is
/// down or restarting is waited for, like JetStream in [`retry_startup`], with `condition` not
/// ready meanwhile. The reliability harness found a worker restarted just as nats-server was
/// killed exiting instead. Refused credentials are not waited for.
pub async fn connect_patiently(
    config: &NatsConfig,
    user: User,
    client_name: &str,
    condition: &landslide_telemetry::readiness::Condition,
) -> anyhow::Result<async_nats::Client> {
    let addrs = server_addrs(&config.urls)?;
    retry_startup("connect to NATS", condition, || {
        connect_to(addrs.clone(), config, user, client_name)
    })
    .await
}

/// Installs ring as the process's TLS crypto provider, once (rustls cannot choose when a build
/// enables both of its providers, and panics at the first TLS connection).
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // An error means another provider was installed first: that one serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Why the broker refused a connection: the credentials or the TLS setup, which waiting cannot
/// fix.
#[derive(Debug, thiserror::Error)]
#[error(
    "the NATS server at {urls} refused us ({reason}): check NATS_USER and NATS_PASSWORD (or the other credentials) and NATS_CA"
)]
pub struct Refused {
    pub urls: String,
    pub reason: String,
}

async fn connect_to(
    addrs: Vec<ServerAddr>,
    config: &NatsConfig,
    user: User,
    client_name: &str,
) -> anyhow::Result<async_nats::Client> {
    let urls = &config.urls;
    install_crypto_provider();
    let connected = config
        .options(user)?
        .name(client_name)
        .connection_timeout(Duration::from_secs(5))
        .max_reconnects(None)
        .connect(addrs)
        .await;
    let client = match connected {
        Ok(client) => client,
        Err(err)
            if matches!(
                err.kind(),
                async_nats::ConnectErrorKind::AuthorizationViolation
                    | async_nats::ConnectErrorKind::Authentication
                    | async_nats::ConnectErrorKind::Tls
            ) =>
        {
            return Err(Refused {
                urls: urls.clone(),
                reason: err.to_string(),
            }
            .into());
        }
        Err(err) => {
            return Err(err)
                .with_context(|| format!("cannot connect to NATS at {urls} (NATS_URL)"));
        }
    };
    // Refuse a server that cannot keep the promise "accepted means on disk", before any vote.
    let info = client.server_info();
    check_version(
        &format!("the server {} at {urls} (NATS_URL)", info.server_name),
        &info.version,
    )?;
    Ok(client)
}

/// How a nats-server syncs its JetStream files, as its monitoring endpoint reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// `sync_interval: always`: every write is fsynced before the ack.
    Always,
    /// Files are fsynced every `interval`; an ack means "in the page cache" until then.
    Every(Duration),
}

/// Reads `<monitor_url>/varz` (the server's `http:` port) and reports how its JetStream syncs.
/// A client connection cannot tell: neither the INFO line nor `$JS.API.INFO` carries it.
pub async fn sync_mode(monitor_url: &str) -> anyhow::Result<SyncMode> {
    let url = format!("{}/varz", monitor_url.trim_end_matches('/'));
    let varz: Value = reqwest::Client::new()
        .get(&url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .with_context(|| format!("cannot read {url} (LANDSLIDE_NATS_MONITOR_URL)"))?
        .json()
        .await
        .with_context(|| format!("{url} is not a nats-server's /varz"))?;
    let config = &varz["jetstream"]["config"];
    anyhow::ensure!(config.is_object(), "{url}: JetStream is not enabled there");
    if config["sync_always"] == true {
        return Ok(SyncMode::Always);
    }
    // nats-server's default interval, when the field is missing.
    let nanos = config["sync_interval"].as_u64().unwrap_or(120_000_000_000);
    Ok(SyncMode::Every(Duration::from_nanos(nanos)))
}

/// Checks every server of `monitor_urls` (comma-separated) and says loudly, at error level,
/// which of them ack votes before they are on disk. Never fails the role: a server that cannot
/// be read is a warning too, since this check is advice, not a gate.
pub async fn warn_if_lazy(monitor_urls: &str) {
    for url in monitor_urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
    {
        match sync_mode(url).await {
            Ok(SyncMode::Always) => {
                tracing::info!(monitor.url = url, "nats-server fsyncs before it acks");
            }
            Ok(SyncMode::Every(interval)) => tracing::error!(
                monitor.url = url,
                sync_interval_s = interval.as_secs(),
                "NATS SERVER SYNCS LAZILY: it acks votes before they are on disk, so a power cut \
                 or kernel crash loses up to {}s of accepted votes; set `jetstream {{ \
                 sync_interval: always }}` in its config (as nats/*.conf do)",
                interval.as_secs()
            ),
            Err(err) => tracing::warn!(
                error = %format!("{err:#}"),
                "cannot tell whether nats-server fsyncs before it acks"
            ),
        }
    }
}

/// One JetStream API request (`$JS.API.INFO`, `$JS.API.STREAM.INFO.<name>`, …) on a connection of
/// its own to the server(s) of `config`, as `user`: the answer, if it came within 2 s and is not an error
/// object (which is what a server answers before JetStream is ready, or without quorum).
///
/// Raw rather than through async-nats' typed calls, which probes need on nats-server 2.9:
/// `query_account` cannot decode its account info (async-nats 0.51 requires `reserved_memory`).
pub async fn api_request(
    config: &NatsConfig,
    user: User,
    subject: &str,
) -> Option<serde_json::Value> {
    install_crypto_provider();
    let attempt = async {
        let client = config
            .options(user)
            .ok()?
            .connection_timeout(Duration::from_secs(1))
            .connect(server_addrs(&config.urls).ok()?)
            .await
            .ok()?;
        let reply = client.request(subject.to_owned(), "".into()).await.ok()?;
        let answer: serde_json::Value = serde_json::from_slice(&reply.payload).ok()?;
        answer.get("error").is_none().then_some(answer)
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .ok()
        .flatten()
}

/// Writes trace context (`traceparent`, `tracestate`) into NATS message headers.
#[derive(Debug)]
pub struct HeaderInjector<'a>(pub &'a mut HeaderMap);

impl opentelemetry::propagation::Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

/// Reads trace context from NATS message headers. NATS header names are case-sensitive; the W3C
/// propagator writes and reads lower-case names, so both sides agree.
#[derive(Debug)]
pub struct HeaderExtractor<'a>(pub &'a HeaderMap);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_ref()).collect()
    }
}

/// Reads a stream from its first message to sequence `last` in order, without acks, for audit
/// and replay: an ordered consumer (flow-controlled, recreated by the client on a gap), deleted by
/// the server once the reader is dropped.
///
/// An ordered consumer is R1, and nats-server places an R1 consumer of a replicated stream on any
/// of its active peers at random (`createGroupForConsumer`), a follower perhaps, which may lag
/// behind the leader: its `pending` can read 0 while the leader holds more. The reader once
/// stopped there, and an audit of a cluster just healed from a partition read 1,722 of some 2,600
/// votes and called 308 correct ballots unexpected (chaos, seed 12488292929069060123). Waiting
/// for that replica instead stalled another audit for good (seed 2). So when the replica has
/// nothing more short of `last`, the reader reads the rest from the stream's leader, one message
/// at a time (`STREAM.MSG.GET`, which only the leader answers): usually the few the replica lags.
pub struct StreamReader {
    messages: consumer::pull::Ordered,
    stream: jetstream::stream::Stream,
    last: u64,
    /// The next sequence to read from the leader, once the replica has run dry short of `last`.
    from_leader: Option<u64>,
    done: bool,
}

impl std::fmt::Debug for StreamReader {
    /// async-nats' ordered stream has no `Debug`: the reader shows how far it reads.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamReader")
            .field("last", &self.last)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl StreamReader {
    /// How long a read may stall before the reader gives up.
    pub const STALL: Duration = Duration::from_secs(30);

    /// A reader of messages 1..=`last` for `user`, whose name begins the consumer's
    /// (`audit_<random>`): a named create, the only kind the audit and tally users may make
    /// ([`User::permissions`]). `description` describes it (`landslide audit`).
    pub async fn open(
        stream: &jetstream::stream::Stream,
        last: u64,
        user: User,
        description: &str,
    ) -> anyhow::Result<Self> {
        Self::open_from(stream, 1, last, user, description).await
    }

    /// [`StreamReader::open`] for messages `first..=last`.
    pub async fn open_from(
        stream: &jetstream::stream::Stream,
        first: u64,
        last: u64,
        user: User,
        description: &str,
    ) -> anyhow::Result<Self> {
        let reader = stream
            .create_consumer(consumer::pull::OrderedConfig {
                name: Some(format!("{user}_{}", uuid::Uuid::new_v4().simple())),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: first.max(1),
                },
                description: Some(description.to_owned()),
                ..Default::default()
            })
            .await
            .with_context(|| format!("cannot create the ordered consumer of {description}"))?;
        let messages = reader
            .messages()
            .await
            .context("cannot read the votes stream")?;
        Ok(Self {
            messages,
            stream: stream.clone(),
            last,
            from_leader: None,
            done: last < first.max(1),
        })
    }

    /// The stream's last sequence, as its leader says (only the leader answers a stream's info).
    /// Of the stream alone, not of the reader, whose ordered consumer is `Send` but not `Sync`.
    async fn leader_last(stream: &jetstream::stream::Stream) -> anyhow::Result<u64> {
        Ok(stream
            .get_info()
            .await
            .context("cannot read the votes stream's state")?
            .state
            .last_sequence)
    }

    /// The next message, or `None` after `last` (or after the stream's end, if `last` itself
    /// was removed), with its stream sequence and the time the stream stored it.
    pub async fn next(&mut self) -> anyhow::Result<Option<Stored>> {
        use futures::StreamExt as _;
        if self.done {
            return Ok(None);
        }
        if let Some(next) = self.from_leader {
            return self.next_from_leader(next).await;
        }
        let last = self.last;
        let message = tokio::time::timeout(Self::STALL, self.messages.next())
            .await
            .map_err(|_| anyhow::anyhow!("reading the votes stream stalled for {:?}", Self::STALL))?
            .ok_or_else(|| anyhow::anyhow!("the votes stream ended before sequence {last}"))?
            .context("cannot read the votes stream")?;
        let info = message
            .info()
            .map_err(|e| anyhow::anyhow!("a message of the votes stream has no metadata: {e}"))?;
        let sequence = info.stream_sequence;
        let stored_at = stored_at(&info);
        if sequence >= last {
            self.done = true;
        } else if info.pending == 0 {
            // Nothing after it on the replica that serves the reader, which may lag: the rest,
            // if the leader holds any (none when `last` itself was removed, or the stream went
            // backwards, which audit reports on its own), comes from the leader.
            if Self::leader_last(&self.stream).await? > sequence {
                self.from_leader = Some(sequence + 1);
            } else {
                self.done = true;
            }
        }
        Ok(Some(Stored {
            sequence,
            stored_at,
            message: message.message,
        }))
    }

    /// The first message from sequence `next` on, read from the leader; `None` past `last` or
    /// the leader's last sequence. A sequence that holds nothing is skipped, as the ordered
    /// consumer skips it (audit notes the gap).
    async fn next_from_leader(&mut self, mut next: u64) -> anyhow::Result<Option<Stored>> {
        let end = self.last.min(Self::leader_last(&self.stream).await?);
        while next <= end {
            match self.stream.get_raw_message(next).await {
                Ok(raw) => {
                    self.from_leader = Some(next + 1);
                    self.done = next >= end;
                    let nanos = i64::try_from(raw.time.unix_timestamp_nanos()).unwrap_or(i64::MAX);
                    return Ok(Some(Stored {
                        sequence: raw.sequence,
                        stored_at: chrono::DateTime::from_timestamp_nanos(nanos),
                        message: async_nats::Message {
                            length: raw.payload.len(),
                            subject: raw.subject,
                            reply: None,
                            payload: raw.payload,
                            headers: Some(raw.headers),
                            status: None,
                            description: None,
                        },
                    }));
                }
                Err(err)
                    if err.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound =>
                {
                    next += 1;
                }
                Err(err) => {
                    return Err(err).with_context(|| {
                        format!("cannot read sequence {next} of the votes stream from its leader")
                    });
                }
            }
        }
        self.done = true;
        Ok(None)
    }
}

/// A message read from a stream.
#[derive(Debug)]
pub struct Stored {
    pub sequence: u64,
    /// When the stream stored it: the clock every role judges a poll's window by.
    pub stored_at: chrono::DateTime<chrono::Utc>,
    pub message: async_nats::Message,
}

/// The time the stream stored a message, from its delivery metadata: set by the server that
/// stored it (the stream leader), never by the client that published it.
pub fn stored_at(info: &jetstream::message::Info<'_>) -> chrono::DateTime<chrono::Utc> {
    let nanos = i64::try_from(info.published.unix_timestamp_nanos()).unwrap_or(i64::MAX);
    chrono::DateTime::from_timestamp_nanos(nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_skew_of_two_servers_allows_for_both_round_trips() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let at = |s: &str| s.parse::<chrono::DateTime<chrono::Utc>>().unwrap();
        // The first answered 20 ms after it was asked, the second asked then and answered 40 ms
        // later: their readings lie 30 ms apart by our clock, theirs 1,530 ms apart.
        let skew = ClockSkew::measure(
            (at("2026-12-06T20:00:00.000Z"), t0, t0 + ms(20)),
            (at("2026-12-06T20:00:01.530Z"), t0 + ms(20), t0 + ms(60)),
        );
        assert_eq!(
            skew,
            ClockSkew {
                millis: 1_500,
                uncertainty_millis: 30
            }
        );
        assert!(skew.beyond(MAX_CLOCK_SKEW));
        assert!(!skew.beyond(Duration::from_millis(1_470)));
        assert!(skew.to_string().contains("1500 ms ahead of"), "{skew}");
        let same = ClockSkew::measure(
            (at("2026-12-06T20:00:00.000Z"), t0, t0 + ms(2)),
            (at("2026-12-06T20:00:00.004Z"), t0 + ms(2), t0 + ms(6)),
        );
        assert!(!same.beyond(MAX_CLOCK_SKEW), "{same}");
    }

    /// A consumer info as nats-server answers it, with the counts given.
    fn info(num_pending: u64, delivered: u64, ack_pending: usize) -> consumer::Info {
        serde_json::from_value(serde_json::json!({
            "stream_name": "VOTES",
            "name": "dedup-worker",
            "created": "2026-12-02T00:00:00Z",
            "config": {
                "durable_name": "dedup-worker",
                "deliver_policy": "all",
                "ack_policy": "explicit",
                "replay_policy": "instant",
            },
            "delivered": { "consumer_seq": delivered, "stream_seq": delivered },
            "ack_floor": { "consumer_seq": 0, "stream_seq": 0 },
            "num_ack_pending": ack_pending,
            "num_redelivered": 0,
            "num_waiting": 0,
            "num_pending": num_pending,
            "cluster": null,
            "push_bound": false,
        }))
        .unwrap()
    }

    #[test]
    fn a_vote_the_consumer_has_not_been_told_of_yet_is_pending() {
        // Acknowledged, stored as the 4th message, and not yet signalled to the consumer, which
        // delivered 3 and still reports nothing pending: the vote is pending all the same.
        assert_eq!(pending(&info(0, 3, 0), 4), 1);
        // Once told, the count is the consumer's own, not twice.
        assert_eq!(pending(&info(1, 3, 0), 4), 1);
        // Delivered and not acknowledged: pending until a worker commits them.
        assert_eq!(pending(&info(0, 4, 2), 4), 2);
        assert_eq!(pending(&info(0, 4, 0), 4), 0);
        // A consumer that delivered beyond the stream's end (read in the right order, only
        // after the stream went backwards): its skipped votes are hidden, so never 0.
        assert_eq!(pending(&info(0, 5, 0), 4), 1);
    }

    #[test]
    fn the_files_are_valid_definitions() {
        let t = Topology::default();
        let votes = t.votes_stream_config().unwrap();
        assert_eq!(votes.name, "VOTES");
        assert_eq!(votes.subjects, ["votes.*"]);
        assert_eq!(votes.discard, stream::DiscardPolicy::New);
        assert_eq!(votes.storage, stream::StorageType::File);
        assert!(votes.duplicate_window >= Duration::from_secs(60));
        let dlq = t.dlq_stream_config().unwrap();
        assert_eq!(dlq.subjects, ["dlq.votes.*"]);
        let consumer = t.consumer_config().unwrap();
        assert_eq!(consumer.durable_name.as_deref(), Some("dedup-worker"));
        assert_eq!(consumer.ack_policy, consumer::AckPolicy::Explicit);
    }

    #[test]
    fn an_isolated_topology_renames_everything() {
        let t = Topology::isolated("t1");
        assert_eq!(t.votes_stream_config().unwrap().subjects, ["t1.votes.*"]);
        assert_eq!(t.dlq_stream_config().unwrap().name, "t1_VOTES_DLQ");
        assert_eq!(
            t.consumer_config().unwrap().durable_name.as_deref(),
            Some("t1_dedup-worker")
        );
    }

    #[test]
    fn differences_name_each_field() {
        let file = serde_json::json!({"discard": "new", "max_age": 0, "description": "x"});
        let expected = serde_json::json!({"discard": "new"});
        let found = serde_json::json!({"discard": "old", "max_age": 0, "description": "y"});
        let d = differences(&file, &expected, &found);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].field, "discard");
        let msg = Incompatible {
            kind: "stream",
            name: "VOTES".into(),
            differences: d,
        }
        .to_string();
        assert!(
            msg.contains("discard: expected \"new\", found \"old\""),
            "{msg}"
        );
    }

    #[test]
    fn versions_parse_and_compare() {
        let v = |s| ServerVersion::parse(s).unwrap();
        assert_eq!(v("nats-server: v2.15.1").to_string(), "2.15.1");
        assert_eq!(v("2.12.0-RC.3"), v("2.12.0"));
        assert!(v("2.9.10") < v("2.12.4"));
        assert!(v("2.14.0") > v("2.12.4"));
        assert_eq!(ServerVersion::parse("latest"), None);
        assert!(ServerVersion::pinned() >= ServerVersion::minimum());
        assert!(ServerVersion::minimum() >= v("2.12.0"));
    }

    #[test]
    fn an_old_server_is_refused_naming_what_to_install() {
        let err = check_version("the server n1", "2.9.10")
            .unwrap_err()
            .to_string();
        assert!(err.contains("nats-server 2.9.10"), "{err}");
        assert!(
            err.contains(&format!("install nats-server {}", ServerVersion::pinned())),
            "{err}"
        );
        assert!(check_version("the server n1", "2.15.1").is_ok());
    }

    #[test]
    fn cluster_urls_split_on_commas() {
        assert_eq!(server_addrs("nats://a:1, nats://b:2").unwrap().len(), 2);
        assert!(server_addrs("").is_err());
    }
}
