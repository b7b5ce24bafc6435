//! A deployment's own certificate authority: a CA and the server certificates it signs, as PEM
//! files. `landslide certs` writes them for a deployment's hosts, `landslide up` for its local
//! servers, and the test harness for each run's, so every one of them serves TLS the same way.
//!
//! The CA's key is written beside its certificate (mode 0600) only so that an operator can sign
//! more certificates with other tools; nothing here reads it back.

use std::io::Write as _;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// Years a certificate is valid from the start of this year: long enough for any poll, short
/// enough that a lost key does not stay good forever. Renew with `landslide certs`.
const VALID_YEARS: i32 = 3;

/// A CA that signs server certificates; its certificate is `<dir>/ca.pem`.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    dir: PathBuf,
    /// Made just now: certificates already in its folder were signed by another CA.
    new: bool,
}

/// What [`Authority::issue_or_keep`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Issued {
    /// A certificate for the same hosts was there already, and is kept.
    Kept,
    /// A new certificate was written (none was there, or it named other hosts).
    New,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("ca", &self.ca())
            .finish_non_exhaustive()
    }
}

/// A certificate and its key, as files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Authority {
    /// A new CA named `name`, written to `<dir>/ca.pem` and `<dir>/ca-key.pem`; refuses to
    /// overwrite a CA already there (the certificates it signed would stop verifying).
    pub fn create(dir: &Path, name: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished(name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut params);
        let key = KeyPair::generate().context("cannot generate the CA's key")?;
        let key_pem = key.serialize_pem();
        let issuer =
            CertifiedIssuer::self_signed(params, key).context("cannot sign the CA certificate")?;
        // The key first: a CA certificate without its key could never sign again, while a key
        // without its certificate is only made again.
        write_new(&dir.join("ca-key.pem"), key_pem.as_bytes(), 0o600)?;
        write_new(&dir.join("ca.pem"), issuer.pem().as_bytes(), 0o644)?;
        Ok(Self {
            new: true,
            ..Self::open(dir)?
        })
    }

    /// The CA already in `dir` (`ca.pem` and `ca-key.pem`), to sign more certificates with.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let read = |file: &str| {
            let path = dir.join(file);
            std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))
        };
        let key = KeyPair::from_pem(&read("ca-key.pem")?)
            .with_context(|| format!("{}: not a private key", dir.join("ca-key.pem").display()))?;
        let issuer = Issuer::from_ca_cert_pem(&read("ca.pem")?, key)
            .with_context(|| format!("{}: not a CA certificate", dir.join("ca.pem").display()))?;
        Ok(Self {
            issuer,
            dir: dir.to_owned(),
            new: false,
        })
    }

    /// The CA in `dir`, created (named `name`) if there is none yet.
    pub fn open_or_create(dir: &Path, name: &str) -> anyhow::Result<Self> {
        if dir.join("ca.pem").exists() {
            Self::open(dir)
        } else {
            Self::create(dir, name)
        }
    }

    /// The certificate `name` for `hosts`, as [`issue`](Self::issue) makes it, unless one for the
    /// same hosts, signed by this CA, is already there: so that running a deployment's set-up
    /// again changes nothing. One for other hosts is replaced (servers pick it up when they
    /// restart).
    pub fn issue_or_keep(
        &self,
        name: &str,
        hosts: &[String],
        purpose: Purpose,
    ) -> anyhow::Result<(CertFiles, Issued)> {
        let files = self.files(name);
        // The purpose and the hosts a certificate names, beside it (rcgen 0.14 reads back a CA
        // certificate's fields, not a server certificate's). A certificate of an earlier release
        // has no purpose line: it served both ways, and is issued again.
        let hosts_file = self.dir.join(format!("{name}-hosts"));
        let wanted = format!("purpose={}\n{}\n", purpose.name(), hosts.join("\n"));
        if !self.new
            && files.cert.exists()
            && files.key.exists()
            && std::fs::read_to_string(&hosts_file).is_ok_and(|had| had == wanted)
        {
            return Ok((files, Issued::Kept));
        }
        for path in [&files.cert, &files.key, &hosts_file] {
            match std::fs::remove_file(path) {
                Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                    return Err(err).with_context(|| format!("cannot replace {}", path.display()));
                }
                _ => {}
            }
        }
        let files = self.issue(name, hosts, purpose)?;
        std::fs::write(&hosts_file, wanted)
            .with_context(|| format!("cannot write {}", hosts_file.display()))?;
        Ok((files, Issued::New))
    }

    fn files(&self, name: &str) -> CertFiles {
        CertFiles {
            cert: self.dir.join(format!("{name}-cert.pem")),
            key: self.dir.join(format!("{name}-key.pem")),
        }
    }

    /// The CA certificate, which clients verify servers against (`NATS_CA`, `sslrootcert`).
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A certificate for `hosts` (names and IP addresses), good for `purpose` alone, written to
    /// `<dir>/<name>-cert.pem` and `<dir>/<name>-key.pem` (0600).
    pub fn issue(
        &self,
        name: &str,
        hosts: &[String],
        purpose: Purpose,
    ) -> anyhow::Result<CertFiles> {
        anyhow::ensure!(!hosts.is_empty(), "a certificate for {name} needs a host");
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished(name);
        params.subject_alt_names = subject_alt_names(hosts)?;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = purpose.usages();
        validity(&mut params);
        let key = KeyPair::generate().context("cannot generate a key")?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .with_context(|| format!("cannot sign the certificate of {name}"))?;
        let files = self.files(name);
        // The key first, as for the CA: a certificate is only ever beside its own key.
        write_new(&files.key, key.serialize_pem().as_bytes(), 0o600)?;
        write_new(&files.cert, cert.pem().as_bytes(), 0o644)?;
        Ok(files)
    }
}

/// What a certificate may be used for. Found by reading the deployments: every certificate the
/// CA issued could also be a client's, and NATS routes verify a peer's chain alone, so
/// PostgreSQL's certificate (on the database host) was accepted as a NATS route, and a route is
/// subject to no user's permissions. Only a route certificate may be a client now: nats-server
/// (Go's TLS) refuses a client certificate whose extended key usage lacks client
/// authentication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A server's (NATS's client port, PostgreSQL, HTTP): server authentication only.
    Server,
    /// A NATS cluster route's, held by NATS nodes alone: server and client authentication,
    /// since routes verify each other both ways.
    Route,
}

impl Purpose {
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        match text {
            "server" => Ok(Self::Server),
            "route" => Ok(Self::Route),
            other => anyhow::bail!("{other:?} is no certificate purpose (server, route)"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Server => "server",
            Self::Route => "route",
        }
    }

    fn usages(self) -> Vec<ExtendedKeyUsagePurpose> {
        match self {
            Self::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Self::Route => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        }
    }
}

/// `hosts` as a certificate names them: IP addresses as such, anything else as a DNS name.
fn subject_alt_names(hosts: &[String]) -> anyhow::Result<Vec<SanType>> {
    hosts
        .iter()
        .map(|host| match host.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => host
                .clone()
                .try_into()
                .map(SanType::DnsName)
                .with_context(|| format!("{host:?} is not a host name")),
        })
        .collect()
}

fn distinguished(name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Landslide");
    dn.push(DnType::CommonName, name);
    dn
}

fn validity(params: &mut CertificateParams) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // The calendar year, close enough: a certificate starts on January 1st of it (so a clock a
    // little behind still accepts it) and ends VALID_YEARS later.
    let year = 1970 + i32::try_from(now / 31_556_952).unwrap_or(0);
    params.not_before = rcgen::date_time_ymd(year, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + VALID_YEARS, 1, 1);
}

/// Writes a file that must not exist yet, with `mode`.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| {
            format!(
                "cannot create {} (remove it to make a new one)",
                path.display()
            )
        })?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_signs_certificates_and_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::create(dir.path(), "test CA").unwrap();
        let files = ca
            .issue(
                "nats",
                &["127.0.0.1".into(), "nats1".into()],
                Purpose::Server,
            )
            .unwrap();
        let cert = std::fs::read_to_string(&files.cert).unwrap();
        assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"), "{cert}");
        let mode = std::fs::metadata(&files.key).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        assert!(Authority::create(dir.path(), "again").is_err());
        assert!(
            ca.issue("nats", &["127.0.0.1".into()], Purpose::Server)
                .is_err()
        );
    }

    #[test]
    fn an_opened_ca_keeps_a_certificate_for_the_same_hosts_and_replaces_one_for_others() {
        let dir = tempfile::tempdir().unwrap();
        let hosts: Vec<String> = vec!["10.0.0.1".into(), "nats1".into()];
        let created = Authority::create(dir.path(), "test CA").unwrap();
        let (files, issued) = created
            .issue_or_keep("nats", &hosts, Purpose::Server)
            .unwrap();
        assert_eq!(issued, Issued::New);
        let first = std::fs::read(&files.cert).unwrap();

        let opened = Authority::open_or_create(dir.path(), "ignored").unwrap();
        assert_eq!(
            std::fs::read(opened.ca()).unwrap(),
            std::fs::read(created.ca()).unwrap()
        );
        assert_eq!(
            opened
                .issue_or_keep("nats", &hosts, Purpose::Server)
                .unwrap()
                .1,
            Issued::Kept
        );
        assert_eq!(std::fs::read(&files.cert).unwrap(), first);

        let other: Vec<String> = vec!["10.0.0.2".into()];
        assert_eq!(
            opened
                .issue_or_keep("nats", &other, Purpose::Server)
                .unwrap()
                .1,
            Issued::New
        );
        assert_ne!(std::fs::read(&files.cert).unwrap(), first);
        assert_eq!(
            opened
                .issue_or_keep("nats", &other, Purpose::Server)
                .unwrap()
                .1,
            Issued::Kept
        );
        // Another purpose is another certificate.
        assert_eq!(
            opened
                .issue_or_keep("nats", &other, Purpose::Route)
                .unwrap()
                .1,
            Issued::New
        );
    }
}
