//! What certd installed for a certificate, checked the same way by every
//! test: one leaf in `cert.pem`, and a private key that matches it.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use rustls_pki_types::{CertificateDer, UnixTime};

use super::{TestEnv, parse_leaf, private_key_spki, read_pem_certs};

/// The installed certificate of `name`: (DNS names sorted, serial, SPKI).
/// Panics unless `cert.pem` holds exactly the leaf and `privkey.pem`
/// matches it.
pub fn installed(env: &TestEnv, name: &str) -> (Vec<String>, String, Vec<u8>) {
    let dir = env.cert_dir().join(name);
    let leaf = read_pem_certs(dir.join("cert.pem"));
    assert_eq!(leaf.len(), 1, "{name}: cert.pem holds exactly the leaf");
    let (names, serial, _not_after, spki) = parse_leaf(&leaf[0]);
    assert_eq!(
        spki,
        private_key_spki(dir.join("privkey.pem")),
        "{name}: key matches certificate"
    );
    (names, serial, spki)
}

/// Checks everything certd installed for `name`: exactly `domains`, the
/// key/certificate pair, the chain, `fullchain.pem`, the key's mode.
/// Returns the serial.
pub fn assert_installed(env: &TestEnv, name: &str, domains: &[&str]) -> String {
    let (names, serial, _) = installed(env, name);
    let mut want: Vec<String> = domains
        .iter()
        .map(std::string::ToString::to_string)
        .collect();
    want.sort();
    assert_eq!(names, want, "{name}: certificate names");

    let dir = env.cert_dir().join(name);
    let leaf = read_pem_certs(dir.join("cert.pem"));
    let chain = read_pem_certs(dir.join("chain.pem"));
    assert!(!chain.is_empty(), "{name}: chain.pem has the intermediate");
    let (_, leaf_cert) = x509_parser::parse_x509_certificate(&leaf[0]).expect("leaf");
    let (_, issuer) = x509_parser::parse_x509_certificate(&chain[0]).expect("issuer");
    assert_eq!(
        leaf_cert.issuer(),
        issuer.subject(),
        "{name}: chain starts with the issuer"
    );
    let full = read_pem_certs(dir.join("fullchain.pem"));
    assert_eq!(
        full,
        [leaf, chain].concat(),
        "{name}: fullchain = cert + chain"
    );

    let mode = fs::metadata(dir.join("privkey.pem"))
        .expect("privkey")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "{name}: privkey.pem is 0600");
    serial
}

/// Which of `roots` (a name for each root's DER) the installed chain of
/// `name` verifies to, as a TLS client would check it now: the leaf in
/// `cert.pem` for serverAuth, through the intermediates in `chain.pem`.
/// Exactly one for a certificate from one of these CAs.
pub fn issuing_roots<'a>(env: &TestEnv, name: &str, roots: &[(&'a str, Vec<u8>)]) -> Vec<&'a str> {
    let dir = env.cert_dir().join(name);
    let leaf = read_pem_certs(dir.join("cert.pem"));
    let chain: Vec<CertificateDer<'static>> = read_pem_certs(dir.join("chain.pem"))
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let leaf = CertificateDer::from(leaf[0].clone());
    let leaf = webpki::EndEntityCert::try_from(&leaf).expect("the leaf parses for webpki");
    let now = UnixTime::now();
    roots
        .iter()
        .filter(|(_, root)| {
            let root = CertificateDer::from(root.as_slice());
            let anchor = webpki::anchor_from_trusted_cert(&root).expect("a usable root");
            leaf.verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &[anchor],
                &chain,
                now,
                webpki::KeyUsage::server_auth(),
                None,
                None,
            )
            .is_ok()
        })
        .map(|(label, _)| *label)
        .collect()
}
