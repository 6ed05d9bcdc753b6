//! dns-01 through dynamic update (RFC 2136) signed with TSIG (RFC 8945):
//! certd adds the TXT record at the zone's primary itself, no hook needed.
//!
//! Present adds one record (class IN); cleanup deletes exactly that record
//! by name, type and value (class NONE, RFC 2136 section 2.5.4), never the
//! whole RRset: a name and its wildcard are validated through the same
//! record name, with two values present at once.
//!
//! The record written is the end of the CNAME chain at the challenge name
//! (or the certificate's `dns_alias`), in the zone that holds it there:
//! BIND ignores a TXT record added next to a CNAME (RFC 2136 §3.4.2.2).

use std::net::SocketAddr;

use async_trait::async_trait;
use hickory_proto::op::{Message, update_message};
use hickory_proto::rr::rdata::TXT;
use hickory_proto::rr::rdata::tsig::TsigAlgorithm as HickoryAlgorithm;
use hickory_proto::rr::{Name, RData, RecordSet, RecordType, TSigner};

use super::{ChallengeSpec, Solver, SolverError, check_alias};
use crate::clock::Clock;
use crate::config::{Dns01Config, Rfc2136Config, ServerAddr, TsigAlgorithm};
use crate::dns::propagation::{Expect, PropagationCheck, ZoneHint};
use crate::dns::{
    DnsError, QUERY_TIMEOUT, display_name, fqdn, query, resolve, send_signed, soa_owner,
};

/// TTL of the challenge record: short, so that a resolver that cached an
/// earlier value (or its absence, which the SOA minimum bounds) lets go of
/// it soon.
const RECORD_TTL: u32 = 60;

/// Allowed clock difference to the server, in seconds (RFC 8945 suggests 300).
const TSIG_FUDGE: u16 = 300;

/// The solver for `[dns01.rfc2136]`.
pub(crate) struct Rfc2136Solver {
    server: ServerAddr,
    zone: Option<Name>,
    signer: TSigner,
    propagation: PropagationCheck,
    /// The time a TSIG signature carries.
    clock: Clock,
}

impl Rfc2136Solver {
    pub(super) fn new(
        cfg: &Rfc2136Config,
        dns01: &Dns01Config,
        clock: Clock,
    ) -> Result<Self, SolverError> {
        let key_err = |detail: String| SolverError::Rfc2136Key {
            key_name: cfg.key_name.clone(),
            detail,
        };
        let algorithm = match cfg.algorithm {
            TsigAlgorithm::HmacSha256 => HickoryAlgorithm::HmacSha256,
            TsigAlgorithm::HmacSha384 => HickoryAlgorithm::HmacSha384,
            TsigAlgorithm::HmacSha512 => HickoryAlgorithm::HmacSha512,
        };
        let key_name = fqdn(&cfg.key_name).map_err(|e| key_err(e.to_string()))?;
        let signer = TSigner::new(
            cfg.secret.expose().to_vec(),
            algorithm,
            key_name,
            TSIG_FUDGE,
        )
        .map_err(|e| key_err(e.to_string()))?;
        let zone = cfg
            .zone
            .as_deref()
            .map(fqdn)
            .transpose()
            .map_err(|e| key_err(e.to_string()))?;
        Ok(Self {
            server: cfg.server.clone(),
            zone,
            signer,
            propagation: PropagationCheck::new(&dns01.propagation, clock.clone()),
            clock,
        })
    }

    /// The server's first address.
    async fn server_addr(&self) -> Result<SocketAddr, DnsError> {
        resolve(&self.server)
            .await?
            .first()
            .copied()
            .ok_or_else(|| DnsError::Resolve {
                host: self.server.host.clone(),
                detail: "no addresses".into(),
            })
    }

    /// The zone `record` is in: configured, or the owner of the SOA the
    /// server returns for the record.
    async fn locate(&self, server: SocketAddr, record: &Name) -> Result<Name, DnsError> {
        let zone = match &self.zone {
            Some(z) => z.clone(),
            None => {
                let msg = query(server, record, RecordType::SOA, false, QUERY_TIMEOUT).await?;
                soa_owner(&msg).ok_or_else(|| {
                    DnsError::Name(format!(
                        "{} is in no zone this server serves (it answered {} without an SOA)",
                        display_name(record),
                        msg.metadata.response_code
                    ))
                })?
            }
        };
        if !zone.zone_of(record) {
            return Err(DnsError::Name(format!(
                "{} is not inside zone {}",
                display_name(record),
                display_name(&zone)
            )));
        }
        Ok(zone)
    }

    /// The primary, the record to write (the end of the CNAME chain) and
    /// its zone. `action` names the step in errors.
    async fn target(
        &self,
        action: &'static str,
        c: &ChallengeSpec,
    ) -> Result<(SocketAddr, Name, Name), SolverError> {
        let record = c.dns_record();
        let err = |record: &str, source: DnsError| SolverError::Rfc2136 {
            action,
            server: self.server.to_string(),
            zone: self
                .zone
                .as_ref()
                .map_or_else(|| "(not found)".to_owned(), display_name),
            record: record.to_owned(),
            source: Box::new(source),
        };
        let server = self.server_addr().await.map_err(|e| err(&record, e))?;
        let name = self
            .propagation
            .follow_cnames(&record, Some(server))
            .await
            .map_err(|source| SolverError::DnsTarget {
                record: record.clone(),
                source: Box::new(source),
            })?;
        let zone = self
            .locate(server, &name)
            .await
            .map_err(|e| err(&display_name(&name), e))?;
        Ok((server, name, zone))
    }

    async fn update(&self, action: &'static str, c: &ChallengeSpec) -> Result<(), SolverError> {
        let (server, name, zone) = self.target(action, c).await?;
        let (record, zone_text) = (display_name(&name), display_name(&zone));
        let msg = build_update(action == "add", name, zone, &c.dns_value);
        send_signed(server, msg, &self.signer, QUERY_TIMEOUT, self.clock.now())
            .await
            .map_err(|e| SolverError::Rfc2136 {
                action,
                server: self.server.to_string(),
                zone: zone_text.clone(),
                record: record.clone(),
                source: Box::new(e),
            })?;
        tracing::debug!(%record, zone = %zone_text, %server, action, "dns-01 record updated");
        Ok(())
    }
}

/// The update that adds (`add`) or deletes one TXT value at `name`.
/// `locate` has checked that `zone` contains `name`, which the hickory
/// builders assert.
fn build_update(add: bool, name: Name, zone: Name, value: &str) -> Message {
    let mut rrset = RecordSet::with_ttl(name, RecordType::TXT, RECORD_TTL);
    rrset.add_rdata(RData::TXT(TXT::new(vec![value.to_owned()])));
    if add {
        // must_exist = false: add to the RRset, creating it if needed.
        update_message::append(rrset, zone, false, false)
    } else {
        // Class NONE with the data: this one RR, not the RRset.
        update_message::delete_by_rdata(rrset, zone, false)
    }
}

#[async_trait]
impl Solver for Rfc2136Solver {
    async fn present(&self, c: &ChallengeSpec) -> Result<(), SolverError> {
        self.update("add", c).await
    }

    async fn cleanup(&self, c: &ChallengeSpec) -> Result<(), SolverError> {
        // Deleting a record that is not there is a no-op for the server, so
        // this is safe after a failed present.
        self.update("delete", c).await
    }

    async fn preflight(&self, c: &ChallengeSpec) -> Result<(), SolverError> {
        let (primary, name, zone) = self.target("check", c).await?;
        check_alias(&self.propagation, c, &name, Some(primary)).await?;
        let record = display_name(&name);
        self.propagation
            .wait(
                &record,
                Expect::Value(&c.dns_value),
                Some(&ZoneHint { zone, primary }),
            )
            .await
            .map_err(|source| SolverError::Propagation {
                record,
                source: Box::new(source),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::OpCode;
    use hickory_proto::rr::DNSClass;

    #[test]
    fn add_and_delete_touch_one_value_only() {
        let zone = fqdn("example.test").expect("zone");
        let name = fqdn("_acme-challenge.w.example.test").expect("name");
        for add in [true, false] {
            let msg = build_update(add, name.clone(), zone.clone(), "value-1");
            assert_eq!(msg.metadata.op_code, OpCode::Update);
            // The zone section (a query in wire terms) names the zone.
            assert_eq!(msg.queries.len(), 1);
            assert_eq!(msg.queries[0].name(), &zone);
            assert_eq!(msg.queries[0].query_type(), RecordType::SOA);
            // No prerequisites (a second value may already be there).
            assert!(msg.answers.is_empty(), "{:?}", msg.answers);
            // One update RR: the name, TXT, this value; IN with a TTL to
            // add, NONE with TTL 0 to delete just this RR (RFC 2136 2.5.4;
            // ANY would delete the whole RRset).
            assert_eq!(msg.authorities.len(), 1);
            let rr = &msg.authorities[0];
            assert_eq!(rr.name, name);
            assert_eq!(
                (rr.dns_class, rr.ttl),
                if add {
                    (DNSClass::IN, RECORD_TTL)
                } else {
                    (DNSClass::NONE, 0)
                }
            );
            assert_eq!(rr.data, RData::TXT(TXT::new(vec!["value-1".into()])));
        }
    }
}
