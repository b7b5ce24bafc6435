//! The definitions in `nats/` are usable as they are: sent raw to the JetStream API, as
//! `nats stream add --config` and `nats consumer add --config` do, and then accepted by the roles.

use landslide_nats::{CONSUMER_JSON, DLQ_STREAM_JSON, User, VOTES_STREAM_JSON};

use crate::support::{self, Db, Nats};

/// One JetStream API request with a raw JSON body; panics with the server's error if any.
async fn api(client: &async_nats::Client, subject: String, body: String) -> serde_json::Value {
    let reply = client.request(subject.clone(), body.into()).await.unwrap();
    let reply: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert!(reply.get("error").is_none(), "{subject}: {reply}");
    reply
}

#[tokio::test(flavor = "multi_thread")]
async fn the_definition_files_create_streams_and_a_consumer_the_roles_accept() {
    let nats = Nats::start().await;
    let client = nats.client().await;
    let votes = api(
        &client,
        "$JS.API.STREAM.CREATE.VOTES".into(),
        VOTES_STREAM_JSON.into(),
    )
    .await;
    assert_eq!(votes["config"]["discard"], "new");
    assert_eq!(votes["config"]["storage"], "file");
    api(
        &client,
        "$JS.API.STREAM.CREATE.VOTES_DLQ".into(),
        DLQ_STREAM_JSON.into(),
    )
    .await;
    // The workers' consumer, as the workers' user: nobody else may create it (`auth::`).
    let consumer: serde_json::Value = serde_json::from_str(CONSUMER_JSON).unwrap();
    let request = serde_json::json!({ "stream_name": "VOTES", "config": consumer });
    let created = api(
        &nats.client_as(User::Worker).await,
        "$JS.API.CONSUMER.CREATE.VOTES.dedup-worker".into(),
        request.to_string(),
    )
    .await;
    assert_eq!(created["config"]["ack_policy"], "explicit");

    // The roles find exactly their definitions and start; a vote goes all the way through.
    let db = Db::create().await;
    let worker = support::worker(&nats, &db);
    let ingest = support::ingest(&nats, "web01", 0).await;
    let (status, _) = support::vote_api(&support::voter(), &ingest.url, "pets", "cats").await;
    assert_eq!(status, 202);
    support::drained(&nats).await;
    assert_eq!(
        db.tally_and_count("pets").await,
        [("cats".to_owned(), 1, 1)]
    );
    ingest.role.stop().await;
    worker.stop().await;
}
