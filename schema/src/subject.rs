//! NATS subject and header names shared by the roles.

use crate::NodeId;

/// The default first token of vote subjects: node `web01` publishes to `votes.web01`.
pub const DEFAULT_VOTES_PREFIX: &str = "votes";

/// The default first tokens of dead-letter subjects: `dlq.votes.<node or "unknown">`.
pub const DEFAULT_DLQ_PREFIX: &str = "dlq.votes";

/// Header on a dead letter: why it could not be counted.
pub const DLQ_REASON_HEADER: &str = "Landslide-Reason";
/// Header on a dead letter: the subject it was published to.
pub const DLQ_SUBJECT_HEADER: &str = "Landslide-Subject";
/// Header on a dead letter: its sequence number in the votes stream.
pub const DLQ_STREAM_SEQ_HEADER: &str = "Landslide-Stream-Seq";

/// The subject node `node` publishes its votes to.
pub fn vote_subject(prefix: &str, node: &NodeId) -> String {
    format!("{prefix}.{node}")
}

/// The subject that carries a dead letter whose original subject was `original`.
pub fn dlq_subject(dlq_prefix: &str, votes_prefix: &str, original: &str) -> String {
    let node = original
        .strip_prefix(votes_prefix)
        .and_then(|rest| rest.strip_prefix('.'))
        .filter(|node| NodeId::parse(*node).is_ok())
        .unwrap_or("unknown");
    format!("{dlq_prefix}.{node}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_carry_the_node() {
        let node = NodeId::parse("web01").unwrap();
        assert_eq!(vote_subject("votes", &node), "votes.web01");
        assert_eq!(
            dlq_subject("dlq.votes", "votes", "votes.web01"),
            "dlq.votes.web01"
        );
        assert_eq!(
            dlq_subject("dlq.votes", "votes", "other.x"),
            "dlq.votes.unknown"
        );
    }
}
