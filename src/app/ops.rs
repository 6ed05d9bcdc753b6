//! The operations a one-shot command and the daemon (for a client of its
//! control socket) both run, with whatever account, ledger and reaper the
//! caller holds: revoke the installed certificate, a reaper pass,
//! deactivate authorizations, roll the account key over. Output goes to a
//! [`Sink`], the terminal or the client's socket.

use std::path::Path;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;

use crate::acme::raw::{Fetched, fetch_authz, fetch_unknown};
use crate::acme::{AcmeAccount, AcmeError, error_chain};
use crate::app::sink::Sink;
use crate::config::Config;
use crate::hygiene::{Policy, Reaper, Settled};
use crate::install;
use crate::ledger::{EventKind, Ledger};

/// Revocation reasons (RFC 5280 §5.3.1) an ACME CA accepts.
#[derive(Debug, Clone, Copy, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum RevokeReason {
    Unspecified,
    KeyCompromise,
    AffiliationChanged,
    Superseded,
    CessationOfOperation,
}

impl RevokeReason {
    fn acme(self) -> instant_acme::RevocationReason {
        use instant_acme::RevocationReason as R;
        match self {
            Self::Unspecified => R::Unspecified,
            Self::KeyCompromise => R::KeyCompromise,
            Self::AffiliationChanged => R::AffiliationChanged,
            Self::Superseded => R::Superseded,
            Self::CessationOfOperation => R::CessationOfOperation,
        }
    }
}

/// Rolls the account key over; the exit code. In the daemon `account` is
/// the one every order and reaper pass uses, and it switches to the new
/// key as the CA confirms it.
pub(crate) async fn rollover(account: &AcmeAccount, cfg: &Config, sink: &Sink) -> u8 {
    match crate::acme::roll_over_account(account, &cfg.storage.state_dir).await {
        Ok(thumbprint) => {
            sink.out(&format!(
                "account key replaced; new thumbprint {thumbprint}"
            ));
            0
        }
        Err(e) => {
            sink.err(&format!(
                "certd: key rollover failed, the old key stays in use: {}",
                error_chain(&e)
            ));
            1
        }
    }
}

/// Revokes the certificate installed for `name` and records it; false
/// (with a line saying why) when there is none or the CA refuses.
pub(crate) async fn revoke_installed(
    cert_dir: &Path,
    name: &str,
    reason: RevokeReason,
    store: &Ledger,
    account: &AcmeAccount,
    sink: &Sink,
) -> anyhow::Result<bool> {
    let pem_path = cert_dir.join(name).join("cert.pem");
    let Some(Ok(der)) = rustls_pki_types::CertificateDer::pem_file_iter(&pem_path)
        .ok()
        .and_then(|mut certs| certs.next())
    else {
        sink.err(&format!(
            "certd: {}: no installed certificate to revoke",
            pem_path.display()
        ));
        return Ok(false);
    };
    let info = install::CertInfo::parse(&der).map_err(anyhow::Error::msg)?;
    let request = instant_acme::RevocationRequest {
        certificate: &der,
        reason: Some(reason.acme()),
    };
    let acme = account.account();
    if let Err(e) = crate::acme::with_nonce_retry(|| acme.revoke(&request)).await {
        let e = AcmeError::from(e);
        sink.err(&format!(
            "certd: {name}: the CA refused the revocation of serial {}: {e}",
            info.serial
        ));
        return Ok(false);
    }
    let reason_name = format!("{reason:?}");
    store
        .record_revoked(name, &info.serial, &reason_name)
        .await?;
    store
        .event(
            EventKind::Revoked,
            Some(name),
            None,
            None,
            Some(&format!("serial {} ({reason_name})", info.serial)),
        )
        .await?;
    sink.out(&format!("{name}: revoked serial {}", info.serial));
    Ok(true)
}

/// One explicit reaper pass, a line per authorization and a summary; the
/// exit code. The daemon runs it for `certd reap` with its own reaper.
pub(crate) async fn reap_pass(
    reaper: &Reaper,
    older_than: Duration,
    dry_run: bool,
    sink: &Sink,
) -> anyhow::Result<u8> {
    let counts = reaper
        .pass(older_than, dry_run, true, |row, outcome| {
            sink.out(&format!(
                "{}  {}  {}",
                describe_settled(outcome),
                row.url,
                row.identifier
            ));
        })
        .await?;
    sink.out(&format!(
        "{}examined {}, {} {}, held back {}, no longer pending {}, failed {}",
        if dry_run { "dry run: " } else { "" },
        counts.examined,
        if dry_run {
            "would deactivate"
        } else {
            "deactivated"
        },
        counts.deactivated,
        counts.held_back,
        counts.resolved,
        counts.failed
    ));
    Ok(u8::from(counts.failed > 0))
}

pub(crate) fn describe_settled(s: &Settled) -> String {
    match s {
        Settled::Deactivated { from } => format!("deactivated (was {from})"),
        Settled::WouldDeactivate { from } => format!("would deactivate (is {from})"),
        Settled::HeldBack { failures, limit } => format!(
            "held back ({failures} failed authorizations for this name in the last hour, limit {limit})"
        ),
        Settled::NotPending(status) => format!("already {status}"),
        Settled::Refused { status } => format!("not deactivated: the CA's answer says {status}"),
        Settled::SkippedValid => "valid, not deactivated (use --include-valid)".into(),
        Settled::Expired => "expired".into(),
        Settled::Gone => "gone (the CA no longer knows it)".into(),
        Settled::Failed(e) => format!("error: {e}"),
    }
}

/// Deactivates the authorizations `urls` name (or every pending one), a
/// line each; the exit code. The daemon runs it for
/// `certd authz deactivate` with its own reaper.
pub(crate) async fn deactivate(
    store: &Ledger,
    reaper: &Reaper,
    urls: Vec<String>,
    all_pending: bool,
    policy: Policy,
    sink: &Sink,
) -> anyhow::Result<u8> {
    if urls.is_empty() && !all_pending {
        sink.err("certd: name authorization or challenge URLs, or use --all-pending");
        return Ok(2);
    }
    let account = reaper.account();
    let targets = if all_pending {
        store.pending_urls(account.ledger_id).await?
    } else {
        urls
    };
    let mut failed = 0;
    for url in targets {
        let (authz_url, identifier) = match resolve_authz(store, account, &url).await {
            Ok(found) => found,
            Err(why) => {
                failed += 1;
                sink.out(&format!("{url}: cannot resolve: {why}"));
                continue;
            }
        };
        let outcome = reaper.settle(&authz_url, &identifier, policy).await?;
        let via = if authz_url == url {
            String::new()
        } else {
            format!(" (authorization {authz_url})")
        };
        if !outcome.is_done() {
            failed += 1;
        }
        sink.out(&format!(
            "{url}{via}: {identifier}: {}",
            describe_settled(&outcome)
        ));
    }
    Ok(u8::from(failed > 0))
}

/// Finds the authorization a URL names: an authorization in the ledger, a
/// challenge in the ledger (seed 000: logs often hold only those), or else
/// whatever the CA says the URL is, following a challenge's
/// `Link: rel="up"` to its authorization.
async fn resolve_authz(
    store: &Ledger,
    account: &AcmeAccount,
    url: &str,
) -> Result<(String, String), String> {
    let ledger = |e: crate::ledger::LedgerError| e.to_string();
    if let Some(a) = store.authz(url).await.map_err(ledger)? {
        return Ok((a.url, a.identifier));
    }
    if let Some(parent) = store.authz_of_challenge(url).await.map_err(ledger)? {
        let a = store
            .authz(&parent)
            .await
            .map_err(ledger)?
            .ok_or("the ledger names a parent authorization it does not hold")?;
        return Ok((a.url, a.identifier));
    }
    let (authz_url, a) = match fetch_unknown(&account.http, &account.signer(), url).await {
        Ok(Fetched::Authz(a)) => (url.to_owned(), a),
        Ok(Fetched::Other { up: Some(up) }) => {
            let a = fetch_authz(&account.http, &account.signer(), &up)
                .await
                .map_err(|e| format!("{up}: {e}"))?;
            (up, a)
        }
        Ok(Fetched::Other { up: None }) => {
            return Err(
                "not in the ledger, and the CA answers with something that is neither an authorization nor a challenge with a Link rel=\"up\" to one".into(),
            );
        }
        Err(e) => return Err(format!("not in the ledger, and the CA says: {e}")),
    };
    let identifier = a.identifier();
    let status = a
        .status
        .parse::<crate::ledger::AuthzStatus>()
        .map_err(|e| format!("{authz_url}: {e}"))?;
    store
        .record_foreign_authz(account.ledger_id, &authz_url, &identifier, status)
        .await
        .map_err(ledger)?;
    Ok((authz_url, identifier))
}
