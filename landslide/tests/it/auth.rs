//! The broker's closed doors: nobody connects without a user and TLS, and each role's user may
//! publish only where its role must (`nats/src/auth.rs`). Found by trying, as a new user would:
//! anything that reached port 4222 could publish a vote for any voter with any stamp, or purge
//! the stream that audit treats as the truth.

use std::time::Duration;

use async_nats::jetstream;
use landslide_nats::{Credentials, NatsConfig, User};
use secrecy::ExposeSecret as _;

use crate::support::{self, Nats, within};

/// Publishes one message as `user` and says whether JetStream stored it (a refused publish is
/// never answered, so the ack times out).
pub(crate) async fn stores(nats: &Nats, user: User, subject: &str) -> bool {
    let js = jetstream::new(nats.client_as(user).await);
    let ack = async { js.publish(subject.to_owned(), "x".into()).await?.await };
    matches!(
        tokio::time::timeout(Duration::from_secs(10), ack).await,
        Ok(Ok(_))
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn nobody_connects_without_credentials_and_tls() {
    let nats = Nats::start().await;
    let ingest = nats.config(User::Ingest);
    let anonymous = ingest.with_credentials(Credentials::Anonymous);
    let wrong = ingest.with_credentials(Credentials::UserPassword {
        user: "ingest".to_owned(),
        password: "not-the-password".into(),
    });
    // The right password, but the server's certificate is not checked against our CA.
    let unverified = NatsConfig {
        tls: None,
        ..ingest.clone()
    };
    for (what, config) in [
        ("no credentials", anonymous),
        ("a wrong password", wrong),
        ("no CA to verify the server", unverified),
    ] {
        let refused = landslide_nats::connect(&config, User::Ingest, "test").await;
        assert!(refused.is_err(), "connected with {what}");
    }
    landslide_nats::connect(&ingest, User::Ingest, "test")
        .await
        .expect("ingest's user connects");
}

/// The broker holds each user's bcrypt hash, never the password (as in every deployment,
/// where `nats/auth.conf` reads the hashes from nats-server's environment), and the roles
/// connect with their passwords against it.
#[tokio::test(flavor = "multi_thread")]
async fn the_broker_holds_only_password_hashes() {
    let nats = Nats::start().await;
    let config = std::fs::read_to_string(nats.config_file(0)).expect("the server's config");
    let hashes: Vec<&str> = config
        .lines()
        .filter_map(|line| line.trim().strip_prefix("password: "))
        .collect();
    assert_eq!(hashes.len(), User::ALL.len(), "{config}");
    for user in User::ALL {
        let Credentials::UserPassword { password, .. } = nats.config(user).credentials else {
            panic!("{user} has no password");
        };
        assert!(
            !config.contains(password.expose_secret()),
            "the server's config holds {user}'s password"
        );
        assert!(
            hashes.iter().any(|hash| hash.starts_with("$2a$11$")
                && bcrypt::verify(password.expose_secret(), hash).unwrap_or(false)),
            "no bcrypt hash of {user}'s password in the server's config"
        );
        landslide_nats::connect(&nats.config(user), user, "test")
            .await
            .unwrap_or_else(|e| panic!("{user} connects against its hash: {e:#}"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn only_ingest_may_publish_votes_and_nobody_may_purge_or_delete_them() {
    let nats = &Nats::start().await;
    support::set_up(nats, &landslide_schema::Polls::default()).await;
    let votes = "votes.web1";
    let checks = User::ALL.map(|user| async move { (user, stores(nats, user, votes).await) });
    let stored: Vec<(User, bool)> = futures::future::join_all(checks).await;
    assert_eq!(stored, User::ALL.map(|user| (user, user == User::Ingest)));
    // Dead letters are the workers' alone.
    assert!(stores(nats, User::Worker, "dlq.votes.web1").await);
    assert!(!stores(nats, User::Ingest, "dlq.votes.web1").await);
    assert!(!stores(nats, User::Tally, "dlq.votes.web1").await);

    // Purging or deleting: refused to every user, the operator included.
    let attempts = User::ALL.map(|user| async move {
        let js = jetstream::new(nats.client_as(user).await);
        let purged = tokio::time::timeout(Duration::from_secs(10), async {
            js.get_stream_no_info("VOTES")
                .await
                .ok()?
                .purge()
                .await
                .ok()
        });
        let deleted = tokio::time::timeout(Duration::from_secs(10), js.delete_stream("VOTES"));
        let (purged, deleted) = futures::join!(purged, deleted);
        (
            user,
            matches!(purged, Ok(Some(_))) || matches!(deleted, Ok(Ok(_))),
        )
    });
    for (user, done) in futures::future::join_all(attempts).await {
        assert!(!done, "{user} purged or deleted the votes stream");
    }
    // And the stream denies it by itself, whoever asks.
    let info = votes_info(nats).await;
    assert!(info.config.deny_purge && info.config.deny_delete);
    assert_eq!(
        info.state.messages, 1,
        "only ingest's vote was stored: {:?}",
        info.state
    );
}

/// The votes stream as audit sees it.
async fn votes_info(nats: &Nats) -> jetstream::stream::Info {
    let js = jetstream::new(nats.client_as(User::Audit).await);
    let mut stream = js.get_stream("VOTES").await.expect("audit reads VOTES");
    stream.info().await.expect("VOTES info").clone()
}

/// Lowering a limit drops the oldest messages at once, a purge by another name: found by trying
/// it as the operator, whose user could update every stream.
#[tokio::test(flavor = "multi_thread")]
async fn nobody_but_the_workers_may_change_the_votes_stream_and_its_limits_stay() {
    let nats = &Nats::start().await;
    support::set_up(nats, &landslide_schema::Polls::default()).await;
    for _ in 0..3 {
        assert!(stores(nats, User::Ingest, "votes.web1").await);
    }
    let before = votes_info(nats).await;
    let shrunk = jetstream::stream::Config {
        max_messages: 1,
        ..before.config.clone()
    };
    let attempts = [User::Admin, User::Ingest, User::Tally, User::Audit].map(|user| {
        let shrunk = shrunk.clone();
        async move {
            let js = jetstream::new(nats.client_as(user).await);
            let updated =
                tokio::time::timeout(Duration::from_secs(10), js.update_stream(shrunk)).await;
            (user, matches!(updated, Ok(Ok(_))))
        }
    });
    for (user, updated) in futures::future::join_all(attempts).await {
        assert!(!updated, "{user} lowered the votes stream's max_msgs");
    }
    let after = votes_info(nats).await;
    assert_eq!(
        after.state.messages, 3,
        "votes were dropped: {:?}",
        after.state
    );
    assert_eq!(after.config.max_messages, before.config.max_messages);
}

/// Found by trying it as the audit user, which could create and pull from any consumer of the
/// votes stream: setting `max_deliver=1` on the workers' durable consumer and pulling took ten
/// accepted votes that were then never counted, and a `filter_subject` skipped a node's votes
/// for good, with `pending: 0` both times.
#[tokio::test(flavor = "multi_thread")]
async fn only_the_workers_may_touch_their_durable_consumer() {
    let nats = &Nats::start().await;
    support::set_up(nats, &landslide_schema::Polls::default()).await;
    for _ in 0..3 {
        assert!(stores(nats, User::Ingest, "votes.web1").await);
    }
    let before = consumer_info(nats).await;
    let config = &before.config;
    let others = User::ALL.into_iter().filter(|user| *user != User::Worker);
    let attempts = others.map(|user| async move {
        let client = nats.client_as(user).await;
        let js = jetstream::new(client.clone());
        let drain = jetstream::consumer::pull::Config {
            durable_name: Some("dedup-worker".to_owned()),
            max_deliver: 1,
            filter_subject: "votes.web2".to_owned(),
            ..jetstream::consumer::FromConsumer::try_from_consumer_config(config.clone())
                .expect("a pull consumer")
        };
        let mut done = Vec::new();
        // Updating it by its name.
        if matches!(
            within(js.create_consumer_on_stream(drain.clone(), "VOTES")).await,
            Some(Ok(_))
        ) {
            done.push("updated it by name");
        }
        // Updating it by the unnamed create, whose body names it.
        let body = serde_json::json!({
            "stream_name": "VOTES",
            "config": { "name": "dedup-worker", "max_deliver": 1, "ack_policy": "explicit",
                        "filter_subject": "votes.web2" },
        });
        let unnamed = client.request("$JS.API.CONSUMER.CREATE.VOTES", body.to_string().into());
        if let Some(Ok(reply)) = within(unnamed).await
            && !String::from_utf8_lossy(&reply.payload).contains("\"error\"")
        {
            done.push("updated it by the unnamed create");
        }
        // Pulling from it.
        let pull = client.request(
            "$JS.API.CONSUMER.MSG.NEXT.VOTES.dedup-worker",
            r#"{"batch":10,"no_wait":true}"#.into(),
        );
        if let Some(Ok(reply)) = within(pull).await
            && !reply.payload.is_empty()
        {
            done.push("pulled from it");
        }
        if matches!(
            within(js.delete_consumer_from_stream("dedup-worker", "VOTES")).await,
            Some(Ok(_))
        ) {
            done.push("deleted it");
        }
        (user, done)
    });
    for (user, done) in futures::future::join_all(attempts).await {
        assert!(done.is_empty(), "{user} {done:?} the workers' consumer");
    }
    let after = consumer_info(nats).await;
    assert_eq!(
        serde_json::to_value(&after.config).unwrap(),
        serde_json::to_value(&before.config).unwrap()
    );
    assert_eq!(after.num_pending, 3, "{after:?}");
    assert_eq!(after.delivered.stream_sequence, 0, "{after:?}");
}

/// The workers' consumer as audit sees it.
async fn consumer_info(nats: &Nats) -> jetstream::consumer::Info {
    let js = jetstream::new(nats.client_as(User::Audit).await);
    let stream = js
        .get_stream_no_info("VOTES")
        .await
        .expect("audit opens VOTES");
    stream
        .consumer_info("dedup-worker")
        .await
        .expect("audit reads the workers' consumer")
}

/// Routes are subject to no user's permissions, so only a NATS node may open one: a server that
/// presents any certificate of the deployment's CA other than a route certificate (a server's,
/// such as PostgreSQL's or the client port's) is refused; with the route certificate, the same
/// server joins, which shows the refusal is the certificate's.
#[tokio::test(flavor = "multi_thread")]
async fn only_a_route_certificate_opens_a_route() {
    let dir = tempfile::tempdir().unwrap();
    let cluster =
        landslide_servers::Nats::start(landslide_servers::NatsLayout::Cluster, dir.path())
            .await
            .unwrap();
    let security = cluster.security();
    let routes_of_first = || async {
        let routez: serde_json::Value = reqwest::get(format!("{}/routez", cluster.monitor_url(0)))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        routez["routes"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|r| r["remote_name"].as_str().map(str::to_owned))
            .collect::<Vec<_>>()
    };
    // A fourth server with the cluster's CA, routing to the first node, presenting `cert`.
    let stranger = |name: &'static str, cert: &landslide_servers::tls::CertFiles| {
        let config = dir.path().join(format!("{name}.conf"));
        std::fs::write(
            &config,
            format!(
                "server_name: {name}\nlisten: 127.0.0.1:{}\n\
                 cluster {{\n  name: landslide\n  listen: 127.0.0.1:{}\n  routes: [ {} ]\n  \
                 tls {{\n    cert_file: {:?}\n    key_file: {:?}\n    ca_file: {:?}\n    \
                 verify: true\n    timeout: 5\n  }}\n}}\n",
                support::free_port(),
                support::free_port(),
                cluster.route_url(0),
                cert.cert,
                cert.key,
                security.ca(),
            ),
        )
        .unwrap();
        tokio::process::Command::new(landslide_servers::Binaries::system().nats_server().unwrap())
            .arg("-c")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };

    let refused = stranger("with-a-server-certificate", security.server_cert());
    // It retries its route every second or so; a few seconds of refusals say enough.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let routes = routes_of_first().await;
    assert!(
        !routes.iter().any(|r| r == "with-a-server-certificate"),
        "a server's certificate opened a route: {routes:?}"
    );
    drop(refused);

    let _joined = stranger("with-the-route-certificate", security.route_cert());
    support::wait_for(
        "the route certificate's route",
        Duration::from_secs(30),
        || async {
            routes_of_first()
                .await
                .iter()
                .any(|r| r == "with-the-route-certificate")
                .then_some(())
        },
    )
    .await;
}
