//! What fleet mode adds to an order's steps, as a hook the order calls
//! without knowing the fleet: the leaseholder shares each challenge's
//! answer before it tells the CA to validate (any host of the fleet may be
//! the one the CA reaches), has every host's responder pre-flighted, and
//! hands the issued certificate to the fleet once it is installed here.
//!
//! Outside fleet mode the order's context has no hooks and none of this
//! happens. The implementation lives in `app` (it holds the lease and the
//! fleet's database); the order only says when.

use std::time::Duration;

use async_trait::async_trait;

use crate::config::ChallengeKind;
use crate::install::ReloadOutcome;

use super::DriveError;

/// A challenge's answer as the fleet shares it: what a responder must
/// serve for `token` (http-01), or for `identifier` (tls-alpn-01).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SharedAnswer {
    pub(crate) kind: ChallengeKind,
    pub(crate) identifier: String,
    pub(crate) token: String,
    pub(crate) key_authorization: String,
    pub(crate) authz_url: String,
    /// How long the answer is worth keeping: the authorization's life.
    pub(crate) valid_for: Duration,
}

/// The fleet's side of one order, under the certificate's lease.
#[async_trait]
pub(crate) trait FleetHooks: Send + Sync {
    /// Stores `answer` for every host (through the lease's fence) before
    /// the challenge is answered; an error stops the order there.
    async fn commit_answer(&self, answer: &SharedAnswer) -> Result<(), DriveError>;

    /// Asks every live host's responder for the committed http-01
    /// `answer`, as the CA may reach any of them.
    async fn preflight(&self, answer: &SharedAnswer) -> Result<(), DriveError>;

    /// Hands the certificate `cert`, installed on this host, to the other
    /// hosts (chain and key, the key sealed); returns its serial.
    async fn publish(
        &self,
        cert: &str,
        fullchain_pem: &str,
        key_pem: &str,
    ) -> Result<String, DriveError>;

    /// Records this host's own install of `serial` and its reloads, as
    /// every other host records its own.
    async fn installed(
        &self,
        cert: &str,
        serial: &str,
        reloads: &[ReloadOutcome],
    ) -> Result<(), DriveError>;
}

/// The challenge types whose answers the fleet shares: those a host's
/// own responder serves. dns-01 and dns-persist-01 are published in DNS,
/// which every host's resolver sees alike.
pub(crate) fn shared(kind: ChallengeKind) -> bool {
    matches!(kind, ChallengeKind::Http01 | ChallengeKind::TlsAlpn01)
}
