//! The short form of the reliability harness (crate `landslide-chaos`): the real `landslide`
//! binary as separate processes under a seeded load, with every fault kind injected, checked
//! against the harness's model of what each voter was told. The long form is `scripts/chaos`.
//!
//! `LANDSLIDE_SEED=<n>` replays a seed's schedule in every test here.

use landslide_chaos::faults::FaultKind;
use landslide_chaos::{NatsLayout, Scenario};

async fn run(layout: NatsLayout, default_seed: u64) {
    let seed = std::env::var("LANDSLIDE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default_seed);
    let scenario = Scenario::short(layout, seed, env!("CARGO_BIN_EXE_landslide"));
    let report = landslide_chaos::run(&scenario)
        .await
        .expect("the harness could not run");
    eprintln!("{report}");
    assert!(
        report.passed(),
        "{report}\nreplay: LANDSLIDE_SEED={seed} cargo nextest run -E 'test(/^chaos::/)'"
    );
    for kind in FaultKind::for_layout(layout) {
        assert!(
            report.injected(kind) >= 1,
            "{kind:?} was never injected (seed {seed})"
        );
    }
    assert!(report.lost + report.doubled + report.misordered == 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn single_server_faults_lose_double_and_misorder_no_vote() {
    run(NatsLayout::Single, 1).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_faults_lose_double_and_misorder_no_vote() {
    run(NatsLayout::Cluster, 2).await;
}

/// A new seed on every run, printed, so that CI explores schedules beyond the fixed two.
#[tokio::test(flavor = "multi_thread")]
async fn a_fresh_seed_loses_doubles_and_misorders_no_vote() {
    let seed = rand::random::<u64>();
    eprintln!("fresh seed {seed}");
    let layout = if seed.is_multiple_of(2) {
        NatsLayout::Single
    } else {
        NatsLayout::Cluster
    };
    run(layout, seed).await;
}
