//! The operations a one-shot command and the daemon (for a client of its
//! control socket) both run, with whatever account, ledger and reaper the
//! caller holds: revoke the installed certificate, a reaper pass,
//! deactivate authorizations, roll the account key over. Output goes to a
//! [`Sink`], the terminal or the client's socket.

use std::path::Path;
use std::time::Duration;

use ring::rand::SystemRandom;
use rustls_pki_types::pem::PemObject;
use tokio_util::sync::CancellationToken;

use crate::acme::raw::{Fetched, fetch_authz, fetch_unknown};
use crate::acme::{AcmeAccount, AcmeError, credentials_path, error_chain};
use crate::app::fleet::Fleet;
use crate::app::sink::Sink;
use crate::config::Config;
use crate::fleet::{Lease, LeaseName, account_key_context};
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

/// Fleet mode's rollover: under the `account:<directory>` lease (the one
/// the fleet's account was created under), the key is rolled over at the
/// CA, then the new key stored sealed in the shared database through the
/// lease's fence, so every host loads the new key. The exit code.
pub(crate) async fn rollover_in_fleet(
    fleet: &Fleet,
    account: &AcmeAccount,
    cfg: &Config,
    sink: &Sink,
) -> u8 {
    let directory = account.directory_url.clone();
    let name = LeaseName::Account(directory.clone());
    let lease = match Lease::claim(&fleet.db, name.clone(), fleet.holder.clone(), fleet.timing)
        .await
    {
        Ok(Some(lease)) => lease,
        Ok(None) => {
            sink.err(&format!(
                "certd: key rollover not started: another host of the fleet holds lease {name}; try again once it is released"
            ));
            return 1;
        }
        Err(e) => {
            sink.err(&format!(
                "certd: key rollover not started: lease {name}: {e}"
            ));
            return 1;
        }
    };
    let renewer = lease.keep_renewed(fleet.db.clone(), &CancellationToken::new());
    let code = match lease.check_deadline() {
        Ok(_) => rollover_and_store(fleet, &lease, account, cfg, sink).await,
        Err(e) => {
            sink.err(&format!("certd: key rollover not started: {e}"));
            1
        }
    };
    renewer.stop().await;
    if let Err(e) = lease.release(&fleet.db).await {
        tracing::warn!(lease = %name, error = %e, "cannot release the lease; it expires on its own");
    }
    code
}

/// The rollover under the held account lease, then the new key sealed
/// and stored.
async fn rollover_and_store(
    fleet: &Fleet,
    lease: &Lease,
    account: &AcmeAccount,
    cfg: &Config,
    sink: &Sink,
) -> u8 {
    let code = rollover(account, cfg, sink).await;
    if code != 0 {
        return code;
    }
    let directory = &account.directory_url;
    let path = credentials_path(&cfg.storage.state_dir, directory);
    let stored = async {
        let json =
            std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let sealed = fleet
            .key
            .seal(&SystemRandom::new(), &account_key_context(directory), &json)
            .map_err(|e| format!("cannot seal it: {e}"))?;
        let mut tx = lease
            .begin_fenced(&fleet.db)
            .await
            .map_err(|e| e.to_string())?;
        tx.put_account_key(&sealed)
            .await
            .map_err(|e| e.to_string())?;
        tx.commit().await.map_err(|e| e.to_string())
    };
    match stored.await {
        Ok(()) => {
            sink.out(&format!(
                "the new key is stored, sealed, in the fleet's database (key id {}): every host loads it",
                fleet.key.id()
            ));
            0
        }
        Err(e) => {
            // The CA knows only the new key now: say where it is.
            sink.err(&format!(
                "certd: the CA rolled the key over, but the fleet's database still holds the old one: {e}. The new key is in {}; the other hosts cannot use the account until it is stored (run `certd account rollover` again here)",
                path.display()
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
