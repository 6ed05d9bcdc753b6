//! Any host answers the CA (fleet mode): the leaseholder's side of an
//! http-01 challenge, and every host's responder falling back to the
//! fleet's shared answers.
//!
//! The order path calls, for each challenge it is about to have validated,
//! in this order:
//!
//! ```text
//! pub async fn commit_answer(services: &Services, lease: &Lease, answer: &ChallengeAnswer)
//!     -> Result<(), AnswerError>
//! pub async fn preflight_members(services: &Services, answer: &ChallengeAnswer)
//!     -> Result<(), PreflightError>
//! ```
//!
//! and only then tells the CA to validate. `commit_answer` stores the key
//! authorization through the lease's fence (refused once the lease is
//! lost, so a host that lost it cannot plant answers for the new holder's
//! order) and announces the token; `preflight_members` asks every live
//! member's responder for the token, as the CA may reach any of them.
//! A tls-alpn-01 answer is committed the same way (kind `TlsAlpn01`, the
//! identifier as the CA's SNI names it); it is not pre-flighted at the
//! members. Every host's tls-alpn-01 responder answers a DNS name it holds
//! no challenge for from the database (IP identifiers: the ordering host
//! only).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use super::Services;
use crate::fleet::{ChallengeAnswer, DbError, FleetAnswers, FleetDb, Lease, LeaseError, Member};
use crate::solver::{Http01Fallback, TlsAlpnFallback};

/// How long a member may be silent and still count as live: one lease
/// length, three heartbeats (`fleet_hosts::heartbeat_every`). A host
/// silent that long has lost its leases too; counting it longer would
/// hold pre-flights and definition changes up for a host that is gone.
pub(crate) fn live_window(lease_ttl: Duration) -> Duration {
    lease_ttl
}

/// How long one member's responder may take to answer the pre-flight.
const PREFLIGHT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an answer could not be committed for the fleet.
#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    #[error("not in fleet mode: the configuration has no [fleet] section")]
    NotFleet,
    /// The fence refused (the lease is lost) or the database failed: the
    /// CA must not be asked to validate.
    #[error("cannot store the http-01 answer for the fleet: {0}")]
    Lease(#[from] LeaseError),
}

/// Members whose responder did not serve the answer.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error("not in fleet mode: the configuration has no [fleet] section")]
    NotFleet,
    #[error("cannot list the fleet's members: {0}")]
    Members(#[from] DbError),
    #[error("{identifier}: {} of the fleet's hosts do not serve the http-01 answer: {}", failed.len(), list(failed))]
    Unserved {
        identifier: String,
        /// `(host id, what went wrong)`, by host id.
        failed: Vec<(String, String)>,
    },
}

/// Stores `answer` in the fleet's database through `lease`'s fence, then
/// announces its token so every host's listener loads it into memory. A
/// host that misses the announcement still answers from the table.
pub async fn commit_answer(
    services: &Services,
    lease: &Lease,
    answer: &ChallengeAnswer,
) -> Result<(), AnswerError> {
    let fleet = services.fleet.as_ref().ok_or(AnswerError::NotFleet)?;
    let mut tx = lease.begin_fenced(&fleet.db).await?;
    tx.put_challenge(answer).await?;
    tx.commit().await?;
    // A hint only: the answer is committed, and every responder falls back
    // to the table.
    if let Err(e) = fleet.db.announce_challenge(&answer.token).await {
        tracing::warn!(error = %e, "fleet: cannot announce an http-01 answer; hosts read it from the database");
    }
    Ok(())
}

/// Asks every live member's responder (its advertised address, the name
/// in `Host`) for `answer`'s token. Members that advertise no address
/// (webroot only) are skipped: only the CA can reach what serves them.
pub async fn preflight_members(
    services: &Services,
    answer: &ChallengeAnswer,
) -> Result<(), PreflightError> {
    let fleet = services.fleet.as_ref().ok_or(PreflightError::NotFleet)?;
    let members = fleet
        .db
        .live_members(live_window(fleet.timing.ttl()))
        .await?;
    // All at once: each may take its whole timeout. The set is dropped
    // (its tasks aborted) if the caller gives up.
    let mut asks = JoinSet::new();
    for Member {
        host_id,
        http01_addr,
        ..
    } in members
    {
        let Some(addr) = http01_addr else { continue };
        let answer = answer.clone();
        asks.spawn(async move {
            let outcome = fetch_answer(&addr, &answer).await;
            (host_id, addr, outcome)
        });
    }
    let mut failed = Vec::new();
    while let Some(done) = asks.join_next().await {
        match done {
            Ok((host, addr, Err(Unserved::Wrong(detail)))) => {
                failed.push((host, format!("{addr}: {detail}")));
            }
            // A host that answers nothing at all is down or hung: a load
            // balancer's health check takes it out of rotation, so the CA
            // does not reach it either. Holding every issuance of the
            // fleet for it would turn one dead host into a fleet outage.
            Ok((host, addr, Err(Unserved::Unreachable(detail)))) => {
                tracing::warn!(
                    host = %host,
                    addr = %addr,
                    identifier = %answer.identifier,
                    "http-01 pre-flight: host does not answer ({detail}); going on without it"
                );
            }
            Ok((_, _, Ok(()))) => {}
            // Only a panic ends a fetch early; it must not pass as served.
            Err(e) => failed.push(("?".into(), format!("the pre-flight failed: {e}"))),
        }
    }
    failed.sort();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(PreflightError::Unserved {
            identifier: answer.identifier.clone(),
            failed,
        })
    }
}

/// Every host's responder asks the fleet's answers for tokens it did not
/// present itself.
#[async_trait]
impl Http01Fallback for FleetAnswers {
    async fn key_authorization(&self, token: &str) -> Option<String> {
        self.answer(token).await.map(|(body, _)| body)
    }
}

/// Every host's tls-alpn-01 responder asks the database for names it holds
/// no challenge for (rare: one lookup per validation handshake).
#[async_trait]
impl TlsAlpnFallback for FleetDb {
    async fn key_authorization(&self, name: &str) -> Option<String> {
        match self.tls_alpn_key_authorization(name).await {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(error = %e, "fleet: cannot look up a tls-alpn-01 answer");
                None
            }
        }
    }
}

/// The fallback for this host's tls-alpn-01 responder, in fleet mode.
pub fn tls_alpn_fallback(services: &Services) -> Option<Arc<dyn TlsAlpnFallback>> {
    let fleet = services.fleet.as_ref()?;
    Some(Arc::new(fleet.db.clone()) as Arc<dyn TlsAlpnFallback>)
}

/// The fallback for this host's http-01 responder, in fleet mode.
pub fn http01_fallback(services: &Services) -> Option<Arc<dyn Http01Fallback>> {
    let fleet = services.fleet.as_ref()?;
    Some(Arc::clone(&fleet.answers) as Arc<dyn Http01Fallback>)
}

/// `GET /.well-known/acme-challenge/<token>` from the responder at `addr`,
/// `Ok` if it answers 200 with the key authorization.
/// Why a member's responder did not serve an answer.
enum Unserved {
    /// Nothing came back: no connection, or no response in time.
    Unreachable(String),
    /// Something else came back: a responder that would fail the CA.
    Wrong(String),
}

async fn fetch_answer(addr: &str, answer: &ChallengeAnswer) -> Result<(), Unserved> {
    let fetch = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let host = match answer.identifier.parse::<std::net::Ipv6Addr>() {
            Ok(v6) => format!("[{v6}]"),
            Err(_) => answer.identifier.clone(),
        };
        let request = format!(
            "GET /.well-known/acme-challenge/{} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nUser-Agent: certd-preflight\r\n\r\n",
            answer.token
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut response = Vec::new();
        stream
            .take(64 * 1024)
            .read_to_end(&mut response)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(String::from_utf8_lossy(&response).into_owned())
    };
    let response = tokio::time::timeout(PREFLIGHT_TIMEOUT, fetch)
        .await
        .map_err(|_| Unserved::Unreachable(format!("no answer within {PREFLIGHT_TIMEOUT:?}")))?
        .map_err(Unserved::Unreachable)?;
    let ok = response.starts_with("HTTP/1.1 200") || response.starts_with("HTTP/1.0 200");
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    if ok && body.trim() == answer.key_authorization {
        Ok(())
    } else {
        let first = response.lines().next().unwrap_or("no response");
        Err(Unserved::Wrong(format!(
            "expected the key authorization, got {:?}",
            crate::text::escape_control(first)
        )))
    }
}

fn list(failed: &[(String, String)]) -> String {
    failed
        .iter()
        .map(|(host, why)| format!("host {host} ({why})"))
        .collect::<Vec<_>>()
        .join("; ")
}
