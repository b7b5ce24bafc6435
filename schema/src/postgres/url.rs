//! `DATABASE_URL`, parsed once into what every connection needs: the server and the user
//! (`tokio_postgres::Config`), and how the connection is protected (libpq's `sslmode`,
//! `sslrootcert`, `sslcert`, `sslkey`), with the TLS configuration built from the files it names.
//!
//! Every connection path (`connect`, `migrate`, the pools) takes a [`DatabaseUrl`], so no path can
//! connect in a way the URL did not ask for.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use secrecy::{ExposeSecret, SecretString};

/// How a connection is protected: libpq's `sslmode`, with libpq's meanings
/// (<https://www.postgresql.org/docs/15/libpq-ssl.html#LIBPQ-SSL-SSLMODE-STATEMENTS>).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plaintext only.
    Disable,
    /// TLS when the server offers it, plaintext when it does not; the certificate is not checked.
    /// The default when the URL gives no `sslmode` (see [`DatabaseUrl::parse`] for why).
    Prefer,
    /// TLS or no connection. Without `sslrootcert` the certificate is not checked (libpq: "I want
    /// my data to be encrypted ... I trust that the network will make sure I always connect to
    /// the server I want"): it protects against eavesdropping, not against an impostor. With
    /// `sslrootcert` it is [`SslMode::VerifyCa`], as in libpq.
    Require,
    /// TLS, and the server's certificate must chain to `sslrootcert`; its name is not checked.
    VerifyCa,
    /// TLS, the certificate must chain to `sslrootcert` and name the host of the URL.
    VerifyFull,
}

impl SslMode {
    /// The `sslmode` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }

    fn parse(value: &str) -> Result<Self, String> {
        Ok(match value {
            "disable" => Self::Disable,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            // libpq's `allow` tries plaintext first and TLS only if the server insists: nothing
            // that wants TLS would choose it, and tokio-postgres has no such mode.
            "allow" => {
                return Err(
                    "sslmode=allow is not supported: use disable, prefer, require, verify-ca or \
                     verify-full"
                        .to_owned(),
                );
            }
            other => {
                return Err(format!(
                    "unknown sslmode {other:?}: use disable, prefer, require, verify-ca or \
                     verify-full"
                ));
            }
        })
    }
}

impl std::fmt::Display for SslMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `DATABASE_URL` that cannot be used, and why; the URL is shown without its password.
#[derive(Debug, thiserror::Error)]
#[error("DATABASE_URL {url} is invalid: {problem}")]
pub struct InvalidDatabaseUrl {
    url: String,
    problem: String,
}

/// A PostgreSQL URL, parsed: where to connect, as whom, and how the connection is protected.
///
/// It never shows its password: `Debug` and `Display` print the URL redacted, so configurations
/// holding one can derive `Debug` and be logged. The URL itself, password included, is held as a
/// [`SecretString`] (the password is a part of its text, which [`DatabaseUrl::with_login`]
/// rewrites), read only through [`ExposeSecret`]. The TLS files it names are read once, by
/// [`DatabaseUrl::parse`]; a renewed certificate takes effect at the next start.
#[derive(Clone)]
pub struct DatabaseUrl {
    url: SecretString,
    config: tokio_postgres::Config,
    ssl_mode: SslMode,
    root_cert: Option<PathBuf>,
    /// `None` for `sslmode=disable`.
    tls: Option<Arc<rustls::ClientConfig>>,
}

/// The URL parameters that are ours to interpret: tokio-postgres knows `sslmode` only up to
/// `require`, and refuses the others as unknown options.
const TLS_PARAMETERS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

impl DatabaseUrl {
    /// Parses `postgres://user:password@host:port/dbname?param=value&...`.
    ///
    /// The TLS parameters are libpq's, with libpq's meanings, except where libpq would leave a
    /// demanding user in plaintext without saying so:
    ///
    /// - Without `sslmode`, the mode is `prefer`, libpq's default: a URL means here what it means
    ///   to `psql`, and one that worked before TLS came (a local server without TLS, the
    ///   deployments' own URLs) keeps working. `prefer` encrypts when the server offers TLS and
    ///   checks nothing, so an impostor or anyone who can answer "no TLS" in its place gets the
    ///   session in plaintext (libpq's table: "I don't care about encryption"). Whoever needs
    ///   protection asks for it with `verify-full` (or `verify-ca`), and then nothing falls back.
    /// - `sslrootcert` with `prefer` (given or by default) is refused: libpq would check the
    ///   certificate when the server offers TLS and still go plaintext when it does not, so a URL
    ///   that names a CA would protect nothing against an impostor. Say `verify-full`.
    /// - `verify-ca` and `verify-full` need `sslrootcert` (libpq would look for
    ///   `~/.postgresql/root.crt`; nothing here reads files the URL does not name), and so does
    ///   `sslcert`, which needs `sslkey` beside it.
    /// - `sslrootcert=system` (libpq 16) is not supported: name the CA file.
    ///
    /// TLS runs over TCP hosts (PostgreSQL offers none on Unix sockets).
    pub fn parse(url: &str) -> Result<Self, InvalidDatabaseUrl> {
        let invalid = |problem: String| InvalidDatabaseUrl {
            url: super::redact(url),
            problem,
        };
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(invalid(
                "it must start with postgres:// or postgresql://".to_owned(),
            ));
        }
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut kept = Vec::new();
        let mut ours: [Option<String>; 4] = Default::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match TLS_PARAMETERS.iter().position(|p| *p == key) {
                Some(i) => {
                    let value = percent_decode(value)
                        .ok_or_else(|| invalid(format!("{key} is not percent-encoded")))?;
                    if ours[i].replace(value).is_some() {
                        return Err(invalid(format!("{key} is given twice")));
                    }
                }
                None => kept.push(pair),
            }
        }
        let [mode, root_cert, cert, key] = ours;
        let ssl_mode = match mode.as_deref() {
            None => SslMode::Prefer,
            Some(mode) => SslMode::parse(mode).map_err(invalid)?,
        };
        if root_cert.as_deref() == Some("system") {
            return Err(invalid(
                "sslrootcert=system is not supported: give the path of the CA certificate that \
                 signed the server's"
                    .to_owned(),
            ));
        }
        let root_cert = root_cert.map(PathBuf::from);
        let client = match (cert, key) {
            (Some(cert), Some(key)) => Some((PathBuf::from(cert), PathBuf::from(key))),
            (None, None) => None,
            _ => {
                return Err(invalid(
                    "sslcert and sslkey go together: give both or neither".to_owned(),
                ));
            }
        };
        match (ssl_mode, &root_cert) {
            (SslMode::Disable, Some(_)) => {
                return Err(invalid(
                    "sslmode=disable with sslrootcert: choose verify-full to use the CA, or \
                     drop sslrootcert"
                        .to_owned(),
                ));
            }
            (SslMode::Prefer, Some(_)) => {
                return Err(invalid(format!(
                    "sslrootcert is given but sslmode is prefer{}, which goes plaintext without \
                     a word when the server (or an impostor) offers no TLS: say \
                     sslmode=verify-full (or verify-ca)",
                    if mode.is_none() { " (the default)" } else { "" }
                )));
            }
            (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
                return Err(invalid(format!(
                    "sslmode={ssl_mode} needs sslrootcert=<path of the CA certificate>"
                )));
            }
            _ => {}
        }
        if ssl_mode == SslMode::Disable && client.is_some() {
            return Err(invalid(
                "sslmode=disable with sslcert: a client certificate needs TLS".to_owned(),
            ));
        }

        let rest = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        let mut config =
            tokio_postgres::Config::from_str(&rest).map_err(|e| invalid(super::error_chain(&e)))?;
        // PostgreSQL offers no TLS on a Unix socket (the server's own kernel carries the bytes, and
        // peer authentication names the process): a socket URL of `prefer` means no TLS, and one
        // that demands TLS could never connect, so it is refused now rather than at every attempt.
        // Found by `landslide db-users` over the socket in scripts/install: the TLS connector
        // needs a host name, and a socket has none ("invalid dns name").
        let sockets_only = !config.get_hosts().is_empty()
            && config
                .get_hosts()
                .iter()
                .all(|host| matches!(host, tokio_postgres::config::Host::Unix(_)));
        let ssl_mode = match ssl_mode {
            SslMode::Prefer if sockets_only => SslMode::Disable,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull if sockets_only => {
                return Err(invalid(format!(
                    "sslmode={ssl_mode} with a Unix socket, where PostgreSQL offers no TLS: \
                     connect over TCP, or leave sslmode out"
                )));
            }
            mode => mode,
        };
        config.ssl_mode(match ssl_mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        });
        let tls = match ssl_mode {
            SslMode::Disable => None,
            mode => Some(Arc::new(
                super::tls::client_config(
                    mode,
                    root_cert.as_deref(),
                    client.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
                )
                .map_err(invalid)?,
            )),
        };
        Ok(Self {
            url: url.into(),
            config,
            ssl_mode,
            root_cert,
            tls,
        })
    }

    /// How connections are protected.
    pub fn ssl_mode(&self) -> SslMode {
        self.ssl_mode
    }

    /// The CA certificate the server is checked against, if any.
    pub fn root_cert(&self) -> Option<&Path> {
        self.root_cert.as_deref()
    }

    /// The database user, if the URL names one.
    pub fn user(&self) -> Option<&str> {
        self.config.get_user()
    }

    /// The database name, if the URL names one.
    pub fn dbname(&self) -> Option<&str> {
        self.config.get_dbname()
    }

    /// The same server and settings, connecting as `user` and with `password` where given instead
    /// of the URL's own: how a deployed role takes its own login role, and its password from a
    /// file systemd hands it (`DATABASE_USER`, `DATABASE_PASSWORD_FILE`), while the URL that every
    /// role of a host shares names only the server.
    pub fn with_login(
        &self,
        user: Option<&str>,
        password: Option<&str>,
    ) -> Result<Self, InvalidDatabaseUrl> {
        // `parse` checked the scheme.
        let url = self.expose_secret();
        let scheme_end = url.find("://").map_or(0, |i| i + 3);
        let (scheme, rest) = url.split_at(scheme_end);
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        let (userinfo, hosts) = match authority.rfind('@') {
            Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
            None => (None, authority),
        };
        let (old_user, old_password) = match userinfo.map(|u| u.split_once(':')) {
            Some(Some((user, password))) => (Some(user.to_owned()), Some(password.to_owned())),
            Some(None) => (userinfo.map(str::to_owned), None),
            None => (None, None),
        };
        let user = user.map(encode_userinfo).or(old_user);
        let password = password.map(encode_userinfo).or(old_password);
        let userinfo = match (user, password) {
            (Some(user), Some(password)) => format!("{user}:{password}@"),
            (Some(user), None) => format!("{user}@"),
            (None, None) => String::new(),
            (None, Some(_)) => {
                return Err(InvalidDatabaseUrl {
                    url: super::redact(url),
                    problem: "a password is given but no user: name one in the URL or in \
                              DATABASE_USER"
                        .to_owned(),
                });
            }
        };
        Self::parse(&format!("{scheme}{userinfo}{hosts}{tail}"))
    }

    pub(super) fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    /// The same URL, with every statement on its connections cancelled by the server after
    /// `limit` (PostgreSQL's `statement_timeout`, set at connect): for a pool that answers the
    /// public, whose queries must never queue up behind a lock for as long as it is held.
    pub fn with_statement_timeout(&self, limit: std::time::Duration) -> Self {
        let mut limited = self.clone();
        let options = format!(
            "{} -c statement_timeout={}",
            self.config.get_options().unwrap_or_default(),
            limit.as_millis()
        );
        limited.config.options(options.trim_start());
        limited
    }

    pub(super) fn tls(&self) -> Option<&rustls::ClientConfig> {
        self.tls.as_deref()
    }
}

/// The URL itself, password included: for handing to another program (`pg_dump`), never for
/// printing.
impl ExposeSecret<str> for DatabaseUrl {
    fn expose_secret(&self) -> &str {
        self.url.expose_secret()
    }
}

impl FromStr for DatabaseUrl {
    type Err = InvalidDatabaseUrl;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        Self::parse(url)
    }
}

impl PartialEq for DatabaseUrl {
    fn eq(&self, other: &Self) -> bool {
        self.expose_secret() == other.expose_secret()
    }
}

impl Eq for DatabaseUrl {}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", super::redact(self.expose_secret()))
    }
}

impl std::fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&super::redact(self.expose_secret()))
    }
}

/// `%XX` escapes decoded; `None` for a malformed escape or bytes that are not UTF-8.
fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = value.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `value` with every byte but RFC 3986's unreserved characters and `/` percent-encoded: for
/// putting a file path into a URL's parameter (`sslrootcert=`).
pub fn percent_encode(value: &str) -> String {
    encode(value, b"-._~/")
}

/// `value` with every byte but RFC 3986's unreserved characters percent-encoded: a user or a
/// password in a URL's userinfo.
fn encode_userinfo(value: &str) -> String {
    encode(value, b"-._~")
}

fn encode(value: &str, kept: &[u8]) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || kept.contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(url: &str) -> String {
        DatabaseUrl::parse(url).expect_err("refused").to_string()
    }

    #[test]
    fn a_database_url_never_prints_its_password() {
        let url = DatabaseUrl::parse("postgres://u:secret@h/db").unwrap();
        assert_eq!(
            format!("{url} {url:?}"),
            "postgres://u:***@h/db \"postgres://u:***@h/db\""
        );
        assert_eq!(url.expose_secret(), "postgres://u:secret@h/db");
        assert!(!problem("postgres://u:secret@h/db?sslmode=bogus").contains("secret"));
    }

    #[test]
    fn without_sslmode_a_url_means_what_it_means_to_libpq() {
        let url = DatabaseUrl::parse("postgres://landslide@127.0.0.1:5432/landslide").unwrap();
        assert_eq!(url.ssl_mode(), SslMode::Prefer);
        assert_eq!(url.user(), Some("landslide"));
        assert_eq!(url.dbname(), Some("landslide"));
        let url =
            DatabaseUrl::parse("postgresql://h/db?sslmode=disable&application_name=x").unwrap();
        assert_eq!(url.ssl_mode(), SslMode::Disable);
        assert!(url.tls().is_none());
    }

    #[test]
    fn every_problem_names_database_url_and_says_what_to_do() {
        for (url, expected) in [
            ("mysql://h/db", "must start with postgres://"),
            (
                "postgres://h/db?sslmode=allow",
                "sslmode=allow is not supported",
            ),
            (
                "postgres://h/db?sslmode=strict",
                "unknown sslmode \"strict\"",
            ),
            ("postgres://h/db?sslmode=verify-full", "needs sslrootcert"),
            ("postgres://h/db?sslmode=verify-ca", "needs sslrootcert"),
            (
                "postgres://h/db?sslrootcert=/ca.pem",
                "prefer (the default)",
            ),
            (
                "postgres://h/db?sslmode=prefer&sslrootcert=/ca.pem",
                "say sslmode=verify-full",
            ),
            (
                "postgres://h/db?sslmode=disable&sslrootcert=/ca.pem",
                "drop sslrootcert",
            ),
            (
                "postgres://h/db?sslmode=require&sslcert=/c.pem",
                "sslcert and sslkey go together",
            ),
            (
                "postgres://h/db?sslmode=require&sslmode=disable",
                "sslmode is given twice",
            ),
            (
                "postgres://h/db?sslmode=verify-full&sslrootcert=system",
                "system is not supported",
            ),
            (
                "postgres://h/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
                "cannot read sslrootcert /nonexistent/ca.pem",
            ),
            ("postgres://h/db?frobnicate=1", "frobnicate"),
        ] {
            let message = problem(url);
            assert!(message.starts_with("DATABASE_URL "), "{url}: {message}");
            assert!(message.contains(expected), "{url}: {message}");
        }
    }

    #[test]
    fn a_unix_socket_gets_no_tls_and_a_url_that_demands_it_there_is_refused() {
        let socket =
            DatabaseUrl::parse("postgres://postgres@%2Fvar%2Frun%2Fpostgresql/db").unwrap();
        assert_eq!(socket.ssl_mode(), SslMode::Disable);
        assert!(socket.tls().is_none());
        let message = problem("postgres://postgres@%2Frun%2Fpostgresql/db?sslmode=require");
        assert!(message.contains("Unix socket"), "{message}");
    }

    #[test]
    fn a_login_given_apart_replaces_the_urls_and_keeps_everything_else() {
        let shared = DatabaseUrl::parse(
            "postgres://landslide@db.internal:5433/landslide?sslmode=require&application_name=x",
        )
        .unwrap();
        let own = shared
            .with_login(Some("landslide_worker"), Some("p@ss:w/rd?&"))
            .unwrap();
        assert_eq!(
            own.expose_secret(),
            "postgres://landslide_worker:p%40ss%3Aw%2Frd%3F%26@db.internal:5433/landslide?\
             sslmode=require&application_name=x"
        );
        assert_eq!(own.user(), Some("landslide_worker"));
        assert_eq!(own.config().get_password(), Some("p@ss:w/rd?&".as_bytes()));
        assert_eq!(own.ssl_mode(), SslMode::Require);
        assert!(!format!("{own} {own:?}").contains("p%40ss"));
        // Only the password: the URL's user keeps it.
        let url = DatabaseUrl::parse("postgres://u:old@h/db").unwrap();
        assert_eq!(
            url.with_login(None, Some("new")).unwrap().expose_secret(),
            "postgres://u:new@h/db"
        );
        assert_eq!(url.with_login(None, None).unwrap(), url);
        let anonymous = DatabaseUrl::parse("postgres://h/db").unwrap();
        let err = anonymous
            .with_login(None, Some("pw"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no user"), "{err}");
        assert!(!err.contains("pw"), "{err}");
    }

    #[test]
    fn percent_encoding_round_trips_paths_and_passwords() {
        for value in ["/tmp/a b/ca.pem", "p@ss:w/rd?&=%", "plain"] {
            assert_eq!(
                percent_decode(&percent_encode(value)).as_deref(),
                Some(value)
            );
        }
        assert_eq!(percent_decode("%zz"), None);
    }
}
