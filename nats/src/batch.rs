//! Atomic batch publish (nats-server 2.12 and later, stream `allow_atomic`): many messages stored
//! all together or not at all, and, with `sync_interval: always`, with one fsync of the stream's
//! block for the whole batch. async-nats 0.51 has no API for it, so this is the wire protocol:
//! every message carries `Nats-Batch-Id` and `Nats-Batch-Sequence` (1, 2, …); only the last has
//! a reply subject and `Nats-Batch-Commit: 1`, and the server's answer to it covers the batch
//! (`{"seq": <last>, "batch": <id>, "count": <n>}`, the messages having consecutive sequences).
//!
//! Limits (server defaults, `jetstream.limits.batch`): at most [`MAX_MESSAGES`] per batch, 50
//! open batches per stream, an open batch abandoned after 10 s without a message. A message id
//! already in the duplicate window refuses the whole batch ([`DUPLICATE_MESSAGE_ID`]) without
//! saying which message.

use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use serde::Deserialize;

/// The most messages in one batch: nats-server's default `jetstream.limits.batch.max_msgs`.
pub const MAX_MESSAGES: usize = 1000;
/// "maximum messages exceeded" when a stream with `discard: new` is full.
pub const STREAM_FULL: u64 = 10077;
/// The server's refusals for lack of room of any other kind: "insufficient resources" (10023),
/// "insufficient memory resources available" (10028), "insufficient storage resources available"
/// (10047): a server, or an account, whose store is full.
const NO_ROOM: [u64; 3] = [10023, 10028, 10047];

/// Whether a refusal says that nothing more fits, in the stream or on the server: a batch so
/// refused is refused for every vote in it alike, and trying them one by one only fills the
/// queue. Found by reading the publisher: a full server store answered 10047, which took the
/// per-vote path, and votes waited there past the load balancer's timeout.
pub fn is_no_room(code: u64) -> bool {
    code == STREAM_FULL || NO_ROOM.contains(&code)
}
/// "atomic publish batch contains duplicate message id".
pub const DUPLICATE_MESSAGE_ID: u64 = 10201;
/// "atomic publish too many inflight": the stream has its limit of open batches.
pub const TOO_MANY_IN_FLIGHT: u64 = 10210;

/// How an atomic batch publish ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Stored: the stream sequence of the batch's first message; the others follow it.
    Stored { first: u64 },
    /// Refused as a whole, with JetStream's error code: nothing of the batch is stored.
    Refused { code: u64, description: String },
    /// No answer (a timeout, no responders during an election, a lost connection), or a refusal
    /// for want of an open-batch slot: the batch may or may not be stored; sending the same
    /// messages again is the way to find out.
    Unknown(String),
}

/// The commit message's answer.
#[derive(Deserialize)]
struct Answer {
    seq: Option<u64>,
    count: Option<u64>,
    error: Option<ApiError>,
}

#[derive(Deserialize)]
struct ApiError {
    err_code: u64,
    #[serde(default)]
    description: String,
}

/// Publishes `messages` (headers, payload) to `subject` as one atomic batch, expecting stream
/// `stream`, and waits up to `timeout` for the commit's answer. `messages` must hold between 1
/// and [`MAX_MESSAGES`]; the batch headers are added to each message's own.
pub async fn publish(
    client: &async_nats::Client,
    subject: &str,
    stream: &str,
    messages: &[(HeaderMap, Bytes)],
    timeout: Duration,
) -> Outcome {
    let count = messages.len();
    let Some(((last_headers, last_payload), rest)) = messages.split_last() else {
        return Outcome::Stored { first: 0 };
    };
    let id = uuid::Uuid::new_v4().simple().to_string();
    let with_batch = |headers: &HeaderMap, n: usize| {
        let mut headers = headers.clone();
        headers.insert("Nats-Batch-Id", id.as_str());
        headers.insert("Nats-Batch-Sequence", n.to_string().as_str());
        headers.insert("Nats-Expected-Stream", stream);
        headers
    };
    for (n, (headers, payload)) in (1..).zip(rest) {
        if let Err(err) = client
            .publish_with_headers(subject.to_owned(), with_batch(headers, n), payload.clone())
            .await
        {
            return Outcome::Unknown(format!("cannot send the batch: {err}"));
        }
    }
    let mut headers = with_batch(last_headers, count);
    headers.insert("Nats-Batch-Commit", "1");
    let request = async_nats::Request::new()
        .headers(headers)
        .payload(last_payload.clone())
        .timeout(Some(timeout));
    let reply = match client.send_request(subject.to_owned(), request).await {
        Ok(reply) => reply,
        Err(err) => return Outcome::Unknown(err.to_string()),
    };
    judge(&reply.payload, count)
}

/// What the answer to a batch of `count` says.
fn judge(answer: &[u8], count: usize) -> Outcome {
    match serde_json::from_slice::<Answer>(answer) {
        Ok(Answer {
            error: Some(error), ..
        }) if error.err_code == TOO_MANY_IN_FLIGHT => Outcome::Unknown(error.description),
        Ok(Answer {
            error: Some(error), ..
        }) => Outcome::Refused {
            code: error.err_code,
            description: error.description,
        },
        Ok(Answer {
            seq: Some(seq),
            count: Some(stored),
            ..
        }) if stored == count as u64 && seq >= stored => Outcome::Stored {
            first: seq + 1 - stored,
        },
        _ => Outcome::Refused {
            code: 0,
            description: format!(
                "unexpected answer to a batch of {count}: {}",
                String::from_utf8_lossy(answer)
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full stream and a full server store are the same answer to the voter: no vote of the
    /// batch fits. A duplicate id or a bad message is about one vote, which splitting finds.
    #[test]
    fn every_refusal_for_lack_of_room_is_told_from_the_others() {
        for full in [STREAM_FULL, 10023, 10028, 10047] {
            assert!(is_no_room(full), "{full}");
        }
        for other in [DUPLICATE_MESSAGE_ID, TOO_MANY_IN_FLIGHT, 10054, 10060] {
            assert!(!is_no_room(other), "{other}");
        }
    }

    #[test]
    fn answers_are_judged() {
        assert_eq!(
            judge(
                br#"{"stream":"VOTES","seq":110,"batch":"b","count":10}"#,
                10
            ),
            Outcome::Stored { first: 101 }
        );
        let dup = br#"{"error":{"code":400,"err_code":10201,"description":"atomic publish batch contains duplicate message id"}}"#;
        assert!(matches!(
            judge(dup, 3),
            Outcome::Refused { code: 10201, .. }
        ));
        let busy = br#"{"error":{"code":429,"err_code":10210,"description":"atomic publish too many inflight"}}"#;
        assert!(matches!(judge(busy, 3), Outcome::Unknown(_)));
        // A count that is not ours is never taken for our batch.
        assert!(matches!(
            judge(br#"{"seq":5,"count":4}"#, 5),
            Outcome::Refused { code: 0, .. }
        ));
    }
}
