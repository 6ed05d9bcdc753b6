//! DNS for dns-01: the record name a challenge lives at, a small client
//! (one query or one signed update, over UDP or TCP) built on hickory-proto's
//! message types, used by dynamic update (`solver::rfc2136`) and by the
//! propagation check here (`propagation`); and the standing records of
//! dns-persist-01 (`persist`), whose format the check verifies.
//!
//! The transport is our own rather than hickory's client crates: certd
//! needs exactly one request and one response at a time, and owning the
//! exchange is what lets every error name the server, the rcode and the
//! TSIG error instead of a generic "request failed".

pub(crate) mod persist;
pub(crate) mod propagation;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::rdata::tsig::TsigError;
use hickory_proto::rr::{Name, RData, RecordType, TSigner};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use crate::clock::UnixTime;
use crate::config::ServerAddr;

/// How long one query or update may take before it counts as lost.
pub(crate) const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// UDP answers up to this size avoid the fallback to TCP; 1232 is the
/// size the DNS community settled on to avoid IP fragmentation.
const EDNS_PAYLOAD: u16 = 1232;

/// A UDP query unanswered for this long is sent again (UDP loses packets).
const UDP_RETRANSMIT: Duration = Duration::from_secs(1);

/// The name dns-01 puts the TXT record at: `_acme-challenge.` before the
/// identifier, without a wildcard's `*.` (RFC 8555 section 8.4), so a name
/// and its wildcard share one record name.
pub(crate) fn challenge_record(identifier: &str) -> String {
    let base = identifier.strip_prefix("*.").unwrap_or(identifier);
    format!("_acme-challenge.{}", base.trim_end_matches('.'))
}

/// `name` as a fully qualified DNS name.
pub fn fqdn(name: &str) -> Result<Name, DnsError> {
    let mut n = Name::from_ascii(name.trim_end_matches('.'))
        .map_err(|e| DnsError::Name(format!("{name:?}: {e}")))?;
    n.set_fqdn(true);
    Ok(n)
}

/// A name as operators write it: no trailing dot.
pub(crate) fn display_name(name: &Name) -> String {
    name.to_ascii().trim_end_matches('.').to_owned()
}

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("no answer within {}s", .0.as_secs_f32())]
    Timeout(Duration),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("cannot resolve {host}: {detail}")]
    Resolve { host: String, detail: String },
    #[error("invalid name {0}")]
    Name(String),
    #[error("malformed DNS message: {0}")]
    Proto(String),
    #[error("{}", rcode_text(*.rcode, *.tsig))]
    Rcode {
        rcode: ResponseCode,
        tsig: Option<TsigError>,
    },
    #[error("the server's answer is not signed with the key: {0}")]
    ResponseSignature(String),
}

/// An rcode (and TSIG error) as an operator can act on it.
fn rcode_text(rcode: ResponseCode, tsig: Option<TsigError>) -> String {
    match (rcode, tsig) {
        (_, Some(TsigError::BadSig)) => {
            "NOTAUTH/BADSIG: the server rejected the signature: the secret does not match the server's key".into()
        }
        (_, Some(TsigError::BadKey)) => {
            "NOTAUTH/BADKEY: the server does not know this key name with this algorithm".into()
        }
        (_, Some(TsigError::BadTime)) => {
            "NOTAUTH/BADTIME: this machine's clock and the server's differ by more than 5 minutes".into()
        }
        (_, Some(e)) => format!("{rcode}, TSIG error {e:?}"),
        (ResponseCode::Refused, None) => {
            "REFUSED: the server does not let this key update this zone (allow-update or update-policy), or is not its primary".into()
        }
        (ResponseCode::NotAuth, None) => {
            "NOTAUTH: the server is not authoritative for the zone".into()
        }
        (ResponseCode::NotZone, None) => "NOTZONE: the record is not inside the zone".into(),
        (ResponseCode::ServFail, None) => "SERVFAIL: the server failed to apply the change".into(),
        (rcode, None) => format!("the server answered {rcode}"),
    }
}

/// The addresses of `server`, resolved through the system resolver.
pub(crate) async fn resolve(server: &ServerAddr) -> Result<Vec<SocketAddr>, DnsError> {
    if let Ok(ip) = server.host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, server.port)]);
    }
    let err = |detail: String| DnsError::Resolve {
        host: server.host.clone(),
        detail,
    };
    let addrs: Vec<SocketAddr> = tokio::time::timeout(
        QUERY_TIMEOUT,
        tokio::net::lookup_host((server.host.as_str(), server.port)),
    )
    .await
    .map_err(|_| err("timed out".into()))?
    .map_err(|e| err(e.to_string()))?
    .collect();
    if addrs.is_empty() {
        return Err(err("no addresses".into()));
    }
    Ok(addrs)
}

/// Asks `server` one question. `recursion` sets RD: on for a resolver, off
/// for an authoritative server (which must answer from its own data).
pub async fn query(
    server: SocketAddr,
    name: &Name,
    rtype: RecordType,
    recursion: bool,
    timeout: Duration,
) -> Result<Message, DnsError> {
    let mut msg = Message::query();
    msg.add_query(Query::query(name.clone(), rtype));
    msg.metadata.recursion_desired = recursion;
    let mut edns = Edns::new();
    edns.set_max_payload(EDNS_PAYLOAD);
    msg.set_edns(edns);
    let bytes = msg.to_vec().map_err(proto)?;
    let deadline = tokio::time::Instant::now() + timeout;
    let answer = udp_exchange(server, &bytes, msg.metadata.id, timeout).await?;
    let response = parse_response(&answer, msg.metadata.id)?;
    if !response.metadata.truncation {
        return Ok(response);
    }
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    let answer = tcp_exchange(server, &bytes, left).await?;
    parse_response(&answer, msg.metadata.id)
}

/// Signs `msg` with `signer`, sends it over TCP (an update must not be
/// lost or cut short), and checks the answer: rcode, TSIG error, and the
/// server's own signature over the answer.
pub(crate) async fn send_signed(
    server: SocketAddr,
    mut msg: Message,
    signer: &TSigner,
    timeout: Duration,
    now: UnixTime,
) -> Result<(), DnsError> {
    // TSIG signs the time of sending (RFC 8945 §5.2.3: a server refuses
    // one off by more than its fudge).
    let now = u64::try_from(now.secs()).unwrap_or(0);
    let verifier = msg.finalize(signer, now).map_err(proto)?;
    let bytes = msg.to_vec().map_err(proto)?;
    let answer = tcp_exchange(server, &bytes, timeout).await?;
    let response = parse_response(&answer, msg.metadata.id)?;
    let tsig = response.signature().and_then(|s| s.data.error);
    let rcode = response.metadata.response_code;
    if rcode != ResponseCode::NoError || tsig.is_some() {
        return Err(DnsError::Rcode { rcode, tsig });
    }
    match verifier {
        Some(mut v) => v
            .verify(&answer)
            .map(drop)
            .map_err(|e| DnsError::ResponseSignature(e.to_string())),
        None => Ok(()),
    }
}

fn proto(e: impl std::fmt::Display) -> DnsError {
    DnsError::Proto(e.to_string())
}

fn parse_response(bytes: &[u8], id: u16) -> Result<Message, DnsError> {
    let msg = Message::from_vec(bytes).map_err(proto)?;
    if msg.metadata.id != id || msg.metadata.message_type != MessageType::Response {
        return Err(DnsError::Proto("the answer is not for this request".into()));
    }
    Ok(msg)
}

async fn udp_exchange(
    server: SocketAddr,
    request: &[u8],
    id: u16,
    timeout: Duration,
) -> Result<Vec<u8>, DnsError> {
    let local: SocketAddr = match server {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(server).await?;
    let exchange = async {
        let mut buf = vec![0u8; 65_535];
        loop {
            socket.send(request).await?;
            // Wait for our answer, ignoring stray datagrams, until it is
            // time to send again.
            let wait = async {
                loop {
                    let n = socket.recv(&mut buf).await?;
                    if n >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == id {
                        return Ok::<_, std::io::Error>(buf[..n].to_vec());
                    }
                }
            };
            if let Ok(answer) = tokio::time::timeout(UDP_RETRANSMIT, wait).await {
                return answer;
            }
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| DnsError::Timeout(timeout))?
        .map_err(DnsError::Io)
}

async fn tcp_exchange(
    server: SocketAddr,
    request: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>, DnsError> {
    let len = u16::try_from(request.len())
        .map_err(|_| DnsError::Proto("request longer than 65535 bytes".into()))?;
    let exchange = async {
        let mut stream = TcpStream::connect(server).await?;
        let mut out = Vec::with_capacity(request.len() + 2);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(request);
        stream.write_all(&out).await?;
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).await?;
        let mut answer = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| DnsError::Timeout(timeout))?
        .map_err(DnsError::Io)
}

/// The owner of the SOA record in a response: the zone the asked name is
/// in. An authoritative server puts it in the answer for the apex and in
/// the authority section for names below it (RFC 2308).
pub(crate) fn soa_owner(msg: &Message) -> Option<Name> {
    msg.answers
        .iter()
        .chain(&msg.authorities)
        .find(|r| matches!(r.data, RData::SOA(_)))
        .map(|r| r.name.clone())
}

/// The target of the CNAME at `name` in a response's answer, if any.
pub(crate) fn cname_target(msg: &Message, name: &Name) -> Option<Name> {
    msg.answers
        .iter()
        .filter(|r| r.name == *name)
        .find_map(|r| match &r.data {
            RData::CNAME(c) => Some(c.0.clone()),
            _ => None,
        })
}

/// The TXT values at `name` in a response's answer, each record's strings
/// joined (a long value may be split into 255-byte strings).
pub fn txt_values(msg: &Message, name: &Name) -> Vec<String> {
    msg.answers
        .iter()
        .filter(|r| r.name == *name)
        .filter_map(|r| match &r.data {
            RData::TXT(txt) => Some(
                txt.txt_data
                    .iter()
                    .map(|s| String::from_utf8_lossy(s))
                    .collect::<String>(),
            ),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::Record;
    use hickory_proto::rr::rdata::{SOA, TXT};

    #[test]
    fn record_names() {
        assert_eq!(
            challenge_record("example.com"),
            "_acme-challenge.example.com"
        );
        assert_eq!(
            challenge_record("*.w.example.com"),
            "_acme-challenge.w.example.com"
        );
        assert_eq!(
            challenge_record("example.com."),
            "_acme-challenge.example.com"
        );
        // Only the leading wildcard label goes.
        assert_eq!(
            challenge_record("*.*.example.com"),
            "_acme-challenge.*.example.com"
        );
        assert_eq!(
            fqdn("_acme-challenge.w.example.com").expect("name"),
            fqdn("_acme-challenge.w.example.com.").expect("name")
        );
        assert_eq!(
            display_name(&fqdn("a.example.com").expect("name")),
            "a.example.com"
        );
    }

    #[test]
    fn soa_and_txt_are_read_from_responses() {
        let zone = fqdn("example.test").expect("zone");
        let rec = fqdn("_acme-challenge.a.example.test").expect("record");
        let soa = SOA::new(
            fqdn("ns.example.test").expect("ns"),
            fqdn("admin.example.test").expect("rname"),
            1,
            3600,
            600,
            86400,
            60,
        );
        let mut msg = Message::query();
        msg.add_authority(Record::from_rdata(zone.clone(), 60, RData::SOA(soa)));
        assert_eq!(soa_owner(&msg), Some(zone));
        assert!(txt_values(&msg, &rec).is_empty());

        msg.add_answer(Record::from_rdata(
            rec.clone(),
            60,
            RData::TXT(TXT::new(vec!["abc".into(), "def".into()])),
        ));
        msg.add_answer(Record::from_rdata(
            rec.clone(),
            60,
            RData::TXT(TXT::new(vec!["second".into()])),
        ));
        assert_eq!(txt_values(&msg, &rec), ["abcdef", "second"]);
    }

    #[test]
    fn cname_targets_are_read_from_responses() {
        use hickory_proto::rr::rdata::CNAME;
        let name = fqdn("_acme-challenge.a.example.test").expect("name");
        let target = fqdn("a.validation.test").expect("target");
        let mut msg = Message::query();
        assert_eq!(cname_target(&msg, &name), None);
        msg.add_answer(Record::from_rdata(
            target.clone(),
            60,
            RData::CNAME(CNAME(name.clone())),
        ));
        // Only a CNAME owned by the name counts.
        assert_eq!(cname_target(&msg, &name), None);
        msg.add_answer(Record::from_rdata(
            name.clone(),
            60,
            RData::CNAME(CNAME(target.clone())),
        ));
        assert_eq!(cname_target(&msg, &name), Some(target));
    }

    #[test]
    fn rcodes_read_as_advice() {
        let e = DnsError::Rcode {
            rcode: ResponseCode::NotAuth,
            tsig: Some(TsigError::BadSig),
        };
        assert!(e.to_string().contains("secret does not match"), "{e}");
        let e = DnsError::Rcode {
            rcode: ResponseCode::Refused,
            tsig: None,
        };
        assert!(e.to_string().starts_with("REFUSED"), "{e}");
    }
}
