//! `landslide up`: the whole system on one machine, as a new user runs it.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::support;

struct Up {
    child: Child,
    vote: String,
    results: String,
    metrics: String,
}

fn start(data_dir: &std::path::Path, ports: [u16; 5]) -> Up {
    let [ingest, tally, nats, postgres, metrics] = ports;
    let child = Command::new(env!("CARGO_BIN_EXE_landslide"))
        .arg("up")
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--ingest-listen", &format!("127.0.0.1:{ingest}")])
        .args(["--tally-listen", &format!("127.0.0.1:{tally}")])
        .args(["--nats-port", &nats.to_string()])
        .args(["--postgres-port", &postgres.to_string()])
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics}")])
        .env_remove("NATS_URL")
        .env_remove("DATABASE_URL")
        .env_remove("LANDSLIDE_COOKIE_KEYS_FILE")
        .env_remove("LANDSLIDE_VOTER_ID_KEY_FILE")
        .env_remove("LANDSLIDE_RECEIPT_KEY_FILE")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start landslide up");
    Up {
        child,
        vote: format!("http://127.0.0.1:{ingest}"),
        results: format!("http://127.0.0.1:{tally}"),
        metrics: format!("http://127.0.0.1:{metrics}"),
    }
}

impl Up {
    /// Ctrl-C, then the exit status and everything it printed.
    fn interrupt(mut self) -> (std::process::ExitStatus, String) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-INT", &pid]).status().unwrap();
        assert!(sent.success());
        let mut stdout = String::new();
        if let Some(mut pipe) = self.child.stdout.take() {
            std::io::Read::read_to_string(&mut pipe, &mut stdout).unwrap();
        }
        (self.child.wait().unwrap(), stdout)
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn up_starts_takes_a_vote_shows_it_finds_it_again_after_a_restart_and_killed_leaves_no_server()
 {
    let data = tempfile::tempdir().unwrap();
    // Run as root, `up` hands PostgreSQL to the `postgres` user, which must reach the folder.
    std::fs::set_permissions(
        data.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let ports = std::array::from_fn(|_| support::free_port());
    let up = start(data.path(), ports);
    let ready = format!("{}/readyz", up.vote);
    support::wait_for("the ingest node", Duration::from_secs(120), || {
        let ready = ready.clone();
        async move {
            let response = reqwest::get(&ready).await.ok()?;
            response.status().is_success().then_some(())
        }
    })
    .await;
    let form = reqwest::get(format!("{}/", up.vote))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(form.contains("Cats or dogs?"));
    let (status, _) = support::vote_api(&support::voter(), &up.vote, "pets", "dogs").await;
    assert_eq!(status, 202);
    let results = support::settled_results(&up.results, "pets", 1).await;
    assert_eq!(results["counts"]["dogs"], 1, "{results}");
    // The three roles' metrics on their own listener, as in every deployment; not beside the pages.
    let metrics = support::metrics_page(&up.metrics).await;
    for role in [
        "landslide_votes_accepted_total",
        "landslide_votes_committed_total",
        "landslide_tally_pending",
    ] {
        assert!(metrics.contains(role), "{role} missing:\n{metrics}");
    }
    for public in [&up.vote, &up.results] {
        let status = reqwest::get(format!("{public}/metrics"))
            .await
            .unwrap()
            .status();
        assert_eq!(status, 404, "{public} serves /metrics");
    }

    operate_with_only_the_env_file(data.path());

    let (status, stdout) = up.interrupt();
    assert!(status.success(), "up exits cleanly: {status}\n{stdout}");
    assert!(
        stdout.contains("vote:") && stdout.contains("results:") && stdout.contains("metrics:"),
        "{stdout}"
    );
    assert!(stdout.contains("stopped cleanly"), "{stdout}");
    assert!(
        stdout.contains(&format!("landslide status --up {}", data.path().display())),
        "up says how to operate it: {stdout}"
    );

    let again = start(data.path(), ports);
    let results = support::settled_results(&again.results, "pets", 1).await;
    assert_eq!(
        results["counts"]["dogs"], 1,
        "the earlier vote is still there: {results}"
    );

    // Killed without a chance to stop anything (SIGKILL, the OOM killer), it still leaves no
    // server of its own running: their guards stop them.
    let pid_in = |file: &str| -> i32 {
        let text = std::fs::read_to_string(data.path().join(file)).expect("a pid file");
        text.lines().next().unwrap().trim().parse().unwrap()
    };
    let servers = [pid_in("nats.pid"), pid_in("postgres/postmaster.pid")];
    let mut again = again;
    again.child.kill().unwrap();
    again.child.wait().unwrap();
    support::wait_for(
        "up's servers to stop after up was killed",
        Duration::from_secs(60),
        || async { (!servers.iter().any(|&pid| running(pid))).then_some(()) },
    )
    .await;
}

/// Whether process `pid` runs: exists and is no zombie (one that has exited, and that an init
/// which does not reap, as in some containers, keeps in the table).
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // The state follows the command name, which is in parentheses and may hold spaces.
            let (_, rest) = stat.rsplit_once(')')?;
            rest.split_whitespace().next().map(|state| state != "Z")
        })
        .unwrap_or(false)
}

/// The operator's commands against a running `up`, given nothing but its folder (`--up`): no
/// NATS URL, credentials, CA or database URL from anywhere else; each connects as its own user.
fn operate_with_only_the_env_file(data_dir: &std::path::Path) {
    let env = data_dir.join("env");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&env).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "{} is private", env.display());
    let out = tempfile::tempdir().unwrap();
    let export_out = out.path().join("export");
    let export_out = export_out.to_str().unwrap();
    let commands: [(&[&str], &str); 6] = [
        (&["status"], "pets"),
        (&["audit"], "CONSISTENT"),
        (&["polls", "show"], "dogs"),
        (&["replay"], ""),
        (&["audit", "--poll", "pets"], "CONSISTENT"),
        (
            &["export", "--poll", "pets", "--out", export_out],
            "wrote the record of poll pets",
        ),
    ];
    for (args, expect) in commands {
        let output = Command::new(env!("CARGO_BIN_EXE_landslide"))
            // `--up` right after the command, where `polls` takes it too.
            .arg(args[0])
            .arg("--up")
            .arg(data_dir)
            .args(&args[1..])
            .env_remove("NATS_URL")
            .env_remove("NATS_CA")
            .env_remove("DATABASE_URL")
            .env_remove("LANDSLIDE_DATABASE_URL")
            .env(
                "LANDSLIDE_EXPORT_KEY",
                "an export key of at least thirty-two bytes",
            )
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success() && stdout.contains(expect),
            "landslide {args:?} --up: {}\n{stdout}\n{stderr}",
            output.status
        );
    }
    let ballots = std::fs::read_to_string(out.path().join("export/ballots.csv")).unwrap();
    assert_eq!(
        ballots.lines().count(),
        2,
        "a header and the one ballot: {ballots}"
    );
    // `up`'s seeded poll names no owner key: its record is unsigned, and proves nothing to a
    // stranger, so `verify` refuses it.
    let output = Command::new(env!("CARGO_BIN_EXE_landslide"))
        .args(["verify", export_out])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        !output.status.success() && stdout.contains("REFUSED") && stdout.contains("owner key"),
        "{stdout}"
    );
}
