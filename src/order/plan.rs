//! Placing an order: `newOrder` with the profile chosen and, where the CA
//! offers ARI, `replaces` naming the installed certificate.

use instant_acme::{Identifier, NewOrder, Order};

use crate::acme::{AcmeError, NONCE_ATTEMPTS, ProblemRecord, is_bad_nonce};
use crate::config::{self, CertificateConfig, ProfilePreference};
use crate::install::{self};
use crate::ledger::Identifiers;

use super::{Context, DriveError};

/// `newOrder`, with `replaces` (RFC 9773) naming the installed certificate
/// where there is one and the CA offers ARI.
pub(super) async fn new_order(
    ctx: &Context,
    cert: &CertificateConfig,
    sorted: &Identifiers,
) -> Result<Order, DriveError> {
    let name = cert.name.as_str();
    let account = &ctx.account.account();
    let mut ids: Vec<&config::Identifier> = cert.domains.iter().collect();
    ids.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    let identifiers: Vec<Identifier> = ids
        .into_iter()
        .map(|d| match d {
            config::Identifier::Dns(name) => Identifier::Dns(name.as_str().to_owned()),
            config::Identifier::Ip(ip) => Identifier::Ip(ip.addr()),
        })
        .collect();
    let offered: Vec<&str> = account.profiles().map(|p| p.name).collect();
    let choice =
        choose_profile(&cert.profile, cert.has_ip(), &offered).map_err(DriveError::Profile)?;
    if let Some(w) = &choice.warning {
        tracing::warn!(cert = name, "{w}");
    } else if let Some(p) = &choice.profile
        && cert.profile.names.is_empty()
    {
        tracing::info!(cert = name, profile = %p, "the certificate has IP addresses; asking for the CA's {p:?} profile");
    }
    // Kept until the next order, so `status` shows what this one fell back to.
    ctx.store
        .set_profile_warning(name, sorted, choice.warning.as_deref())
        .await?;
    let base = || {
        let order = NewOrder::new(&identifiers);
        match &choice.profile {
            Some(p) => order.profile(p),
            None => order,
        }
    };
    let installed = install::installed(&ctx.cert_dir, name)
        .and_then(|i| i.ari_id)
        .filter(|_| ctx.replaces_installed);
    if let Some((aki, serial)) = installed.as_deref().and_then(|id| id.split_once('.')) {
        let replaces = instant_acme::CertificateIdentifier {
            authority_key_identifier: aki.into(),
            serial: serial.into(),
        };
        // Orders created for these names before this request are not its:
        // forgotten, so that one recorded below was created by it.
        while ctx.account.http.take_created_order(sorted).is_some() {}
        match nonce_retry!(account.new_order(&base().replaces(replaces.clone())).await) {
            Ok(order) => return Ok(order),
            // No ARI at this CA: nothing was sent.
            Err(instant_acme::Error::Unsupported(_)) => {}
            // The CA created the order (certd's HTTP layer saw its 201) but
            // instant-acme refused the answer: 0.8.5 does so when the order
            // does not echo `replaces`, as an `Error::Other` holding a bare
            // message, with no type or field to match. A problem document
            // would be `Error::Api`, and a request that failed in transport
            // created no order; so an order created by this request is
            // what tells this case apart. The order is real and its
            // authorizations pending: take it as an order without ARI.
            Err(instant_acme::Error::Other(e)) => {
                let Some(url) = ctx.account.http.take_created_order(sorted) else {
                    return Err(AcmeError::from(instant_acme::Error::Other(e)).into());
                };
                tracing::info!(cert = name, order = %url, error = %e, "the CA ignored `replaces`; using the order as is");
                return account
                    .order(url)
                    .await
                    .map_err(|e| AcmeError::from(e).into());
            }
            // `replaces` is a hint; see `refuses_replaces`.
            Err(instant_acme::Error::Api(p)) if refuses_replaces(&p) => {
                tracing::info!(cert = name, problem = %ProblemRecord::from_problem(&p), "order with `replaces` refused; ordering without");
            }
            Err(e) => return Err(AcmeError::from(e).into()),
        }
    }
    nonce_retry!(account.new_order(&base()).await).map_err(|e| AcmeError::from(e).into())
}

/// Whether a CA's answer to a `newOrder` with `replaces` refuses the hint
/// rather than the order, so that the same order without `replaces` is
/// worth sending: `alreadyReplaced` and other 4xx problems, and an ACME
/// problem document with a 5xx status from a CA that cannot find the
/// installed certificate (one from another CA, or from before a move;
/// Pebble answers that with `serverInternal`). A rate limit stands, and so
/// does a 5xx without a problem document (a proxy's error page: the CA is
/// down, and the same order would fail the same way).
pub(super) fn refuses_replaces(p: &instant_acme::Problem) -> bool {
    let acme_type = p
        .r#type
        .as_deref()
        .and_then(|t| t.strip_prefix("urn:ietf:params:acme:error:"));
    match (p.status, acme_type) {
        (Some(429), _) | (_, Some("rateLimited")) => false,
        (Some(s), _) if s < 500 => true,
        (_, Some(_)) => true,
        (_, None) => false,
    }
}

/// The profile a new order names, and why it is not the first configured.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ProfileChoice {
    pub(crate) profile: Option<String>,
    /// For the log and `status`: configured profiles the CA does not list.
    pub(crate) warning: Option<String>,
}

/// The CA's profile for IP certificates: Let's Encrypt issues for an IP
/// address only under it.
pub(super) const IP_PROFILE: &str = "shortlived";

/// Picks the first configured profile the CA's directory lists. One it
/// does not list is skipped with a warning (CAs retire profiles: Let's
/// Encrypt's `tlsclient` went on 2026-07-08), unless the preference says
/// one of them is required. With none configured, or none left, the order
/// names none, except that a certificate with IP addresses asks for
/// `shortlived` where the CA lists it.
pub(crate) fn choose_profile(
    pref: &ProfilePreference,
    has_ip: bool,
    offered: &[&str],
) -> Result<ProfileChoice, String> {
    let listed = || {
        // Sorted: the directory's `meta.profiles` is an unordered map.
        let mut names = offered.to_vec();
        names.sort_unstable();
        if names.is_empty() {
            "the CA lists no profiles".to_owned()
        } else {
            format!("the CA lists {}", names.join(", "))
        }
    };
    let quoted = |names: &[String]| {
        names
            .iter()
            .map(|n| format!("{n:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let fallback = || (has_ip && offered.contains(&IP_PROFILE)).then(|| IP_PROFILE.to_owned());
    let Some(pos) = pref
        .names
        .iter()
        .position(|n| offered.contains(&n.as_str()))
    else {
        if pref.names.is_empty() {
            return Ok(ProfileChoice {
                profile: fallback(),
                warning: None,
            });
        }
        if pref.required {
            return Err(format!(
                "profile {} is not offered and profile_required is set; {}",
                quoted(&pref.names),
                listed()
            ));
        }
        let profile = fallback();
        let using = match &profile {
            Some(p) => format!("ordering with {p:?}"),
            None => "ordering without a profile (the CA's default)".to_owned(),
        };
        return Ok(ProfileChoice {
            warning: Some(format!(
                "profile {} is not offered ({}); {using}",
                quoted(&pref.names),
                listed()
            )),
            profile,
        });
    };
    let chosen = pref.names[pos].clone();
    let warning = (pos > 0).then(|| {
        format!(
            "profile {} is not offered ({}); ordering with {chosen:?}",
            quoted(&pref.names[..pos]),
            listed()
        )
    });
    Ok(ProfileChoice {
        profile: Some(chosen),
        warning,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_is_dropped_only_when_the_ca_refused_the_hint() {
        let problem = |status: u16, kind: &str| -> instant_acme::Problem {
            serde_json::from_value(serde_json::json!({
                "type": kind,
                "status": status,
                "detail": "d",
            }))
            .expect("a problem document")
        };
        let acme = |t: &str| format!("urn:ietf:params:acme:error:{t}");
        assert!(refuses_replaces(&problem(409, &acme("alreadyReplaced"))));
        assert!(refuses_replaces(&problem(500, &acme("serverInternal"))));
        assert!(!refuses_replaces(&problem(429, &acme("rateLimited"))));
        assert!(!refuses_replaces(&problem(503, &acme("rateLimited"))));
        // A proxy's error page, turned into a problem by certd.
        assert!(!refuses_replaces(&problem(
            502,
            "urn:certd:error:httpError"
        )));
    }

    /// The choice among the configured profiles and the directory's list,
    /// including lists no Pebble serves (Let's Encrypt's, with `tlsclient`
    /// retired).
    #[test]
    fn profiles_fall_back_unless_required() {
        let pref = |names: &[&str], required| ProfilePreference {
            names: names.iter().map(|n| n.to_string()).collect(),
            required,
        };
        let le = ["tlsserver", "classic", "shortlived"];
        let chosen = |p: &ProfilePreference, ip, offered: &[&str]| {
            choose_profile(p, ip, offered).expect("a choice")
        };

        let c = chosen(&pref(&["tlsserver", "classic"], false), false, &le);
        assert_eq!((c.profile.as_deref(), c.warning), (Some("tlsserver"), None));

        // Retired: the next one, with a warning naming what was skipped.
        let c = chosen(&pref(&["tlsclient", "classic"], false), false, &le);
        assert_eq!(c.profile.as_deref(), Some("classic"));
        let w = c.warning.expect("a warning");
        assert!(w.contains("\"tlsclient\" is not offered"), "{w}");
        assert!(w.contains("classic, shortlived, tlsserver"), "{w}");

        // None left: the CA's default, or `shortlived` for addresses.
        let c = chosen(&pref(&["tlsclient"], false), false, &le);
        assert_eq!(c.profile, None);
        assert!(c.warning.expect("a warning").contains("CA's default"));
        let c = chosen(&pref(&["tlsclient"], false), true, &le);
        assert_eq!(c.profile.as_deref(), Some("shortlived"));

        // Required: a hard error with what the CA lists.
        let e = choose_profile(&pref(&["tlsclient"], true), false, &le).expect_err("required");
        assert!(e.contains("profile_required"), "{e}");
        assert!(e.contains("classic, shortlived, tlsserver"), "{e}");
        let e = choose_profile(&pref(&["classic"], true), false, &[]).expect_err("none listed");
        assert!(e.contains("lists no profiles"), "{e}");
        // A CA without profiles and no preference: nothing to say.
        let c = chosen(&pref(&[], false), false, &[]);
        assert_eq!((c.profile, c.warning), (None, None));

        // Addresses without a configured profile: `shortlived` where listed.
        let c = chosen(&pref(&[], false), true, &le);
        assert_eq!(
            (c.profile.as_deref(), c.warning),
            (Some("shortlived"), None)
        );
        let c = chosen(&pref(&[], false), true, &["default"]);
        assert_eq!(c.profile, None);
        // ... but a configured one wins.
        let c = chosen(&pref(&["classic"], false), true, &le);
        assert_eq!(c.profile.as_deref(), Some("classic"));
    }
}
