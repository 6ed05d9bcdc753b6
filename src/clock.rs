//! Wall-clock time as the ledger stores it (Unix seconds) and as people and
//! JSON read it (RFC 3339).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serializer;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Seconds since the Unix epoch, UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct UnixTime(i64);

impl UnixTime {
    pub fn now() -> Self {
        Self::from_system(SystemTime::now())
    }

    pub fn from_secs(secs: i64) -> Self {
        Self(secs)
    }

    pub fn from_system(t: SystemTime) -> Self {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Self(i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
            Err(e) => Self(-i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX)),
        }
    }

    pub fn secs(self) -> i64 {
        self.0
    }

    pub fn system_time(self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(u64::try_from(self.0).unwrap_or(0))
    }

    pub fn plus(self, d: Duration) -> Self {
        Self(
            self.0
                .saturating_add(i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
        )
    }

    /// Time from now until `self`, zero if it has passed.
    pub fn until(self) -> Duration {
        Duration::from_secs(u64::try_from(self.0 - Self::now().0).unwrap_or(0))
    }

    pub fn rfc3339(self) -> String {
        rfc3339(self.0)
    }
}

/// Formats Unix seconds as RFC 3339 (`2026-11-22T04:32:35Z`).
pub fn rfc3339(secs: i64) -> String {
    OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| secs.to_string())
}

/// Parses an RFC 3339 timestamp (as ACME objects carry in `expires`).
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    OffsetDateTime::parse(s, &Rfc3339)
        .ok()
        .map(|t| t.unix_timestamp())
}

/// Serde helper: `Option<i64>` Unix seconds as an RFC 3339 string or null.
pub fn serialize_opt_rfc3339<S: Serializer>(v: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(secs) => s.serialize_str(&rfc3339(*secs)),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let s = rfc3339(1_795_000_000);
        assert_eq!(parse_rfc3339(&s), Some(1_795_000_000));
        assert!(s.ends_with('Z'));
    }
}
