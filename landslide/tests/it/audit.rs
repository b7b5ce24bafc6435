//! `landslide audit` against a real stream and database: it passes when the database holds what the
//! stream says, and names the voter or the option when it does not.

use std::time::Duration;

use diesel::sql_types::{Text, Uuid as SqlUuid};
use diesel_async::RunQueryDsl;
use landslide_tally::audit::{AuditConfig, AuditReport, TallyMismatch, audit};
use uuid::Uuid;

use crate::tally::{Stack, commit_like_a_worker, vote, vote_in};

fn config(stack: &Stack) -> AuditConfig {
    let mut config = AuditConfig::new(
        stack
            .nats
            .connections(landslide_nats::User::Audit, Some(&stack.db)),
    );
    config.connections.topology = stack.topology.clone();
    config.wait = Duration::from_secs(10);
    config
}

async fn run_audit(stack: &Stack) -> AuditReport {
    audit(&config(stack)).await.expect("audit runs")
}

/// Three voters; `a` changed their mind twice and `b` once, and `a`'s last two votes reached the
/// stream out of order. Ballots: a dogs, b cats, c dogs.
async fn three_voters(stack: &Stack) -> (Uuid, Uuid, Uuid) {
    let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let events = [
        vote(a, "cats", 10),
        vote(b, "dogs", 11),
        vote(a, "dogs", 30),
        vote(c, "dogs", 12),
        vote(a, "cats", 20),
        vote(b, "cats", 40),
    ];
    for event in &events {
        stack.publish(event).await;
    }
    commit_like_a_worker(&stack.db, &events).await;
    stack.ack(events.len()).await;
    (a, b, c)
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_passes_on_a_consistent_database() {
    let stack = Stack::start().await;
    three_voters(&stack).await;

    let report = run_audit(&stack).await;
    assert!(report.is_consistent(), "{report}");
    assert_eq!(
        (
            report.events_read,
            report.voters,
            report.ballots,
            report.undecodable
        ),
        (6, 3, 3, 0),
        "{report}"
    );
    assert!(
        report.to_string().starts_with("audit: CONSISTENT"),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_passes_on_an_empty_stream() {
    let stack = Stack::start().await;
    let report = run_audit(&stack).await;
    assert!(report.is_consistent(), "{report}");
    assert_eq!(
        (report.events_read, report.voters, report.ballots),
        (0, 0, 0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_names_the_voter_whose_ballot_choice_was_changed_behind_its_back() {
    let stack = Stack::start().await;
    let (a, _, _) = three_voters(&stack).await;
    diesel::sql_query("UPDATE ballots SET choice = 'cats' WHERE poll = 'pets' AND voter = $1")
        .bind::<SqlUuid, _>(a)
        .execute(&mut stack.db.conn().await)
        .await
        .unwrap();

    let report = run_audit(&stack).await;
    assert!(!report.is_consistent());
    assert_eq!(report.wrong_ballots.len(), 1, "{report}");
    let wrong = &report.wrong_ballots[0];
    assert_eq!((wrong.voter.0, wrong.expected.choice.as_str()), (a, "dogs"));
    assert_eq!(wrong.found.choice, "cats");
    // The tally still says what the worker wrote; the ballot count no longer agrees.
    let cats = report
        .tally_mismatches
        .iter()
        .find(|m| m.option == "cats")
        .expect("cats");
    assert_eq!((cats.expected, cats.tally, cats.count), (1, 1, 2));
    let text = report.to_string();
    assert!(
        text.contains(&a.to_string()),
        "the report does not name the voter: {text}"
    );
    assert!(text.starts_with("audit: INCONSISTENT"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_names_a_voter_whose_ballot_is_missing_or_unexpected() {
    let stack = Stack::start().await;
    let (_, b, _) = three_voters(&stack).await;
    let stranger = Uuid::new_v4();
    let mut conn = stack.db.conn().await;
    diesel::sql_query("DELETE FROM ballots WHERE voter = $1")
        .bind::<SqlUuid, _>(b)
        .execute(&mut conn)
        .await
        .unwrap();
    diesel::sql_query(
        "INSERT INTO ballots (poll, voter, choice, ts, event_id, after_ts, stored_ns) VALUES ('pets', $1, 'dogs', 1, $2, 0, 0)",
    )
    .bind::<SqlUuid, _>(stranger)
    .bind::<SqlUuid, _>(Uuid::new_v4())
    .execute(&mut conn)
    .await
    .unwrap();

    let report = run_audit(&stack).await;
    assert_eq!(report.missing_ballots.len(), 1, "{report}");
    assert_eq!(report.missing_ballots[0].voter.0, b);
    assert_eq!(report.unexpected_ballots.len(), 1, "{report}");
    assert_eq!(report.unexpected_ballots[0].voter.0, stranger);
    let text = report.to_string();
    assert!(
        text.contains(&b.to_string()) && text.contains(&stranger.to_string()),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_names_the_option_whose_tally_row_was_changed() {
    let stack = Stack::start().await;
    three_voters(&stack).await;
    let changed = diesel::sql_query(
        "UPDATE tallies SET votes = votes + 5 \
         WHERE (poll, option, shard) = (SELECT poll, option, shard FROM tallies \
                                        WHERE poll = 'pets' AND option = $1 LIMIT 1)",
    )
    .bind::<Text, _>("dogs")
    .execute(&mut stack.db.conn().await)
    .await
    .unwrap();
    assert_eq!(changed, 1);

    let report = run_audit(&stack).await;
    assert!(!report.is_consistent());
    assert!(
        report.wrong_ballots.is_empty() && report.missing_ballots.is_empty(),
        "{report}"
    );
    assert_eq!(
        report.tally_mismatches,
        [TallyMismatch {
            poll: "pets".to_owned(),
            option: "dogs".to_owned(),
            expected: 2,
            tally: 7,
            count: 2,
        }]
    );
    let text = report.to_string();
    assert!(
        text.contains("poll pets option dogs: expected 2, tally 7, ballots 2"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_reports_undecodable_messages_next_to_the_dead_letters() {
    let stack = Stack::start().await;
    let voter = Uuid::new_v4();
    let good = vote(voter, "cats", 10);
    stack.publish(&good).await;
    stack.publish_raw(b"not a vote".to_vec()).await;
    stack
        .publish(&vote_in("elections", Uuid::new_v4(), "cats", 11))
        .await;
    stack.publish(&vote(Uuid::new_v4(), "fish", 12)).await;
    commit_like_a_worker(&stack.db, &[good]).await;
    // A correct worker dead-letters the three it cannot count before acking them.
    for reason in ["undecodable", "unknown poll", "unknown option"] {
        stack
            .worker_js
            .publish(format!("{}.test", stack.topology.dlq_prefix), reason.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    stack.ack(4).await;

    let report = run_audit(&stack).await;
    assert!(report.is_consistent(), "{report}");
    assert_eq!(report.events_read, 4);
    assert_eq!(report.undecodable, 1);
    assert_eq!(report.unknown_poll_or_option, 2);
    assert_eq!(report.dead_letters, 3);
    assert_eq!(report.voters, 1);
    let text = report.to_string();
    assert!(
        text.contains(
            "1 undecodable, 2 refused by their poll definitions, 0 stamped ahead of the \
             stream, 0 naming a revision the polls bucket lacks; dead letters stored: 3\n"
        ),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_refuses_to_judge_while_votes_are_not_committed() {
    let stack = Stack::start().await;
    stack.publish(&vote(Uuid::new_v4(), "cats", 10)).await;
    let mut config = config(&stack);
    config.wait = Duration::from_millis(300);

    let err = audit(&config)
        .await
        .expect_err("the consumer is not drained");
    let message = format!("{err:#}");
    assert!(message.contains("not all committed"), "{message}");
    assert!(message.contains("1 votes not delivered"), "{message}");
}
