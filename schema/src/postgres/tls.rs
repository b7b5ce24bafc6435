//! The rustls configuration of each `sslmode`: which certificates a connection accepts.
//!
//! `verify-full` is rustls' own WebPKI verifier over the CA of `sslrootcert`: the chain and the
//! host name. `verify-ca` (and `require` with `sslrootcert`, as libpq) checks the same chain with
//! the same function but not the name ([`AnyName`] with roots). `prefer` and `require` without a
//! CA accept any certificate ([`AnyName`] without), as libpq does: the session is encrypted, to
//! whoever answered.
//! In every mode the TLS handshake itself is verified (the server proves it holds the key of the
//! certificate it sent), and the crypto provider is ring, chosen here rather than taken from the
//! process (`landslide_nats::install_crypto_provider`), so connecting never depends on a global.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::SslMode;

/// The client configuration of `mode` (not `disable`); `root` is required by the verifying
/// modes (the URL's parser makes sure of it). Errors are the URL's problem, in words.
pub(super) fn client_config(
    mode: SslMode,
    root: Option<&Path>,
    client: Option<(&Path, &Path)>,
) -> Result<ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot set up TLS: {e}"))?;
    let roots = root.map(read_roots).transpose()?;
    let builder = match (mode, roots) {
        (SslMode::VerifyFull, Some(roots)) => builder.with_root_certificates(roots),
        (SslMode::VerifyCa | SslMode::Require, Some(roots)) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyName {
                roots: Some(Arc::new(roots)),
                algorithms: provider.signature_verification_algorithms,
            })),
        (SslMode::Prefer | SslMode::Require, None) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyName {
                roots: None,
                algorithms: provider.signature_verification_algorithms,
            })),
        (mode, _) => return Err(format!("sslmode={mode} cannot be set up with these files")),
    };
    match client {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(Iterator::collect::<Result<Vec<_>, _>>)
                .map_err(|e| format!("cannot read sslcert {}: {e}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("cannot read sslkey {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("sslcert and sslkey do not make a client certificate: {e}"))
        }
    }
}

/// The CA certificates of `path` (PEM, one or more: a bundle such as Amazon RDS's).
fn read_roots(path: &Path) -> Result<RootCertStore, String> {
    let problem =
        |e: &dyn std::fmt::Display| format!("cannot read sslrootcert {}: {e}", path.display());
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| problem(&e))?;
    if certs.is_empty() {
        return Err(problem(&"it holds no certificate"));
    }
    for cert in certs {
        roots.add(cert).map_err(|e| problem(&e))?;
    }
    Ok(roots)
}

/// The verifier of every mode but `verify-full`: with `roots` (`verify-ca`, and `require` with a
/// CA), the server's certificate must chain to one of them, whatever name it has (rustls' WebPKI
/// verifier checks the chain first and the name after, with two public functions; this is the
/// first of them alone). Without (`prefer`, `require` without a CA), any certificate, as libpq
/// accepts it in these modes. Either way the handshake's signatures are checked, so the session
/// is encrypted to whoever holds the key of the certificate that was sent.
#[derive(Debug)]
struct AnyName {
    roots: Option<Arc<RootCertStore>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.algorithms.all,
            )?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
