//! When to renew without ARI: a fixed fraction of the certificate's
//! lifetime before it ends, more for short-lived certificates.

use crate::clock::UnixTime;

/// Lifetimes shorter than this renew at half their lifetime.
const SHORT_LIFETIME: i64 = 10 * 86_400;

/// When a certificate with this validity should be renewed without ARI:
/// when the `remaining` fraction (`[daemon] renew_remaining`) of its
/// lifetime is left, or half of it for lifetimes under 10 days, where a
/// third (two days of a six-day certificate) leaves too few retries.
pub(crate) fn renewal_time(not_before: i64, not_after: i64, remaining: f64) -> UnixTime {
    let lifetime = (not_after - not_before).max(0);
    let remaining = if lifetime < SHORT_LIFETIME {
        remaining.max(0.5)
    } else {
        remaining
    };
    UnixTime::from_secs(not_after - (lifetime as f64 * remaining) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_at_two_thirds() {
        let day = 86_400;
        assert_eq!(renewal_time(0, 90 * day, 1.0 / 3.0).secs(), 60 * day);
        assert_eq!(
            renewal_time(0, 10 * day, 1.0 / 3.0).secs(),
            10 * day - 10 * day / 3
        );
        // Under 10 days: half the lifetime, unless more was asked for.
        assert_eq!(renewal_time(0, 6 * day, 1.0 / 3.0).secs(), 3 * day);
        assert_eq!(renewal_time(0, 6 * day, 0.75).secs(), 6 * day / 4);
    }
}
