//! One poll definition for every role: the polls bucket, its revisions, and votes judged by the
//! revision they were accepted under. The issue that brought it: an ingest node started with a
//! polls file that had a third option took a `birds` vote with 202, the workers (on the default
//! file) dead-lettered it, and audit still passed. Then the poll's life: opening, closing, the
//! final result and its certificate.

use std::collections::BTreeMap;
use std::time::Duration;

use landslide_nats::{User, polls};
use landslide_schema::record::OwnerSigningKey;
use landslide_schema::{Polls, Revision, RevisionHash, VoteEvent};
use landslide_tally::audit::{AuditConfig, audit};
use landslide_tally::certificate::{Export, ExportKey, certify};
use sha2::{Digest as _, Sha256};
use uuid::Uuid;

use crate::support::{self, Db, Nats, within};
use crate::tally::vote;

const BIRDS: &str = r#"
[[poll]]
id = "pets"
question = "Cats, dogs or birds?"
options = [
  { id = "cats", label = "Cats" },
  { id = "dogs", label = "Dogs" },
  { id = "birds", label = "Birds" },
]
"#;

async fn store(nats: &Nats) -> async_nats::jetstream::kv::Store {
    let js = async_nats::jetstream::new(nats.client().await);
    polls::ensure_bucket(
        &js,
        &landslide_nats::Topology::default(),
        landslide_nats::Access::SetUp,
    )
    .await
    .unwrap()
}

/// The poll definitions as a worker starting with the built-in poll reads and watches them.
async fn worker_watch(nats: &Nats) -> anyhow::Result<polls::PollWatch> {
    let js = async_nats::jetstream::new(nats.client_as(User::Worker).await);
    let topology = landslide_nats::Topology::default();
    polls::watch(
        &js,
        &topology,
        &Polls::default(),
        landslide_nats::Access::SetUp,
    )
    .await
}

async fn dead_letters(nats: &Nats) -> u64 {
    nats.messages("VOTES_DLQ").await
}

#[tokio::test(flavor = "multi_thread")]
async fn every_role_judges_a_vote_by_the_revision_it_was_accepted_under() {
    let nats = Nats::start().await;
    let db = Db::create().await;
    // The worker starts first, on the built-in poll: it seeds revision 1.
    let worker = support::worker(&nats, &db);
    support::wait_for("the polls bucket", Duration::from_secs(15), || async {
        let store = store(&nats).await;
        (!polls::read_all(&store).await.ok()?.revisions.is_empty()).then_some(())
    })
    .await;
    // An ingest node started with another polls file: the bucket wins, so the node refuses
    // `birds` (422) instead of accepting what the workers would refuse.
    let birds = Polls::from_toml(BIRDS).unwrap();
    let ingest = support::ingest_with(&nats, "web1", |c| c.connections.polls = birds.clone()).await;
    let voter = support::voter();
    let (status, body) = support::vote_api(&voter, &ingest.url, "pets", "birds").await;
    assert_eq!(status, 422, "{body}");

    // The owner adds the option: revision 2, picked up without a restart.
    let store = store(&nats).await;
    assert_eq!(polls::put(&store, BIRDS).await.unwrap(), Revision(2));
    support::wait_for("ingest to accept birds", Duration::from_secs(15), || {
        let voter = voter.clone();
        let url = ingest.url.clone();
        async move {
            let (status, _) = support::vote_api(&voter, &url, "pets", "birds").await;
            (status == 202).then_some(())
        }
    })
    .await;
    // It names revision 2 by number and by the hash of the text the owner wrote.
    let stored = nats
        .js()
        .await
        .get_stream("VOTES")
        .await
        .unwrap()
        .get_last_raw_message_by_subject("votes.web1")
        .await
        .unwrap();
    let accepted = VoteEvent::decode(&stored.payload).unwrap();
    assert_eq!(accepted.rev, Some(Revision(2)));
    assert_eq!(accepted.rev_hash, Some(RevisionHash::of(BIRDS)));

    // A vote naming a revision nobody has written yet waits (nak), and is never dead-lettered;
    // once the revision exists, it counts.
    let early = VoteEvent {
        rev: Some(Revision(3)),
        ..vote(Uuid::new_v4(), "fish", 1_000)
    };
    let js = async_nats::jetstream::new(nats.client_as(landslide_nats::User::Ingest).await);
    js.publish("votes.web9", early.encode().into())
        .await
        .unwrap()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(dead_letters(&nats).await, 0);
    assert!(support::pending(&nats).await.unwrap() >= 1);
    let fish = BIRDS.replace(
        r#"{ id = "birds", label = "Birds" },"#,
        r#"{ id = "birds", label = "Birds" }, { id = "fish", label = "Fish" },"#,
    );
    assert_eq!(polls::put(&store, &fish).await.unwrap(), Revision(3));
    support::drained(&nats).await;
    assert_eq!(dead_letters(&nats).await, 0);

    let ballots = db.tally_and_count("pets").await;
    let count = |option: &str| {
        ballots
            .iter()
            .find(|(o, _, _)| o == option)
            .map_or(0, |(_, tally, _)| *tally)
    };
    assert_eq!((count("birds"), count("fish")), (1, 1), "{ballots:?}");
    let mut config = AuditConfig::new(nats.connections(landslide_nats::User::Audit, Some(&db)));
    config.wait = Duration::from_secs(10);
    let report = audit(&config).await.unwrap();
    assert!(report.is_consistent(), "{report}");
    assert_eq!(report.unknown_poll_or_option, 0, "{report}");
    worker.stop().await;
    ingest.role.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn polls_put_refuses_an_invalid_file_and_never_overwrites_a_revision() {
    let nats = Nats::start().await;
    let store = store(&nats).await;
    assert!(polls::put(&store, "not = [toml").await.is_err());
    let one_option = BIRDS.replace(
        r#"{ id = "dogs", label = "Dogs" },
  { id = "birds", label = "Birds" },"#,
        "",
    );
    assert!(polls::put(&store, &one_option).await.is_err());
    assert!(polls::read_all(&store).await.unwrap().revisions.is_empty());
    // Two writers at once get two revisions.
    let (a, b) = tokio::join!(polls::put(&store, BIRDS), polls::put(&store, BIRDS));
    let mut revisions = [a.unwrap(), b.unwrap()];
    revisions.sort();
    assert_eq!(revisions, [Revision(1), Revision(2)]);
    let seeded = polls::load(&store, &Polls::default(), landslide_nats::Access::SetUp)
        .await
        .unwrap();
    assert_eq!(
        seeded.latest().0,
        Revision(2),
        "a seed never writes over revisions"
    );
}

/// A poll that is over cannot be changed: the revision would count none of its votes (a poll once
/// over stays over), so `polls put` says so rather than write it. A revision may carry the poll
/// along unchanged.
#[tokio::test(flavor = "multi_thread")]
async fn polls_put_refuses_to_change_a_poll_that_is_over() {
    let nats = Nats::start().await;
    let store = store(&nats).await;
    let an_hour_ago = chrono::Utc::now() - chrono::Duration::hours(1);
    let over = windowed(an_hour_ago - chrono::Duration::hours(1), an_hour_ago);
    assert_eq!(polls::put(&store, &over).await.unwrap(), Revision(1));
    let reopened = windowed(an_hour_ago, chrono::Utc::now() + chrono::Duration::hours(1));
    let refused = polls::put(&store, &reopened).await.unwrap_err();
    assert!(
        format!("{refused:#}").contains("poll pets is over"),
        "{refused:#}"
    );
    let lunch = "\n[[poll]]\nid = \"lunch\"\nquestion = \"Pizza or pasta?\"\n\
        options = [{ id = \"pizza\", label = \"Pizza\" }, { id = \"pasta\", label = \"Pasta\" }]\n";
    let carried = format!("{over}{lunch}");
    assert_eq!(polls::put(&store, &carried).await.unwrap(), Revision(2));
}

/// Found by trying it: a plain publish to `$KV.LANDSLIDE_POLLS.rev.78` as `admin` (or as
/// `worker`, which could publish to every key) replaced a revision under which three votes had
/// been accepted; the workers then dead-lettered them, and audit, judging by the rewrite, passed.
/// The bucket kept no history and allowed purges and rollups.
#[tokio::test(flavor = "multi_thread")]
async fn no_user_may_rewrite_delete_or_purge_a_revision() {
    let nats = &Nats::start().await;
    support::set_up(nats, &Polls::default()).await;
    // Each user's attempts on the heap: six of them at once outgrow a test thread's stack.
    let attempts = User::ALL.map(|user| Box::pin(async move {
        let js = async_nats::jetstream::new(nats.client_as(user).await);
        let store = js.get_key_value("LANDSLIDE_POLLS").await.unwrap();
        let stream = "KV_LANDSLIDE_POLLS";
        let unsealed = async_nats::jetstream::stream::Config {
            discard_new_per_subject: false,
            ..polls::bucket_config(&landslide_nats::Topology::default())
        };
        // Every attempt at once: each refused one waits out its timeout.
        let (published, put, deleted, purged, purged_bucket, updated, deleted_bucket) = tokio::join!(
            crate::auth::stores(nats, user, "$KV.LANDSLIDE_POLLS.rev.1"),
            within(store.put("rev.1", BIRDS.into())),
            within(store.delete("rev.1")),
            within(store.purge("rev.1")),
            within(async { js.get_stream_no_info(stream).await.ok()?.purge().await.ok() }),
            within(js.update_stream(unsealed)),
            within(js.delete_stream(stream)),
        );
        let done: Vec<&str> = [
            (published, "published over it"),
            (matches!(put, Some(Ok(_))), "put over it"),
            (matches!(deleted, Some(Ok(()))), "deleted it"),
            (matches!(purged, Some(Ok(()))), "purged it"),
            (matches!(purged_bucket, Some(Some(_))), "purged the bucket"),
            (matches!(updated, Some(Ok(_))), "unsealed the bucket"),
            (matches!(deleted_bucket, Some(Ok(_))), "deleted the bucket"),
        ]
        .into_iter()
        .filter_map(|(done, what)| done.then_some(what))
        .collect();
        (user, done)
    }));
    for (user, done) in futures::future::join_all(attempts).await {
        assert!(done.is_empty(), "{user} {done:?} revision 1");
    }
    let store = store(nats).await;
    let contents = polls::read_all(&store).await.unwrap();
    assert_eq!(contents.revisions.len(), 1, "{contents:?}");
    assert_eq!(contents.revisions[0].polls, Polls::default());
    assert!(contents.strays.is_empty(), "{contents:?}");
    assert!(polls::findings(&store).await.unwrap().is_empty());

    // A new revision: the polls' owner and the operator may write one, nobody else.
    let created = User::ALL
        .into_iter()
        .enumerate()
        .map(|(i, user)| async move {
            let key = format!("$KV.LANDSLIDE_POLLS.rev.{}", 10 + i);
            (user, crate::auth::stores(nats, user, &key).await)
        });
    let created: Vec<(User, bool)> = futures::future::join_all(created).await;
    assert_eq!(
        created,
        User::ALL.map(|user| (user, matches!(user, User::Polls | User::Admin)))
    );
}

/// A bucket made before it was sealed (as async-nats' `create_key_value` makes one) lets the
/// operator rewrite a revision: every role keeps the text it read first, says so, and starts
/// beside a key it cannot read, which once stopped every role from starting.
#[tokio::test(flavor = "multi_thread")]
async fn a_role_keeps_the_revision_it_read_first_and_starts_beside_a_stray_key() {
    let nats = &Nats::start().await;
    let admin = async_nats::jetstream::new(nats.client().await);
    let unsealed = admin
        .create_key_value(async_nats::jetstream::kv::Config {
            bucket: "LANDSLIDE_POLLS".to_owned(),
            history: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    unsealed
        .create("rev.1", Polls::default().to_toml().into())
        .await
        .unwrap();
    // Keys no revision can be read from: one not a polls file, one not a revision's key.
    unsealed
        .create("rev.2", "not = [toml".into())
        .await
        .unwrap();
    unsealed.create("notes", "hello".into()).await.unwrap();

    let watch = worker_watch(nats)
        .await
        .expect("a stray key does not stop a role");
    assert_eq!(watch.current().latest().0, Revision(1));

    let owner = async_nats::jetstream::new(nats.client_as(User::Polls).await);
    let store = owner.get_key_value("LANDSLIDE_POLLS").await.unwrap();
    let newest = |revision| {
        let watch = watch.clone();
        async move { (watch.current().latest().0 == revision).then_some(()) }
    };
    assert_eq!(polls::put(&store, BIRDS).await.unwrap(), Revision(3));
    support::wait_for("revision 3", Duration::from_secs(30), || {
        newest(Revision(3))
    })
    .await;
    // The rewrite, then one more revision: once the role has that, it has seen the rewrite.
    unsealed.put("rev.1", BIRDS.into()).await.unwrap();
    assert_eq!(polls::put(&store, BIRDS).await.unwrap(), Revision(4));
    support::wait_for("revision 4", Duration::from_secs(30), || {
        newest(Revision(4))
    })
    .await;
    assert_eq!(
        watch.current().get(Revision(1)),
        Some(&Polls::default()),
        "the role adopted a rewritten revision"
    );

    let findings = polls::findings(&store).await.unwrap();
    for expected in [
        "the polls bucket is not sealed",
        "rev.1 of the polls bucket: written after rev.3",
        "rev.2 of the polls bucket: not a valid polls file",
        "notes of the polls bucket: not a revision's key",
    ] {
        assert!(
            findings.iter().any(|f| f.starts_with(expected)),
            "{expected:?} not in {findings:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_role_sees_a_new_revision_after_nats_server_restarted() {
    let mut nats = Nats::start().await;
    let watch = worker_watch(&nats).await.unwrap();
    assert_eq!(watch.current().latest().0, Revision(1));

    nats.kill().await;
    nats.restart().await;
    let store = store(&nats).await;
    assert_eq!(polls::put(&store, BIRDS).await.unwrap(), Revision(2));
    support::wait_for("the new revision", Duration::from_secs(30), || async {
        (watch.current().latest().0 == Revision(2)).then_some(())
    })
    .await;
}

/// A vote through the API that must be refused with 403 and a message containing `why`.
async fn refused(ingest: &str, why: &str) {
    let (status, body) = support::vote_api(&support::voter(), ingest, "pets", "cats").await;
    assert_eq!(status, 403, "{body}");
    let message = body["error"].as_str().unwrap_or_default();
    assert!(message.contains(why), "{body}");
}

/// The voting form's HTML.
async fn form(ingest: &str) -> String {
    reqwest::get(ingest).await.unwrap().text().await.unwrap()
}

/// The owner of the windowed poll: their key signs its record.
fn owner() -> OwnerSigningKey {
    OwnerSigningKey::from_seed([7; 32])
}

/// `landslide verify DIR ARGS…`: whether it passed, and what it printed.
fn verify(dir: &std::path::Path, args: &[&str]) -> (bool, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_landslide"))
        .arg("verify")
        .arg(dir)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// One line of each published file edited, in a copy of the record: `verify` refuses every copy.
fn every_edited_file_is_refused(record: &std::path::Path) {
    let edits: [(&str, &str, &str); 6] = [
        ("events.csv", ",dogs,", ",cats,"),
        ("ballots.csv", ",dogs,", ",cats,"),
        ("certificate.json", "\"dogs\": 1", "\"dogs\": 2"),
        ("revisions/1.toml", "Cats or dogs?", "Cats or dogs!"),
        ("revisions/2.toml", "Cats or dogs?", "Cats or dogs!"),
        ("certificate.sig", "ed25519:", "ed25519:0"),
    ];
    for (file, from, to) in edits {
        let copy = tempfile::tempdir().unwrap();
        std::fs::create_dir(copy.path().join("revisions")).unwrap();
        for name in [
            "events.csv",
            "ballots.csv",
            "certificate.json",
            "certificate.sig",
            "revisions/1.toml",
            "revisions/2.toml",
        ] {
            std::fs::copy(record.join(name), copy.path().join(name)).unwrap();
        }
        let path = copy.path().join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(from), "{file} lacks {from:?}: {text}");
        let signature = file == "certificate.sig";
        // The signature: one hex digit more would not parse; one changed digit is the edit.
        let edited = if signature {
            let mut digits: Vec<char> = text.trim_end().chars().collect();
            let last = digits.len() - 1;
            digits[last] = if digits[last] == '0' { '1' } else { '0' };
            format!("{}\n", digits.into_iter().collect::<String>())
        } else {
            text.replacen(from, to, 1)
        };
        std::fs::write(&path, edited).unwrap();
        let (ok, out) = verify(copy.path(), &[]);
        assert!(
            !ok && out.contains("REFUSED"),
            "an edited {file} verified:\n{out}"
        );
    }
}

/// `landslide export` of poll `pets`, signed by [`owner`]: the record's folder, the audit and the
/// certificate.
async fn export(
    nats: &Nats,
    db: &Db,
) -> (
    tempfile::TempDir,
    landslide_tally::audit::AuditReport,
    landslide_schema::record::Certificate,
) {
    let mut config = AuditConfig::new(nats.connections(User::Audit, Some(db)));
    config.wait = Duration::from_secs(10);
    let key = ExportKey::new("an export key of the poll's owner, 32+ bytes").unwrap();
    let out = tempfile::tempdir().unwrap();
    let export = Export {
        out: out.path(),
        signing: Some(&owner()),
    };
    let (report, certificate) = certify(&config, "pets", &key, Some(export)).await.unwrap();
    (out, report, certificate)
}

/// The pets poll with a window, as a polls file, owned by [`owner`].
fn windowed(
    opens_at: chrono::DateTime<chrono::Utc>,
    closes_at: chrono::DateTime<chrono::Utc>,
) -> String {
    let poll =
        |t: chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    format!(
        "[[poll]]\nid = \"pets\"\nquestion = \"Cats or dogs?\"\n\
         options = [{{ id = \"cats\", label = \"Cats\" }}, {{ id = \"dogs\", label = \"Dogs\" }}]\n\
         opens_at = \"{}\"\ncloses_at = \"{}\"\nowner_key = \"{}\"\n",
        poll(opens_at),
        poll(closes_at),
        owner().public()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vote_counts_only_if_the_stream_stored_it_inside_the_window_whatever_the_node_clock() {
    let nats = Nats::start().await;
    let db = Db::create().await;
    let now = chrono::Utc::now();
    let store = store(&nats).await;
    let later = now + chrono::Duration::hours(1);
    polls::put(&store, &windowed(later, later + chrono::Duration::hours(1)))
        .await
        .unwrap();
    let worker = support::worker(&nats, &db);
    let honest = support::ingest(&nats, "web1", 0).await;
    // A node whose clock is two minutes slow: by its clock the poll is still open after the close.
    let slow = support::ingest(&nats, "web2", -120_000).await;

    refused(&honest.url, "opens at").await;
    assert!(
        form(&honest.url)
            .await
            .contains("This poll is not open yet.")
    );

    // Open (since an hour ago, so the slow node's clock is inside too), closing in three seconds.
    let closes_at = chrono::Utc::now() + chrono::Duration::seconds(3);
    let opened = now - chrono::Duration::hours(1);
    polls::put(&store, &windowed(opened, closes_at))
        .await
        .unwrap();
    let early = support::voter();
    let receipt = support::wait_for("the poll to open", Duration::from_secs(15), || {
        let early = early.clone();
        let url = honest.url.clone();
        async move {
            let (status, body) = support::vote_api(&early, &url, "pets", "dogs").await;
            (status == 202).then(|| {
                let field = |name: &str| body[name].as_str().unwrap().to_owned();
                (field("event_id"), field("receipt"))
            })
        }
    })
    .await;
    let (event_id, receipt) = receipt;
    let wait = (closes_at - chrono::Utc::now())
        .to_std()
        .unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_millis(200)).await;

    refused(&honest.url, "closed at").await;
    let page = form(&honest.url).await;
    assert!(page.contains("This poll is closed."), "{page}");
    assert!(
        !page.contains("<button"),
        "a closed poll still has buttons: {page}"
    );
    // The slow node stores the vote (its clock says open), then reads when the stream stored it:
    // after the close, so no 202.
    refused(&slow.url, "closed at").await;

    // Closed by the stream's clock and nothing pending: the result is final.
    let tally = support::tally(&nats, &db).await;
    let results = support::wait_for("the final result", Duration::from_secs(30), || {
        let url = format!("{}/api/results/pets", tally.url);
        async move {
            let body: serde_json::Value = reqwest::get(&url).await.ok()?.json().await.ok()?;
            (body["status"] == "final").then_some(body)
        }
    })
    .await;
    assert_eq!(results["total"], 1, "{results}");
    assert_eq!(results["pending"], 0, "{results}");
    assert!(results["closes_at"].as_str().is_some(), "{results}");
    let page = form(&tally.url).await;
    assert!(page.contains("Final result"), "{page}");
    assert!(page.contains("100.0%"), "{page}");
    tally.role.stop().await;

    // The record: final, the counts, signed by the owner; `landslide verify` recomputes it from
    // the folder alone, finds the voter's vote by their receipt, and refuses any edited file.
    let (out, report, certificate) = export(&nats, &db).await;
    assert!(report.is_consistent(), "{report}");
    assert_eq!(certificate.status, "final", "{certificate}");
    assert_eq!(
        certificate.counts,
        BTreeMap::from([("cats".to_owned(), 0), ("dogs".to_owned(), 1)])
    );
    assert_eq!((certificate.ballots, certificate.events_read), (1, 2));
    assert_eq!(
        certificate.events, 2,
        "both events of the poll are in the log"
    );
    assert_eq!(
        (certificate.first_sequence, certificate.last_sequence),
        (1, 2)
    );
    let csv = std::fs::read_to_string(out.path().join("ballots.csv")).unwrap();
    let digest = format!("sha256:{:x}", Sha256::digest(csv.as_bytes()));
    assert_eq!(certificate.digest, digest);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "voter,choice,event_id,ts");
    assert_eq!(lines.len(), 2, "{csv}");
    assert!(lines[1].contains(&format!(",dogs,{event_id},")), "{csv}");
    let (ok, text) = verify(out.path(), &["--receipt", &receipt]);
    assert!(ok, "{text}");
    assert!(text.contains("VERIFIED"), "{text}");
    assert!(text.contains("counts: cats 0, dogs 1"), "{text}");
    assert!(text.contains("not counted: 1 (closed 1)"), "{text}");
    assert!(
        text.contains("receipt: in the record (sequence 1): counted"),
        "{text}"
    );
    let other = landslide_schema::record::OwnerSigningKey::from_seed([9; 32]).public();
    let (ok, text) = verify(out.path(), &["--owner-key", &other.to_string()]);
    assert!(
        !ok && text.contains("not by the published owner key"),
        "{text}"
    );
    every_edited_file_is_refused(out.path());

    // What an operator without the nats CLI sees.
    let mut config = AuditConfig::new(nats.connections(User::Audit, Some(&db)));
    config.wait = Duration::from_secs(10);
    // A key other than the poll's owner's is refused before the audit reads the stream: nothing
    // is written.
    let elsewhere = tempfile::tempdir().unwrap();
    let wrong = Export {
        out: elsewhere.path(),
        signing: Some(&OwnerSigningKey::from_seed([8; 32])),
    };
    let key = ExportKey::new("an export key of the poll's owner, 32+ bytes").unwrap();
    let refused = certify(&config, "pets", &key, Some(wrong))
        .await
        .unwrap_err();
    assert!(
        format!("{refused:#}").contains("not the owner key"),
        "{refused:#}"
    );
    assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 0);
    let status = landslide_tally::status::status(&config).await.unwrap();
    let text = status.to_string();
    assert!(text.contains("poll pets (Cats or dogs?): final"), "{text}");
    assert!(text.contains("counts: cats 0, dogs 1; total 1"), "{text}");
    assert!(text.contains("pending: 0"), "{text}");
    assert!(text.contains("stream VOTES: 2 messages"), "{text}");
    assert!(text.contains("stream VOTES_DLQ: 1 messages"), "{text}");

    support::drained(&nats).await;
    let counts = db.tally_and_count("pets").await;
    let total: i64 = counts.iter().map(|(_, tally, _)| tally).sum();
    assert_eq!(
        total, 1,
        "only the vote inside the window counts: {counts:?}"
    );
    let report = audit(&config).await.unwrap();
    assert!(report.is_consistent(), "{report}");
    // The slow node's vote is in the stream, refused and not counted.
    assert_eq!(
        (report.events_read, report.unknown_poll_or_option),
        (2, 1),
        "{report}"
    );
    worker.stop().await;
    honest.role.stop().await;
    slow.role.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_receipt_says_whether_its_vote_is_the_one_counted_or_which_replaced_it() {
    let nats = Nats::start().await;
    let db = Db::create().await;
    let worker = support::worker(&nats, &db);
    let ingest = support::ingest(&nats, "web1", 0).await;
    let tally = support::tally(&nats, &db).await;
    let voter = support::voter();
    let (_, first) = support::vote_api(&voter, &ingest.url, "pets", "cats").await;
    let (_, second) = support::vote_api(&voter, &ingest.url, "pets", "dogs").await;
    let receipt = |body: &serde_json::Value| body["receipt"].as_str().unwrap().to_owned();
    let (first, second) = (receipt(&first), receipt(&second));
    support::drained(&nats).await;

    let ask = |r: String| {
        let url = format!("{}/api/receipts/{r}", tally.url);
        async move {
            let response = reqwest::get(&url).await.ok()?;
            let body: serde_json::Value = response.json().await.ok()?;
            // Before tally's first refresh the answer is a 503: ask again.
            (body["status"].is_string() && body["status"] != "pending").then_some(body)
        }
    };
    let counted = support::wait_for("the second receipt", Duration::from_secs(15), || {
        ask(second.clone())
    })
    .await;
    assert_eq!(counted["status"], "counted", "{counted}");
    assert_eq!(counted["counted_choice"], "dogs", "{counted}");
    // The earlier receipt says it was replaced, and nothing of the vote that replaced it: a
    // receipt once gave the later choice and event id to anyone who held it.
    let replaced = ask(first.clone()).await.unwrap();
    assert_eq!(replaced["status"], "superseded", "{replaced}");
    let text = replaced.to_string();
    assert!(
        !text.contains("dogs") && !text.contains(counted["event_id"].as_str().unwrap()),
        "{replaced}"
    );
    let page = form(&format!("{}/receipts/{first}", tally.url)).await;
    assert!(
        page.contains("A later vote of yours replaced this one; that one is counted."),
        "{page}"
    );
    assert!(!page.contains("dogs"), "{page}");
    let garbage = reqwest::get(format!("{}/api/receipts/not-a-receipt", tally.url))
        .await
        .unwrap();
    assert_eq!(garbage.status(), 400);
    // Receipts this site did not issue learn nothing: one made up for the voter (a receipt once
    // answered with the voter's current choice for any event id), the counted one with another
    // stamp, and one without its tag, as receipts were before they were authenticated.
    let (voter_part, body) = {
        let parts: Vec<&str> = second.split('.').collect();
        (parts[1].to_owned(), parts[..4].join("."))
    };
    let made_up = format!("pets.{voter_part}.{}.1.{}", "0".repeat(32), "0".repeat(32));
    let restamped = second.replacen(".1", ".2", 1);
    for forged in [made_up, restamped] {
        let response = reqwest::get(format!("{}/api/receipts/{forged}", tally.url))
            .await
            .unwrap();
        assert_eq!(response.status(), 404, "{forged}");
        let text = response.text().await.unwrap();
        assert!(
            text.contains("did not issue") && !text.contains("dogs"),
            "{text}"
        );
    }
    let untagged = reqwest::get(format!("{}/api/receipts/{body}", tally.url))
        .await
        .unwrap();
    assert_eq!(untagged.status(), 400);

    // Found in review: the lookups had no statement timeout, so one held up by a lock on the
    // ballots held a connection of the four, and queued every lookup behind it, for as long as
    // the lock lasted. Now PostgreSQL cancels it, and the answer is a prompt 503.
    let mut locker = db.conn().await;
    use diesel_async::RunQueryDsl as _;
    for statement in ["BEGIN", "LOCK TABLE ballots IN ACCESS EXCLUSIVE MODE"] {
        diesel::sql_query(statement)
            .execute(&mut locker)
            .await
            .unwrap();
    }
    let response = reqwest::Client::new()
        .get(format!("{}/api/receipts/{second}", tally.url))
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .expect("an answer while the ballots are locked");
    assert_eq!(response.status(), 503);
    diesel::sql_query("ROLLBACK")
        .execute(&mut locker)
        .await
        .unwrap();

    worker.stop().await;
    ingest.role.stop().await;
    tally.role.stop().await;
}

/// Found by trying it: `pending` was one figure for every poll, so a poll still taking votes (or
/// one vote waiting for its revision) kept every other poll from being final. Now, once a poll
/// has closed, tally reads the polls of the votes not yet counted, and a closed poll with none of
/// its own pending is final whatever the others do.
#[tokio::test(flavor = "multi_thread")]
async fn a_closed_poll_is_final_while_another_still_takes_votes() {
    let nats = Nats::start().await;
    let db = Db::create().await;
    let store = store(&nats).await;
    let millis =
        |t: chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let closes_at = chrono::Utc::now() + chrono::Duration::seconds(3);
    let two_polls = format!(
        "{BIRDS}\n[[poll]]\nid = \"lunch\"\nquestion = \"Pizza or pasta?\"\n\
         options = [{{ id = \"pizza\", label = \"Pizza\" }}, {{ id = \"pasta\", label = \"Pasta\" }}]\n\
         opens_at = \"{}\"\ncloses_at = \"{}\"\n",
        millis(chrono::Utc::now() - chrono::Duration::hours(1)),
        millis(closes_at)
    );
    polls::put(&store, &two_polls).await.unwrap();
    let worker = support::worker(&nats, &db);
    let ingest = support::ingest(&nats, "web1", 0).await;
    let (status, body) = support::vote_api(&support::voter(), &ingest.url, "lunch", "pizza").await;
    assert_eq!(status, 202, "{body}");
    support::drained(&nats).await;
    let wait = (closes_at - chrono::Utc::now())
        .to_std()
        .unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_millis(200)).await;

    // No worker: the open poll's votes stay pending.
    worker.stop().await;
    for _ in 0..3 {
        let (status, body) =
            support::vote_api(&support::voter(), &ingest.url, "pets", "cats").await;
        assert_eq!(status, 202, "{body}");
    }
    let tally = support::tally(&nats, &db).await;
    let results = |poll: &'static str| {
        let url = format!("{}/api/results/{poll}", tally.url);
        async move {
            reqwest::get(&url)
                .await
                .ok()?
                .json::<serde_json::Value>()
                .await
                .ok()
        }
    };
    let lunch = support::wait_for("lunch to be final", Duration::from_secs(30), || async {
        let body = results("lunch").await?;
        (body["status"] == "final").then_some(body)
    })
    .await;
    assert_eq!(
        (lunch["total"].as_i64(), lunch["pending"].as_u64()),
        (Some(1), Some(0)),
        "{lunch}"
    );
    let pets = results("pets").await.unwrap();
    assert_eq!(pets["status"], "open", "{pets}");
    assert_eq!(pets["pending"], 3, "{pets}");
    tally.role.stop().await;
    ingest.role.stop().await;
}

/// Found in review: tally judged a poll's state by its latest revision's window, while the
/// workers judge each vote by the revision it names. An owner who moved the close earlier (revision
/// 2) saw `final` two seconds after the new close, and then a vote that a node still on revision
/// 1 had taken moments later was counted, after `final`. Now each revision lives
/// `REVISION_OVERLAP` after the next is written: votes under it stored within that count (and
/// keep the poll from being final), later ones are dead letters, and the published record
/// judges them the same.
#[tokio::test(flavor = "multi_thread")]
async fn a_poll_is_final_only_once_every_revision_it_was_open_under_has_stopped_counting() {
    let nats = Nats::start().await;
    let db = Db::create().await;
    let store = store(&nats).await;
    let opened = chrono::Utc::now() - chrono::Duration::hours(1);
    let first = windowed(opened, opened + chrono::Duration::days(1));
    polls::put(&store, &first).await.unwrap();
    let worker = support::worker(&nats, &db);
    let tally = support::tally(&nats, &db).await;
    // Revision 2 closes the poll two seconds from now.
    polls::put(
        &store,
        &windowed(opened, chrono::Utc::now() + chrono::Duration::seconds(2)),
    )
    .await
    .unwrap();
    let written = polls::read_all(&store).await.unwrap().revisions[1].written;

    // Every answer of tally's results API from now on.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<serde_json::Value>::new()));
    let watcher = tokio::spawn({
        let (seen, url) = (seen.clone(), format!("{}/api/results/pets", tally.url));
        async move {
            loop {
                if let Ok(body) = async { reqwest::get(&url).await?.json().await }.await {
                    seen.lock().unwrap().push(body);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });
    let js = async_nats::jetstream::new(nats.client_as(User::Ingest).await);
    let under_first = |choice| VoteEvent {
        rev: Some(Revision(1)),
        rev_hash: Some(RevisionHash::of(&first)),
        ..vote(Uuid::new_v4(), choice, 1_000)
    };
    let at = |offset: i64| {
        let wait = written + chrono::Duration::seconds(offset) - chrono::Utc::now();
        tokio::time::sleep(wait.to_std().unwrap_or_default())
    };
    // Five seconds after revision 2, past its close: a vote a node still on revision 1 took.
    at(5).await;
    let in_time = under_first("dogs");
    js.publish("votes.web9", in_time.encode().into())
        .await
        .unwrap()
        .await
        .unwrap();
    // Past revision 1's life: no honest node took this one.
    at(16).await;
    js.publish("votes.web9", under_first("cats").encode().into())
        .await
        .unwrap()
        .await
        .unwrap();
    let results = support::wait_for("the final result", Duration::from_secs(40), || {
        let seen = seen.clone();
        async move {
            let last = seen.lock().unwrap().last().cloned()?;
            (last["status"] == "final").then_some(last)
        }
    })
    .await;
    watcher.abort();
    assert_eq!(results["counts"]["dogs"], 1, "{results}");
    assert_eq!(results["total"], 1, "{results}");
    let seen = seen.lock().unwrap().clone();
    let first_final = seen.iter().position(|r| r["status"] == "final").unwrap();
    assert!(
        seen[first_final..].iter().all(|r| r["total"] == 1),
        "the count changed after it was final: {seen:?}"
    );
    assert!(
        seen.iter()
            .any(|r| r["status"] == "open" && r["total"] == 1),
        "revision 1's vote came while revision 1 still kept the poll open: {seen:?}"
    );
    assert_eq!(dead_letters(&nats).await, 1);
    tally.role.stop().await;

    // The audit and the published record judge both votes alike.
    let (out, report, certificate) = export(&nats, &db).await;
    assert!(report.is_consistent(), "{report}");
    assert_eq!(report.unknown_poll_or_option, 1, "{report}");
    assert_eq!(certificate.status, "final", "{certificate}");
    let (ok, text) = verify(out.path(), &[]);
    assert!(ok, "{text}");
    assert!(text.contains("counts: cats 0, dogs 1"), "{text}");
    assert!(text.contains("not counted: 1 (superseded 1)"), "{text}");
    worker.stop().await;
}

/// An ingest node that cannot confirm that it holds the latest revision (the polls bucket cannot
/// be read) might stamp votes with a revision whose life has ended: it takes none meanwhile, says
/// why on `/readyz`, and takes votes again once it can.
#[tokio::test(flavor = "multi_thread")]
async fn an_ingest_node_that_cannot_read_the_polls_bucket_takes_no_vote() {
    let (_dir, mut nats, db, topology) = three_replicas().await;
    // The polls bucket on one server, the votes on all three: with that server down, votes can
    // be stored and the bucket cannot be read.
    let js = async_nats::jetstream::new(nats.client(User::Worker).await.unwrap());
    let one = landslide_nats::Topology {
        replicas: 1,
        ..topology.clone()
    };
    let mut bucket = js.create_stream(polls::bucket_config(&one)).await.unwrap();
    let admin = async_nats::jetstream::new(nats.client(User::Admin).await.unwrap());
    let store = admin.get_key_value(&topology.polls_bucket).await.unwrap();
    polls::put(&store, &Polls::default().to_toml())
        .await
        .unwrap();
    let host = bucket
        .info()
        .await
        .unwrap()
        .cluster
        .clone()
        .unwrap()
        .leader
        .unwrap();
    let host = (0..nats.len()).find(|&n| nats.name(n) == host).unwrap();
    let worker = support::worker_with(&nats, &db, |c| c.connections.topology = topology.clone());
    let ingest = support::ingest_with(&nats, "web1", |c| {
        c.connections.topology = topology.clone();
    })
    .await;
    let voter = support::voter();
    let (status, body) = support::vote_api(&voter, &ingest.url, "pets", "cats").await;
    assert_eq!(status, 202, "{body}");

    nats.kill(host).await.unwrap();
    let readyz = format!("{}/readyz", ingest.url);
    let why = support::wait_for(
        "ingest to stop taking votes",
        Duration::from_secs(30),
        || {
            let readyz = readyz.clone();
            async move {
                let response = reqwest::get(&readyz).await.ok()?;
                let text = response.text().await.ok()?;
                text.contains("poll definitions").then_some(text)
            }
        },
    )
    .await;
    assert!(why.contains("confirmed current"), "{why}");
    let (status, body) = support::vote_api(&voter, &ingest.url, "pets", "dogs").await;
    assert_eq!(status, 503, "{body}");

    // The bucket back: votes are taken again, and counted.
    nats.restart(host).await.unwrap();
    support::wait_for(
        "ingest to take votes again",
        Duration::from_secs(60),
        || {
            let (voter, url) = (voter.clone(), ingest.url.clone());
            async move {
                let (status, _) = support::vote_api(&voter, &url, "pets", "dogs").await;
                (status == 202).then_some(())
            }
        },
    )
    .await;
    support::drained(&nats).await;
    let ballots = db.tally_and_count("pets").await;
    assert!(
        ballots.iter().any(|(o, n, _)| o == "dogs" && *n == 1),
        "{ballots:?}"
    );
    worker.stop().await;
    ingest.role.stop().await;
}

/// A three-node cluster (in a folder kept while the result lives), a database, and the topology
/// of three replicas.
async fn three_replicas() -> (
    tempfile::TempDir,
    landslide_servers::Nats,
    Db,
    landslide_nats::Topology,
) {
    let dir = tempfile::tempdir().unwrap();
    let nats = landslide_servers::Nats::start(landslide_servers::NatsLayout::Cluster, dir.path())
        .await
        .unwrap();
    let topology = landslide_nats::Topology {
        replicas: 3,
        ..landslide_nats::Topology::default()
    };
    (dir, nats, Db::create().await, topology)
}

/// On three replicas, the copy of a vote of a windowed poll that ingest reads back (when the
/// stream stored it decides whether it counts) may come from a follower that has not applied the
/// vote yet: answered `503` for a stored vote, whose voter then votes again. Ingest asks the
/// stream's leader when a replica does not have it.
#[tokio::test(flavor = "multi_thread")]
async fn on_three_replicas_every_stored_vote_of_a_windowed_poll_is_answered_202() {
    let (_dir, nats, db, topology) = three_replicas().await;
    let now = chrono::Utc::now();
    let polls = Polls::from_toml(&windowed(
        now - chrono::Duration::hours(1),
        now + chrono::Duration::hours(1),
    ))
    .unwrap();
    let worker = support::worker_with(&nats, &db, |c| {
        c.connections.topology = topology.clone();
        c.connections.polls = polls.clone();
    });
    let js = async_nats::jetstream::new(nats.client(User::Worker).await.unwrap());
    let leader = support::wait_for("the votes stream", Duration::from_secs(30), || async {
        let mut stream = js.get_stream(&topology.votes_stream).await.ok()?;
        stream.info().await.ok()?.cluster.clone()?.leader
    })
    .await;
    // Connected to a follower alone: its replica answers the read-back first.
    let follower = (0..nats.len()).find(|&n| nats.name(n) != leader).unwrap();
    let ingest = support::ingest_with(&nats, "web1", |c| {
        c.connections.topology = topology.clone();
        c.connections.polls = polls.clone();
        c.connections.nats = nats.node_config(follower, User::Ingest);
    })
    .await;
    let mut refused = Vec::new();
    for _ in 0..200 {
        let (status, body) =
            support::vote_api(&support::voter(), &ingest.url, "pets", "cats").await;
        if status != 202 {
            refused.push((status, body));
        }
    }
    assert!(
        refused.is_empty(),
        "{} of 200 refused: {:?}",
        refused.len(),
        refused.first()
    );
    ingest.role.stop().await;
    worker.stop().await;
}
