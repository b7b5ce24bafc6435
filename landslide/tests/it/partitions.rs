//! Votes split over several partition streams (`landslide_nats::partitions`): each counted once,
//! as the voter's latest, wherever the voter's votes landed; one number of partitions for every
//! role; and a number changed on a running deployment, up and down, losing nothing.

use crate::support::{self, Db, Nats};

/// Sets the number of vote partitions a role is given.
fn partitions(k: u16) -> impl Fn(&mut landslide_nats::Topology) {
    move |topology| topology.vote_partitions = k
}

/// An ingest node given `k` partitions that publishes to `partition`.
async fn node(nats: &Nats, name: &str, k: u16, partition: u16) -> support::Ingest {
    support::ingest_with(nats, name, |config| {
        partitions(k)(&mut config.connections.topology);
        config.partition = Some(partition);
    })
    .await
}

/// Three partitions, one node on each. Some voters change their minds from one partition to the
/// next with the cookie; others vote, lose the answer to their second vote (in another
/// partition), and vote again in a third: the rule of the lost answer, across the streams of
/// three leaders. Every voter is counted once, as their last vote, tally says nothing is
/// pending only once every partition is drained, and audit agrees from the three streams. A
/// worker that drained partition 0 alone leaves two thirds of the votes pending, and the test
/// waits in vain.
#[tokio::test(flavor = "multi_thread")]
async fn votes_in_three_partitions_are_counted_once_each_as_the_voters_latest() {
    const VOTERS: usize = 6;
    let nats = Nats::start().await;
    let db = Db::create().await;
    let worker = support::worker_with(&nats, &db, |config| {
        partitions(3)(&mut config.connections.topology);
    });
    let nodes = [
        node(&nats, "p0", 3, 0).await,
        node(&nats, "p1", 3, 1).await,
        node(&nats, "p2", 3, 2).await,
    ];
    let tally = support::tally_with(&nats, &db, |config| {
        partitions(3)(&mut config.connections.topology);
    })
    .await;
    for _ in 0..VOTERS {
        // A change of mind, the cookie carried from partition 0 to 1 to 2: dogs.
        let (status, cookie) = support::vote_with_cookie(&nodes[0].url, None, "cats").await;
        assert_eq!(status, 202);
        let (status, cookie) =
            support::vote_with_cookie(&nodes[1].url, cookie.as_deref(), "cats").await;
        assert_eq!(status, 202);
        let (status, _) = support::vote_with_cookie(&nodes[2].url, cookie.as_deref(), "dogs").await;
        assert_eq!(status, 202);
        // A lost answer: the dogs of partition 1 never reach the voter's cookie, and the cats
        // after it, in partition 2, knew as much: the later stored wins, cats.
        let (status, cookie) = support::vote_with_cookie(&nodes[0].url, None, "dogs").await;
        assert_eq!(status, 202);
        let (status, _lost) =
            support::vote_with_cookie(&nodes[1].url, cookie.as_deref(), "dogs").await;
        assert_eq!(status, 202);
        let (status, _) = support::vote_with_cookie(&nodes[2].url, cookie.as_deref(), "cats").await;
        assert_eq!(status, 202);
    }
    for (i, stream) in ["VOTES", "VOTES_P1", "VOTES_P2"].into_iter().enumerate() {
        assert_eq!(
            nats.messages(stream).await,
            2 * VOTERS as u64,
            "partition {i}"
        );
    }
    support::drained(&nats).await;
    assert_eq!(
        db.tally_and_count("pets").await,
        [
            ("cats".to_owned(), VOTERS as i64, VOTERS as i64),
            ("dogs".to_owned(), VOTERS as i64, VOTERS as i64)
        ]
    );
    let results = tally.settled_results("pets", 2 * VOTERS as u64).await;
    assert_eq!(results["counts"]["cats"], VOTERS as u64, "{results}");
    // Audit folds the three streams into one merge: consistent, every event read.
    let mut audit = landslide_tally::audit::AuditConfig::new(support::connections(
        &nats,
        landslide_nats::User::Audit,
        Some(&db),
    ));
    partitions(3)(&mut audit.connections.topology);
    let report = landslide_tally::audit::audit(&audit).await.unwrap();
    assert!(report.is_consistent(), "{report}");
    assert_eq!(report.events_read, 6 * VOTERS as u64, "{report}");
    assert_eq!(report.voters, 2 * VOTERS as u64, "{report}");
    let read: Vec<_> = report.streams.iter().map(|s| s.stream.as_str()).collect();
    assert_eq!(read, ["VOTES", "VOTES_P1", "VOTES_P2"]);
    // The published record names one stream in this release: the certificate is refused, not
    // written for a part of the votes.
    let key =
        landslide_tally::certificate::ExportKey::new("an export key, 32 bytes or more..").unwrap();
    let refused = landslide_tally::certificate::certify(&audit, "pets", &key, None)
        .await
        .expect_err("a certificate of three partition streams");
    assert!(
        format!("{refused:#}").contains("split over 3 partition streams"),
        "{refused:#}"
    );
    tally.role.stop().await;
    for node in nodes {
        node.role.stop().await;
    }
    worker.stop().await;
}

/// The workers record the number of partitions; an ingest node or tally given another refuses to
/// start, naming both numbers, instead of publishing where nobody drains or missing a stream.
#[tokio::test(flavor = "multi_thread")]
async fn a_role_given_another_number_of_partitions_refuses_to_start_naming_both() {
    let nats = Nats::start().await;
    let db = Db::create().await;
    let worker = support::worker_with(&nats, &db, |config| {
        partitions(3)(&mut config.connections.topology);
    });
    // Once the worker has recorded 3, a node given 3 starts.
    let three = node(&nats, "three", 3, 2).await;
    let one = support::start_ingest(&nats, "one", |_| {}).await;
    let err = one
        .role
        .join()
        .await
        .expect_err("a node given 1 partition of 3");
    let said = format!("{err:#}");
    assert!(
        said.contains("started with 1 vote partition") && said.contains("records 3"),
        "{said}"
    );
    // A partition beyond the recorded number is refused too.
    let beyond = support::start_ingest(&nats, "beyond", |config| {
        partitions(3)(&mut config.connections.topology);
        config.partition = Some(3);
    })
    .await;
    let said = format!(
        "{:#}",
        beyond.role.join().await.expect_err("partition 3 of 3")
    );
    assert!(said.contains("--partition 3"), "{said}");
    three.role.stop().await;
    worker.stop().await;
}

/// K raised from 1 to 3 and lowered to 1 again while ingest nodes keep taking votes: the workers
/// create the new streams before they record the new number, a node started before the change
/// goes on publishing to its partition, and after the number is lowered the workers still drain
/// the streams beyond it. Every vote is counted.
#[tokio::test(flavor = "multi_thread")]
async fn raising_and_lowering_the_number_of_partitions_loses_no_vote() {
    let nats = Nats::start().await;
    let db = Db::create().await;
    let mut votes = 0u64;
    let mut cast = async |url: &str| {
        let (status, _) = support::vote_api(&support::voter(), url, "pets", "cats").await;
        assert_eq!(status, 202);
        votes += 1;
    };
    let worker = support::worker(&nats, &db);
    let old = support::ingest(&nats, "old", 0).await;
    cast(&old.url).await;
    support::drained(&nats).await;

    // Up: the workers first, then new nodes.
    worker.stop().await;
    let worker = support::worker_with(&nats, &db, |config| {
        partitions(3)(&mut config.connections.topology);
    });
    let new = node(&nats, "new", 3, 2).await;
    cast(&new.url).await;
    cast(&old.url).await;
    support::drained(&nats).await;
    assert_eq!(nats.messages("VOTES_P2").await, 1);

    // Down: the workers given 1 again still drain partition 2, where `new` still publishes.
    worker.stop().await;
    let worker = support::worker(&nats, &db);
    support::wait_for(
        "the workers to record 1 partition",
        std::time::Duration::from_secs(30),
        || async {
            let js = nats.js().await;
            let mut votes = js.get_stream("VOTES").await.ok()?;
            let config = &votes.info().await.ok()?.config;
            let recorded = landslide_nats::partitions::Recorded::of(config).ok()?;
            (recorded.partitions == 1 && recorded.streams == 3).then_some(())
        },
    )
    .await;
    cast(&new.url).await;
    cast(&old.url).await;
    support::drained(&nats).await;
    assert_eq!(nats.messages("VOTES_P2").await, 2);
    assert_eq!(
        db.tally_and_count("pets").await,
        [("cats".to_owned(), votes as i64, votes as i64)]
    );
    new.role.stop().await;
    old.role.stop().await;
    worker.stop().await;
}

/// On a three-node cluster, three partitions get three leaders: the workers ask each stream's
/// leader to step down to a server of its own (`partitions::spread_leaders`). nats-server alone
/// picks each new stream's leader at random, all three distinct only 6 times in 27.
#[tokio::test(flavor = "multi_thread")]
async fn on_a_three_node_cluster_three_partitions_have_three_leaders() {
    let dir = tempfile::tempdir().unwrap();
    let nats = landslide_servers::Nats::start(landslide_servers::NatsLayout::Cluster, dir.path())
        .await
        .unwrap();
    let db = Db::create().await;
    let worker = support::worker_with(&nats, &db, |config| {
        config.connections.topology.replicas = 3;
        partitions(3)(&mut config.connections.topology);
    });
    let leaders = support::wait_for(
        "three partitions with three leaders",
        std::time::Duration::from_secs(60),
        || async {
            let mut leaders = Vec::new();
            for stream in ["VOTES", "VOTES_P1", "VOTES_P2"] {
                leaders.push(nats.stream_leader(stream).await?);
            }
            let mut distinct = leaders.clone();
            distinct.sort_unstable();
            distinct.dedup();
            (distinct.len() == 3).then_some(leaders)
        },
    )
    .await;
    assert_eq!(leaders.len(), 3);
    worker.stop().await;
}
