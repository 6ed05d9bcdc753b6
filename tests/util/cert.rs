//! Reading what certd installed: certificate chains and private keys.

use std::path::Path;

use rcgen::PublicKeyData;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::extensions::GeneralName;

/// The DER of every `CERTIFICATE` block in a PEM file, in file order (leaf
/// first in a chain). Panics if the file cannot be read or parsed.
pub fn read_pem_certs(path: impl AsRef<Path>) -> Vec<Vec<u8>> {
    let path = path.as_ref();
    CertificateDer::pem_file_iter(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
        .map(|cert| {
            cert.unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
                .to_vec()
        })
        .collect()
}

/// The facts tests compare about a certificate: its DNS names (sorted), its
/// serial number (lowercase hex without leading zero bytes or separators),
/// its notAfter (Unix seconds) and its SubjectPublicKeyInfo DER.
pub fn parse_leaf(der: &[u8]) -> (Vec<String>, String, i64, Vec<u8>) {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("parse X.509 certificate");
    let mut names: Vec<String> = cert
        .subject_alternative_name()
        .expect("well-formed subjectAltName extension")
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::DNSName(dns) => Some(dns.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    let serial: String = cert
        .raw_serial()
        .iter()
        .skip_while(|&&byte| byte == 0)
        .map(|byte| format!("{byte:02x}"))
        .collect();
    let not_after = cert.validity().not_after.timestamp();
    let spki = cert.public_key().raw.to_vec();
    (names, serial, not_after, spki)
}

/// The SubjectPublicKeyInfo DER of a PKCS#8 (`PRIVATE KEY`) PEM file, to
/// compare with `parse_leaf`'s: equal means the certificate is for this key.
pub fn private_key_spki(pem_path: impl AsRef<Path>) -> Vec<u8> {
    let path = pem_path.as_ref();
    let pem =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    rcgen::KeyPair::from_pem(&pem)
        .unwrap_or_else(|e| panic!("parse private key {}: {e}", path.display()))
        .subject_public_key_info()
}
