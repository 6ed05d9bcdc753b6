//! `certd status` in fleet mode: per certificate the leaseholder and its
//! epoch, each host's installed serial and reload result, the live
//! members, and the members whose certificate definitions differ from
//! this host's (they would order something else under the same lease).
//!
//! Read from the fleet's database; when it cannot be reached, status says
//! so in one line (and in each `--json` row) rather than failing.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::app::fleet::host_id;
use crate::app::fleet_answers::live_window;
use crate::app::fleet_hosts::config_hash;
use crate::clock::{Clock, UnixTime};
use crate::config::{Config, FleetConfig};
use crate::fleet::{DbOptions, FleetDb, InstallRow, LeaseName, LeaseRow, Member};
use crate::ledger::{Ledger, LedgerError};
use crate::text::escape_control;

/// How long status waits for the fleet's database.
const DB_TIMEOUT: Duration = Duration::from_secs(5);

/// The fleet as this host's status shows it.
pub(super) struct FleetView {
    host_id: String,
    /// Where the database is (`host:port`), never its URL.
    target: String,
    read: Result<FleetRead, String>,
}

struct FleetRead {
    members: Vec<Member>,
    /// Live members whose `config_hash` differs from this host's.
    differing: Vec<String>,
    leases: HashMap<String, LeaseRow>,
    installs: HashMap<String, Vec<InstallRow>>,
    /// Per certificate, the hosts whose definition of it differs from
    /// the fleet's (which its leaseholders order), with the fields.
    definitions: HashMap<String, Vec<DefinedDifferently>>,
    /// Per certificate, the fleet's failure backoff still running.
    holds: HashMap<String, HeldBack>,
}

/// The fleet's failure backoff on a certificate: no host orders it before
/// `until`.
#[derive(Debug, Clone, Serialize)]
pub(super) struct HeldBack {
    /// RFC 3339.
    until: String,
    /// The host whose attempt failed.
    host: String,
    error: String,
}

/// A host whose definition of a certificate differs from the fleet's: it
/// does not take the certificate's lease.
#[derive(Debug, Clone, Serialize)]
pub(super) struct DefinedDifferently {
    host: String,
    fields: Vec<String>,
}

/// One certificate's fleet state in `status --json`; the keys are a public
/// interface.
#[derive(Debug, Serialize)]
pub(super) struct FleetCertStatus<'a> {
    /// The host holding the certificate's lease now; null when free or
    /// expired.
    leaseholder: Option<&'a str>,
    /// The lease's epoch (its fencing token); 0 if never claimed.
    epoch: i64,
    /// Each host's latest install of the certificate.
    hosts: Vec<HostInstall<'a>>,
    /// The members heard from recently.
    live_hosts: Vec<&'a str>,
    /// Live members whose certificate definitions differ from this host's.
    hosts_listing_differently: Vec<&'a str>,
    /// Hosts whose definition of this certificate differs from the
    /// fleet's, and in which fields; they do not take its lease.
    hosts_defining_differently: &'a [DefinedDifferently],
    /// The fleet's last attempt failed and its backoff still runs: no
    /// host orders the certificate before `until`; null otherwise.
    held_back: Option<&'a HeldBack>,
    /// Why the fleet's database could not be read (the rest is empty).
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

#[derive(Debug, Serialize)]
struct HostInstall<'a> {
    host: &'a str,
    serial: &'a str,
    installed: bool,
    /// The reload commands' outcomes, when installed.
    reload: Option<&'a str>,
    /// Why it was not installed.
    error: Option<&'a str>,
}

impl FleetView {
    /// Reads the fleet's state for the certificates `names`.
    pub(super) async fn read(cfg: &Config, fleet: &FleetConfig, names: &[String]) -> Self {
        let host_id = host_id(fleet).unwrap_or_else(|e| format!("? ({e})"));
        let opts = DbOptions {
            connect_timeout: DB_TIMEOUT,
            max_connections: 2,
            ..DbOptions::default()
        };
        let db = match FleetDb::open(&fleet.database_url, &opts).await {
            Ok(db) => db,
            Err(e) => {
                return Self {
                    host_id,
                    target: String::new(),
                    read: Err(e.to_string()),
                };
            }
        };
        let target = db.target().to_string();
        let read = match tokio::time::timeout(DB_TIMEOUT, read(&db, cfg, names)).await {
            Ok(Ok(read)) => Ok(read),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "the fleet database at {target}: no answer within {DB_TIMEOUT:?}"
            )),
        };
        db.pool().close().await;
        Self {
            host_id,
            target,
            read,
        }
    }

    /// `name`'s row for `status --json`.
    pub(super) fn cert(&self, name: &str) -> FleetCertStatus<'_> {
        let read = match &self.read {
            Ok(read) => read,
            Err(e) => {
                return FleetCertStatus {
                    leaseholder: None,
                    epoch: 0,
                    hosts: Vec::new(),
                    live_hosts: Vec::new(),
                    hosts_listing_differently: Vec::new(),
                    hosts_defining_differently: &[],
                    held_back: None,
                    error: Some(e),
                };
            }
        };
        let lease = read.leases.get(name);
        FleetCertStatus {
            leaseholder: lease.filter(|l| l.live).and_then(|l| l.holder.as_deref()),
            epoch: lease.map_or(0, |l| l.epoch),
            hosts: read
                .installs
                .get(name)
                .into_iter()
                .flatten()
                .map(|r| HostInstall {
                    host: &r.host_id,
                    serial: &r.serial,
                    installed: r.installed,
                    reload: r.reload_result.as_deref(),
                    error: r.error.as_deref(),
                })
                .collect(),
            live_hosts: read.members.iter().map(|m| m.host_id.as_str()).collect(),
            hosts_listing_differently: read.differing.iter().map(String::as_str).collect(),
            hosts_defining_differently: read.definitions.get(name).map_or(&[], Vec::as_slice),
            held_back: read.holds.get(name),
            error: None,
        }
    }

    /// The table's fleet section.
    pub(super) fn push_table(&self, out: &mut String, names: &[&str]) {
        let read = match &self.read {
            Ok(read) => read,
            Err(e) => {
                let _ = writeln!(
                    out,
                    "\nFleet (this host: {}): cannot read the fleet database: {}",
                    escape_control(&self.host_id),
                    escape_control(e)
                );
                return;
            }
        };
        let _ = writeln!(
            out,
            "\nFleet (this host: {}, database {}):",
            escape_control(&self.host_id),
            self.target
        );
        let live: Vec<String> = read
            .members
            .iter()
            .map(|m| {
                let addr = m.http01_addr.as_deref().unwrap_or("no http-01 responder");
                format!(
                    "{} (certd {}, {})",
                    escape_control(&m.host_id),
                    escape_control(&m.version),
                    escape_control(addr)
                )
            })
            .collect();
        let _ = writeln!(
            out,
            "  live hosts: {}",
            if live.is_empty() {
                "none".to_owned()
            } else {
                live.join(", ")
            }
        );
        for host in &read.differing {
            let _ = writeln!(
                out,
                "  host {} lists certificates differently: its [[certificate]] sections differ from this host's",
                escape_control(host)
            );
        }
        for name in names {
            let c = self.cert(name);
            let holder = match (c.leaseholder, c.epoch) {
                (Some(h), epoch) => format!("leaseholder {}, epoch {epoch}", escape_control(h)),
                (None, 0) => "no lease yet".to_owned(),
                (None, epoch) => format!("no leaseholder, epoch {epoch}"),
            };
            let _ = writeln!(out, "  {name}: {holder}");
            for d in c.hosts_defining_differently {
                let _ = writeln!(
                    out,
                    "    host {} defines it differently ({}): it does not take the lease",
                    escape_control(&d.host),
                    d.fields.join(", ")
                );
            }
            if let Some(h) = c.held_back {
                let _ = writeln!(
                    out,
                    "    held back until {}: the fleet's last attempt failed on {}: {}",
                    h.until,
                    escape_control(&h.host),
                    one_line(&h.error)
                );
            }
            if c.hosts.is_empty() {
                let _ = writeln!(out, "    no host has installed a published issuance");
            }
            for h in &c.hosts {
                let what = match (h.installed, h.error) {
                    (true, _) => format!(
                        "installed; reload: {}",
                        one_line(h.reload.unwrap_or("not recorded"))
                    ),
                    (false, Some(e)) => format!("NOT installed: {}", one_line(e)),
                    (false, None) => "NOT installed".to_owned(),
                };
                let _ = writeln!(
                    out,
                    "    {}: serial {} {what}",
                    escape_control(h.host),
                    escape_control(h.serial)
                );
            }
        }
    }
}

/// The database's or the ledger's error, for status's one line.
type ReadError = Box<dyn std::error::Error + Send + Sync>;

async fn read(db: &FleetDb, cfg: &Config, names: &[String]) -> Result<FleetRead, ReadError> {
    let (members, leases, installs) = tokio::try_join!(
        db.live_members(live_window(
            cfg.fleet
                .as_ref()
                .map_or(crate::config::FleetConfig::DEFAULT_LEASE_TTL, |f| f
                    .lease_ttl)
        )),
        db.leases(),
        db.latest_installs(names)
    )?;
    let ours = config_hash(cfg);
    let differing = members
        .iter()
        .filter(|m| m.config_hash != ours)
        .map(|m| m.host_id.clone())
        .collect();
    let leases = leases
        .into_iter()
        .filter_map(|l| {
            let name = l.name.strip_prefix(&LeaseName::Cert(String::new()).key())?;
            Some((name.to_owned(), l))
        })
        .collect();
    let mut by_cert: HashMap<String, Vec<InstallRow>> = HashMap::new();
    for row in installs {
        by_cert.entry(row.cert_name.clone()).or_default().push(row);
    }
    let store = Ledger::postgres(
        db.pool().clone(),
        cfg.storage.state_dir.clone(),
        Clock::system(),
    );
    let definitions = defined_differently(&store, names).await?;
    let holds = running_holds(&store, names).await?;
    Ok(FleetRead {
        members,
        differing,
        leases,
        installs: by_cert,
        definitions,
        holds,
    })
}

/// Per certificate of `names`, the fleet's failure backoff if it still
/// runs.
async fn running_holds(
    store: &Ledger,
    names: &[String],
) -> Result<HashMap<String, HeldBack>, LedgerError> {
    let now = store.clock().now().secs();
    let mut by_cert = HashMap::new();
    for name in names {
        if let Some(hold) = store.renewal_hold(name).await?.filter(|h| h.until > now) {
            let held = HeldBack {
                until: UnixTime::from_secs(hold.until).rfc3339(),
                host: hold.host_id,
                error: hold.error,
            };
            by_cert.insert(name.clone(), held);
        }
    }
    Ok(by_cert)
}

/// Per certificate of `names`, the hosts whose recorded definition
/// differs from the fleet's.
async fn defined_differently(
    store: &Ledger,
    names: &[String],
) -> Result<HashMap<String, Vec<DefinedDifferently>>, LedgerError> {
    let mut by_cert = HashMap::new();
    for name in names {
        let Some(fleet) = store.fleet_definition(name).await? else {
            continue;
        };
        let differing: Vec<DefinedDifferently> = store
            .host_definitions(name)
            .await?
            .into_iter()
            .filter(|h| h.definition.hash != fleet.definition.hash)
            .map(|h| DefinedDifferently {
                fields: h
                    .definition
                    .differing(&fleet.definition)
                    .into_iter()
                    .map(str::to_owned)
                    .collect(),
                host: h.host_id,
            })
            .collect();
        by_cert.insert(name.clone(), differing);
    }
    Ok(by_cert)
}

/// Reload outcomes span lines; the table keeps one per host.
fn one_line(text: &str) -> String {
    escape_control(&text.replace('\n', "; ")).into_owned()
}
