//! Facts about X.509 certificates: what a certificate names and when it is
//! valid ([`CertInfo`]), the roots an operator trusts ([`TrustedRoots`]),
//! and the check a CA's chain must pass before it may be installed
//! ([`verify_chain`]).
//!
//! The CA's answer is untrusted input: the chain is checked as a TLS client
//! would check it, so a CA that sends an expired, misissued or unchained
//! certificate cannot replace a working one.
//!
//! This stays in `install` rather than below `acme`: the ACME layer hands
//! certificates over as bytes and never reads one; `install` (checking an
//! issuance) and the layers above it (scheduling, status) are the readers.

use std::time::Duration;

use rustls_pki_types::CertificateDer;
use webpki::{EndEntityCert, KeyUsage, VerifiedPath, anchor_from_trusted_cert};
use x509_parser::certificate::X509Certificate;

use crate::clock::{UnixTime, rfc3339};
use crate::config::TrustedRoots;

/// How far the CA's clock may run ahead of ours: a certificate valid from
/// a moment from now is taken (CAs rarely backdate). It also refuses one
/// that expires within this margin, which would be useless anyway.
const CLOCK_SKEW: Duration = Duration::from_secs(300);

/// Facts about a certificate, parsed from its DER.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// DNS names from the subjectAltName extension, sorted.
    pub dns_names: Vec<String>,
    /// iPAddress entries of the subjectAltName extension (RFC 8738), in
    /// canonical text form (RFC 5952 for IPv6), sorted.
    pub ip_addresses: Vec<String>,
    /// Serial number, lower-case hex.
    pub serial: String,
    pub not_before: i64,
    pub not_after: i64,
    /// DER of the SubjectPublicKeyInfo.
    pub spki: Vec<u8>,
    /// The RFC 9773 certificate identifier (base64url AKI keyIdentifier "."
    /// base64url serial), when the certificate has an AKI.
    pub ari_id: Option<String>,
}

impl CertInfo {
    pub fn parse(der: &[u8]) -> Result<Self, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("cannot parse certificate: {e}"))?;
        let mut dns_names: Vec<String> = Vec::new();
        let mut ip_addresses: Vec<String> = Vec::new();
        let sans = cert.subject_alternative_name().ok().flatten();
        for n in sans.iter().flat_map(|san| san.value.general_names.iter()) {
            match n {
                x509_parser::extensions::GeneralName::DNSName(d) => {
                    dns_names.push(d.to_ascii_lowercase());
                }
                x509_parser::extensions::GeneralName::IPAddress(raw) => {
                    ip_addresses.push(ip_from_san(raw)?.to_string());
                }
                _ => {}
            }
        }
        dns_names.sort();
        ip_addresses.sort();
        let aki = cert
            .extensions()
            .iter()
            .find_map(|ext| match ext.parsed_extension() {
                x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(aki) => {
                    aki.key_identifier.as_ref().map(|k| k.0.to_vec())
                }
                _ => None,
            });
        let b64 = |b: &[u8]| {
            use base64::Engine;
            base64::prelude::BASE64_URL_SAFE_NO_PAD.encode(b)
        };
        let ari_id = aki.map(|k| format!("{}.{}", b64(&k), b64(cert.tbs_certificate.raw_serial())));
        Ok(Self {
            ari_id,
            dns_names,
            ip_addresses,
            // Lower-case hex without leading zero bytes, as CAs and
            // `openssl x509 -serial` print it.
            serial: cert
                .raw_serial()
                .iter()
                .skip_while(|b| **b == 0)
                .map(|b| format!("{b:02x}"))
                .collect(),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            spki: cert.public_key().raw.to_vec(),
        })
    }

    /// Every name on the certificate, DNS names and addresses, sorted as
    /// text: comparable with a certificate's sorted `domain_strings`.
    pub(crate) fn names(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .dns_names
            .iter()
            .chain(&self.ip_addresses)
            .cloned()
            .collect();
        all.sort();
        all
    }
}

/// An iPAddress SAN's octets: 4 for IPv4, 16 for IPv6 (RFC 5280 section
/// 4.2.1.6); any other length is a malformed certificate.
fn ip_from_san(raw: &[u8]) -> Result<std::net::IpAddr, String> {
    if let Ok(v4) = <[u8; 4]>::try_from(raw) {
        return Ok(std::net::Ipv4Addr::from(v4).into());
    }
    <[u8; 16]>::try_from(raw)
        .map(|v6| std::net::Ipv6Addr::from(v6).into())
        .map_err(|_| format!("an iPAddress SAN of {} bytes", raw.len()))
}

/// Checks the chain the CA issued (`certs`, leaf first) as a TLS client
/// would, before it may replace a working certificate:
///
/// - the leaf is valid at `now` (give or take `CLOCK_SKEW`), is not a CA,
///   and carries the serverAuth extended key usage;
/// - every certificate is issued by the one after it (RFC 8555 section 9.1),
///   each of those is a CA, and each signature verifies (rustls-webpki's
///   RFC 5280 path validation: validity, basic constraints, EKU and name
///   constraints along the path);
/// - with `roots`, the chain ends at one of them; without, at the last
///   certificate the CA sent, so a leaf without a chain is refused.
pub(crate) fn verify_chain(
    certs: &[CertificateDer<'_>],
    roots: Option<&TrustedRoots>,
    now: UnixTime,
) -> Result<(), String> {
    let parsed = certs
        .iter()
        .enumerate()
        .map(|(i, der)| {
            x509_parser::parse_x509_certificate(der)
                .map(|(_, cert)| cert)
                .map_err(|e| format!("certificate {} of the chain cannot be parsed: {e}", i + 1))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let ([leaf, issuers @ ..], [leaf_der, issuer_ders @ ..]) = (parsed.as_slice(), certs) else {
        return Err("no certificate in the response".into());
    };
    let now = now.plus(CLOCK_SKEW);
    check_leaf(leaf, now)?;
    if issuer_ders.is_empty() && roots.is_none() {
        return Err(
            "the CA sent the certificate without its chain, so nothing shows who issued it".into(),
        );
    }
    for (i, pair) in parsed.windows(2).enumerate() {
        if pair[0].issuer().as_raw() != pair[1].subject().as_raw() {
            return Err(format!(
                "certificate {} of the chain ({}) is not issued by the next one ({})",
                i + 1,
                pair[0].subject(),
                pair[1].subject()
            ));
        }
    }
    for (i, cert) in issuers.iter().enumerate() {
        if !is_ca(cert)? {
            return Err(format!(
                "certificate {} of the chain ({}) issues the one before it but is not a CA",
                i + 2,
                cert.subject()
            ));
        }
    }

    let leaf = EndEntityCert::try_from(leaf_der)
        .map_err(|e| format!("the certificate is not usable for TLS: {e}"))?;
    let time = rustls_pki_types::UnixTime::since_unix_epoch(Duration::from_secs(
        u64::try_from(now.secs()).unwrap_or(0),
    ));
    let algs = webpki::ALL_VERIFICATION_ALGS;
    // serverAuth where an intermediate has EKUs at all; the leaf's own was
    // required above.
    let usage = KeyUsage::server_auth();
    match (roots, issuer_ders.split_last()) {
        (Some(roots), _) => {
            let anchors = roots.anchors();
            leaf.verify_for_usage(algs, &anchors, issuer_ders, time, usage, None, None)
                .map_err(|e| {
                    format!(
                        "the chain does not lead to a root in trusted_roots ({}): {e}",
                        roots.path().display()
                    )
                })?;
        }
        (None, Some((top, between))) => {
            let anchor = anchor_from_trusted_cert(top)
                .map_err(|e| format!("the chain's last certificate is unusable: {e}"))?;
            // Every certificate the CA sent must be on the path, not just
            // some that happen to link up.
            let uses_all = |path: &VerifiedPath<'_>| {
                if path.intermediate_certificates().count() == between.len() {
                    Ok(())
                } else {
                    Err(webpki::Error::UnknownIssuer)
                }
            };
            leaf.verify_for_usage(algs, &[anchor], between, time, usage, None, Some(&uses_all))
                .map_err(|e| format!("the chain does not verify: {e}"))?;
        }
        // Refused above: no roots and no chain.
        (None, None) => return Err("the CA sent no chain".into()),
    }
    Ok(())
}

/// The leaf's own properties, checked first for a clear message.
fn check_leaf(leaf: &X509Certificate<'_>, now: UnixTime) -> Result<(), String> {
    let validity = leaf.validity();
    let (from, until) = (
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    );
    if now.secs() < from {
        return Err(format!(
            "the certificate is not valid before {}",
            rfc3339(from)
        ));
    }
    if now.secs() > until {
        return Err(format!("the certificate expired at {}", rfc3339(until)));
    }
    if is_ca(leaf)? {
        return Err(
            "the certificate is a CA certificate (basicConstraints cA), not a server's".into(),
        );
    }
    let server_auth = leaf
        .extended_key_usage()
        .map_err(|e| format!("the certificate's extended key usage is malformed: {e}"))?
        .is_some_and(|eku| eku.value.server_auth);
    if !server_auth {
        return Err(
            "the certificate lacks the serverAuth extended key usage of a TLS server certificate"
                .into(),
        );
    }
    Ok(())
}

fn is_ca(cert: &X509Certificate<'_>) -> Result<bool, String> {
    cert.basic_constraints()
        .map(|bc| bc.is_some_and(|bc| bc.value.ca))
        .map_err(|e| format!("{}: malformed basic constraints: {e}", cert.subject()))
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::Path;

    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };
    use time::OffsetDateTime;

    use super::*;
    use crate::clock::Clock;
    use crate::install::testca::{TestCa, leaf_params};

    fn verify(certs: &[CertificateDer<'_>], roots: Option<&TrustedRoots>) -> Result<(), String> {
        verify_chain(certs, roots, Clock::system().now())
    }

    fn roots_file(dir: &Path, cas: &[&TestCa]) -> TrustedRoots {
        let path = dir.join("roots.pem");
        let pem: String = cas.iter().map(|ca| ca.cert.pem()).collect();
        fs::write(&path, pem).expect("write roots");
        TrustedRoots::load(&path).expect("roots")
    }

    #[test]
    fn a_proper_chain_verifies() {
        let root = TestCa::root("Test Root");
        let inter = root.intermediate("Test Intermediate");
        let key = KeyPair::generate().expect("key");
        let leaf = leaf_params(&["a.example"])
            .signed_by(&key, &inter.issuer)
            .expect("leaf");
        let leaf = leaf.der().clone();
        verify(&[leaf.clone(), inter.der()], None).expect("leaf and intermediate");
        verify(&[leaf.clone(), inter.der(), root.der()], None).expect("with the root");
        let dir = tempfile::tempdir().expect("tempdir");
        let roots = roots_file(dir.path(), &[&root]);
        verify(&[leaf.clone(), inter.der()], Some(&roots)).expect("to a trusted root");
        verify(&[leaf, inter.der(), root.der()], Some(&roots)).expect("root included");
    }

    #[test]
    fn leaf_properties_are_checked() {
        let ca = TestCa::root("Test Root").intermediate("Test Intermediate");
        let key = KeyPair::generate().expect("key");
        let issue = |params: CertificateParams| {
            let leaf = params.signed_by(&key, &ca.issuer).expect("leaf");
            verify(&[leaf.der().clone(), ca.der()], None).expect_err("refused")
        };
        let mut expired = leaf_params(&["a.example"]);
        expired.not_before = OffsetDateTime::now_utc() - time::Duration::days(90);
        expired.not_after = OffsetDateTime::now_utc() - time::Duration::days(1);
        let e = issue(expired);
        assert!(e.contains("expired at"), "{e}");

        let mut future = leaf_params(&["a.example"]);
        future.not_before = OffsetDateTime::now_utc() + time::Duration::days(1);
        let e = issue(future);
        assert!(e.contains("not valid before"), "{e}");

        let mut ca_leaf = leaf_params(&["a.example"]);
        ca_leaf.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let e = issue(ca_leaf);
        assert!(e.contains("is a CA certificate"), "{e}");

        let mut client = leaf_params(&["a.example"]);
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let e = issue(client);
        assert!(e.contains("serverAuth"), "{e}");

        let mut no_eku = leaf_params(&["a.example"]);
        no_eku.extended_key_usages.clear();
        let e = issue(no_eku);
        assert!(e.contains("serverAuth"), "{e}");
    }

    #[test]
    fn the_chain_must_link_and_verify() {
        let root = TestCa::root("Test Root");
        let inter = root.intermediate("Test Intermediate");
        let key = KeyPair::generate().expect("key");
        let leaf = leaf_params(&["a.example"])
            .signed_by(&key, &inter.issuer)
            .expect("leaf")
            .der()
            .clone();

        let e = verify(std::slice::from_ref(&leaf), None).expect_err("no chain");
        assert!(e.contains("without its chain"), "{e}");
        let e = verify(&[], None).expect_err("nothing");
        assert!(e.contains("no certificate"), "{e}");

        // Out of order: the root before the intermediate.
        let e = verify(&[leaf.clone(), root.der(), inter.der()], None).expect_err("order");
        assert!(e.contains("not issued by the next one"), "{e}");

        // An impostor with the intermediate's name but another key.
        let impostor = root.intermediate("Test Intermediate");
        let e = verify(&[leaf.clone(), impostor.der()], None).expect_err("signature");
        assert!(e.contains("does not verify"), "{e}");

        // A self-signed leaf (the key's own) is no chain either.
        let own = leaf_params(&["a.example"])
            .self_signed(&key)
            .expect("self-signed");
        let e = verify(&[own.der().clone()], None).expect_err("self-signed");
        assert!(e.contains("without its chain"), "{e}");

        // A non-CA certificate as an issuer.
        let other_key = KeyPair::generate().expect("key");
        let server = leaf_params(&["b.example"])
            .self_signed(&other_key)
            .expect("server");
        let server_issuer = Issuer::new(leaf_params(&["b.example"]), other_key);
        let below = leaf_params(&["a.example"])
            .signed_by(&key, &server_issuer)
            .expect("leaf");
        let e = verify(&[below.der().clone(), server.der().clone()], None).expect_err("non-CA");
        assert!(e.contains("is not a CA"), "{e}");
    }

    #[test]
    fn trusted_roots_decide() {
        let root = TestCa::root("Test Root");
        let rogue = TestCa::root("Rogue Root").intermediate("Rogue Intermediate");
        let key = KeyPair::generate().expect("key");
        let rogue_leaf = leaf_params(&["a.example"])
            .signed_by(&key, &rogue.issuer)
            .expect("leaf");
        let dir = tempfile::tempdir().expect("tempdir");
        let roots = roots_file(dir.path(), &[&root]);
        let e =
            verify(&[rogue_leaf.der().clone(), rogue.der()], Some(&roots)).expect_err("another CA");
        assert!(e.contains("trusted_roots"), "{e}");
        // Directly under a trusted root, no intermediate needed.
        let direct = leaf_params(&["a.example"])
            .signed_by(&key, &root.issuer)
            .expect("leaf");
        verify(&[direct.der().clone()], Some(&roots)).expect("issued by the root");
        verify(&[direct.der().clone()], None).expect_err("but not without roots");

        fs::write(dir.path().join("empty.pem"), "nothing").expect("write");
        let e = TrustedRoots::load(&dir.path().join("empty.pem")).expect_err("empty");
        assert!(e.contains("no PEM certificate"), "{e}");
        let e = TrustedRoots::load(&dir.path().join("absent.pem")).expect_err("absent");
        assert!(e.contains("cannot read"), "{e}");
    }

    mod prop {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1000))]

            /// Whatever bytes a CA (or a damaged file) hands over, parsing
            /// them as a certificate fails cleanly or succeeds; never panics.
            #[test]
            fn any_bytes_parse_without_panicking(body in proptest::collection::vec(any::<u8>(), 0..512)) {
                let _ = CertInfo::parse(&body);
            }
        }
    }
}
