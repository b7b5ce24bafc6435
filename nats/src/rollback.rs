//! A votes stream that went backwards, and how the workers take up again what it stored since.
//!
//! JetStream can lose what it acknowledged only with the disks under a quorum of its servers
//! (a restored backup, a cluster power cut after 2.15's store sync changed: RELIABILITY.md). When
//! it does, the stream's sequences go back and are used again by new votes. A consumer of one
//! server rewinds to the stream's new end by itself; a replicated consumer does not (nats-server
//! `consumer.go`, `reconcileStateWithStream` runs "only for non-replicated consumers"), so the
//! workers' consumer would skip every reused sequence without a word, and those votes would never
//! be counted.
//!
//! The workers therefore keep a mark in PostgreSQL, in each batch's transaction
//! (`landslide_schema::mark`): the highest sequence they committed, the event stored there and
//! when. [`judge`] compares it with the stream: a last sequence below the mark, a consumer that
//! delivered beyond the stream's last sequence, or another event at the marked sequence means the
//! stream went backwards. The workers then restart their consumer from a moment before anything
//! the stream may have stored since ([`restart_time`], [`restart_consumer`]): every message
//! stored from then on is delivered again, whatever its sequence. Folding a vote twice changes
//! nothing, so reading again from a safe point costs time, never correctness.

use std::fmt;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer};
use chrono::{DateTime, Utc};
use landslide_schema::mark::Mark;
use landslide_schema::{EventId, VoteEvent};

use crate::Topology;

/// How far before the marked vote's stored time the workers start again: the stream's clock may
/// have moved to another server (a new leader) whose clock is behind, and a message stored after
/// the rollback must not fall before the start. NTP keeps servers within milliseconds; a minute
/// costs a minute of votes read twice.
pub const CLOCK_MARGIN: Duration = Duration::from_secs(60);

/// How a stream went backwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Regression {
    /// The stream's last sequence is below the highest one the workers committed.
    LastBelowMark { last: u64, mark: u64 },
    /// The workers' consumer delivered beyond the stream's last sequence.
    ConsumerAhead { delivered: u64, last: u64 },
    /// The marked sequence holds another event than the one the workers committed there (or
    /// none).
    OtherEvent {
        sequence: u64,
        committed: EventId,
        found: Option<EventId>,
    },
}

impl fmt::Display for Regression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::LastBelowMark { last, mark } => write!(
                f,
                "the stream's last sequence {last} is below sequence {mark}, which the workers \
                 committed"
            ),
            Self::ConsumerAhead { delivered, last } => write!(
                f,
                "the workers' consumer delivered sequence {delivered}, beyond the stream's last \
                 sequence {last}"
            ),
            Self::OtherEvent {
                sequence,
                committed,
                found: Some(found),
            } => write!(
                f,
                "sequence {sequence} holds event {found}, not event {committed}, which the \
                 workers committed there"
            ),
            Self::OtherEvent {
                sequence,
                committed,
                found: None,
            } => write!(
                f,
                "sequence {sequence} holds no vote, yet the workers committed event {committed} \
                 there"
            ),
        }
    }
}

/// What [`observe`] read of the stream and the consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub last: u64,
    pub delivered: u64,
    pub ack_floor: u64,
    /// The event at the mark's sequence, when the mark is within the stream: `Some(None)` when
    /// no vote is there.
    pub at_mark: Option<Option<EventId>>,
}

/// Whether the stream went backwards, by the workers' `mark` and what was `observed`.
pub fn judge(mark: Option<&Mark>, observed: &Observed) -> Option<Regression> {
    if observed.delivered > observed.last {
        return Some(Regression::ConsumerAhead {
            delivered: observed.delivered,
            last: observed.last,
        });
    }
    let mark = mark?;
    if observed.last < mark.sequence {
        return Some(Regression::LastBelowMark {
            last: observed.last,
            mark: mark.sequence,
        });
    }
    match (mark.event_id, observed.at_mark) {
        (Some(committed), Some(found)) if found != Some(committed) => {
            Some(Regression::OtherEvent {
                sequence: mark.sequence,
                committed,
                found,
            })
        }
        _ => None,
    }
}

/// Reads the stream's and the consumer's state, and the event at `mark` (from the stream's
/// leader, never a follower that may lag behind it).
pub async fn observe(
    js: &jetstream::Context,
    topology: &Topology,
    mark: Option<&Mark>,
) -> anyhow::Result<Observed> {
    let backlog = crate::backlog(js, &topology.votes_stream, &topology.consumer).await?;
    observe_with(js, topology, &backlog, mark).await
}

/// [`observe`] with the stream's and the consumer's state already read (`backlog`).
pub async fn observe_with(
    js: &jetstream::Context,
    topology: &Topology,
    backlog: &crate::Backlog,
    mark: Option<&Mark>,
) -> anyhow::Result<Observed> {
    let at_mark = match mark {
        Some(mark) if mark.sequence <= backlog.stream_last && mark.sequence > 0 => {
            Some(event_at(js, topology, mark.sequence).await?)
        }
        _ => None,
    };
    Ok(Observed::new(backlog, at_mark))
}

impl Observed {
    /// What `backlog` says, with the event found at the mark, if it was read.
    pub fn new(backlog: &crate::Backlog, at_mark: Option<Option<EventId>>) -> Self {
        Self {
            last: backlog.stream_last,
            delivered: backlog.info.delivered.stream_sequence,
            ack_floor: backlog.info.ack_floor.stream_sequence,
            at_mark,
        }
    }
}

/// The message at `sequence`, read from the stream's leader: the event id when it is a vote, and
/// when the stream stored it; `None` when the stream holds nothing there.
pub async fn message_at(
    js: &jetstream::Context,
    topology: &Topology,
    sequence: u64,
) -> anyhow::Result<Option<(Option<EventId>, DateTime<Utc>)>> {
    let stream = js
        .get_stream_no_info(&topology.votes_stream)
        .await
        .with_context(|| format!("cannot open the stream {}", topology.votes_stream))?;
    match stream.get_raw_message(sequence).await {
        Ok(message) => {
            let stored_at = DateTime::from_timestamp_nanos(
                i64::try_from(message.time.unix_timestamp_nanos()).unwrap_or(i64::MAX),
            );
            let event = VoteEvent::decode(&message.payload).ok().map(|e| e.event_id);
            Ok(Some((event, stored_at)))
        }
        Err(err) if err.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => {
            Ok(None)
        }
        Err(err) => {
            Err(err).with_context(|| format!("cannot read sequence {sequence} of the votes stream"))
        }
    }
}

/// The vote event at `sequence`; `None` when the stream holds no vote there.
pub async fn event_at(
    js: &jetstream::Context,
    topology: &Topology,
    sequence: u64,
) -> anyhow::Result<Option<EventId>> {
    Ok(message_at(js, topology, sequence)
        .await?
        .and_then(|(event, _)| event))
}

/// From when the workers must take the stream up again after it went backwards: [`CLOCK_MARGIN`]
/// before the marked vote was stored (nothing the stream stored since can be older), or earlier
/// when the first message the consumer had not acknowledged was stored earlier still
/// (`unacked_stored_at`): those were never committed.
pub fn restart_time(
    mark: Option<&Mark>,
    unacked_stored_at: Option<DateTime<Utc>>,
) -> DateTime<Utc> {
    let margin = chrono::Duration::from_std(CLOCK_MARGIN).unwrap_or_default();
    let from_mark = mark.map(|m| m.stored_at - margin);
    match (from_mark, unacked_stored_at) {
        (Some(a), Some(b)) => a.min(b),
        (Some(t), None) | (None, Some(t)) => t,
        // Nothing known: from the start.
        (None, None) => DateTime::UNIX_EPOCH,
    }
}

/// Replaces the workers' consumer with one that delivers every message stored from `from` on:
/// deleted, then created with the file's definition but `deliver_policy: by_start_time`. The
/// workers' pulls from the old one end ("consumer deleted"), and each worker opens the new one.
pub async fn restart_consumer(
    js: &jetstream::Context,
    topology: &Topology,
    from: DateTime<Utc>,
) -> anyhow::Result<consumer::PullConsumer> {
    let stream = js
        .get_stream_no_info(&topology.votes_stream)
        .await
        .with_context(|| format!("cannot open the stream {}", topology.votes_stream))?;
    match stream.delete_consumer(&topology.consumer).await {
        Ok(_) => {}
        Err(err)
            if matches!(
                err.kind(),
                jetstream::stream::ConsumerErrorKind::JetStream(e)
                    if e.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND
            ) => {}
        Err(err) => {
            return Err(err)
                .with_context(|| format!("cannot delete consumer {}", topology.consumer));
        }
    }
    let mut config = topology.consumer_config()?;
    let start_time = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(
        from.timestamp_nanos_opt().unwrap_or(0),
    ))
    .context("the restart time is out of range")?;
    config.deliver_policy = consumer::DeliverPolicy::ByStartTime { start_time };
    stream
        .create_consumer(config)
        .await
        .with_context(|| format!("cannot create consumer {} again", topology.consumer))
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;

    fn mark(sequence: u64, id: u128) -> Mark {
        Mark {
            sequence,
            event_id: Some(EventId(Uuid::from_u128(id))),
            stored_at: DateTime::from_timestamp_nanos(1_000_000_000_000),
        }
    }

    fn observed(last: u64, delivered: u64, at_mark: Option<Option<u128>>) -> Observed {
        Observed {
            last,
            delivered,
            ack_floor: delivered,
            at_mark: at_mark.map(|e| e.map(|id| EventId(Uuid::from_u128(id)))),
        }
    }

    #[test]
    fn a_stream_that_kept_what_the_workers_committed_did_not_go_backwards() {
        assert_eq!(judge(None, &observed(0, 0, None)), None);
        assert_eq!(
            judge(Some(&mark(10, 7)), &observed(12, 12, Some(Some(7)))),
            None
        );
        // A mark without an event (rebased onto a hole) is only compared by sequence.
        let hole = Mark {
            event_id: None,
            ..mark(10, 7)
        };
        assert_eq!(judge(Some(&hole), &observed(10, 10, Some(None))), None);
    }

    #[test]
    fn every_way_a_stream_goes_backwards_is_named() {
        assert_eq!(
            judge(Some(&mark(10, 7)), &observed(8, 8, None)),
            Some(Regression::LastBelowMark { last: 8, mark: 10 })
        );
        assert_eq!(
            judge(None, &observed(8, 10, None)),
            Some(Regression::ConsumerAhead {
                delivered: 10,
                last: 8
            })
        );
        assert_eq!(
            judge(Some(&mark(10, 7)), &observed(12, 12, Some(Some(9)))),
            Some(Regression::OtherEvent {
                sequence: 10,
                committed: EventId(Uuid::from_u128(7)),
                found: Some(EventId(Uuid::from_u128(9)))
            })
        );
        assert!(matches!(
            judge(Some(&mark(10, 7)), &observed(12, 12, Some(None))),
            Some(Regression::OtherEvent { found: None, .. })
        ));
    }

    #[test]
    fn the_restart_is_a_margin_before_the_mark_or_earlier_for_what_was_never_acknowledged() {
        let m = mark(10, 7);
        let margin = chrono::Duration::from_std(CLOCK_MARGIN).unwrap();
        assert_eq!(restart_time(Some(&m), None), m.stored_at - margin);
        let early = m.stored_at - margin * 3;
        assert_eq!(restart_time(Some(&m), Some(early)), early);
        assert_eq!(restart_time(None, None), DateTime::UNIX_EPOCH);
    }
}
