//! tls-alpn-01 (RFC 8737): a TLS listener that answers only the CA's
//! validation handshakes.
//!
//! One listener is shared by all orders. A handshake that offers ALPN
//! `acme-tls/1` for a name with a challenge in flight gets a self-signed
//! certificate for that name carrying the critical `acmeIdentifier`
//! extension (the SHA-256 of the key authorization); any other handshake
//! (a browser, a name without a challenge) fails at once with a TLS alert
//! rather than hanging.
//!
//! In fleet mode the CA may ask any host for a name only the ordering host
//! presented: for a DNS name it does not hold, the responder asks its
//! [`TlsAlpnFallback`] (the fleet's shared answers) for the key
//! authorization and answers with a certificate made for it. IP
//! identifiers (whose SNI is a reverse name) are answered by the ordering
//! host only.

use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use rustls::server::{Acceptor, ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{ChallengeSpec, Solver, SolverError};
use crate::tinyhttp;

const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The certificates for names with a challenge in flight.
#[derive(Default)]
struct Certs(Mutex<HashMap<String, Arc<CertifiedKey>>>);

impl Certs {
    /// Inserts and removes are single operations: a poisoned map is intact.
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<CertifiedKey>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl fmt::Debug for Certs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certs")
            .field("names", &self.lock().len())
            .finish()
    }
}

impl ResolvesServerCert for Certs {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let acme = hello
            .alpn()
            .is_some_and(|mut protocols| protocols.any(|p| p == ACME_TLS_ALPN));
        if !acme {
            return None;
        }
        let name = hello
            .server_name()?
            .trim_end_matches('.')
            .to_ascii_lowercase();
        self.lock().get(&name).cloned()
    }
}

/// Where the responder looks for a name it holds no challenge for: another
/// host's order (fleet mode). Defined here, implemented where the fleet is
/// known, so this layer does not depend on it.
#[async_trait]
pub trait TlsAlpnFallback: Send + Sync {
    /// The key authorization of a tls-alpn-01 challenge in flight for
    /// `name` (a DNS name, lower case, no trailing dot), or `None`.
    async fn key_authorization(&self, name: &str) -> Option<String>;
}

/// The tls-alpn-01 responder and the solver presenting through it.
pub struct TlsAlpnSolver {
    certs: Arc<Certs>,
}

impl TlsAlpnSolver {
    /// Binds `addr` and serves until `cancel` fires. Names not presented
    /// here are asked of `fallback`.
    pub async fn start(
        addr: SocketAddr,
        fallback: Option<Arc<dyn TlsAlpnFallback>>,
        tracker: &TaskTracker,
        cancel: &CancellationToken,
    ) -> Result<Self, SolverError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| SolverError::Listen { addr, source })?;
        let certs = Arc::new(Certs::default());
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| SolverError::TlsAlpn(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(certs.clone());
        config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
        let config = Arc::new(config);
        // Connection limits, idle eviction and accept back-off as for the
        // HTTP listeners. The ticket is held until the handshake is over.
        let own = certs.clone();
        tinyhttp::accept_loop(
            listener,
            "tls-alpn-01",
            tracker,
            cancel,
            move |stream, ticket| {
                let (config, certs, fallback) = (config.clone(), own.clone(), fallback.clone());
                async move {
                    let handshake = async {
                        let start =
                            tokio_rustls::LazyConfigAcceptor::new(Acceptor::default(), stream)
                                .await
                                .ok()?;
                        let config = match wanted_elsewhere(&start.client_hello(), &certs) {
                            Some(name) => match &fallback {
                                Some(fallback) => {
                                    fallback_config(&config, fallback.as_ref(), &name)
                                        .await
                                        .unwrap_or(config)
                                }
                                None => config,
                            },
                            None => config,
                        };
                        start.into_stream(config).await.ok()
                    };
                    // The CA only needs the handshake; close right after.
                    if let Ok(Some(mut tls)) =
                        tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await
                    {
                        ticket.busy();
                        let _ = tls.shutdown().await;
                    }
                }
            },
        );
        tracing::debug!(%addr, "tls-alpn-01 responder listening");
        Ok(Self { certs })
    }

    /// The validation certificate for `identifier`: self-signed, the
    /// identifier as its only SAN, and the critical acmeIdentifier
    /// extension (the SHA-256 of `key_authorization`).
    fn validation_cert(
        identifier: &str,
        key_authorization: &str,
    ) -> Result<Arc<CertifiedKey>, SolverError> {
        let err = |e: String| SolverError::TlsAlpn(format!("{identifier}: {e}"));
        let digest = ring::digest::digest(&ring::digest::SHA256, key_authorization.as_bytes());
        let mut params = rcgen::CertificateParams::new(vec![identifier.to_owned()])
            .map_err(|e| err(e.to_string()))?;
        params.custom_extensions =
            vec![rcgen::CustomExtension::new_acme_identifier(digest.as_ref())];
        let key = rcgen::KeyPair::generate().map_err(|e| err(e.to_string()))?;
        let cert = params.self_signed(&key).map_err(|e| err(e.to_string()))?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signer =
            rustls::crypto::ring::sign::any_supported_type(&der).map_err(|e| err(e.to_string()))?;
        Ok(Arc::new(CertifiedKey::new(
            vec![cert.der().clone()],
            signer,
        )))
    }
}

#[async_trait]
impl Solver for TlsAlpnSolver {
    async fn present(&self, c: &ChallengeSpec) -> Result<(), SolverError> {
        let cert = Self::validation_cert(&c.identifier, &c.key_authorization)?;
        self.certs.lock().insert(sni_name(&c.identifier), cert);
        Ok(())
    }

    async fn cleanup(&self, c: &ChallengeSpec) -> Result<(), SolverError> {
        self.certs.lock().remove(&sni_name(&c.identifier));
        Ok(())
    }
}

/// The DNS name a validation handshake (ALPN `acme-tls/1`) asks for when
/// this host holds no challenge for it; `None` for any other handshake.
fn wanted_elsewhere(hello: &ClientHello<'_>, certs: &Certs) -> Option<String> {
    let acme = hello
        .alpn()
        .is_some_and(|mut protocols| protocols.any(|p| p == ACME_TLS_ALPN));
    let name = hello
        .server_name()?
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let reverse = name.ends_with(".in-addr.arpa") || name.ends_with(".ip6.arpa");
    (acme && !reverse && !certs.lock().contains_key(&name)).then_some(name)
}

/// `base` answering `name` with a validation certificate for the key
/// authorization `fallback` holds; `None` if it holds none.
async fn fallback_config(
    base: &Arc<rustls::ServerConfig>,
    fallback: &dyn TlsAlpnFallback,
    name: &str,
) -> Option<Arc<rustls::ServerConfig>> {
    let key_authorization = fallback.key_authorization(name).await?;
    let cert = match TlsAlpnSolver::validation_cert(name, &key_authorization) {
        Ok(cert) => cert,
        Err(e) => {
            tracing::warn!(error = %e, "tls-alpn-01: cannot make the validation certificate for another host's challenge");
            return None;
        }
    };
    // A resolver of its own for this one connection: the shared map holds
    // only this host's challenges, which its cleanup removes.
    let one = Certs::default();
    one.lock().insert(name.to_owned(), cert);
    let mut config = (**base).clone();
    config.cert_resolver = Arc::new(one);
    Some(Arc::new(config))
}

/// The SNI name the CA's validation connection carries for `identifier`:
/// the name itself, or for an IP address its reverse-DNS name (RFC 8738
/// section 6), as `1.0.0.127.in-addr.arpa` or the 32 nibbles of an IPv6
/// address under `ip6.arpa`. The validation certificate still names the
/// address itself, as an iPAddress SAN.
fn sni_name(identifier: &str) -> String {
    match identifier.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(v4)) => {
            let [a, b, c, d] = v4.octets();
            format!("{d}.{c}.{b}.{a}.in-addr.arpa")
        }
        Ok(std::net::IpAddr::V6(v6)) => {
            let mut name = String::with_capacity(72);
            for byte in v6.octets().iter().rev() {
                // Writing to a String cannot fail.
                let _ = write!(name, "{:x}.{:x}.", byte & 0xf, byte >> 4);
            }
            name.push_str("ip6.arpa");
            name
        }
        Err(_) => identifier.to_ascii_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 8738 section 6's reverse names, as Pebble's validator sends them.
    #[test]
    fn ip_identifiers_use_their_reverse_names() {
        assert_eq!(sni_name("127.0.0.1"), "1.0.0.127.in-addr.arpa");
        assert_eq!(
            sni_name("2001:db8::1"),
            "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"
        );
        assert_eq!(sni_name("WWW.Example.com"), "www.example.com");
    }

    #[tokio::test]
    async fn plain_tls_is_refused_at_once() {
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("probe");
        let addr = probe.local_addr().expect("addr");
        drop(probe);
        let solver = TlsAlpnSolver::start(addr, None, &tracker, &cancel)
            .await
            .expect("start");
        let spec = ChallengeSpec {
            identifier: "a.example".into(),
            token: Some(
                super::super::Token::parse("tttttttttttttttttttttt").expect("a valid token"),
            ),
            key_authorization: "t.thumb".into(),
            dns_value: String::new(),
            dns_alias: None,
            persist: None,
        };
        solver.present(&spec).await.expect("present");
        // A client without acme-tls/1 gets an alert, not a hang.
        let mut roots = rustls::RootCertStore::empty();
        let ca = rcgen::CertificateParams::new(vec!["x.example".to_owned()])
            .expect("params")
            .self_signed(&rcgen::KeyPair::generate().expect("key"))
            .expect("cert");
        roots.add(ca.der().clone()).expect("root");
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let name = rustls_pki_types::ServerName::try_from("a.example").expect("name");
        let result =
            tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp)).await;
        assert!(
            matches!(result, Ok(Err(_))),
            "expected a prompt handshake failure"
        );
        cancel.cancel();
        tracker.close();
        tracker.wait().await;
    }
}
