//! The pages in a real browser: Debian's Chromium, driven by playwright-core from
//! `landslide/tests/browser/pages.mjs`, with axe-core on every page. This test starts the servers
//! and the roles, and runs the script's two phases around the poll's close. `scripts/test`
//! installs Chromium and the script's npm packages.

use std::path::PathBuf;
use std::time::Duration;

use landslide_nats::polls;

use crate::support::{self, Db, Nats};

fn browser_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// Runs one phase of the browser script; fails the test with what the script found.
async fn run_phase(phase: &str, ingest: &str, tally: &str) {
    let dir = browser_dir();
    assert!(
        dir.join("node_modules/playwright-core").is_dir(),
        "the browser script's packages are missing: run `npm ci --prefix {}` (scripts/test does)",
        dir.display()
    );
    let output = tokio::process::Command::new("node")
        .arg("pages.mjs")
        .arg(phase)
        .current_dir(&dir)
        .env("INGEST_URL", ingest)
        .env("TALLY_URL", tally)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(120), output)
        .await
        .expect("the browser script did not finish within 120 s")
        .expect("cannot run node (install Node.js; scripts/test does)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "browser phase {phase} failed:\n{text}"
    );
    eprintln!("{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn vote_change_watch_live_results_without_javascript_then_closed_and_final() {
    let nats = Nats::start().await;
    let db = Db::create().await;
    let worker = support::worker(&nats, &db);
    let tally = support::tally(&nats, &db).await;
    let results_url = format!("{}/", tally.url);
    let ingest = support::ingest_with(&nats, "web1", |c| {
        c.results_url = Some(results_url.clone());
    })
    .await;
    support::wait_for("tally's first results", Duration::from_secs(15), || async {
        let url = format!("{}/api/results/pets", tally.url);
        reqwest::get(&url)
            .await
            .ok()?
            .status()
            .is_success()
            .then_some(())
    })
    .await;

    run_phase("open", &ingest.url, &tally.url).await;

    // The owner closes the poll: a revision whose window ended a second ago.
    let now = chrono::Utc::now();
    let closed = format!(
        "[[poll]]\nid = \"pets\"\nquestion = \"Cats or dogs?\"\n\
         options = [{{ id = \"cats\", label = \"Cats\" }}, {{ id = \"dogs\", label = \"Dogs\" }}]\n\
         opens_at = \"{}\"\ncloses_at = \"{}\"\n",
        (now - chrono::Duration::hours(1)).to_rfc3339(),
        (now - chrono::Duration::seconds(1)).to_rfc3339(),
    );
    let js = async_nats::jetstream::new(nats.client().await);
    let store = polls::ensure_bucket(
        &js,
        &landslide_nats::Topology::default(),
        landslide_nats::Access::SetUp,
    )
    .await
    .unwrap();
    polls::put(&store, &closed).await.unwrap();
    support::drained(&nats).await;
    support::wait_for(
        "ingest to see the close",
        Duration::from_secs(15),
        || async {
            let page = reqwest::get(&ingest.url).await.ok()?.text().await.ok()?;
            page.contains("This poll is closed.").then_some(())
        },
    )
    .await;

    // Final once no node can still take a vote under revision 1, which left the poll open:
    // `REVISION_OVERLAP` after revision 2 was written, and the grace after that.
    support::wait_for("the final result", Duration::from_secs(40), || async {
        let url = format!("{}/api/results/pets", tally.url);
        let body: serde_json::Value = reqwest::get(&url).await.ok()?.json().await.ok()?;
        (body["status"] == "final").then_some(())
    })
    .await;
    run_phase("closed", &ingest.url, &tally.url).await;
    worker.stop().await;
    ingest.role.stop().await;
    tally.role.stop().await;
}
