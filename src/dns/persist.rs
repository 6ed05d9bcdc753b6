//! dns-persist-01 (draft-ietf-acme-dns-persist): one standing TXT record at
//! `_validation-persist.<name>` that lets one account of one CA validate
//! the name for as long as the record stays, with no DNS write per order.
//!
//! The record's value is an RFC 8659 issue-value: the CA's issuer domain
//! name, then `; tag=value` parameters: `accounturi=` (mandatory, the
//! account URL), `policy=wildcard` (needed for a wildcard authorization)
//! and an optional `persistUntil=` (Unix seconds). [`PersistExpect::check`]
//! accepts exactly what Pebble's validator accepts, so certd does not ask
//! the CA to validate a record the CA will refuse.

use crate::clock::UnixTime;

/// The label before the name that dns-persist-01 records live under.
pub(crate) const PERSIST_LABEL: &str = "_validation-persist";

/// The record name for `identifier`: a wildcard's `*.` goes (the CA looks
/// at the base name and asks for `policy=wildcard`).
pub(crate) fn persist_record(identifier: &str) -> String {
    let base = identifier.strip_prefix("*.").unwrap_or(identifier);
    format!("{PERSIST_LABEL}.{}", base.trim_end_matches('.'))
}

/// What a visible record must say for the CA to accept it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PersistExpect {
    /// The CA's issuer domain names (the challenge's `issuer-domain-names`,
    /// or the directory's `caaIdentities`); the record names one of them.
    pub issuers: Vec<String>,
    /// The account URL, which `accounturi=` must equal.
    pub account_uri: String,
    /// A wildcard authorization needs `policy=wildcard`.
    pub wildcard: bool,
}

impl PersistExpect {
    /// The TXT value to publish: the first issuer, the account, and the
    /// wildcard policy where needed.
    pub(crate) fn record_value(&self) -> String {
        let issuer = self.issuers.first().map_or("", String::as_str);
        let mut v = format!("{issuer}; accounturi={}", self.account_uri);
        if self.wildcard {
            v.push_str("; policy=wildcard");
        }
        v
    }

    /// Whether one of `values` (the TXT values at the record) authorizes
    /// this account; `Err` says why none does.
    /// `now` is when the values were read (`persistUntil` is compared).
    pub(crate) fn check(&self, values: &[String], now: UnixTime) -> Result<(), String> {
        let now = u64::try_from(now.secs()).unwrap_or(0);
        let mut why = Vec::new();
        for value in values {
            let mut parts = value.split(';');
            let issuer = parts.next().map_or("", trim_wsp);
            if !self.issuers.iter().any(|i| i == issuer) {
                continue;
            }
            match parse_params(parts) {
                Err(e) => why.push(format!("{issuer:?}: {e}")),
                Ok(p) => match self.mismatch(&p, now) {
                    None => return Ok(()),
                    Some(e) => why.push(format!("{issuer:?}: {e}")),
                },
            }
        }
        Err(if why.is_empty() {
            format!(
                "no TXT record names the issuer {}",
                self.issuers.join(" or ")
            )
        } else {
            why.join("; ")
        })
    }

    fn mismatch(&self, p: &Params, now: u64) -> Option<String> {
        match &p.account_uri {
            None => return Some("no accounturi".into()),
            Some(a) if *a != self.account_uri => {
                return Some(format!("accounturi is {a}, not {}", self.account_uri));
            }
            Some(_) => {}
        }
        if self.wildcard && !p.wildcard {
            return Some("no policy=wildcard, which a wildcard name needs".into());
        }
        if let Some(until) = p.persist_until
            && now > until
        {
            return Some(format!("persistUntil={until} has passed"));
        }
        None
    }
}

/// The parameters certd reads from a record value.
#[derive(Debug, Default)]
struct Params {
    account_uri: Option<String>,
    wildcard: bool,
    persist_until: Option<u64>,
}

/// RFC 8659 parameters: `tag=value`, tags case-insensitive and unique,
/// values of printable ASCII without `;` or spaces.
fn parse_params<'a>(parts: impl Iterator<Item = &'a str>) -> Result<Params, String> {
    let mut p = Params::default();
    let mut seen = Vec::new();
    for raw in parts {
        let param = trim_wsp(raw);
        let Some((tag, value)) = param.split_once('=') else {
            return Err(format!("malformed parameter {param:?}"));
        };
        let (tag, value) = (trim_wsp(tag).to_ascii_lowercase(), trim_wsp(value));
        if tag.is_empty() || seen.contains(&tag) {
            return Err(format!("empty or repeated tag in {param:?}"));
        }
        if !value
            .bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && b != b';')
        {
            return Err(format!("malformed value in {param:?}"));
        }
        match tag.as_str() {
            "accounturi" if value.is_empty() => return Err("empty accounturi".into()),
            "accounturi" => p.account_uri = Some(value.to_owned()),
            "policy" => p.wildcard = value.eq_ignore_ascii_case("wildcard"),
            "persistuntil" => {
                p.persist_until = Some(
                    value
                        .parse()
                        .map_err(|_| format!("malformed persistUntil {value:?}"))?,
                );
            }
            _ => {}
        }
        seen.push(tag);
    }
    Ok(p)
}

/// The `issuer-domain-names` of the challenge at `challenge_url` in an
/// authorization object; empty when absent or unreadable (the solver then
/// says the CA named no issuer).
pub(crate) fn issuers_in_authz(authz: &[u8], challenge_url: &str) -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct Authz {
        #[serde(default)]
        challenges: Vec<Challenge>,
    }
    #[derive(serde::Deserialize)]
    struct Challenge {
        #[serde(default)]
        url: String,
        #[serde(default, rename = "issuer-domain-names")]
        issuers: Vec<String>,
    }
    serde_json::from_slice::<Authz>(authz)
        .map(|a| {
            a.challenges
                .into_iter()
                .find(|c| c.url == challenge_url)
                .map(|c| c.issuers)
                .unwrap_or_default()
        })
        .unwrap_or_default()
}

/// RFC 8659 whitespace is space and tab only.
fn trim_wsp(s: &str) -> &str {
    s.trim_matches([' ', '\t'])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Clock;

    fn expect(wildcard: bool) -> PersistExpect {
        PersistExpect {
            issuers: vec!["ca.example".into(), "ca2.example".into()],
            account_uri: "https://ca.example/acct/1".into(),
            wildcard,
        }
    }

    #[test]
    fn record_name_and_value() {
        assert_eq!(
            persist_record("*.w.example"),
            "_validation-persist.w.example"
        );
        assert_eq!(
            persist_record("a.example."),
            "_validation-persist.a.example"
        );
        assert_eq!(
            expect(false).record_value(),
            "ca.example; accounturi=https://ca.example/acct/1"
        );
        assert_eq!(
            expect(true).record_value(),
            "ca.example; accounturi=https://ca.example/acct/1; policy=wildcard"
        );
        // What certd prints, it accepts.
        for w in [false, true] {
            let e = expect(w);
            e.check(&[e.record_value()], Clock::system().now())
                .expect("own value");
        }
    }

    /// Pebble 2.10 sends dns-persist-01 without a token in every
    /// authorization: instant-acme must still parse it, and the issuers
    /// are read from the raw object.
    #[test]
    fn a_tokenless_challenge_parses_and_names_its_issuers() {
        let authz = r#"{"status":"pending","expires":"2030-01-01T00:00:00Z",
            "identifier":{"type":"dns","value":"a.example"},
            "challenges":[
              {"type":"dns-persist-01","url":"https://ca/c/1","status":"pending",
               "issuer-domain-names":["ca.example"],"accounturi":"https://ca/acct/1"},
              {"type":"http-01","url":"https://ca/c/2","status":"pending","token":"abc"}]}"#;
        let state: instant_acme::AuthorizationState = serde_json::from_str(authz).expect("parses");
        assert_eq!(
            state.challenges[0].r#type,
            instant_acme::ChallengeType::Unknown("dns-persist-01".into())
        );
        assert!(state.challenges[0].token.is_empty());
        assert_eq!(
            state.challenges[1].r#type,
            instant_acme::ChallengeType::Http01
        );
        assert_eq!(
            issuers_in_authz(authz.as_bytes(), "https://ca/c/1"),
            ["ca.example"]
        );
        assert!(issuers_in_authz(authz.as_bytes(), "https://ca/c/2").is_empty());
        assert!(issuers_in_authz(b"not json", "https://ca/c/1").is_empty());
    }

    #[test]
    fn accepts_what_the_ca_accepts() {
        let e = expect(true);
        let ok = [
            " ca2.example ;AccountURI=https://ca.example/acct/1;\tpolicy=WILDCARD ",
            "ca.example; accounturi=https://ca.example/acct/1; policy=wildcard; persistUntil=99999999999",
            "ca.example; accounturi=https://ca.example/acct/1; policy=wildcard; future=x",
        ];
        for v in ok {
            e.check(&[v.to_owned()], Clock::system().now())
                .unwrap_or_else(|why| panic!("{v}: {why}"));
        }
        let bad = [
            (
                "other.example; accounturi=https://ca.example/acct/1",
                "no TXT record names",
            ),
            (
                "ca.example; accounturi=https://ca.example/acct/2; policy=wildcard",
                "not https://ca.example/acct/1",
            ),
            (
                "ca.example; accounturi=https://ca.example/acct/1",
                "policy=wildcard",
            ),
            ("ca.example; policy=wildcard", "no accounturi"),
            (
                "ca.example; accounturi=https://ca.example/acct/1; policy=wildcard;",
                "malformed parameter",
            ),
            (
                "ca.example; accounturi=a; accounturi=https://ca.example/acct/1",
                "repeated",
            ),
            (
                "ca.example; accounturi=https://ca.example/acct/1; policy=wildcard; persistUntil=1",
                "has passed",
            ),
        ];
        for (v, needle) in bad {
            let why = e
                .check(&[v.to_owned()], Clock::system().now())
                .expect_err(v);
            assert!(why.contains(needle), "{v}: {why}");
        }
        // One good record among others is enough.
        e.check(
            &[bad[0].0.to_owned(), ok[0].to_owned()],
            Clock::system().now(),
        )
        .expect("one good value");
        // A non-wildcard name needs no policy.
        expect(false)
            .check(
                &["ca.example; accounturi=https://ca.example/acct/1".into()],
                Clock::system().now(),
            )
            .expect("no policy needed");
    }
}
