//! Test certificate authorities: a root, intermediates under it, and
//! server certificates they issue, for the installer's and the chain
//! check's tests.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

/// A CA for tests: its certificate and the means to sign with it.
pub(super) struct TestCa {
    pub(super) cert: rcgen::Certificate,
    pub(super) issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    pub(super) fn root(name: &str) -> TestCa {
        let key = KeyPair::generate().expect("key");
        let params = ca_params(name);
        let cert = params.self_signed(&key).expect("root");
        TestCa {
            cert,
            issuer: Issuer::new(params, key),
        }
    }

    pub(super) fn intermediate(&self, name: &str) -> TestCa {
        let key = KeyPair::generate().expect("key");
        let params = ca_params(name);
        let cert = params.signed_by(&key, &self.issuer).expect("intermediate");
        TestCa {
            cert,
            issuer: Issuer::new(params, key),
        }
    }

    pub(super) fn der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }
}

pub(super) fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
}

/// A server certificate as a CA issues it: serverAuth, valid now.
pub(super) fn leaf_params(names: &[&str]) -> CertificateParams {
    let mut params =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .expect("params");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = OffsetDateTime::now_utc() - time::Duration::days(1);
    params.not_after = OffsetDateTime::now_utc() + time::Duration::days(30);
    params
}

/// Leaf (for a fresh key) and intermediate PEM, issued under `ca`.
pub(super) fn chain_pem(names: &[&str], key: &KeyPair, ca: &TestCa) -> String {
    let leaf = leaf_params(names).signed_by(key, &ca.issuer).expect("leaf");
    format!("{}{}", leaf.pem(), ca.cert.pem())
}
