//! Which TLS servers certd trusts: the system's roots plus the optional
//! `[acme] ca_bundle`, with the system's loaded only when needed.
//!
//! Reading and parsing the system trust store (about 150 roots, from
//! `/etc/ssl/certs`) took 3–4 ms, a sixth of the CPU time of a whole
//! `certd renew` against a private CA that the bundle alone vouches for. So
//! a server certificate is checked against the bundle first, and the
//! system's roots are read the first time one does not verify against the bundle
//! (at once when there is no bundle). Both checks are rustls's own
//! WebPKI verification; only the order and the loading are certd's.

use std::sync::{Arc, OnceLock};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{CertificateError, DigitallySignedStruct, Error, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

/// Verifies servers against the bundle, then the system's roots.
#[derive(Debug)]
pub(super) struct Roots {
    provider: Arc<CryptoProvider>,
    bundle: Option<Arc<WebPkiServerVerifier>>,
    /// `None` inside once the system has no usable roots.
    system: OnceLock<Option<Arc<WebPkiServerVerifier>>>,
}

impl Roots {
    /// `bundle`: the certificates of `ca_bundle`, already read.
    pub(super) fn new(
        provider: Arc<CryptoProvider>,
        bundle: Option<RootCertStore>,
    ) -> Result<Self, String> {
        let bundle = match bundle {
            Some(store) => Some(
                WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone())
                    .build()
                    .map_err(|e| e.to_string())?,
            ),
            None => None,
        };
        Ok(Self {
            provider,
            bundle,
            system: OnceLock::new(),
        })
    }

    fn system(&self) -> Option<&Arc<WebPkiServerVerifier>> {
        self.system
            .get_or_init(|| {
                // Unreadable system certificates are not fatal: a private
                // CA may be trusted through `ca_bundle` alone.
                let native = rustls_native_certs::load_native_certs();
                let mut store = RootCertStore::empty();
                store.add_parsable_certificates(native.certs);
                WebPkiServerVerifier::builder_with_provider(Arc::new(store), self.provider.clone())
                    .build()
                    .ok()
            })
            .as_ref()
    }
}

/// A TLS refusal in words, saying which setting fixes it: rustls's
/// `Display` is a debug dump (`invalid peer certificate: UnknownIssuer`).
pub(super) fn describe(e: &Error) -> String {
    const ADD_ROOT: &str = "add its root to `[acme] ca_bundle`";
    let Error::InvalidCertificate(cert) = e else {
        return format!("the TLS handshake with the CA failed: {e}");
    };
    match cert {
        CertificateError::UnknownIssuer => {
            format!("the CA's TLS certificate is not trusted: {ADD_ROOT}")
        }
        CertificateError::Other(other) if is_ca_used_as_end_entity(other) => format!(
            "the CA's TLS certificate is a CA certificate used as a server certificate: \
             the server must present a certificate issued by that CA (and {ADD_ROOT})"
        ),
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            "the CA's TLS certificate has expired".into()
        }
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            "the CA's TLS certificate is not valid yet (is this host's clock right?)".into()
        }
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            "the CA's TLS certificate is not valid for the host name of `[acme] directory`".into()
        }
        CertificateError::Revoked => "the CA's TLS certificate is revoked".into(),
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            "the CA's TLS certificate is not a server certificate (extended key usage)".into()
        }
        CertificateError::BadSignature
        | CertificateError::UnsupportedSignatureAlgorithmContext { .. }
        | CertificateError::UnsupportedSignatureAlgorithmForPublicKeyContext { .. } => format!(
            "the CA's TLS certificate is not signed by a key of a root certd trusts \
             (a signature that does not verify or an algorithm its issuer's key cannot make): \
             {ADD_ROOT}, the one that issued it"
        ),
        CertificateError::BadEncoding => "the CA's TLS certificate cannot be parsed".into(),
        _ => format!("the CA's TLS certificate is refused: {e}"),
    }
}

/// webpki's `CaUsedAsEndEntity`, which rustls passes on as an opaque
/// `Other` error.
fn is_ca_used_as_end_entity(other: &rustls::OtherError) -> bool {
    other
        .0
        .downcast_ref::<webpki::Error>()
        .is_some_and(|e| matches!(e, webpki::Error::CaUsedAsEndEntity))
}

impl ServerCertVerifier for Roots {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let verify = |v: &WebPkiServerVerifier| {
            v.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        };
        let unknown = Error::InvalidCertificate(CertificateError::UnknownIssuer);
        let from_bundle = match &self.bundle {
            Some(bundle) => match verify(bundle) {
                Ok(verified) => return Ok(verified),
                Err(e) => e,
            },
            None => unknown.clone(),
        };
        // Not the bundle's, or not valid by it: as with one store holding
        // both, the system's roots get their turn.
        let from_system = match self.system() {
            Some(system) => verify(system),
            None => Err(unknown.clone()),
        };
        // When both refuse, the more telling reason: the bundle's when it
        // knew the issuer (an expired certificate, a wrong name).
        from_system.map_err(|e| {
            if from_bundle == unknown {
                e
            } else {
                from_bundle
            }
        })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

    use super::*;

    /// A CA named `name`, and a leaf for `ca.test` it signed.
    fn ca_and_leaf(name: &str) -> (CertificateDer<'static>, CertificateDer<'static>) {
        let ca_key = KeyPair::generate().expect("generate CA key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("no SANs is valid");
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, name.to_owned());
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).expect("self-sign CA");
        let issuer = Issuer::new(ca, &ca_key);
        let leaf_key = KeyPair::generate().expect("generate leaf key");
        let leaf = CertificateParams::new(vec!["ca.test".to_owned()])
            .expect("valid SAN")
            .signed_by(&leaf_key, &issuer)
            .expect("sign leaf");
        (ca_cert.der().clone(), leaf.der().clone())
    }

    fn roots(bundle: &CertificateDer<'static>) -> Roots {
        let mut store = RootCertStore::empty();
        store.add(bundle.clone()).expect("CA parses");
        Roots::new(
            Arc::new(rustls::crypto::ring::default_provider()),
            Some(store),
        )
        .expect("verifier builds")
    }

    fn verify(roots: &Roots, leaf: &CertificateDer<'static>) -> Result<ServerCertVerified, Error> {
        let name = ServerName::try_from("ca.test").expect("valid name");
        roots.verify_server_cert(leaf, &[], &name, &[], UnixTime::now())
    }

    #[test]
    fn the_bundle_vouches_without_the_system_store() {
        let (ca, leaf) = ca_and_leaf("bundle CA");
        let roots = roots(&ca);
        verify(&roots, &leaf).expect("the bundle's CA signed the leaf");
        assert!(
            roots.system.get().is_none(),
            "system roots were loaded though the bundle sufficed"
        );
    }

    #[test]
    fn an_unknown_issuer_is_refused_after_asking_the_system() {
        let (ca, _) = ca_and_leaf("bundle CA");
        let (_, stranger) = ca_and_leaf("stranger CA");
        let roots = roots(&ca);
        let err = verify(&roots, &stranger).expect_err("no root signed it");
        assert!(
            matches!(
                err,
                Error::InvalidCertificate(CertificateError::UnknownIssuer)
            ),
            "{err:?}"
        );
        assert!(
            roots.system.get().is_some(),
            "the system store was not consulted"
        );
    }

    #[test]
    fn a_wrong_name_is_refused_with_the_bundles_reason() {
        let (ca, leaf) = ca_and_leaf("bundle CA");
        let roots = roots(&ca);
        let name = ServerName::try_from("other.test").expect("valid name");
        let err = roots
            .verify_server_cert(&leaf, &[], &name, &[], UnixTime::now())
            .expect_err("the leaf is for ca.test");
        // The bundle knew the issuer, so its reason wins over the system's
        // "unknown issuer".
        assert!(
            matches!(
                err,
                Error::InvalidCertificate(
                    CertificateError::NotValidForNameContext { .. }
                        | CertificateError::NotValidForName
                )
            ),
            "{err:?}"
        );
    }

    /// The refusals an operator meets with a private CA, in words that name
    /// the setting to change.
    #[test]
    fn refusals_are_worded_with_the_fix() {
        let (ca, _) = ca_and_leaf("bundle CA");
        let (_, stranger) = ca_and_leaf("stranger CA");
        let roots = roots(&ca);
        let err = verify(&roots, &stranger).expect_err("no root signed it");
        assert_eq!(
            describe(&err),
            "the CA's TLS certificate is not trusted: add its root to `[acme] ca_bundle`"
        );
        // A server that presents the bundle's CA certificate itself.
        let err = verify(&roots, &ca).expect_err("a CA is not a server certificate");
        let text = describe(&err);
        assert!(
            text.starts_with(
                "the CA's TLS certificate is a CA certificate used as a server certificate"
            ),
            "{text} ({err:?})"
        );
        assert!(!text.contains("Other("), "{text}");
    }
}
