//! Who may do what on the broker, and how a role proves who it is.
//!
//! Every deployment has one NATS user per role, each allowed only the subjects its role uses
//! ([`User::permissions`]): ingest publishes votes and reads the stream's and the polls' state;
//! workers consume, ack, dead-letter and set the streams up; tally reads the consumer's state and
//! the polls; audit reads everything and writes nothing; `polls` (the polls' owner) writes new
//! revisions of the poll definitions; `admin` is the operator's. No user may purge or delete the
//! votes stream or its messages (and the stream itself denies both), nor change a revision of
//! the poll definitions (the bucket refuses a second write of a key, `polls.rs`), and only the
//! workers may create, pull from, ack on or delete their durable consumer. Replies come on an
//! inbox of the role's own (`_INBOX_<user>.`), so no role reads another's answers.
//!
//! [`authorization`] writes these users as a nats-server `authorization` block: `nats/auth.conf`
//! is its output for the default names (a unit test keeps the file and the code the same), and the
//! test harness and `landslide up` write it for their own names and passwords.

use std::path::PathBuf;

use anyhow::Context as _;
use secrecy::{ExposeSecret as _, SecretString};

use crate::{MAX_VOTE_PARTITIONS, Topology};

/// A user of the broker: one per role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum User {
    /// Ingest nodes: publish votes.
    Ingest,
    /// Dedup-workers and `landslide replay`: consume, dead-letter, set the streams up.
    Worker,
    /// Tally: the consumer's state and the polls.
    Tally,
    /// `landslide audit`, `export` and `status`: read only.
    Audit,
    /// The polls' owner: `landslide polls put`. Writes new revisions of the poll definitions,
    /// and reads; nothing else.
    Polls,
    /// The operator: the `nats` CLI. Everything but what [`User::admin_denied`] lists.
    Admin,
}

impl User {
    pub const ALL: [Self; 6] = [
        Self::Ingest,
        Self::Worker,
        Self::Tally,
        Self::Audit,
        Self::Polls,
        Self::Admin,
    ];

    /// The user name, as in `nats/auth.conf` and `NATS_USER`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ingest => "ingest",
            Self::Worker => "worker",
            Self::Tally => "tally",
            Self::Audit => "audit",
            Self::Polls => "polls",
            Self::Admin => "admin",
        }
    }

    /// The environment variable that holds this user's password for a client: `landslide up`'s
    /// env file, and the caller's server that `up` is pointed at.
    pub fn password_var(self) -> String {
        format!(
            "LANDSLIDE_NATS_{}_PASSWORD",
            self.name().to_ascii_uppercase()
        )
    }

    /// The environment variable that gives nats-server this user's password's bcrypt hash
    /// ([`password_hash`]) in `nats/auth.conf`. The server never holds the password itself.
    pub fn password_hash_var(self) -> String {
        format!("{}_HASH", self.password_var())
    }

    /// The prefix of this role's reply subjects: requests (JetStream API calls, publish acks,
    /// pulled messages) are answered there, and only this user may subscribe to it.
    pub fn inbox_prefix(self) -> String {
        format!("_INBOX_{}", self.name())
    }

    /// The subjects this user may publish and subscribe to, for `topology`'s names. Everything
    /// else is refused; for [`User::Admin`], who may use every subject but a few, the refused
    /// ones are [`User::admin_denied`].
    ///
    /// Subject permissions match whole tokens, so a consumer name cannot be limited to a prefix:
    /// audit may create and read consumers of any name (its readers name theirs `audit_…`,
    /// [`crate::StreamReader`]) but the workers' durable one ([`User::durable_denied`]), and never
    /// by the unnamed `CONSUMER.CREATE.<stream>`, whose request body may name any consumer and
    /// would update an existing one (nats-server `jsConsumerCreateRequest`, legacy ephemeral).
    ///
    /// Each entry is what a call of async-nats 0.51 sends (read in its source, and checked by the
    /// integration tests, where every role runs with these permissions): `get_stream` is
    /// `STREAM.INFO.<stream>`, a durable pull is `CONSUMER.MSG.NEXT.<stream>.<consumer>` answered
    /// on the inbox and acked on `$JS.ACK.<stream>.<consumer>.…`, an ordered consumer (key-value
    /// watch and listing, audit's and replay's reads) is `CONSUMER.CREATE.<stream>.<name>.<filter>`
    /// with flow-control replies on `$JS.FC.<stream>.…`, a key-value get is
    /// `DIRECT.GET.KV_<bucket>.$KV.<bucket>.<key>`, a put or create a publish to `$KV.<bucket>.<key>`.
    ///
    /// Every rule about the votes stream is written for each vote partition's stream up to
    /// [`MAX_VOTE_PARTITIONS`] ([`crate::partitions`]): the same configuration serves every K.
    pub fn permissions(self, t: &Topology) -> Permissions {
        let api = |s: &str| format!("$JS.API.{s}");
        let dlq = &t.dlq_stream;
        let consumer = &t.consumer;
        let kv = format!("KV_{}", t.polls_bucket);
        // Reading the poll definitions: the bucket's state, its watch and key listing, and gets.
        // An ordered consumer deletes the one it replaces (the bucket has no durable consumer).
        let read_polls = vec![
            api(&format!("STREAM.INFO.{kv}")),
            // Unnamed (`CONSUMER.CREATE.<stream>`) or named, with a filter or without.
            api(&format!("CONSUMER.CREATE.{kv}")),
            api(&format!("CONSUMER.CREATE.{kv}.>")),
            api(&format!("CONSUMER.DELETE.{kv}.*")),
            api(&format!("DIRECT.GET.{kv}.>")),
            format!("$JS.FC.{kv}.>"),
        ];
        // Reading the votes stream through consumers of one's own (`StreamReader`): named creates
        // only (see above), never the workers' durable one (`durable_denied`).
        let read_votes = each_partition(t, |votes, _| {
            vec![
                api(&format!("CONSUMER.CREATE.{votes}.*")),
                api(&format!("CONSUMER.CREATE.{votes}.*.>")),
                api(&format!("CONSUMER.MSG.NEXT.{votes}.*")),
            ]
        });
        let inbox = vec![format!("{}.>", self.inbox_prefix())];
        let mut denied = Vec::new();
        let publish = match self {
            Self::Admin => {
                return Permissions {
                    publish: Rule::all_but(Self::admin_denied(t)),
                    subscribe: Rule::all_but(Vec::new()),
                };
            }
            Self::Ingest => [
                each_partition(t, |votes, prefix| {
                    vec![
                        format!("{prefix}.*"),
                        api(&format!("STREAM.INFO.{votes}")),
                        // Reading back the time a vote of a windowed poll was stored: from any
                        // replica, else from the leader (which a lagging follower cannot answer
                        // for).
                        api(&format!("DIRECT.GET.{votes}")),
                        api(&format!("STREAM.MSG.GET.{votes}")),
                    ]
                }),
                read_polls,
            ]
            .concat(),
            Self::Worker => [
                vec![
                    api(&format!("STREAM.INFO.{dlq}")),
                    // Account limits, which creating the polls bucket reads.
                    api("INFO"),
                    // Setting the streams, the consumer and the bucket up (an existing stream is
                    // only brought up to its file: `ensure_stream`).
                    api(&format!("STREAM.CREATE.{dlq}")),
                    api(&format!("STREAM.UPDATE.{dlq}")),
                    api(&format!("STREAM.CREATE.{kv}")),
                    format!("{}.*", t.dlq_prefix),
                    // Seeding an empty bucket with revision 1, and only that: the bucket refuses
                    // it once rev.1 exists.
                    format!("$KV.{}.rev.1", t.polls_bucket),
                ],
                each_partition(t, |votes, _| {
                    vec![
                        api(&format!("STREAM.INFO.{votes}")),
                        // An existing stream is only brought up to its file (`ensure_stream`);
                        // partition 0's also records the partitions (`partitions::ensure`).
                        api(&format!("STREAM.CREATE.{votes}")),
                        api(&format!("STREAM.UPDATE.{votes}")),
                        api(&format!("CONSUMER.INFO.{votes}.{consumer}")),
                        // The message at the workers' mark, read from the stream's leader: has
                        // the stream gone backwards (`rollback`)?
                        api(&format!("STREAM.MSG.GET.{votes}")),
                        // Restarting the durable consumer from before a rollback of the stream
                        // (`rollback::restart_consumer`): only this durable, by its name.
                        api(&format!("CONSUMER.DELETE.{votes}.{consumer}")),
                        // The durable consumer, and replay's ordered one (which is never deleted
                        // by subject: that would allow deleting the durable one too; the server
                        // removes it once idle).
                        api(&format!("CONSUMER.CREATE.{votes}")),
                        api(&format!("CONSUMER.CREATE.{votes}.>")),
                        api(&format!("CONSUMER.MSG.NEXT.{votes}.*")),
                        format!("$JS.ACK.{votes}.{consumer}.>"),
                        format!("$JS.FC.{votes}.>"),
                        // Spreading the partitions' leaders over the servers
                        // (`partitions::spread_leaders`).
                        api(&format!("STREAM.LEADER.STEPDOWN.{votes}")),
                    ]
                }),
                read_polls,
            ]
            .concat(),
            Self::Tally => {
                denied = Self::durable_denied(t);
                [
                    each_partition(t, |votes, _| {
                        vec![
                            api(&format!("STREAM.INFO.{votes}")),
                            api(&format!("CONSUMER.INFO.{votes}.{consumer}")),
                            // The message at the workers' mark (`rollback`).
                            api(&format!("STREAM.MSG.GET.{votes}")),
                        ]
                    }),
                    // The votes not yet counted, read for their polls (`pending_by_poll`).
                    read_votes,
                    read_polls,
                ]
                .concat()
            }
            Self::Audit => {
                denied = Self::durable_denied(t);
                [
                    each_partition(t, |votes, _| {
                        vec![
                            api(&format!("STREAM.INFO.{votes}")),
                            api(&format!("CONSUMER.INFO.{votes}.{consumer}")),
                            // The message at the workers' mark (`rollback`).
                            api(&format!("STREAM.MSG.GET.{votes}")),
                        ]
                    }),
                    vec![
                        api(&format!("STREAM.INFO.{dlq}")),
                        // Named consumers only (see above), the workers' excepted.
                        api(&format!("CONSUMER.CREATE.{dlq}.*")),
                        api(&format!("CONSUMER.CREATE.{dlq}.*.>")),
                        api(&format!("CONSUMER.MSG.NEXT.{dlq}.*")),
                    ],
                    read_votes,
                    read_polls,
                ]
                .concat()
            }
            Self::Polls => [
                vec![
                    // Creating the bucket, sealed, if no worker has yet (`polls::ensure_bucket`),
                    // which reads the account's limits.
                    api("INFO"),
                    api(&format!("STREAM.CREATE.{kv}")),
                    // A new revision: a create, which the bucket refuses on a key that exists.
                    format!("$KV.{}.rev.*", t.polls_bucket),
                ],
                read_polls,
            ]
            .concat(),
        };
        Permissions {
            publish: Rule {
                allow: publish,
                deny: denied,
            },
            subscribe: Rule::only(inbox),
        }
    }

    /// What only the workers may do to their durable consumer: create or update it (by its name,
    /// or by the unnamed create whose body may name it), pull from it, ack on it, pause or delete
    /// it. With a pull and `max_deliver=1` the audit user once took ten accepted votes from the
    /// workers, which then never counted them; with a `filter_subject`, a whole node's votes.
    pub fn durable_denied(t: &Topology) -> Vec<String> {
        let consumer = &t.consumer;
        each_partition(t, |votes, _| {
            let mut denied = vec![format!("$JS.API.CONSUMER.CREATE.{votes}")];
            for api in [
                "CONSUMER.CREATE",
                "CONSUMER.DURABLE.CREATE",
                "CONSUMER.DELETE",
                "CONSUMER.MSG.NEXT",
                "CONSUMER.PAUSE",
                "CONSUMER.UNPIN",
            ] {
                denied.push(format!("$JS.API.{api}.{votes}.{consumer}"));
            }
            denied.push(format!("$JS.API.CONSUMER.CREATE.{votes}.{consumer}.>"));
            denied.push(format!("$JS.ACK.{votes}.{consumer}.>"));
            denied
        })
    }

    /// What not even the operator may publish: a vote (only ingest makes votes), and deleting or
    /// purging the votes or dead-letter stream or a message of theirs, which audit needs whole
    /// (the streams deny message deletes and purges themselves; deleting a whole stream only a
    /// server config change allows). Nor updating them: a lower `max_msgs`, `max_bytes` or
    /// `max_age` drops the oldest votes at once, a purge by another name (found by trying it).
    /// The workers' user keeps the update, to bring the definitions of `nats/` in place. The
    /// polls bucket's stream alike, which nobody may update: an update could take its refusal
    /// of a second write of a key away (`polls::bucket_config`). And the workers' durable
    /// consumer ([`User::durable_denied`]).
    pub fn admin_denied(t: &Topology) -> Vec<String> {
        let mut denied = each_partition(t, |_, prefix| vec![format!("{prefix}.*")]);
        let kv = format!("KV_{}", t.polls_bucket);
        let votes = t.partitions(MAX_VOTE_PARTITIONS);
        let streams = votes.iter().map(|p| &p.votes_stream);
        for stream in streams.chain([&t.dlq_stream, &kv]) {
            for api in [
                "STREAM.DELETE",
                "STREAM.PURGE",
                "STREAM.MSG.DELETE",
                "STREAM.UPDATE",
            ] {
                denied.push(format!("$JS.API.{api}.{stream}"));
            }
        }
        denied.extend(Self::durable_denied(t));
        denied
    }
}

/// `rules(stream, subject prefix)` for every vote partition that a deployment of `t`'s names may
/// have, 0 to [`MAX_VOTE_PARTITIONS`] - 1, in order.
fn each_partition(t: &Topology, rules: impl Fn(&str, &str) -> Vec<String>) -> Vec<String> {
    t.partitions(MAX_VOTE_PARTITIONS)
        .iter()
        .flat_map(|p| rules(&p.votes_stream, &p.votes_prefix))
        .collect()
}

impl std::fmt::Display for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a user may publish and subscribe to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    pub publish: Rule,
    pub subscribe: Rule,
}

/// Subjects allowed: those `allow` matches and `deny` does not (nats-server: deny wins).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub allow: Vec<String>,
    pub deny: Vec<String>,
}

impl Rule {
    /// These and nothing else.
    pub fn only(allow: Vec<String>) -> Self {
        Self {
            allow,
            deny: Vec::new(),
        }
    }

    /// Everything but these.
    pub fn all_but(deny: Vec<String>) -> Self {
        Self {
            allow: vec![">".to_owned()],
            deny,
        }
    }

    /// The rule as nats-server's config writes it.
    fn conf(&self) -> String {
        let list = |items: &[String]| {
            items
                .iter()
                .map(|s| format!("\"{s}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if self.deny.is_empty() {
            format!("{{ allow: [{}] }}", list(&self.allow))
        } else {
            format!(
                "{{ allow: [{}], deny: [{}] }}",
                list(&self.allow),
                list(&self.deny)
            )
        }
    }
}

/// A nats-server `authorization` block with every [`User`] and its permissions for `topology`.
/// `password` gives each user's password as the config writes it: a quoted literal, or a
/// `$VARIABLE` that nats-server takes from its environment (and refuses to start without).
pub fn authorization(topology: &Topology, password: impl Fn(User) -> String) -> String {
    let quote = |s: &str| format!("\"{s}\"");
    let mut out = String::from("authorization {\n  users: [\n");
    for user in User::ALL {
        out.push_str(&format!(
            "    {{\n      user: {}\n      password: {}\n",
            quote(user.name()),
            password(user)
        ));
        let p = user.permissions(topology);
        out.push_str(&format!(
            "      permissions: {{\n        publish: {}\n        subscribe: {}\n      }}\n    }}\n",
            p.publish.conf(),
            p.subscribe.conf()
        ));
    }
    out.push_str("  ]\n}\n");
    out
}

/// `nats/auth.conf`: the users of every deployment, password hashes from the environment.
pub const AUTH_CONF: &str = include_str!("../auth.conf");

/// The text of `nats/auth.conf`: [`authorization`] for the default names, each password's hash
/// from the variable [`User::password_hash_var`].
pub fn auth_conf() -> String {
    format!(
        "# The broker's users, one per role, with only the subjects each role uses. Generated from\n\
         # nats/src/auth.rs (`User::permissions`); a unit test keeps the two the same. Every\n\
         # password's bcrypt hash comes from the server's environment\n\
         # (LANDSLIDE_NATS_<USER>_PASSWORD_HASH, made by `landslide nats-password-hash`), and\n\
         # nats-server refuses to start if one is missing. No user may connect without one.\n{}",
        authorization(&Topology::default(), |user| format!(
            "${}",
            user.password_hash_var()
        ))
    )
}

/// The bcrypt cost of [`password_hash`]: nats-server's own default (its `mkpasswd` tool and
/// `nats server passwd` make cost-11 hashes). nats-server checks the hash at every connect
/// (`comparePasswords`, no cache), which at cost 11 takes about 0.1 s of one core here: a role
/// connects once and keeps its connection, so only reconnect storms pay it, and a guess at a
/// password costs an attacker who stole the hash as much.
pub const BCRYPT_COST: u32 = 11;

/// `password`'s bcrypt hash as nats-server takes it in place of the password.
///
/// In the `$2a$` form: nats-server's config lexer reads a value that starts with `$` as a
/// variable reference, except the bcrypt form its docs and `mkpasswd` use; an environment
/// variable's value is lexed again, and with nats-server 2.15.1 `$2b$…` there fails as an
/// unknown variable while `$2a$…` is taken as the hash (the same algorithm; the letter only
/// names the revision of the encoder). Passwords over 72 bytes are refused, not truncated.
pub fn password_hash(password: &str) -> anyhow::Result<String> {
    let parts = bcrypt::non_truncating_hash_with_result(password, BCRYPT_COST)
        .context("cannot hash the password (bcrypt takes at most 72 bytes)")?;
    Ok(parts.format_for_version(bcrypt::Version::TwoA))
}

/// How a role proves who it is to the broker. Its secrets are [`SecretString`]s: never shown by
/// `Debug`, so neither is a configuration that holds them.
#[derive(Debug, Clone)]
pub enum Credentials {
    /// None: only a server without authorization lets such a client in.
    Anonymous,
    /// `NATS_USER` with `NATS_PASSWORD` (or `NATS_PASSWORD_FILE`).
    UserPassword {
        user: String,
        password: SecretString,
    },
    /// `NATS_TOKEN` (or `NATS_TOKEN_FILE`).
    Token(SecretString),
    /// `NATS_NKEY_SEED_FILE`: an nkey seed (`SU…`).
    NKey(SecretString),
    /// `NATS_CREDS`: a `.creds` file (a user JWT and its seed), for an operator-mode server.
    CredsFile(PathBuf),
}

/// TLS to the broker: the server's certificate must chain to `ca` and name the host connected
/// to; `client` is a certificate and key for servers that verify clients (mutual TLS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    pub ca: PathBuf,
    pub client: Option<(PathBuf, PathBuf)>,
}

/// Where the broker is and how to reach it: what every role connects with.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// One URL or several, comma-separated (a cluster): `NATS_URL`.
    pub urls: String,
    pub credentials: Credentials,
    /// `None`: plain TCP, unless a URL says `tls://` (then the system's roots verify it).
    pub tls: Option<Tls>,
}

impl NatsConfig {
    /// A server without authorization or TLS: a test's own throwaway server, a probe.
    pub fn anonymous(urls: impl Into<String>) -> Self {
        Self {
            urls: urls.into(),
            credentials: Credentials::Anonymous,
            tls: None,
        }
    }

    /// `urls` as `user` with `password`, verifying the servers against `ca` if given.
    pub fn user(
        urls: impl Into<String>,
        user: &str,
        password: impl Into<SecretString>,
        ca: Option<PathBuf>,
    ) -> Self {
        Self {
            urls: urls.into(),
            credentials: Credentials::UserPassword {
                user: user.to_owned(),
                password: password.into(),
            },
            tls: ca.map(|ca| Tls { ca, client: None }),
        }
    }

    /// The same servers and TLS, other credentials.
    pub fn with_credentials(&self, credentials: Credentials) -> Self {
        Self {
            credentials,
            ..self.clone()
        }
    }

    /// The environment that gives a `landslide` process this configuration (what its flags read:
    /// `NATS_URL`, the credentials' variables, `NATS_CA`, `NATS_CERT`, `NATS_KEY`).
    pub fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![("NATS_URL", self.urls.clone())];
        match &self.credentials {
            Credentials::Anonymous => {}
            Credentials::UserPassword { user, password } => {
                env.push(("NATS_USER", user.clone()));
                env.push(("NATS_PASSWORD", password.expose_secret().to_owned()));
            }
            Credentials::Token(token) => {
                env.push(("NATS_TOKEN", token.expose_secret().to_owned()));
            }
            // A seed is read from a file only; a process is given one by its own file.
            Credentials::NKey(_) => {}
            Credentials::CredsFile(path) => env.push(("NATS_CREDS", path.display().to_string())),
        }
        if let Some(tls) = &self.tls {
            env.push(("NATS_CA", tls.ca.display().to_string()));
            if let Some((cert, key)) = &tls.client {
                env.push(("NATS_CERT", cert.display().to_string()));
                env.push(("NATS_KEY", key.display().to_string()));
            }
        }
        env
    }

    /// async-nats' options for this configuration, replies on `user`'s inbox.
    pub(crate) fn options(&self, user: User) -> anyhow::Result<async_nats::ConnectOptions> {
        let mut options =
            async_nats::ConnectOptions::new().custom_inbox_prefix(user.inbox_prefix());
        options = match &self.credentials {
            Credentials::Anonymous => options,
            Credentials::UserPassword { user, password } => {
                options.user_and_password(user.clone(), password.expose_secret().to_owned())
            }
            Credentials::Token(token) => options.token(token.expose_secret().to_owned()),
            Credentials::NKey(seed) => options.nkey(seed.expose_secret().to_owned()),
            Credentials::CredsFile(path) => {
                let text = std::fs::read_to_string(path).with_context(|| {
                    format!(
                        "cannot read the NATS credentials {} (NATS_CREDS)",
                        path.display()
                    )
                })?;
                options.credentials(&text).with_context(|| {
                    format!(
                        "{} is not a NATS credentials file (NATS_CREDS)",
                        path.display()
                    )
                })?
            }
        };
        if let Some(tls) = &self.tls {
            options = options
                .require_tls(true)
                .add_root_certificates(tls.ca.clone());
            if let Some((cert, key)) = &tls.client {
                options = options.add_client_certificate(cert.clone(), key.clone());
            }
        }
        Ok(options)
    }
}

/// The settings that give a role its [`Credentials`], as flags and the environment hold them.
/// Exactly one way may be set (or none, for a server without authorization).
#[derive(Debug, Clone, Default)]
pub struct CredentialSettings {
    pub user: Option<String>,
    pub password: Option<SecretString>,
    pub password_file: Option<PathBuf>,
    pub token: Option<SecretString>,
    pub token_file: Option<PathBuf>,
    pub nkey_seed_file: Option<PathBuf>,
    pub creds: Option<PathBuf>,
}

impl CredentialSettings {
    pub fn credentials(&self) -> anyhow::Result<Credentials> {
        let secret = |value: &Option<SecretString>, file: &Option<PathBuf>, what: &str| {
            read_secret(value.as_ref(), file.as_deref(), what)
        };
        let password = secret(&self.password, &self.password_file, "NATS_PASSWORD")?;
        let token = secret(&self.token, &self.token_file, "NATS_TOKEN")?;
        let nkey = secret(&None, &self.nkey_seed_file, "NATS_NKEY_SEED")?;
        let ways = [
            self.user.is_some() || password.is_some(),
            token.is_some(),
            nkey.is_some(),
            self.creds.is_some(),
        ];
        anyhow::ensure!(
            ways.iter().filter(|&&set| set).count() <= 1,
            "give NATS credentials one way only: NATS_USER with NATS_PASSWORD, NATS_TOKEN, \
             NATS_NKEY_SEED_FILE or NATS_CREDS"
        );
        Ok(match (&self.user, password, token, nkey, &self.creds) {
            (Some(user), Some(password), ..) => Credentials::UserPassword {
                user: user.clone(),
                password,
            },
            (Some(_), None, ..) => anyhow::bail!("NATS_USER is set without NATS_PASSWORD"),
            (None, Some(_), ..) => anyhow::bail!("NATS_PASSWORD is set without NATS_USER"),
            (_, _, Some(token), ..) => Credentials::Token(token),
            (_, _, _, Some(seed), _) => Credentials::NKey(seed),
            (_, _, _, _, Some(creds)) => Credentials::CredsFile(creds.clone()),
            _ => Credentials::Anonymous,
        })
    }
}

/// A secret given as a value or as a file holding it (trailing newline dropped); both is an error.
pub fn read_secret(
    value: Option<&SecretString>,
    file: Option<&std::path::Path>,
    what: &str,
) -> anyhow::Result<Option<SecretString>> {
    match (value.filter(|v| !v.expose_secret().is_empty()), file) {
        (Some(_), Some(_)) => anyhow::bail!("set {what} or {what}_FILE, not both"),
        (Some(value), None) => Ok(Some(value.clone())),
        (None, Some(path)) => {
            let text = SecretString::from(
                std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read {} ({what}_FILE)", path.display()))?,
            );
            let text = text.expose_secret().trim_end_matches(['\r', '\n']);
            anyhow::ensure!(
                !text.is_empty(),
                "{} ({what}_FILE) is empty",
                path.display()
            );
            Ok(Some(text.into()))
        }
        (None, None) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_auth_conf_is_the_generated_one() {
        assert_eq!(
            AUTH_CONF,
            auth_conf(),
            "nats/auth.conf differs from nats/src/auth.rs: regenerate it with \
             `cargo run -p landslide-nats --example auth-conf > nats/auth.conf`"
        );
    }

    #[test]
    fn no_role_may_purge_or_delete_and_only_ingest_may_vote() {
        let t = Topology::default();
        let durable = User::durable_denied(&t);
        for user in User::ALL {
            let Permissions { publish, subscribe } = user.permissions(&t);
            if user == User::Admin {
                assert_eq!(publish.allow, [">"]);
                for subject in [
                    "votes.*",
                    "$JS.API.STREAM.PURGE.VOTES",
                    "$JS.API.STREAM.DELETE.VOTES",
                    "$JS.API.STREAM.MSG.DELETE.VOTES",
                    "$JS.API.STREAM.UPDATE.VOTES",
                    "$JS.API.STREAM.PURGE.KV_LANDSLIDE_POLLS",
                    "$JS.API.STREAM.DELETE.KV_LANDSLIDE_POLLS",
                    "$JS.API.STREAM.MSG.DELETE.KV_LANDSLIDE_POLLS",
                    "$JS.API.STREAM.UPDATE.KV_LANDSLIDE_POLLS",
                ] {
                    assert!(
                        publish.deny.contains(&subject.to_owned()),
                        "admin and {subject}"
                    );
                }
                assert!(durable.iter().all(|d| publish.deny.contains(d)));
                // Every partition alike, up to the last one a deployment may have.
                for subject in [
                    "votes.p15.*",
                    "$JS.API.STREAM.PURGE.VOTES_P15",
                    "$JS.API.STREAM.UPDATE.VOTES_P15",
                    "$JS.ACK.VOTES_P15.dedup-worker.>",
                    "$JS.API.CONSUMER.MSG.NEXT.VOTES_P15.dedup-worker",
                ] {
                    assert!(
                        publish.deny.contains(&subject.to_owned()),
                        "admin and {subject}"
                    );
                }
                continue;
            }
            for subject in &publish.allow {
                // The workers own their durable consumer, and restart it by name after the
                // stream went backwards (`rollback`); no one else may delete a consumer of the
                // votes stream, and no one any other way.
                let own_consumer = user == User::Worker
                    && t.partitions(MAX_VOTE_PARTITIONS).iter().any(|p| {
                        *subject
                            == format!("$JS.API.CONSUMER.DELETE.{}.dedup-worker", p.votes_stream)
                    });
                assert!(
                    !subject.contains("STREAM.DELETE")
                        && !subject.contains("PURGE")
                        && !subject.contains("MSG.DELETE")
                        && !subject.contains("STREAM.UPDATE.KV_")
                        && (own_consumer || !subject.contains("CONSUMER.DELETE.VOTES")),
                    "{user} may publish {subject}"
                );
                // Revisions of the poll definitions: the owner's, and the workers' seed.
                if subject.starts_with("$KV.LANDSLIDE_POLLS.") {
                    match user {
                        User::Polls => assert_eq!(subject, "$KV.LANDSLIDE_POLLS.rev.*"),
                        User::Worker => assert_eq!(subject, "$KV.LANDSLIDE_POLLS.rev.1"),
                        _ => panic!("{user} may publish {subject}"),
                    }
                }
                // The workers' durable consumer: only the workers may reach it, and audit only
                // by a name that the deny list can refuse.
                if user != User::Worker {
                    assert!(!subject.contains("$JS.ACK.VOTES"), "{user}: {subject}");
                    assert_ne!(subject, "$JS.API.CONSUMER.CREATE.VOTES", "{user}");
                    if subject.contains("CONSUMER.CREATE.VOTES")
                        || subject.contains("CONSUMER.MSG.NEXT.VOTES")
                    {
                        assert!(durable.iter().all(|d| publish.deny.contains(d)), "{user}");
                    }
                }
            }
            let votes = publish.allow.contains(&"votes.*".to_owned());
            assert_eq!(votes, user == User::Ingest, "{user} and votes.*");
            assert_eq!(subscribe, Rule::only(vec![format!("_INBOX_{user}.>")]));
        }
    }

    #[test]
    fn credentials_come_one_way_only() {
        let none = CredentialSettings::default();
        assert!(matches!(
            none.credentials().unwrap(),
            Credentials::Anonymous
        ));
        let user = CredentialSettings {
            user: Some("ingest".into()),
            password: Some("pw".into()),
            ..Default::default()
        };
        assert!(matches!(
            user.credentials().unwrap(),
            Credentials::UserPassword { .. }
        ));
        let both = CredentialSettings {
            token: Some("t".into()),
            ..user.clone()
        };
        assert!(both.credentials().is_err());
        let lone = CredentialSettings {
            user: Some("ingest".into()),
            ..Default::default()
        };
        assert!(lone.credentials().is_err());
        assert_eq!(
            format!("{:?}", user.credentials().unwrap()),
            "UserPassword { user: \"ingest\", password: SecretBox<str>([REDACTED]) }"
        );
    }
}
