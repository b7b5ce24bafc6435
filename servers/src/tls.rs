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
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

/// Years a certificate is valid from the start of this year: long enough for any poll, short
/// enough that a lost key does not stay good forever. Renew with `landslide certs`.
const VALID_YEARS: i32 = 3;

/// A CA that signs server certificates; its certificate is `<dir>/ca.pem`.
pub struct Authority {
    issuer: CertifiedIssuer<'static, KeyPair>,
    dir: PathBuf,
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
        write_new(&dir.join("ca.pem"), issuer.pem().as_bytes(), 0o644)?;
        write_new(&dir.join("ca-key.pem"), key_pem.as_bytes(), 0o600)?;
        Ok(Self {
            issuer,
            dir: dir.to_owned(),
        })
    }

    /// The CA certificate, which clients verify servers against (`NATS_CA`, `sslrootcert`).
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A certificate for `hosts` (names and IP addresses), good for serving and for being a
    /// client (cluster routes verify each other both ways), written to `<dir>/<name>-cert.pem`
    /// and `<dir>/<name>-key.pem` (0600).
    pub fn issue(&self, name: &str, hosts: &[String]) -> anyhow::Result<CertFiles> {
        anyhow::ensure!(!hosts.is_empty(), "a certificate for {name} needs a host");
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished(name);
        params.subject_alt_names = hosts
            .iter()
            .map(|host| match host.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => host
                    .clone()
                    .try_into()
                    .map(SanType::DnsName)
                    .with_context(|| format!("{host:?} is not a host name")),
            })
            .collect::<anyhow::Result<_>>()?;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        validity(&mut params);
        let key = KeyPair::generate().context("cannot generate a key")?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .with_context(|| format!("cannot sign the certificate of {name}"))?;
        let files = CertFiles {
            cert: self.dir.join(format!("{name}-cert.pem")),
            key: self.dir.join(format!("{name}-key.pem")),
        };
        write_new(&files.cert, cert.pem().as_bytes(), 0o644)?;
        write_new(&files.key, key.serialize_pem().as_bytes(), 0o600)?;
        Ok(files)
    }
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
            .issue("nats", &["127.0.0.1".into(), "nats1".into()])
            .unwrap();
        let cert = std::fs::read_to_string(&files.cert).unwrap();
        assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"), "{cert}");
        let mode = std::fs::metadata(&files.key).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        assert!(Authority::create(dir.path(), "again").is_err());
        assert!(ca.issue("nats", &["127.0.0.1".into()]).is_err());
    }
}
