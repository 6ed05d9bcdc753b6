//! Which CA a certificate's next order goes to: a pure function of the
//! certificate's list of CAs, `sticky`, the CA that issued the installed
//! certificate, and what certd knows of each CA (unreachable since when,
//! rate-limited until when, identifiers paused, profiles offered).
//!
//! The list is tried in order, starting at the issuer when the certificate
//! is sticky. A CA is skipped, with the reason, when it cannot issue soon:
//! unreachable (or answering 5xx) for longer than `ca_fallback_after`, a
//! rate limit that ends after the certificate's safe renewal deadline, an
//! identifier it paused, or a profile the certificate needs that its
//! directory does not list (IP identifiers need `shortlived`). A
//! validation failure is never a reason: it is the operator's to fix, and
//! another CA would fail the same way.
//!
//! When every CA is skipped the first is tried anyway: a renewal that waits
//! for nothing is worse than one that may fail.

use std::fmt;
use std::time::Duration;

use crate::clock::{UnixTime, rfc3339};
use crate::config::CaName;

/// What certd knows of one CA, as far as the choice is concerned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct CaFacts {
    /// The first failure (unreachable, 5xx) of the current streak.
    pub(crate) failing_since: Option<UnixTime>,
    /// No new order before this (the CA's `Retry-After`).
    pub(crate) rate_limited_until: Option<UnixTime>,
    /// The CA paused one of the certificate's identifiers.
    pub(crate) paused: bool,
    /// The profiles its directory lists; `None` until the directory is read.
    pub(crate) profiles: Option<Vec<String>>,
}

/// What the certificate asks of the choice.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Wants<'a> {
    /// Its CAs, in order of preference.
    pub(crate) cas: &'a [CaName],
    pub(crate) sticky: bool,
    /// The CA that issued the installed certificate.
    pub(crate) issuer: Option<&'a CaName>,
    pub(crate) fallback_after: Duration,
    /// When it must be renewed at the latest (now when none is installed).
    pub(crate) deadline: UnixTime,
    /// An IP address is among its identifiers.
    pub(crate) has_ip: bool,
    /// The profiles it requires, one of them (empty: none required).
    pub(crate) required_profiles: &'a [String],
}

/// Why a CA was passed over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Skip {
    Unreachable { since: UnixTime },
    RateLimited { until: UnixTime },
    Paused,
    NoShortlived,
    NoProfile { wanted: Vec<String> },
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unreachable { since } => {
                write!(f, "unreachable since {}", rfc3339(since.secs()))
            }
            Self::RateLimited { until } => write!(
                f,
                "rate-limited until {}, after the renewal deadline",
                rfc3339(until.secs())
            ),
            Self::Paused => f.write_str("an identifier is paused at this CA"),
            Self::NoShortlived => f.write_str(
                "IP identifiers need the shortlived profile, which this CA does not offer",
            ),
            Self::NoProfile { wanted } => write!(
                f,
                "it offers none of the required profiles ({})",
                wanted.join(", ")
            ),
        }
    }
}

/// The outcome of [`choose`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Choice<'a> {
    /// The CA to try now; `None` only for an empty list.
    pub(crate) ca: Option<&'a CaName>,
    /// The CAs passed over before it, and why.
    pub(crate) skipped: Vec<(&'a CaName, Skip)>,
}

/// The order the CAs are tried in: the list, or the issuer first when
/// the certificate is sticky and the issuer is still in its list.
pub(crate) fn order<'a>(wants: &Wants<'a>) -> Vec<&'a CaName> {
    let mut out: Vec<&CaName> = wants.cas.iter().collect();
    if wants.sticky
        && let Some(issuer) = wants.issuer
        && let Some(i) = out.iter().position(|c| *c == issuer)
    {
        let first = out.remove(i);
        out.insert(0, first);
    }
    out
}

/// Why `ca` cannot issue soon, if it cannot.
pub(crate) fn skip(wants: &Wants<'_>, facts: &CaFacts, now: UnixTime) -> Option<Skip> {
    if let Some(since) = facts.failing_since
        && since.plus(wants.fallback_after) <= now
    {
        return Some(Skip::Unreachable { since });
    }
    if facts.paused {
        return Some(Skip::Paused);
    }
    if let Some(until) = facts.rate_limited_until
        && until > now
        && until > wants.deadline
    {
        return Some(Skip::RateLimited { until });
    }
    if let Some(profiles) = &facts.profiles {
        if wants.has_ip && !profiles.iter().any(|p| p == "shortlived") {
            return Some(Skip::NoShortlived);
        }
        if !wants.required_profiles.is_empty()
            && !wants.required_profiles.iter().any(|w| profiles.contains(w))
        {
            return Some(Skip::NoProfile {
                wanted: wants.required_profiles.to_vec(),
            });
        }
    }
    None
}

/// The CA to try now, after `tried` (CAs this round already failed at),
/// and the ones passed over on the way.
pub(crate) fn choose<'a>(
    wants: &Wants<'a>,
    facts: impl Fn(&CaName) -> CaFacts,
    tried: &[&CaName],
    now: UnixTime,
) -> Choice<'a> {
    let order = order(wants);
    let mut skipped = Vec::new();
    for ca in order.iter().copied().filter(|c| !tried.contains(c)) {
        match skip(wants, &facts(ca), now) {
            Some(why) => skipped.push((ca, why)),
            None => {
                return Choice {
                    ca: Some(ca),
                    skipped,
                };
            }
        }
    }
    // Everything is skipped: the first untried CA is the best bet.
    let ca = order.iter().copied().find(|c| !tried.contains(c));
    Choice { ca, skipped }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Clock;

    const HOUR: Duration = Duration::from_secs(3600);

    fn names(list: &[&str]) -> Vec<CaName> {
        list.iter().map(|n| n.parse().expect("a CA name")).collect()
    }

    fn wants<'a>(cas: &'a [CaName], now: UnixTime) -> Wants<'a> {
        Wants {
            cas,
            sticky: false,
            issuer: None,
            fallback_after: HOUR,
            deadline: now.plus(Duration::from_secs(20 * 86400)),
            has_ip: false,
            required_profiles: &[],
        }
    }

    fn pick<'a>(
        w: &Wants<'a>,
        facts: &[(&str, CaFacts)],
        tried: &[&CaName],
        now: UnixTime,
    ) -> Choice<'a> {
        choose(
            w,
            |n| {
                facts
                    .iter()
                    .find(|(f, _)| *f == n.as_str())
                    .map(|(_, f)| f.clone())
                    .unwrap_or_default()
            },
            tried,
            now,
        )
    }

    fn clock() -> Clock {
        Clock::fixed(UnixTime::from_secs(1_800_000_000))
    }

    #[test]
    fn the_first_ca_is_tried_when_nothing_is_known() {
        let now = clock().now();
        let cas = names(&["le", "zerossl"]);
        let c = pick(&wants(&cas, now), &[], &[], now);
        assert_eq!(c.ca.map(CaName::as_str), Some("le"));
        assert!(c.skipped.is_empty());
    }

    #[test]
    fn unreachable_falls_back_only_after_ca_fallback_after() {
        let clock = clock();
        let start = clock.now();
        let cas = names(&["le", "zerossl"]);
        let down = CaFacts {
            failing_since: Some(start),
            ..CaFacts::default()
        };
        clock.advance(Duration::from_secs(3599));
        let now = clock.now();
        let c = pick(&wants(&cas, now), &[("le", down.clone())], &[], now);
        assert_eq!(c.ca.map(CaName::as_str), Some("le"), "not yet");
        clock.advance(Duration::from_secs(1));
        let now = clock.now();
        let c = pick(&wants(&cas, now), &[("le", down)], &[], now);
        assert_eq!(c.ca.map(CaName::as_str), Some("zerossl"));
        assert_eq!(
            c.skipped,
            vec![(&cas[0], Skip::Unreachable { since: start })]
        );
    }

    #[test]
    fn a_rate_limit_falls_back_only_when_it_ends_after_the_deadline() {
        let now = clock().now();
        let cas = names(&["le", "zerossl"]);
        let w = wants(&cas, now);
        let soon = CaFacts {
            rate_limited_until: Some(now.plus(HOUR)),
            ..CaFacts::default()
        };
        assert_eq!(pick(&w, &[("le", soon)], &[], now).ca, Some(&cas[0]));
        let late = w.deadline.plus(HOUR);
        let long = CaFacts {
            rate_limited_until: Some(late),
            ..CaFacts::default()
        };
        let c = pick(&w, &[("le", long)], &[], now);
        assert_eq!(c.ca, Some(&cas[1]));
        assert_eq!(c.skipped[0].1, Skip::RateLimited { until: late });
    }

    #[test]
    fn a_paused_identifier_falls_back() {
        let now = clock().now();
        let cas = names(&["le", "zerossl"]);
        let paused = CaFacts {
            paused: true,
            ..CaFacts::default()
        };
        let c = pick(&wants(&cas, now), &[("le", paused)], &[], now);
        assert_eq!(c.ca, Some(&cas[1]));
        assert_eq!(c.skipped[0].1, Skip::Paused);
    }

    #[test]
    fn missing_capabilities_fall_back() {
        let now = clock().now();
        let cas = names(&["le", "other"]);
        let plain = CaFacts {
            profiles: Some(vec!["classic".into()]),
            ..CaFacts::default()
        };
        let mut w = wants(&cas, now);
        w.has_ip = true;
        let c = pick(&w, &[("le", plain.clone())], &[], now);
        assert_eq!(c.ca, Some(&cas[1]));
        assert_eq!(c.skipped[0].1, Skip::NoShortlived);
        let required = vec!["tlsserver".to_owned()];
        let mut w = wants(&cas, now);
        w.required_profiles = &required;
        let c = pick(&w, &[("le", plain)], &[], now);
        assert_eq!(c.ca, Some(&cas[1]));
        assert!(c.skipped[0].1.to_string().contains("tlsserver"));
    }

    #[test]
    fn sticky_starts_at_the_issuer_otherwise_the_list_does() {
        let now = clock().now();
        let cas = names(&["le", "zerossl", "buypass"]);
        let mut w = wants(&cas, now);
        w.issuer = Some(&cas[1]);
        assert_eq!(pick(&w, &[], &[], now).ca, Some(&cas[0]));
        w.sticky = true;
        assert_eq!(pick(&w, &[], &[], now).ca, Some(&cas[1]));
        assert_eq!(order(&w), vec![&cas[1], &cas[0], &cas[2]]);
        // An issuer no longer listed changes nothing.
        let gone: CaName = "gone".parse().expect("a CA name");
        w.issuer = Some(&gone);
        assert_eq!(order(&w), vec![&cas[0], &cas[1], &cas[2]]);
    }

    #[test]
    fn tried_cas_are_passed_and_all_skipped_tries_the_first_untried() {
        let now = clock().now();
        let cas = names(&["le", "zerossl"]);
        let w = wants(&cas, now);
        assert_eq!(pick(&w, &[], &[&cas[0]], now).ca, Some(&cas[1]));
        assert_eq!(pick(&w, &[], &[&cas[0], &cas[1]], now).ca, None);
        let paused = CaFacts {
            paused: true,
            ..CaFacts::default()
        };
        let c = pick(&w, &[("le", paused.clone()), ("zerossl", paused)], &[], now);
        assert_eq!(c.ca, Some(&cas[0]));
        assert_eq!(c.skipped.len(), 2);
    }
}
