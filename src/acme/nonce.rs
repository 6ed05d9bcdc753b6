//! Nonces: every `Replay-Nonce` the CA sends is spent by the same task's
//! next request, and an order's last one goes to a pool, so instant-acme's
//! `HEAD newNonce` is answered without a round trip when it can be. And a
//! request rejected for its nonce is repeated, since the CA did not
//! process it.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::StatusCode;
use instant_acme::BytesResponse;

use super::http::{AcmeHttp, lock};

/// instant-acme retries a request whose nonce the CA rejected three times;
/// CAs under load reject more (Pebble's `PEBBLE_WFE_NONCEREJECT=50` rejects
/// half). A request rejected for its nonce was not processed, so repeating
/// it is safe: callers repeat each instant-acme call up to this many times.
pub const NONCE_ATTEMPTS: usize = 6;

/// Whether the CA rejected a request for its nonce (after instant-acme's
/// own retries).
pub fn is_bad_nonce(e: &instant_acme::Error) -> bool {
    matches!(e, instant_acme::Error::Api(p)
        if p.r#type.as_deref() == Some("urn:ietf:params:acme:error:badNonce"))
}

/// Calls `f` again while it fails on a rejected nonce, up to
/// `NONCE_ATTEMPTS` times.
pub async fn with_nonce_retry<T, F, Fut>(mut f: F) -> Result<T, instant_acme::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, instant_acme::Error>>,
{
    let mut attempt = 1;
    loop {
        match f().await {
            Err(e) if attempt < NONCE_ATTEMPTS && is_bad_nonce(&e) => attempt += 1,
            other => return other,
        }
    }
}

/// Pooled nonces older than this are dropped: CAs expire them, and a
/// rejected nonce costs a round trip, the very thing the pool saves.
const NONCE_MAX_AGE: Duration = Duration::from_secs(300);
const NONCE_POOL_MAX: usize = 32;

tokio::task_local! {
    /// The latest nonce a CA sent to the current order's task.
    pub(super) static LAST_NONCE: std::cell::RefCell<Option<String>>;
    /// The `Retry-After` of the latest answer the current task received
    /// (`None` when it had none). instant-acme's `Problem` drops the
    /// header, and the observation per URL is shared by every task that
    /// posts to the same URL (all `newOrder`s): this is how the problem an
    /// instant-acme call returns gets the `Retry-After` of its own answer,
    /// with the time the answer came (a rate limit's floor counts from it).
    pub(super) static LAST_RETRY_AFTER: std::cell::Cell<Option<(SystemTime, SystemTime)>>;
}

/// The `Retry-After` of the answer the current task received last and when
/// that answer came, inside a `nonce_scope`.
pub(super) fn last_retry_after() -> Option<(SystemTime, SystemTime)> {
    LAST_RETRY_AFTER
        .try_with(std::cell::Cell::get)
        .ok()
        .flatten()
}

impl AcmeHttp {
    /// Runs one order (or any sequence of requests) so that its last unspent
    /// nonce goes to the pool when it ends. Every response's nonce is spent
    /// by the next request of the same task (instant-acme keeps it in the
    /// order), so only the last one is ever free; pooling nonces any earlier
    /// would let a concurrent order spend the same nonce and both would
    /// need a retry. The next order's `newNonce` is then answered from the
    /// pool without a round trip.
    pub async fn nonce_scope<F: Future>(&self, fut: F) -> F::Output {
        let slot = std::cell::RefCell::new(None);
        let retry_after = LAST_RETRY_AFTER.scope(std::cell::Cell::new(None), fut);
        LAST_NONCE
            .scope(slot, async {
                let out = retry_after.await;
                if let Some(nonce) = LAST_NONCE.with(|slot| slot.take()) {
                    self.inner.nonces.put(&nonce);
                }
                out
            })
            .await
    }
}

/// Nonces no request spent, oldest first.
#[derive(Default)]
pub(super) struct NoncePool(Mutex<VecDeque<(String, Instant)>>);

impl NoncePool {
    pub(super) fn take(&self) -> Option<String> {
        let mut pool = lock(&self.0);
        while let Some((nonce, at)) = pool.pop_front() {
            if at.elapsed() < NONCE_MAX_AGE {
                return Some(nonce);
            }
        }
        None
    }

    pub(super) fn put(&self, nonce: &str) {
        let mut pool = lock(&self.0);
        if pool.len() >= NONCE_POOL_MAX {
            pool.pop_front();
        }
        pool.push_back((nonce.to_owned(), Instant::now()));
    }
}

pub(super) fn synthetic_nonce_response(nonce: &str) -> BytesResponse {
    let mut parts = http::Response::new(()).into_parts().0;
    parts.status = StatusCode::OK;
    if let Ok(v) = http::HeaderValue::from_str(nonce) {
        parts.headers.insert("replay-nonce", v);
    }
    BytesResponse {
        parts,
        body: Box::new(Bytes::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acme::error::{AcmeError, Disposition};
    use crate::acme::http::parse_retry_after;
    use crate::clock::Clock;

    /// instant-acme's problem has no `Retry-After`: the answer's header
    /// reaches the error through the task's scope.
    #[tokio::test]
    async fn a_problem_keeps_its_answer_s_retry_after() {
        let http = AcmeHttp::new(None, Clock::system()).expect("client");
        let at = http
            .nonce_scope(async {
                let now = SystemTime::now();
                LAST_RETRY_AFTER
                    .with(|slot| slot.set(parse_retry_after("3600", now).map(|at| (at, now))));
                let p: instant_acme::Problem = serde_json::from_str(
                    r#"{"type":"urn:ietf:params:acme:error:rateLimited","status":429}"#,
                )
                .expect("problem");
                AcmeError::from(instant_acme::Error::Api(p)).disposition()
            })
            .await;
        let Disposition::RateLimited { until: Some(until) } = at else {
            panic!("{at:?}");
        };
        assert!(until > SystemTime::now() + Duration::from_secs(3500));
        // Outside any scope there is nothing to read.
        assert_eq!(last_retry_after(), None);
    }

    #[tokio::test]
    async fn only_a_scope_s_last_nonce_is_pooled() {
        let http = AcmeHttp::new(None, Clock::system()).expect("client");
        http.nonce_scope(async {
            for n in ["a", "b"] {
                LAST_NONCE.with(|slot| slot.replace(Some(n.to_owned())));
            }
        })
        .await;
        // Outside any scope a response's nonce is not kept.
        let _ = LAST_NONCE.try_with(|slot| slot.replace(Some("c".to_owned())));
        assert_eq!(http.inner.nonces.take().as_deref(), Some("b"));
        assert_eq!(http.inner.nonces.take(), None);
    }
}
