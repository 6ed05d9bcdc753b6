//! The propagation check: before the CA is asked to validate a dns-01
//! challenge, poll until the TXT value is visible at every server that
//! answers for the zone.
//!
//! A CA resolves the record once, through the zone's authoritative servers;
//! a value the secondaries have not picked up yet means a failed
//! validation, which costs failure budget (seed 003). A failed check costs
//! nothing: the driver keeps the authorization pending and resumes it.
//!
//! Which servers: `nameservers` when the operator lists them (split
//! horizon, tests); otherwise the zone's NS records, resolved, on port 53.
//! With dynamic update the zone and its primary are known, so the NS
//! records come from the primary, which is always checked too; with a hook
//! the zone is found through the system's resolvers (`/etc/resolv.conf`).
//!
//! A record name that is a CNAME (delegation to a zone certd may update,
//! as with acme-dns) is followed first ([`PropagationCheck::follow_cnames`]):
//! the CA follows it too, and the servers of the original zone answer only
//! with the CNAME.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::time::Instant;

use super::persist::PersistExpect;
use super::{
    DnsError, QUERY_TIMEOUT, cname_target, display_name, fqdn, query, resolve, soa_owner,
    txt_values,
};
use crate::clock::{Clock, UnixTime};
use crate::config::{PropagationConfig, ServerAddr};

/// First pause between polls; doubles up to `POLL_CAP`. Short, because a
/// primary usually has the record at once and a secondary within seconds.
const POLL_START: Duration = Duration::from_millis(250);
const POLL_CAP: Duration = Duration::from_secs(8);

/// Where the resolvers are when the zone must be found by recursion.
const RESOLV_CONF: &str = "/etc/resolv.conf";

/// CNAMEs followed from a record name before giving up (a loop, or a
/// chain no CA would follow either).
const MAX_CNAME_HOPS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum PropagationError {
    #[error("cannot find the servers to check: {0}")]
    Discover(String),
    #[error("cannot follow the CNAME at {record}: {detail}")]
    Cname { record: String, detail: String },
    #[error(
        "TXT value {value:?} not visible after {}s at {missing}",
        .waited.as_secs()
    )]
    NotVisible {
        value: String,
        waited: Duration,
        /// Each server still lacking the value, with what it last said.
        missing: String,
    },
}

/// The known facts about the zone, where the solver has them.
#[derive(Debug, Clone)]
pub(crate) struct ZoneHint {
    pub zone: Name,
    /// The primary that took the update: always checked, and asked for the
    /// zone's NS records.
    pub primary: SocketAddr,
}

/// What the check waits to see among the TXT values at a record.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Expect<'a> {
    /// dns-01: this value.
    Value(&'a str),
    /// dns-persist-01: a value that authorizes the account.
    Persist(&'a PersistExpect),
}

impl Expect<'_> {
    /// The value as messages show it.
    fn shown(&self) -> String {
        match self {
            Self::Value(v) => (*v).to_owned(),
            Self::Persist(p) => p.record_value(),
        }
    }

    fn check(&self, values: &[String], now: UnixTime) -> Result<(), String> {
        match self {
            Self::Value(v) if values.iter().any(|x| x == v) => Ok(()),
            Self::Value(_) if values.is_empty() => Err("no TXT record".into()),
            Self::Value(_) => Err(format!("{} other TXT value(s)", values.len())),
            Self::Persist(_) if values.is_empty() => Err("no TXT record".into()),
            Self::Persist(p) => p.check(values, now),
        }
    }
}

/// Whether a CNAME chase got an answer for its last name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chase {
    Answered,
    Unanswered,
}

/// The check as configured.
#[derive(Debug, Clone)]
pub(crate) struct PropagationCheck {
    cfg: PropagationConfig,
    /// When an answer was read, for records that expire.
    clock: Clock,
}

impl PropagationCheck {
    pub(crate) fn new(cfg: &PropagationConfig, clock: Clock) -> Self {
        Self {
            cfg: cfg.clone(),
            clock,
        }
    }

    /// The same servers, checked even where dns-01's check is switched off
    /// (dns-persist-01 has no other safeguard), for at most `timeout`.
    pub(crate) fn always(cfg: &PropagationConfig, timeout: Duration, clock: Clock) -> Self {
        Self {
            cfg: PropagationConfig {
                enabled: true,
                timeout: cfg.timeout.min(timeout),
                ..cfg.clone()
            },
            clock,
        }
    }

    /// The end of the CNAME chain starting at `record`: where the TXT
    /// record must be written and looked for (RFC 2136 §3.4.2.2: a TXT
    /// record next to a CNAME is ignored). Asked of `primary` (with
    /// dynamic update) and the configured `nameservers` without recursion,
    /// else of the system's resolvers with it. Where no server answers,
    /// the name reached so far is used, as before CNAMEs were followed
    /// (an offline hook setup keeps working); a loop is an error.
    pub(crate) async fn follow_cnames(
        &self,
        record: &str,
        primary: Option<SocketAddr>,
    ) -> Result<Name, PropagationError> {
        self.chase(record, primary).await.map(|(name, _)| name)
    }

    /// Checks, for alias mode, that the CNAME chain at `original` (what
    /// the CA asks for) leads to `target` (where certd writes), so that a
    /// forgotten CNAME fails here and not at the CA, where it costs a
    /// failed validation. Where no server answers, nothing can be told
    /// and the check passes.
    pub(crate) async fn check_alias(
        &self,
        original: &str,
        target: &Name,
        primary: Option<SocketAddr>,
    ) -> Result<(), PropagationError> {
        match self.chase(original, primary).await? {
            (end, Chase::Answered) if end != *target => Err(PropagationError::Cname {
                record: original.to_owned(),
                detail: format!(
                    "it leads to {}, not to the dns_alias target; publish `{original}. CNAME {}.`",
                    display_name(&end),
                    display_name(target)
                ),
            }),
            _ => Ok(()),
        }
    }

    /// Follows the chain at `record`: its end, and whether a server
    /// answered for it.
    async fn chase(
        &self,
        record: &str,
        primary: Option<SocketAddr>,
    ) -> Result<(Name, Chase), PropagationError> {
        let err = |detail: String| PropagationError::Cname {
            record: record.to_owned(),
            detail,
        };
        let start = fqdn(record).map_err(|e| err(e.to_string()))?;
        let mut asked: Vec<(SocketAddr, bool)> = primary.map(|p| (p, false)).into_iter().collect();
        if self.cfg.nameservers.is_empty() {
            match system_resolvers() {
                Ok(r) => asked.extend(r.into_iter().map(|r| (r, true))),
                Err(e) => tracing::debug!(error = %e, "no resolvers to follow CNAMEs with"),
            }
        } else {
            for ns in &self.cfg.nameservers {
                match resolve(ns).await {
                    Ok(addrs) => asked.extend(addrs.into_iter().map(|a| (a, false))),
                    Err(e) => tracing::debug!(error = %e, "nameserver unresolvable"),
                }
            }
        }
        let mut name = start.clone();
        let mut seen = vec![start];
        for _ in 0..MAX_CNAME_HOPS {
            match cname_at(&name, &asked).await {
                Ok(None) => return Ok((name, Chase::Answered)),
                Err(why) => {
                    tracing::warn!(
                        record = %display_name(&name),
                        %why,
                        "cannot tell whether the record name is a CNAME; using it as it is"
                    );
                    return Ok((name, Chase::Unanswered));
                }
                Ok(Some(target)) if seen.contains(&target) => {
                    return Err(err(format!("the chain loops at {}", display_name(&target))));
                }
                Ok(Some(target)) => {
                    tracing::debug!(from = %name, to = %target, "following CNAME");
                    seen.push(target.clone());
                    name = target;
                }
            }
        }
        Err(err(format!("more than {MAX_CNAME_HOPS} CNAMEs in a row")))
    }

    /// Waits until the TXT values at `record` show what `expect` asks on
    /// every server that answers for its zone, or fails after the
    /// configured timeout, naming the servers still lacking it. `record`
    /// is the end of its CNAME chain ([`Self::follow_cnames`]).
    pub(crate) async fn wait(
        &self,
        record: &str,
        expect: Expect<'_>,
        hint: Option<&ZoneHint>,
    ) -> Result<(), PropagationError> {
        if !self.cfg.enabled {
            return Ok(());
        }
        let start = Instant::now();
        let deadline = start + self.cfg.timeout;
        let name = fqdn(record).map_err(|e| PropagationError::Discover(e.to_string()))?;
        let mut pending: Vec<(SocketAddr, String)> = self
            .servers(&name, hint)
            .await
            .map_err(PropagationError::Discover)?
            .into_iter()
            .map(|s| (s, "not asked yet".to_owned()))
            .collect();
        let mut backoff = Backoff::new(POLL_START, POLL_CAP);
        loop {
            // A server that has shown the value keeps it; only the others
            // are asked again.
            let mut still = Vec::with_capacity(pending.len());
            for (server, _) in pending {
                let left = deadline.saturating_duration_since(Instant::now());
                let timeout = QUERY_TIMEOUT.min(left).max(Duration::from_millis(500));
                match check(server, &name, expect, timeout, &self.clock).await {
                    Ok(()) => {}
                    Err(why) => still.push((server, why)),
                }
            }
            pending = still;
            if pending.is_empty() {
                tracing::debug!(record, elapsed = ?start.elapsed(), "record visible");
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                let missing = pending
                    .iter()
                    .map(|(s, why)| format!("{s} ({why})"))
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(PropagationError::NotVisible {
                    value: expect.shown(),
                    waited: self.cfg.timeout,
                    missing,
                });
            }
            let pause = backoff.next_delay().min(deadline - now);
            tracing::debug!(
                record,
                ?pause,
                waiting_for = pending.len(),
                "record not visible yet"
            );
            tokio::time::sleep(pause).await;
        }
    }

    /// The servers to ask, without duplicates.
    async fn servers(
        &self,
        name: &Name,
        hint: Option<&ZoneHint>,
    ) -> Result<Vec<SocketAddr>, String> {
        let mut out = Vec::new();
        if let Some(h) = hint {
            out.push(h.primary);
        }
        if self.cfg.nameservers.is_empty() {
            let (zone, asked, recursion) = match hint {
                Some(h) => (h.zone.clone(), vec![h.primary], false),
                None => {
                    let resolvers = system_resolvers()?;
                    (find_zone(name, &resolvers).await?, resolvers, true)
                }
            };
            out.extend(zone_servers(&zone, &asked, recursion).await?);
        } else {
            for ns in &self.cfg.nameservers {
                out.extend(resolve(ns).await.map_err(|e| e.to_string())?);
            }
        }
        let mut seen = std::collections::HashSet::new();
        out.retain(|a| seen.insert(*a));
        Ok(out)
    }
}

/// One question to one server: do the TXT values at `name` show what
/// `expect` asks? `Err` says what the server answered instead.
async fn check(
    server: SocketAddr,
    name: &Name,
    expect: Expect<'_>,
    timeout: Duration,
    clock: &Clock,
) -> Result<(), String> {
    let msg = query(server, name, RecordType::TXT, false, timeout)
        .await
        .map_err(|e| e.to_string())?;
    let values = txt_values(&msg, name);
    match msg.metadata.response_code {
        ResponseCode::NoError => expect.check(&values, clock.now()),
        rcode => Err(rcode.to_string()),
    }
}

/// The CNAME target at `name`, from the first of `servers` (address,
/// recursion desired) that answers for it: `None` when it has no CNAME.
async fn cname_at(name: &Name, servers: &[(SocketAddr, bool)]) -> Result<Option<Name>, String> {
    let mut last = String::from("no server to ask; set dns01.nameservers");
    for (server, recursion) in servers {
        match query(*server, name, RecordType::CNAME, *recursion, QUERY_TIMEOUT).await {
            Ok(msg)
                if matches!(
                    msg.metadata.response_code,
                    ResponseCode::NoError | ResponseCode::NXDomain
                ) =>
            {
                return Ok(cname_target(&msg, name));
            }
            Ok(msg) => last = format!("{server} answered {}", msg.metadata.response_code),
            Err(e) => last = format!("{server}: {e}"),
        }
    }
    Err(last)
}

/// The zone `name` is in, asked of recursive resolvers.
async fn find_zone(name: &Name, resolvers: &[SocketAddr]) -> Result<Name, String> {
    let mut last = String::from("no resolvers");
    for r in resolvers {
        match query(*r, name, RecordType::SOA, true, QUERY_TIMEOUT).await {
            Ok(msg) => match soa_owner(&msg) {
                Some(zone) => return Ok(zone),
                None => {
                    last = format!("{r} answered {} without an SOA", msg.metadata.response_code);
                }
            },
            Err(e) => last = format!("{r}: {e}"),
        }
    }
    Err(format!(
        "the zone of {} ({last}); set dns01.nameservers",
        display_name(name)
    ))
}

/// The addresses of `zone`'s name servers, asking `servers` in turn for
/// the NS records and using glue where the answer carries it.
async fn zone_servers(
    zone: &Name,
    servers: &[SocketAddr],
    recursion: bool,
) -> Result<Vec<SocketAddr>, String> {
    let mut last = String::from("no server to ask");
    for s in servers {
        let msg = match query(*s, zone, RecordType::NS, recursion, QUERY_TIMEOUT).await {
            Ok(m) => m,
            Err(e) => {
                last = format!("{s}: {e}");
                continue;
            }
        };
        let (names, glue) = ns_targets(&msg, zone);
        if names.is_empty() {
            last = format!(
                "{s} answered {} without NS records",
                msg.metadata.response_code
            );
            continue;
        }
        let mut out = Vec::new();
        for ns in names {
            let glued: Vec<IpAddr> = glue
                .iter()
                .filter(|(n, _)| *n == ns)
                .map(|(_, ip)| *ip)
                .collect();
            if glued.is_empty() {
                let host = ServerAddr {
                    host: display_name(&ns),
                    port: 53,
                };
                out.extend(resolve(&host).await.map_err(|e: DnsError| e.to_string())?);
            } else {
                out.extend(glued.into_iter().map(|ip| SocketAddr::new(ip, 53)));
            }
        }
        return Ok(out);
    }
    Err(format!(
        "the name servers of {} ({last}); set dns01.nameservers",
        display_name(zone)
    ))
}

/// The NS names of `zone` in a response, and the addresses (glue) the
/// additional section gives for any of them.
fn ns_targets(msg: &Message, zone: &Name) -> (Vec<Name>, Vec<(Name, IpAddr)>) {
    let names = msg
        .answers
        .iter()
        .filter(|r| r.name == *zone)
        .filter_map(|r| match &r.data {
            RData::NS(ns) => Some(ns.0.clone()),
            _ => None,
        })
        .collect();
    let glue = msg
        .additionals
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some((r.name.clone(), IpAddr::V4(a.0))),
            RData::AAAA(a) => Some((r.name.clone(), IpAddr::V6(a.0))),
            _ => None,
        })
        .collect();
    (names, glue)
}

fn system_resolvers() -> Result<Vec<SocketAddr>, String> {
    let text = std::fs::read_to_string(RESOLV_CONF).map_err(|e| format!("{RESOLV_CONF}: {e}"))?;
    let found = parse_resolv_conf(&text);
    if found.is_empty() {
        return Err(format!(
            "{RESOLV_CONF} names no nameserver; set dns01.nameservers"
        ));
    }
    Ok(found)
}

/// The `nameserver` lines of a resolv.conf, on port 53. Link-local IPv6
/// addresses with a zone (`fe80::1%eth0`) are skipped.
fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
                .and_then(|ip| ip.parse::<IpAddr>().ok())
                .map(|ip| SocketAddr::new(ip, 53))
        })
        .collect()
}

/// Pauses between polls: `start`, doubling to `cap`.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    next: Duration,
    cap: Duration,
}

impl Backoff {
    pub(crate) fn new(start: Duration, cap: Duration) -> Self {
        Self {
            next: start.min(cap),
            cap,
        }
    }

    pub(crate) fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.cap);
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::Record;
    use hickory_proto::rr::rdata::{A, NS};

    #[test]
    fn backoff_doubles_to_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(250), Duration::from_secs(2));
        let got: Vec<u128> = (0..6).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(got, [250, 500, 1000, 2000, 2000, 2000]);
        let mut b = Backoff::new(Duration::from_secs(5), Duration::from_secs(1));
        assert_eq!(b.next_delay(), Duration::from_secs(1));
    }

    #[test]
    fn resolv_conf_nameservers() {
        let text = "# comment\nsearch example.com\nnameserver 192.0.2.1\nnameserver  2001:db8::1\nnameserver fe80::1%eth0\noptions ndots:2\nnameserver\n";
        assert_eq!(
            parse_resolv_conf(text),
            [
                "192.0.2.1:53".parse::<SocketAddr>().expect("addr"),
                "[2001:db8::1]:53".parse().expect("addr"),
            ]
        );
    }

    #[test]
    fn ns_names_and_glue() {
        let zone = fqdn("example.test").expect("zone");
        let ns1 = fqdn("ns1.example.test").expect("ns1");
        let ns2 = fqdn("ns.elsewhere.test").expect("ns2");
        let mut msg = Message::query();
        for ns in [&ns1, &ns2] {
            msg.add_answer(Record::from_rdata(
                zone.clone(),
                60,
                RData::NS(NS(ns.clone())),
            ));
        }
        msg.add_additional(Record::from_rdata(
            ns1.clone(),
            60,
            RData::A(A("192.0.2.7".parse().expect("ip"))),
        ));
        let (names, glue) = ns_targets(&msg, &zone);
        assert_eq!(names, [ns1.clone(), ns2]);
        assert_eq!(glue, [(ns1, "192.0.2.7".parse::<IpAddr>().expect("ip"))]);
    }

    #[tokio::test]
    async fn disabled_check_passes_at_once() {
        let check = PropagationCheck::new(
            &PropagationConfig {
                enabled: false,
                ..PropagationConfig::default()
            },
            Clock::system(),
        );
        check
            .wait("_acme-challenge.a.invalid", Expect::Value("v"), None)
            .await
            .expect("skipped");
    }

    #[tokio::test]
    async fn silent_server_fails_within_the_timeout() {
        // A bound UDP socket that never answers.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let addr = silent.local_addr().expect("addr");
        let check = PropagationCheck::new(
            &PropagationConfig {
                enabled: true,
                timeout: Duration::from_secs(1),
                nameservers: vec![ServerAddr {
                    host: "127.0.0.1".into(),
                    port: addr.port(),
                }],
            },
            Clock::system(),
        );
        let started = std::time::Instant::now();
        let err = check
            .wait("_acme-challenge.a.example.test", Expect::Value("v"), None)
            .await
            .expect_err("nobody answers");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
        let text = err.to_string();
        assert!(
            text.contains(&addr.to_string()) && text.contains("no answer"),
            "{text}"
        );
    }
}
