//! Taking up an unfinished order for the same names instead of leaving
//! its authorizations to rot: still open, it is validated further; already
//! finalized, its certificate is downloaded with the stored key.

use std::path::Path;

use instant_acme::{Order, OrderStatus};
use rcgen::KeyPair;

use crate::acme::{AcmeError, NONCE_ATTEMPTS, is_bad_nonce};
use crate::ledger::{EventKind, Identifiers};

use super::keys::find_order_key;
use super::{Context, DriveError, order_status, recovery};

/// An unfinished order taken up again.
pub(super) enum Resumed {
    /// Not finalized yet: what is left of validation, then finalization.
    Open(Order),
    /// Finalized before the last run stopped: downloaded with the key that
    /// was stored before `finalize` was sent.
    Finalized(Order, Box<(KeyPair, String)>),
}

/// Reuse before abandoning (seed 003): the newest unfinished order for the
/// same names, if the CA still has it pending or ready, or has finalized it
/// and its key is stored.
pub(super) async fn resume(
    ctx: &Context,
    name: &str,
    identifiers: &Identifiers,
    key_dir: &Path,
) -> Result<Option<Resumed>, DriveError> {
    let now = ctx.store.clock().now().secs();
    let Some(row) = ctx
        .store
        .resumable_order(ctx.account.ledger_id, identifiers, now)
        .await?
    else {
        return Ok(None);
    };
    if ctx.reaper.active().contains(&row.url) {
        return Ok(None);
    }
    let why = match nonce_retry!(ctx.account.account().order(row.url.clone()).await) {
        Ok(mut order) => match order.state().status {
            OrderStatus::Pending | OrderStatus::Ready => {
                tracing::info!(cert = name, order = %row.url, "resuming order");
                ctx.store
                    .event(
                        EventKind::OrderResumed,
                        Some(name),
                        Some(&row.url),
                        None,
                        None,
                    )
                    .await?;
                return Ok(Some(Resumed::Open(order)));
            }
            status @ (OrderStatus::Processing | OrderStatus::Valid) => {
                match find_order_key(&ctx.store, key_dir, &row.url).await? {
                    Some((key, pem)) => {
                        tracing::info!(cert = name, order = %row.url, "resuming a finalized order with its stored key");
                        let detail = format!(
                            "finalized ({}); downloading with the stored key",
                            order_status(status)
                        );
                        ctx.store
                            .event(
                                EventKind::OrderResumed,
                                Some(name),
                                Some(&row.url),
                                None,
                                Some(&detail),
                            )
                            .await?;
                        return Ok(Some(Resumed::Finalized(order, Box::new((key, pem)))));
                    }
                    None => "not resumable: finalized, but its key is not stored".to_owned(),
                }
            }
            other => format!("not resumable: the CA says {}", order_status(other)),
        },
        Err(e) => format!("not resumable: {}", AcmeError::from(e)),
    };
    recovery::abandon_order(&ctx.reaper, &ctx.store, &row.url, name, &why).await?;
    Ok(None)
}
