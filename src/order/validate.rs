//! Validation: the order's authorizations recorded (write-ahead), a
//! challenge chosen and answered for each pending one, and the
//! authorizations polled until final.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use instant_acme::{
    AuthorizationStatus, AuthorizedIdentifier, ChallengeStatus, ChallengeType, Identifier, Order,
};
use tokio_util::sync::CancellationToken;

use crate::acme::{AcmeError, NONCE_ATTEMPTS, ProblemRecord, is_bad_nonce};
use crate::config::{CertificateConfig, ChallengeKind};
use crate::dns::persist::PersistExpect;
use crate::ledger::{self, Identifiers, NewAuthz, NewChallenge};
use crate::solver::{ChallengeSpec, Solver};

use super::hooks::{self, SharedAnswer};
use super::{Context, DriveError, Poll, later, order_status, sleep_or_cancel};

/// How long certd waits for the CA to validate all challenges of an order.
pub(super) const VALIDATION_TIMEOUT: Duration = Duration::from_secs(180);

/// How long to wait for the CA's validation request to reach the
/// standalone responder before polling anyway.
pub(super) const FETCH_WAIT: Duration = Duration::from_secs(2);

/// How long a shared answer is kept when the CA gave its authorization
/// no expiry, and at most.
const ANSWER_KEPT: Duration = Duration::from_secs(3600);
const ANSWER_KEPT_MAX: Duration = Duration::from_secs(7 * 24 * 3600);

/// One challenge certd decided to answer.
pub(super) struct Planned {
    pub(super) authz_url: String,
    pub(super) challenge_url: String,
    pub(super) kind: ChallengeKind,
    pub(super) solver: Arc<dyn Solver>,
    pub(super) spec: ChallengeSpec,
    /// The CA is validating it already (an earlier run, or the lease's
    /// earlier holder, answered it): presented again, not answered again.
    pub(super) answered: bool,
}

/// Fetches every authorization of the order and records them with their
/// challenges in one transaction.
pub(super) async fn record_authorizations(
    ctx: &Context,
    name: &str,
    order: &mut Order,
    domains: &Identifiers,
) -> Result<(), DriveError> {
    let order_url = order.url().to_owned();
    // instant-acme fetches each authorization once and caches it, so a
    // pass that failed on a rejected nonce is repeated for the rest only.
    let (records, foreign) =
        nonce_retry!(collect_authorizations(ctx, order, domains).await).map_err(AcmeError::from)?;
    let status = order_status(order.state().status);
    ctx.store
        .record_order(
            ctx.account.ledger_id,
            name,
            &order_url,
            domains,
            status,
            &records,
        )
        .await?;
    // Refused only now that every authorization is in the ledger, so the
    // failure path settles them all, the foreign one included.
    match foreign {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The order's authorizations as the ledger records them, and the refusal
/// of the first whose identifier the order did not ask for.
pub(super) async fn collect_authorizations(
    ctx: &Context,
    order: &mut Order,
    domains: &Identifiers,
) -> Result<(Vec<NewAuthz>, Option<DriveError>), instant_acme::Error> {
    let mut records = Vec::new();
    let mut foreign = None;
    let mut auths = order.authorizations();
    while let Some(a) = auths.next().await {
        let a = a?;
        let identifier = match requested_name(domains, &a.identifier()) {
            Some(name) => name.to_owned(),
            None => {
                // The ledger keeps what the CA said; outputs escape it.
                let said = a.identifier().to_string();
                foreign.get_or_insert_with(|| foreign_authz(a.url(), &said, domains));
                said
            }
        };
        records.push(NewAuthz {
            url: a.url().to_owned(),
            identifier,
            status: authz_status(a.status),
            expires_at: ctx.account.http.observed(a.url()).and_then(|o| o.expires),
            challenges: a
                .challenges
                .iter()
                .map(|c| NewChallenge {
                    url: c.url.clone(),
                    kind: challenge_type(&c.r#type),
                    status: challenge_status(c.status),
                })
                .collect(),
        });
    }
    Ok((records, foreign))
}

/// The name in `requested` an authorization's identifier stands for, or
/// `None` if the order did not ask for it. A wildcard's authorization names
/// the base domain with `wildcard: true` (RFC 8555 section 7.1.3), which
/// stands for `*.` and the base; a `*` in the value itself is never valid.
/// The name returned is certd's own string, so nothing downstream (a hook's
/// environment, a pre-flight connection, the ledger) ever carries the CA's.
pub(super) fn requested_name<'r>(
    requested: &'r [String],
    id: &AuthorizedIdentifier<'_>,
) -> Option<&'r str> {
    let value = match id.identifier {
        Identifier::Dns(value) => value,
        // An address compares as an address (`::1` is `0:0::1`), and is
        // never a wildcard.
        Identifier::Ip(addr) if !id.wildcard => {
            return requested
                .iter()
                .map(String::as_str)
                .find(|name| name.parse::<std::net::IpAddr>().is_ok_and(|a| a == *addr));
        }
        _ => return None,
    };
    if value.contains('*') {
        return None;
    }
    requested
        .iter()
        .map(String::as_str)
        // A configured address is asked for as an `ip` identifier only.
        .filter(|name| name.parse::<std::net::IpAddr>().is_err())
        .find(|name| match name.strip_prefix("*.") {
            Some(base) => id.wildcard && base.eq_ignore_ascii_case(value),
            None => !id.wildcard && name.eq_ignore_ascii_case(value),
        })
}

pub(super) fn foreign_authz(url: &str, identifier: &str, domains: &Identifiers) -> DriveError {
    DriveError::ForeignAuthz {
        url: url.to_owned(),
        identifier: identifier.to_owned(),
        asked: domains.join(", "),
    }
}

/// Picks a challenge for every pending authorization.
pub(super) async fn plan_challenges(
    ctx: &Context,
    cert: &CertificateConfig,
    order: &mut Order,
    domains: &Identifiers,
) -> Result<Vec<Planned>, DriveError> {
    let mut plan = Vec::new();
    let mut auths = order.authorizations();
    while let Some(a) = auths.next().await {
        let mut a = a.map_err(AcmeError::from)?;
        // Checked when recorded; checked again because this is where the
        // name starts to be used.
        let identifier = match requested_name(domains, &a.identifier()) {
            Some(name) => name.to_owned(),
            None => return Err(foreign_authz(a.url(), &a.identifier().to_string(), domains)),
        };
        match a.status {
            AuthorizationStatus::Valid => continue,
            AuthorizationStatus::Pending => {}
            other => {
                return Err(DriveError::AuthzUnusable {
                    identifier,
                    status: authz_status(other),
                });
            }
        }
        let offered: Vec<(ChallengeType, ChallengeStatus)> = a
            .challenges
            .iter()
            .map(|c| (c.r#type.clone(), c.status))
            .collect();
        let history = ctx.store.challenge_history(&identifier).await?;
        let is_ip = matches!(a.identifier().identifier, Identifier::Ip(_));
        let Some((kind, answered)) =
            pick_challenge(&preference(&cert.challenges, &history), &offered, is_ip)
        else {
            return Err(DriveError::NoChallenge {
                identifier,
                offered: offered
                    .iter()
                    .map(|(t, _)| challenge_type(t))
                    .collect::<Vec<_>>()
                    .join(", "),
                wanted: cert
                    .challenges
                    .iter()
                    .map(|k| k.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        let solver = ctx.solvers.get(kind)?;
        let authz_url = a.url().to_owned();
        // `find` above proved the CA offers this type.
        let Some(challenge) = a.challenge(acme_type(kind)) else {
            continue;
        };
        let key_auth = challenge.key_authorization();
        let challenge_url = challenge.url.clone();
        // dns-persist-01 has no token (instant-acme leaves it empty); only
        // the types that use one parse it.
        let token = match kind {
            ChallengeKind::DnsPersist01 => None,
            _ => Some(crate::solver::Token::parse(&challenge.token)?),
        };
        let (key_authorization, dns_value) = (key_auth.as_str().to_owned(), key_auth.dns_value());
        let persist = match kind {
            ChallengeKind::DnsPersist01 => {
                Some(persist_expect(ctx, &authz_url, &challenge_url, &identifier).await?)
            }
            _ => None,
        };
        plan.push(Planned {
            authz_url,
            challenge_url,
            kind,
            solver,
            spec: ChallengeSpec {
                identifier,
                token,
                key_authorization,
                dns_value,
                dns_alias: cert.dns_alias.clone(),
                persist,
            },
            answered,
        });
    }
    Ok(plan)
}

/// The challenge to take for an authorization offering `offered` (type
/// and status), from `preferred` (the configured types, best first):
/// one the CA is validating already, if it is of a type certd would
/// take, else the first preferred type offered. The flag says the CA is
/// validating it: a second answer would be refused (Pebble: "Cannot
/// update challenge with status processing") and count as a failure,
/// and the order would be given up and placed again. RFC 8738 section 7:
/// never dns-01 for an address (`is_ip`), whatever the CA offers (there
/// is no `_acme-challenge` name to publish under).
fn pick_challenge(
    preferred: &[ChallengeKind],
    offered: &[(ChallengeType, ChallengeStatus)],
    is_ip: bool,
) -> Option<(ChallengeKind, bool)> {
    let usable = || {
        preferred
            .iter()
            .copied()
            .filter(move |k| !(is_ip && *k == ChallengeKind::Dns01))
    };
    let validating = usable().find(|k| {
        offered
            .iter()
            .any(|(t, status)| *t == acme_type(*k) && *status == ChallengeStatus::Processing)
    });
    if let Some(kind) = validating {
        return Some((kind, true));
    }
    usable()
        .find(|k| offered.iter().any(|(t, _)| *t == acme_type(*k)))
        .map(|kind| (kind, false))
}

/// What the dns-persist-01 record for `identifier` must say: the issuer
/// domain names come from the challenge object (`issuer-domain-names`,
/// which instant-acme does not keep), so the authorization is fetched
/// once more; the account URL is ours.
pub(super) async fn persist_expect(
    ctx: &Context,
    authz_url: &str,
    challenge_url: &str,
    identifier: &str,
) -> Result<PersistExpect, DriveError> {
    let rsp = ctx
        .account
        .http
        .signed_post(&ctx.account.signer(), authz_url, None)
        .await?;
    Ok(PersistExpect {
        issuers: crate::dns::persist::issuers_in_authz(&rsp.body, challenge_url),
        account_uri: ctx.account.account().id().to_owned(),
        wildcard: identifier.starts_with("*."),
    })
}

/// Presents every planned challenge, answers them, and polls the
/// authorizations until all are valid. Whatever was presented is pushed to
/// `presented` so the caller cleans it up on every path.
pub(super) async fn validate<'p>(
    ctx: &Context,
    order: &mut Order,
    plan: &'p [Planned],
    presented: &mut Vec<&'p Planned>,
    cancel: &CancellationToken,
) -> Result<(), DriveError> {
    for p in plan {
        presented.push(p);
        // A hook may hang; shutdown must not wait for it (kill_on_drop
        // ends the process when this future is dropped).
        tokio::select! {
            result = p.solver.present(&p.spec) => result?,
            () = cancel.cancelled() => return Err(DriveError::Cancelled),
        }
    }
    // Fleet mode: the CA may reach any host, so every host must have the
    // answer before the pre-flight, and the CA is asked only after both.
    let shared: Vec<(&Planned, SharedAnswer)> = match &ctx.fleet {
        Some(_) => plan
            .iter()
            .filter(|p| hooks::shared(p.kind))
            .map(|p| (p, shared_answer(ctx, p)))
            .collect(),
        None => Vec::new(),
    };
    if let Some(fleet) = &ctx.fleet {
        for (_, answer) in &shared {
            fleet.commit_answer(answer).await?;
        }
    }
    // A challenge the CA is validating already needs no pre-flight: there
    // is nothing left to decide before asking the CA.
    for p in plan.iter().filter(|p| !p.answered) {
        // A dns-01 propagation check may poll for minutes; shutdown must
        // not wait for it.
        tokio::select! {
            result = p.solver.preflight(&p.spec) => result.map_err(DriveError::Preflight)?,
            () = cancel.cancelled() => return Err(DriveError::Cancelled),
        }
    }
    if let Some(fleet) = &ctx.fleet {
        for (_, answer) in shared
            .iter()
            .filter(|(p, _)| p.kind == ChallengeKind::Http01 && !p.answered)
        {
            tokio::select! {
                result = fleet.preflight(answer) => result?,
                () = cancel.cancelled() => return Err(DriveError::Cancelled),
            }
        }
    }
    for p in plan {
        ctx.store
            .set_authz_challenge(&p.authz_url, p.kind.as_str(), &p.challenge_url)
            .await?;
    }
    // Answer each challenge (instant-acme hands out handles in order).
    let mut auths = order.authorizations();
    while let Some(a) = auths.next().await {
        let mut a = a.map_err(AcmeError::from)?;
        let Some(p) = plan.iter().find(|p| p.authz_url == a.url()) else {
            continue;
        };
        if p.answered {
            tracing::info!(authz = %p.authz_url, kind = %p.kind, "the CA is validating this challenge already; waiting for its outcome");
            continue;
        }
        let Some(mut challenge) = a.challenge(acme_type(p.kind)) else {
            continue;
        };
        nonce_retry!(challenge.set_ready().await).map_err(AcmeError::from)?;
        tracing::debug!(authz = %p.authz_url, kind = %p.kind, "challenge answered");
    }

    // Seed 004: do not poll before the CA has looked, when we can tell.
    for p in plan.iter().filter(|p| !p.answered) {
        p.solver.wait_fetched(&p.spec, FETCH_WAIT).await;
    }

    let mut waiting: HashSet<&str> = plan.iter().map(|p| p.authz_url.as_str()).collect();
    let mut poll = Poll::new(
        ctx.store.clock().clone(),
        Duration::from_millis(20),
        Duration::from_secs(5),
        VALIDATION_TIMEOUT,
    );
    let mut retry_after = None;
    while !waiting.is_empty() {
        let Some(delay) = poll.next_delay(retry_after) else {
            return Err(AcmeError::Timeout(format!(
                "{} authorization(s) still pending after {}s",
                waiting.len(),
                VALIDATION_TIMEOUT.as_secs()
            ))
            .into());
        };
        sleep_or_cancel(delay, cancel).await?;
        retry_after = None;
        let mut auths = order.authorizations();
        while let Some(a) = auths.next().await {
            let mut a = a.map_err(AcmeError::from)?;
            let url = a.url().to_owned();
            if !waiting.contains(url.as_str()) {
                continue;
            }
            let state = nonce_retry!(a.refresh().await).map_err(AcmeError::from)?;
            let status = state.status;
            // Every authorization waited on is planned; certd's own name
            // for it, not what the refreshed object says.
            let p = plan.iter().find(|p| p.authz_url == url);
            let identifier = p.map(|p| p.spec.identifier.clone()).unwrap_or_default();
            match status {
                AuthorizationStatus::Pending => {
                    retry_after = later(
                        retry_after,
                        ctx.account.http.observed(&url).and_then(|o| o.retry_after),
                    );
                }
                AuthorizationStatus::Valid => {
                    ctx.store
                        .set_authz_status(&url, ledger::AuthzStatus::Valid, None)
                        .await?;
                    waiting.remove(url.as_str());
                }
                AuthorizationStatus::Invalid => {
                    // Record the answered challenge's problem document.
                    let problem = state
                        .challenges
                        .iter()
                        .find(|c| p.is_some_and(|p| p.challenge_url == c.url))
                        .or_else(|| state.challenges.iter().find(|c| c.error.is_some()))
                        .and_then(|c| c.error.as_ref())
                        .map_or(
                            ProblemRecord {
                                kind: None,
                                detail: Some("the CA gave no reason".into()),
                                status: None,
                                subproblems: Vec::new(),
                            },
                            ProblemRecord::from_problem,
                        );
                    ctx.store
                        .set_authz_status(
                            &url,
                            ledger::AuthzStatus::Invalid,
                            Some(&problem.to_json()),
                        )
                        .await?;
                    return Err(DriveError::Validation {
                        identifier,
                        kind: p.map_or(ChallengeKind::Http01, |p| p.kind),
                        problem,
                    });
                }
                other => {
                    let status = authz_status(other);
                    ctx.store.set_authz_status(&url, status, None).await?;
                    return Err(DriveError::AuthzUnusable { identifier, status });
                }
            }
        }
    }
    Ok(())
}

/// The answer to `p` as the fleet shares it, kept as long as its
/// authorization lives (an hour when the CA did not say).
fn shared_answer(ctx: &Context, p: &Planned) -> SharedAnswer {
    let now = ctx.store.clock().now().secs();
    let valid_for = ctx
        .account
        .http
        .observed(&p.authz_url)
        .and_then(|o| o.expires)
        .and_then(|at| u64::try_from(at - now).ok())
        .map_or(ANSWER_KEPT, Duration::from_secs)
        .clamp(VALIDATION_TIMEOUT, ANSWER_KEPT_MAX);
    SharedAnswer {
        kind: p.kind,
        identifier: p.spec.identifier.clone(),
        token: p
            .spec
            .token
            .as_ref()
            .map_or_else(String::new, |t| t.as_str().to_owned()),
        key_authorization: p.spec.key_authorization.clone(),
        authz_url: p.authz_url.clone(),
        valid_for,
    }
}

/// Challenge fallback (seed 002): the configured types in order, except
/// that a type whose last validation for this identifier failed goes behind
/// those whose last one did not. So after an http-01 failure the next order
/// leads with dns-01, and keeps doing so while dns-01 keeps working.
/// `history` is (type, final status), newest first.
pub(crate) fn preference(
    configured: &[ChallengeKind],
    history: &[(String, ledger::AuthzStatus)],
) -> Vec<ChallengeKind> {
    let last_failed = |k: &ChallengeKind| {
        history
            .iter()
            .find(|(t, _)| t == k.as_str())
            .is_some_and(|(_, status)| *status == ledger::AuthzStatus::Invalid)
    };
    let mut order = configured.to_vec();
    order.sort_by_key(last_failed);
    order
}

pub(super) fn acme_type(k: ChallengeKind) -> ChallengeType {
    match k {
        ChallengeKind::Http01 => ChallengeType::Http01,
        ChallengeKind::Dns01 => ChallengeType::Dns01,
        ChallengeKind::TlsAlpn01 => ChallengeType::TlsAlpn01,
        // instant-acme 0.8.5 has no variant for it: unknown types parse
        // as `Unknown` with their name.
        ChallengeKind::DnsPersist01 => ChallengeType::Unknown(k.as_str().to_owned()),
    }
}

pub(super) fn challenge_type(t: &ChallengeType) -> String {
    match t {
        ChallengeType::Http01 => "http-01".into(),
        ChallengeType::Dns01 => "dns-01".into(),
        ChallengeType::TlsAlpn01 => "tls-alpn-01".into(),
        ChallengeType::DeviceAttest01 => "device-attest-01".into(),
        ChallengeType::Unknown(s) => s.clone(),
        other => format!("{other:?}"),
    }
}

/// An authorization's status as instant-acme parsed it, as the ledger
/// stores it.
pub(crate) fn authz_status(s: AuthorizationStatus) -> ledger::AuthzStatus {
    match s {
        AuthorizationStatus::Pending => ledger::AuthzStatus::Pending,
        AuthorizationStatus::Valid => ledger::AuthzStatus::Valid,
        AuthorizationStatus::Invalid => ledger::AuthzStatus::Invalid,
        AuthorizationStatus::Revoked => ledger::AuthzStatus::Revoked,
        AuthorizationStatus::Expired => ledger::AuthzStatus::Expired,
        AuthorizationStatus::Deactivated => ledger::AuthzStatus::Deactivated,
    }
}

pub(super) fn challenge_status(s: ChallengeStatus) -> ledger::ChallengeStatus {
    match s {
        ChallengeStatus::Pending => ledger::ChallengeStatus::Pending,
        ChallengeStatus::Processing => ledger::ChallengeStatus::Processing,
        ChallengeStatus::Valid => ledger::ChallengeStatus::Valid,
        ChallengeStatus::Invalid => ledger::ChallengeStatus::Invalid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_types_move_behind() {
        use ChallengeKind::{Dns01, Http01};
        use ledger::AuthzStatus::{Invalid, Valid};
        let h = |v: &[(&str, ledger::AuthzStatus)]| -> Vec<(String, ledger::AuthzStatus)> {
            v.iter().map(|(a, b)| (a.to_string(), *b)).collect()
        };
        assert_eq!(preference(&[Http01, Dns01], &[]), [Http01, Dns01]);
        assert_eq!(
            preference(&[Http01, Dns01], &h(&[("http-01", Invalid)])),
            [Dns01, Http01]
        );
        let after = h(&[("dns-01", Valid), ("http-01", Invalid)]);
        assert_eq!(preference(&[Http01, Dns01], &after), [Dns01, Http01]);
        let both = h(&[("dns-01", Invalid), ("http-01", Invalid)]);
        assert_eq!(preference(&[Http01, Dns01], &both), [Http01, Dns01]);
        let recovered = h(&[
            ("http-01", Valid),
            ("dns-01", Invalid),
            ("http-01", Invalid),
        ]);
        assert_eq!(preference(&[Http01, Dns01], &recovered), [Http01, Dns01]);
    }

    /// A challenge the CA is validating already is taken (and not answered
    /// again) if certd would take its type at all, even behind a preferred
    /// one; otherwise the preference decides.
    #[test]
    fn a_challenge_being_validated_is_waited_on_not_answered_again() {
        use ChallengeKind::{Dns01, Http01, TlsAlpn01};
        use ChallengeStatus::{Invalid, Pending, Processing};
        let offer =
            |v: &[(ChallengeKind, ChallengeStatus)]| -> Vec<(ChallengeType, ChallengeStatus)> {
                v.iter().map(|(k, s)| (acme_type(*k), *s)).collect()
            };
        let fresh = offer(&[(Http01, Pending), (Dns01, Pending)]);
        assert_eq!(
            pick_challenge(&[Dns01, Http01], &fresh, false),
            Some((Dns01, false))
        );
        let validating = offer(&[(Http01, Processing), (Dns01, Pending)]);
        assert_eq!(
            pick_challenge(&[Dns01, Http01], &validating, false),
            Some((Http01, true))
        );
        // Not a type certd takes for this certificate: the preference.
        assert_eq!(
            pick_challenge(&[Dns01], &validating, false),
            Some((Dns01, false))
        );
        // Never dns-01 for an address, even one the CA is validating.
        let for_ip = offer(&[(Dns01, Processing), (Http01, Pending)]);
        assert_eq!(
            pick_challenge(&[Dns01, Http01], &for_ip, true),
            Some((Http01, false))
        );
        // Only `processing` is waited on.
        let failed = offer(&[(Http01, Invalid), (TlsAlpn01, Pending)]);
        assert_eq!(
            pick_challenge(&[Http01, TlsAlpn01], &failed, false),
            Some((Http01, false))
        );
        assert_eq!(
            pick_challenge(&[Dns01], &offer(&[(Http01, Pending)]), false),
            None
        );
    }

    /// Only the names the order asked for pass, as certd spells them; a
    /// wildcard only as the base name with `wildcard: true`.

    #[test]
    fn authorizations_must_name_what_was_asked() {
        let asked = ["a.example".to_owned(), "*.w.example".to_owned()];
        let check = |value: &str, wildcard: bool| {
            requested_name(&asked, &Identifier::Dns(value.into()).authorized(wildcard))
        };
        assert_eq!(check("a.example", false), Some("a.example"));
        assert_eq!(check("A.Example", false), Some("a.example"));
        assert_eq!(check("w.example", true), Some("*.w.example"));
        // The wildcard's base was not asked for, nor a wildcard of a.example.
        assert_eq!(check("w.example", false), None);
        assert_eq!(check("a.example", true), None);
        // RFC 8555: the value never holds the `*.` itself.
        assert_eq!(check("*.w.example", false), None);
        assert_eq!(check("*.w.example", true), None);
        assert_eq!(check("evil.example", false), None);
        assert_eq!(check("a.example\nupdate add evil.example", false), None);
        assert_eq!(check("", false), None);
        let ip = Identifier::Ip("127.0.0.1".parse().expect("address"));
        assert_eq!(requested_name(&asked, &ip.authorized(false)), None);
    }

    /// An address authorization matches the configured address, whatever
    /// text form the CA writes it in; never as a wildcard.

    #[test]
    fn ip_authorizations_match_as_addresses() {
        let asked = ["127.0.0.1".to_owned(), "2001:db8::1".to_owned()];
        let check = |value: &str, wildcard: bool| {
            let addr = value.parse().expect("address");
            requested_name(&asked, &Identifier::Ip(addr).authorized(wildcard))
        };
        assert_eq!(check("127.0.0.1", false), Some("127.0.0.1"));
        assert_eq!(check("2001:0db8:0:0:0:0:0:1", false), Some("2001:db8::1"));
        assert_eq!(check("127.0.0.2", false), None);
        assert_eq!(check("::1", false), None);
        assert_eq!(check("127.0.0.1", true), None);
        // A DNS identifier spelling an asked address is not that address.
        let dns = Identifier::Dns("127.0.0.1".into());
        assert_eq!(requested_name(&asked, &dns.authorized(false)), None);
    }
}
