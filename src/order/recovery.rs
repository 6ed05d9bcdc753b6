//! Recovery after a restart: orders the ledger shows in flight that no
//! task drives, and orders the CA created that the ledger never learnt
//! of, are resumed or settled.
//!
//! An order left unfinished is either taken up again by the next order for
//! the same names (marked `Resumable`) or abandoned, its pending
//! authorizations settled within the CA's failure budget by the reaper.
//!
//! One process recovers all of an account's orders at start
//! ([`recover`]). A fleet cannot: a peer's orders are in flight and
//! driven. There, recovery is per certificate, by the host that claimed
//! its lease, for the orders earlier epochs left ([`recover_certificate`]).

use std::collections::HashSet;

use crate::acme::AcmeError;
use crate::acme::raw::{account_orders, fetch_authz, fetch_order};
use crate::hygiene::{Policy, Reaper};
use crate::ledger::{
    Actor, EventKind, Identifiers, Ledger, LedgerError, NewAuthz, NewChallenge, OrderRow,
    OrderStatus, OrderStep,
};

use super::keys::{forget_order_key, has_order_key, order_key_dir};

/// The certificate name an adopted order gets when the ledger cannot tell
/// whose it is; no configured certificate can have it (names are plain).
const UNKNOWN_CERT: &str = "(unknown)";

/// Why an order could not be adopted.
#[derive(Debug, thiserror::Error)]
enum AdoptError {
    #[error(transparent)]
    Acme(#[from] AcmeError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

/// Crash recovery: orders the ledger shows in flight but that no task is
/// driving, after adopting those the CA lists for the account that the
/// ledger never learnt of (see [`adopt_unknown`]). Those `keep`
/// accepts (their certificate is still configured with the same names,
/// and the driver will resume them) are marked resumable, one per set of
/// names; the rest are abandoned and their pending authorizations
/// settled within the budget. An order interrupted after finalization
/// is resumable only while its key is stored: the driver then downloads
/// its certificate instead of ordering the same one again.
pub(crate) async fn recover(
    reaper: &Reaper,
    keep: impl Fn(&OrderRow) -> bool,
) -> Result<(usize, usize), LedgerError> {
    let s = reaper.store();
    adopt_unknown(reaper).await?;
    let orders = s.in_flight_orders(reaper.account().ledger_id).await?;
    settle_in_flight(reaper, s, orders, keep).await
}

/// Fleet mode's recovery of one certificate, by the host that just
/// claimed its lease: orders the CA created for `cert_name` that the
/// ledger never learnt of (an earlier holder died between `newOrder` and
/// recording it: its intent is left) are adopted ([`adopt_intents_of`]),
/// then the orders for `cert_name` that earlier holders left in flight
/// are marked resumable (the newest for names `keep` accepts, so the
/// order that follows takes it up instead of placing another) or
/// abandoned. `store` is the handle fenced by the lease, so a host that
/// lost the lease meanwhile changes nothing. Only this certificate's
/// intents are read and cleared: a peer's, for an order it is placing
/// now, stay.
pub(crate) async fn recover_certificate(
    reaper: &Reaper,
    store: &Ledger,
    cert_name: &str,
    keep: impl Fn(&OrderRow) -> bool,
) -> Result<(usize, usize), LedgerError> {
    let reaper = reaper.writing_to(store.clone());
    adopt_intents_of(&reaper, cert_name).await?;
    let orders = store
        .in_flight_orders(reaper.account().ledger_id)
        .await?
        .into_iter()
        .filter(|o| o.cert_name == cert_name)
        .collect();
    settle_in_flight(&reaper, store, orders, keep).await
}

/// Adopts the orders the CA lists for the account that the ledger does
/// not know and that are for the names of one of `cert_name`'s intents,
/// under `cert_name`; then clears those intents. Orders for other names
/// are left to their own certificates' recovery. Returns how many were
/// adopted.
pub(crate) async fn adopt_intents_of(
    reaper: &Reaper,
    cert_name: &str,
) -> Result<usize, LedgerError> {
    let s = reaper.store();
    let account = reaper.account();
    let intents = s.intents_of(account.ledger_id, cert_name).await?;
    let Some(newest) = intents.iter().map(|i| i.id).max() else {
        return Ok(0);
    };
    let names: Vec<Identifiers> = intents.into_iter().map(|i| i.identifiers).collect();
    let adopted = adopt_listed(reaper, Some((cert_name, &names))).await?;
    if adopted.is_some() {
        s.clear_intents_of(account.ledger_id, cert_name, newest)
            .await?;
    }
    Ok(adopted.unwrap_or(0))
}

/// Marks resumable, or abandons, `orders` (oldest first), writing
/// through `s`.
async fn settle_in_flight(
    reaper: &Reaper,
    s: &Ledger,
    mut orders: Vec<OrderRow>,
    keep: impl Fn(&OrderRow) -> bool,
) -> Result<(usize, usize), LedgerError> {
    let key_dir = order_key_dir(s).await?;
    let (mut resumable, mut abandoned) = (0, 0);
    // Newest first: of several unfinished orders for the same names the
    // driver resumes the newest, so the older ones are abandoned now.
    orders.reverse();
    let mut kept = HashSet::new();
    for order in orders {
        if reaper.active().contains(&order.url) {
            continue;
        }
        let finalized_without_key =
            order.step == OrderStep::Finalizing && !has_order_key(s, &key_dir, &order.url).await?;
        if !finalized_without_key && keep(&order) && kept.insert(order.identifiers.clone()) {
            s.set_order_state(&order.url, order.status, OrderStep::Resumable, None)
                .await?;
            s.event(
                EventKind::OrderRecovered,
                Some(&order.cert_name),
                Some(&order.url),
                None,
                Some("left to resume"),
            )
            .await?;
            resumable += 1;
            continue;
        }
        abandon_order(reaper, s, &order.url, &order.cert_name, "recovery").await?;
        abandoned += 1;
    }
    Ok((resumable, abandoned))
}

/// Orders the CA lists for the account (RFC 8555 §7.1.2.1) that the
/// ledger does not know: a crash between `newOrder` and recording its
/// answer leaves one, with pending authorizations. Each still `pending`
/// or `ready` is recorded with its authorizations (write-ahead, as the
/// driver records its own), under the certificate the ledger's intent
/// for those names recorded; [`recover`] then resumes or
/// abandons it like any other. The list is walked only when an intent
/// shows that a `newOrder` was interrupted: it grows with every order
/// the account ever made (Pebble pages it three at a time). Where the
/// CA offers no list (Let's Encrypt), nothing is adopted: the next
/// `newOrder` for the same names is answered there with the same order.
/// Returns how many were adopted.
pub(crate) async fn adopt_unknown(reaper: &Reaper) -> Result<usize, LedgerError> {
    let s = reaper.store();
    let account = reaper.account();
    if !s.has_intents(account.ledger_id).await? {
        return Ok(0);
    }
    let adopted = adopt_listed(reaper, None).await?;
    if adopted.is_some() {
        s.clear_intents(account.ledger_id).await?;
    }
    Ok(adopted.unwrap_or(0))
}

/// Walks the CA's list of the account's orders and adopts those the
/// ledger does not know: all of them, or with `only`, those for one of
/// the names given, under the certificate given. `None`: the list could
/// not be read (recorded as a reaper error), so the intents stay for a
/// later try; the CA offering no list is `Some(0)`.
async fn adopt_listed(
    reaper: &Reaper,
    only: Option<(&str, &[Identifiers])>,
) -> Result<Option<usize>, LedgerError> {
    let s = reaper.store();
    let account = reaper.account();
    let orders = match account_orders(&account.http, &account.signer()).await {
        Ok(Some(orders)) => orders,
        Ok(None) => return Ok(Some(0)),
        Err(e) => {
            let msg = format!("cannot list the account's orders: {e}");
            s.event(EventKind::ReaperError, None, None, None, Some(&msg))
                .await?;
            tracing::warn!(error = %e, "cannot list the account's orders at the CA; orders unknown to the ledger are not adopted");
            return Ok(None);
        }
    };
    let mut adopted = 0;
    for url in orders {
        if s.order_known(&url).await? {
            continue;
        }
        match adopt(reaper, &url, only).await {
            Ok(true) => adopted += 1,
            Ok(false) => {}
            Err(AdoptError::Ledger(e)) => return Err(e),
            Err(AdoptError::Acme(e)) => {
                let msg = format!("cannot adopt: {e}");
                s.event(EventKind::ReaperError, None, Some(&url), None, Some(&msg))
                    .await?;
                tracing::warn!(order = %url, error = %e, "cannot adopt an order unknown to the ledger");
            }
        }
    }
    Ok(Some(adopted))
}

/// Records one order the ledger did not know, if it may still have
/// pending authorizations (and, with `only`, is for one of its names).
async fn adopt(
    reaper: &Reaper,
    url: &str,
    only: Option<(&str, &[Identifiers])>,
) -> Result<bool, AdoptError> {
    let s = reaper.store();
    let account = reaper.account();
    let order = fetch_order(&account.http, &account.signer(), url).await?;
    let status = order
        .status
        .parse::<OrderStatus>()
        .map_err(|e| AcmeError::Protocol(format!("{url}: {e}")))?;
    match status {
        OrderStatus::Pending | OrderStatus::Ready => {}
        OrderStatus::Processing
        | OrderStatus::Valid
        | OrderStatus::Invalid
        | OrderStatus::Abandoned => return Ok(false),
    }
    let names = Identifiers::new(order.sorted_identifiers());
    if let Some((_, wanted)) = only
        && !wanted.contains(&names)
    {
        return Ok(false);
    }
    let mut authzs = Vec::with_capacity(order.authorizations.len());
    for authz_url in &order.authorizations {
        let a = fetch_authz(&account.http, &account.signer(), authz_url).await?;
        authzs.push(NewAuthz {
            url: authz_url.clone(),
            identifier: a.identifier(),
            status: a
                .status
                .parse()
                .map_err(|e| AcmeError::Protocol(format!("{authz_url}: {e}")))?,
            expires_at: a.expires.as_deref().and_then(crate::clock::parse_rfc3339),
            challenges: a
                .challenges
                .iter()
                .map(|c| {
                    Ok(NewChallenge {
                        url: c.url.clone(),
                        kind: c.kind.clone(),
                        status: c
                            .status
                            .parse()
                            .map_err(|e| AcmeError::Protocol(format!("{}: {e}", c.url)))?,
                    })
                })
                .collect::<Result<_, AcmeError>>()?,
        });
    }
    // Without an intent or an earlier order for these names, the order
    // is nobody's: recorded under a name no certificate has, so
    // recovery abandons it.
    let cert_name = match only {
        Some((cert_name, _)) => cert_name.to_owned(),
        None => s
            .cert_name_for(account.ledger_id, &names)
            .await?
            .unwrap_or_else(|| UNKNOWN_CERT.to_owned()),
    };
    s.record_order(account.ledger_id, &cert_name, url, &names, status, &authzs)
        .await?;
    if let Some(expires) = order
        .expires
        .as_deref()
        .and_then(crate::clock::parse_rfc3339)
    {
        s.set_order_expires(url, expires).await?;
    }
    let detail = format!(
        "listed by the CA, unknown to the ledger: {}",
        names.join(", ")
    );
    s.event(
        EventKind::OrderAdopted,
        Some(&cert_name),
        Some(url),
        None,
        Some(&detail),
    )
    .await?;
    tracing::info!(cert = %cert_name, order = %url, "adopted an order the ledger did not know");
    Ok(true)
}

/// Gives up on an order: settles its pending authorizations and marks it
/// abandoned, writing the order's state through `s` (in fleet mode, the
/// handle fenced by the certificate's lease).
pub(crate) async fn abandon_order(
    reaper: &Reaper,
    s: &Ledger,
    order_url: &str,
    cert_name: &str,
    why: &str,
) -> Result<(), LedgerError> {
    for (url, identifier) in s.pending_authz_of_order(order_url).await? {
        reaper
            .settle(&url, &identifier, Policy::by(Actor::Driver))
            .await?;
    }
    // A finalized order's stored key would only ever sign for it.
    let key_dir = order_key_dir(s).await?;
    forget_order_key(s, &key_dir, order_url).await;
    s.set_order_state(
        order_url,
        OrderStatus::Abandoned,
        OrderStep::Abandoned,
        Some(why),
    )
    .await?;
    s.event(
        EventKind::OrderAbandoned,
        Some(cert_name),
        Some(order_url),
        None,
        Some(why),
    )
    .await?;
    Ok(())
}
