//! How long to wait before trying again: a failure backoff that doubles,
//! spread at random so the retries of many certificates do not line up,
//! and capped by the time the certificate has left. The daemon's
//! scheduler, its account loading and its ARI checks share it.

use std::time::Duration;

use ring::rand::SecureRandom;

use crate::clock::UnixTime;
use crate::install::CertInfo;

/// A uniform random number in [0, 1), from ring's system RNG.
pub(crate) fn random_fraction() -> f64 {
    let mut b = [0u8; 8];
    // The system RNG failing is not recoverable in any useful way here;
    // zero jitter is a safe fallback.
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

/// The delay before retry number `failures` (1-based): `min` doubling up to
/// `max`, drawn uniformly from the upper half so retries of many
/// certificates spread out.
pub(crate) fn failure_backoff(failures: u32, min: Duration, max: Duration) -> Duration {
    let doublings = failures.saturating_sub(1).min(20);
    let d = min.saturating_mul(1 << doublings).min(max);
    d.mul_f64(0.5 + 0.5 * random_fraction())
}

/// The failure backoff, capped at an eighth of the time `info` has left:
/// a 6-day certificate must not wait 6 hours between its last few tries.
pub(crate) fn capped_backoff(
    failures: u32,
    min: Duration,
    max: Duration,
    info: Option<&CertInfo>,
    now: UnixTime,
) -> Duration {
    let d = failure_backoff(failures, min, max);
    match info {
        Some(info) => {
            let left = u64::try_from(info.not_after - now.secs()).unwrap_or(0);
            d.min(Duration::from_secs(left / 8).max(min.min(Duration::from_secs(60))))
        }
        None => d,
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    fn info(not_before: i64, not_after: i64) -> CertInfo {
        CertInfo {
            dns_names: vec!["a.example".to_owned()],
            ip_addresses: Vec::new(),
            serial: "01".into(),
            not_before,
            not_after,
            spki: Vec::new(),
            ari_id: None,
        }
    }

    #[test]
    fn backoff_is_capped_by_the_time_left() {
        const D: i64 = 86_400;
        let i = info(0, 6 * D);
        let (min, max) = (Duration::from_secs(60), Duration::from_secs(6 * 3600));
        // A day left: at most 3 hours between tries, not 6.
        let now = UnixTime::from_secs(5 * D);
        for failures in 1..20 {
            let d = capped_backoff(failures, min, max, Some(&i), now);
            assert!(d <= Duration::from_secs(3 * 3600), "{d:?}");
        }
        // Plenty left: the configured backoff.
        let far = info(0, 90 * D);
        let d = capped_backoff(20, min, max, Some(&far), UnixTime::from_secs(D));
        assert!(d >= Duration::from_secs(3 * 3600), "{d:?}");
    }
}
