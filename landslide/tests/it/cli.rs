//! The binary's configuration errors: each names what to set, before anything is bound.

use std::process::Command;

fn landslide(args: &[&str], env: &[(&str, &str)], keys: &[(&str, String)]) -> (bool, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_landslide"));
    command.args(args);
    for var in [
        "DATABASE_URL",
        "LANDSLIDE_NODE_ID",
        "NATS_URL",
        "LANDSLIDE_EXPORT_KEY",
        "LANDSLIDE_MAX_CLOCK_OFFSET_MS",
    ] {
        command.env_remove(var);
    }
    // Valid key files unless the case sets others; an empty value unsets the variable.
    command.envs(keys.iter().map(|(var, path)| (var, path)));
    for (var, value) in env {
        if value.is_empty() {
            command.env_remove(var);
        } else {
            command.env(var, value);
        }
    }
    let output = command.output().unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Arguments, environment, and what the error must say.
type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);

#[test]
fn missing_or_bad_settings_name_the_variable_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let keys = crate::support::key_files(dir.path())
        .map(|(var, path)| (var, path.to_str().expect("a UTF-8 path").to_owned()));
    let short = dir.path().join("short");
    std::fs::write(&short, "CHANGE_ME\n").unwrap();
    let short = short.to_str().unwrap();
    let missing = "/nonexistent/cookie-keys";
    let long_secret = "x".repeat(40);
    let cases: &[Case] = &[
        (
            &["status", "--up", "/nonexistent/landslide"],
            &[],
            "is `landslide up --data-dir /nonexistent/landslide` running",
        ),
        (
            &["ingest", "--node-id", "web01"],
            &[("LANDSLIDE_COOKIE_KEYS_FILE", "")],
            "LANDSLIDE_COOKIE_KEYS_FILE is not set",
        ),
        (&["ingest"], &[], "LANDSLIDE_NODE_ID is not set"),
        (
            &["ingest", "--node-id", "web01"],
            &[("LANDSLIDE_VOTER_ID_KEY_FILE", "")],
            "LANDSLIDE_VOTER_ID_KEY_FILE is not set",
        ),
        (
            &["ingest", "--node-id", "web01"],
            &[("LANDSLIDE_RECEIPT_KEY_FILE", "")],
            "LANDSLIDE_RECEIPT_KEY_FILE is not set",
        ),
        (
            &["tally"],
            &[
                ("DATABASE_URL", "postgres://x@127.0.0.1:1/x"),
                ("LANDSLIDE_RECEIPT_KEY_FILE", short),
            ],
            "(LANDSLIDE_RECEIPT_KEY_FILE): the receipt key must be at least 32 bytes",
        ),
        (
            &["ingest", "--node-id", "web01"],
            &[("LANDSLIDE_COOKIE_KEYS_FILE", short)],
            "(LANDSLIDE_COOKIE_KEYS_FILE): a key must be at least 32 bytes",
        ),
        (
            &["ingest", "--node-id", "web01"],
            &[("LANDSLIDE_COOKIE_KEYS_FILE", missing)],
            "cannot read the key file /nonexistent/cookie-keys",
        ),
        // Keys of earlier releases' variables are refused, not dropped (every voter would be a
        // new one), by every command: an env file that every unit loads must not hold them.
        (
            &["ingest", "--node-id", "web01"],
            &[("LANDSLIDE_SECRET", &long_secret)],
            "LANDSLIDE_SECRET is set, but keys are no longer read from the environment",
        ),
        (
            &["dedup-worker"],
            &[("LANDSLIDE_RECEIPT_KEY", &long_secret)],
            "LANDSLIDE_RECEIPT_KEY is set",
        ),
        (
            &["up"],
            &[("LANDSLIDE_SECRET_PREVIOUS", &long_secret)],
            "LANDSLIDE_SECRET_PREVIOUS is set",
        ),
        (
            &["ingest", "--node-id", "web.01"],
            &[],
            "invalid --node-id \"web.01\" (LANDSLIDE_NODE_ID)",
        ),
        (
            &["ingest", "--node-id", "web01"],
            &[("LANDSLIDE_MAX_CLOCK_OFFSET_MS", "300000")],
            "LANDSLIDE_MAX_CLOCK_OFFSET_MS must be more than 0 and less than 300000 ms",
        ),
        (
            &["ingest", "--node-id", "web01"],
            &[("LANDSLIDE_RATE_LIMIT", "-1")],
            "invalid --rate-limit or --rate-burst (LANDSLIDE_RATE_LIMIT, LANDSLIDE_RATE_BURST)",
        ),
        (
            &["ingest", "--node-id", "web01", "--rate-burst", "0"],
            &[],
            "the burst must be at least 1",
        ),
        (
            &["ingest", "--node-id", "web01"],
            &[("LANDSLIDE_CLIENT_IP_HEADER", "X Forwarded For")],
            "invalid --client-ip-header (LANDSLIDE_CLIENT_IP_HEADER)",
        ),
        (&["dedup-worker"], &[], "DATABASE_URL is not set"),
        (&["tally"], &[], "DATABASE_URL is not set"),
        (&["audit"], &[], "DATABASE_URL is not set"),
        // No secret has a flag: every user of the host may read a process's arguments.
        (
            &["audit", "--poll", "pets", "--export-key", "x"],
            &[],
            "unexpected argument '--export-key'",
        ),
        (
            &["dedup-worker", "--nats-password", "x"],
            &[],
            "unexpected argument '--nats-password'",
        ),
        (
            &["ingest", "--secret", "x"],
            &[],
            "unexpected argument '--secret'",
        ),
        (
            &["audit", "--poll", "pets"],
            &[
                ("DATABASE_URL", "postgres://x@127.0.0.1:1/x"),
                ("LANDSLIDE_EXPORT_KEY_FILE", "/nonexistent/export.key"),
            ],
            "cannot read the password file /nonexistent/export.key",
        ),
        (
            &["audit", "--poll", "pets"],
            &[("DATABASE_URL", "postgres://x@127.0.0.1:1/x")],
            "set LANDSLIDE_EXPORT_KEY or LANDSLIDE_EXPORT_KEY_FILE",
        ),
        (
            &["export", "--poll", "pets", "--out", "/nonexistent"],
            &[
                ("DATABASE_URL", "postgres://x@127.0.0.1:1/x"),
                ("LANDSLIDE_EXPORT_KEY", "short"),
            ],
            "LANDSLIDE_EXPORT_KEY must be at least 32 bytes",
        ),
        (
            &["export", "--poll", "pets", "--out", "/nonexistent"],
            &[
                ("DATABASE_URL", "postgres://x@127.0.0.1:1/x"),
                (
                    "LANDSLIDE_EXPORT_KEY",
                    "an export key of at least thirty-two bytes",
                ),
                ("LANDSLIDE_SIGNING_KEY_FILE", "/nonexistent/owner.key"),
            ],
            "cannot read the signing key /nonexistent/owner.key",
        ),
        (
            &["verify", "/nonexistent"],
            &[],
            "cannot read /nonexistent/",
        ),
        (
            &["keygen", "--out", "/nonexistent/owner.key"],
            &[],
            "cannot create /nonexistent/owner.key",
        ),
        (&["status"], &[], "DATABASE_URL is not set"),
        (&["migrate"], &[], "DATABASE_URL is not set"),
        (&["db-users"], &[], "DATABASE_URL is not set"),
        (
            &["dedup-worker"],
            &[(
                "DATABASE_URL",
                "postgres://x:secret-pw@127.0.0.1:1/x?sslmode=verify-full",
            )],
            "DATABASE_URL postgres://x:***@127.0.0.1:1/x?sslmode=verify-full is invalid: \
             sslmode=verify-full needs sslrootcert",
        ),
        (
            &["tally"],
            &[(
                "DATABASE_URL",
                "postgres://x@127.0.0.1:1/x?sslrootcert=/ca.pem",
            )],
            "sslrootcert is given but sslmode is prefer (the default)",
        ),
        (
            &["db-users", "--worker-password-file", "/nonexistent/worker"],
            &[("DATABASE_URL", "postgres://x@127.0.0.1:1/x")],
            "cannot read the password file /nonexistent/worker",
        ),
        (
            &["dedup-worker", "--batch-size", "5000"],
            &[("DATABASE_URL", "postgres://x@127.0.0.1:1/x")],
            "must be between 1 and 1000",
        ),
        (
            &["dedup-worker", "--stream-replicas", "2"],
            &[("DATABASE_URL", "postgres://x@127.0.0.1:1/x")],
            "2 replicas cannot survive",
        ),
        // A database that cannot be reached is no setting to fix: the roles wait for it, not
        // ready, and say why without the password
        // (`tally::a_database_that_cannot_be_reached_keeps_tally_not_ready_naming_database_url`).
    ];
    for (args, env, needle) in cases {
        let (ok, stderr) = landslide(args, env, &keys);
        assert!(!ok, "{args:?} succeeded");
        assert!(
            stderr.contains(needle),
            "{args:?}: {stderr:?} lacks {needle:?}"
        );
        assert!(!stderr.contains("secret-pw"), "a password leaked: {stderr}");
    }
}
