//! The application's services, built once and shared by every way certd
//! runs: the one-shot commands (`cli`) and the daemon
//! (`daemon`). [`Services`] holds the configuration, the clock, the
//! ledger and the count of its failed writes; from it come the ACME
//! account, the order context (reaper, recovery of unfinished orders) and
//! the one handler of an order's outcome (`outcome`), so `certd renew` and
//! `certd run` record, alert and back off by the same rules.

pub(crate) mod backoff;
pub(crate) mod ca_choice;
pub(crate) mod cas;
pub(crate) mod dirs;
pub(crate) mod fleet;
pub(crate) mod lease;
pub mod fleet_answers;
pub mod fleet_hosts;
pub(crate) mod fleet_order;
pub(crate) mod ops;
pub(crate) mod outcome;
pub(crate) mod sink;

use std::sync::Arc;

use crate::acme::{AcmeAccount, AcmeHttp, SetupError};
use crate::clock::Clock;
use crate::config::{CaConfig, CaName, CertificateConfig, Config};
use crate::hygiene::Reaper;
use crate::ledger::{Ledger, LedgerError, OrderRow};
use crate::metrics::LedgerWriteErrors;
use crate::order::{Context, RunMode};
use crate::solver::Solvers;

use self::fleet::Fleet;
use self::lease::Leases;
use self::outcome::Outcomes;

/// What every run of certd starts from.
#[derive(Clone)]
pub struct Services {
    /// The configuration certd started with (the daemon's reloads keep
    /// their own current one).
    pub(crate) cfg: Arc<Config>,
    pub(crate) clock: Clock,
    pub(crate) store: Ledger,
    pub(crate) ledger_errors: LedgerWriteErrors,
    /// Fleet mode (`[fleet]`): the shared database, the fleet key and
    /// this host's identity; `store` is then the shared ledger.
    pub(crate) fleet: Option<Arc<Fleet>>,
    /// Fleet mode's leases, for the metrics page.
    pub(crate) leases: Leases,
}

/// What recovery found of the orders an earlier run left unfinished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Recovered {
    pub(crate) resumable: usize,
    pub(crate) abandoned: usize,
}

impl Services {
    /// Creates (and checks) the state and certificate directories and
    /// opens the ledger, creating it when there is none.
    pub async fn open(cfg: Config, clock: Clock) -> anyhow::Result<Self> {
        dirs::ensure_dirs(&cfg)?;
        let fleet = Fleet::open(&cfg).await?;
        let store = match &fleet {
            // The fleet key once more, to seal finalized orders' keys
            // (`order::keys`); the file was just read and checked.
            Some(f) => Ledger::postgres(
                f.db.pool().clone(),
                cfg.storage.state_dir.clone(),
                clock.clone(),
            )
            .with_order_key_seal(Arc::new(crate::order::FleetOrderKeys(
                crate::fleet::FleetKey::load(&f.cfg.key_file)?,
            ))),
            None => Ledger::open(&cfg.db_path(), clock.clone()).await?,
        };
        let mut services = Self::with_ledger(Arc::new(cfg), clock, store);
        services.fleet = fleet;
        Ok(services)
    }

    /// Services around a ledger the caller opened.
    pub(crate) fn with_ledger(cfg: Arc<Config>, clock: Clock, store: Ledger) -> Self {
        Self {
            cfg,
            clock,
            store,
            ledger_errors: LedgerWriteErrors::default(),
            fleet: None,
            leases: Leases::default(),
        }
    }

    /// The outcome handler over this ledger and clock.
    pub(crate) fn outcomes(&self) -> Outcomes {
        Outcomes {
            store: self.store.clone(),
            clock: self.clock.clone(),
            errors: self.ledger_errors.clone(),
        }
    }

    /// The account a run starts with: the primary CA's, or, while that one
    /// cannot be loaded (unreachable, refusing), the next configured CA's
    /// that can, so a CA down at start does not hold back certificates
    /// that may fall back. With every CA failing, the primary's error.
    pub(crate) async fn first_account(
        &self,
        cfg: &Config,
    ) -> Result<(AcmeAccount, CaName), SetupError> {
        let primary = cfg.primary_ca();
        let first_error = match self.account_at(cfg, primary).await {
            Ok(account) => return Ok((account, primary.name.clone())),
            Err(e) => e,
        };
        for ca in cfg.cas.iter().filter(|c| c.name != primary.name) {
            match self.account_at(cfg, ca).await {
                Ok(account) => {
                    tracing::warn!(
                        ca = %primary.name,
                        error = %crate::acme::error_chain(&first_error),
                        "cannot load the account at this CA; starting with CA {}",
                        ca.name
                    );
                    return Ok((account, ca.name.clone()));
                }
                Err(e) => {
                    tracing::warn!(ca = %ca.name, error = %crate::acme::error_chain(&e), "cannot load the account at this CA either");
                }
            }
        }
        Err(first_error)
    }

    /// Loads the ACME account at `ca`, with its own HTTP client (its CA
    /// bundle), creating it at the CA on first use: one attempt. In fleet
    /// mode, the fleet's one account there.
    pub(crate) async fn account_at(
        &self,
        cfg: &Config,
        ca: &CaConfig,
    ) -> Result<AcmeAccount, SetupError> {
        let http = AcmeHttp::new(ca.acme.ca_bundle.as_deref(), self.clock.clone())?;
        let state_dir = &cfg.storage.state_dir;
        match &self.fleet {
            // One account for the whole fleet, its key sealed in the
            // shared database.
            Some(fleet) => fleet.account(&ca.acme, state_dir, &self.store, http).await,
            None => AcmeAccount::load_or_create(&ca.acme, state_dir, &self.store, http).await,
        }
    }

    /// The reaper of `account` at `ca`, with that CA's limits, and its
    /// unfinished orders recovered (not in fleet mode: there recovery is
    /// per certificate, under its lease).
    pub(crate) async fn reaper_at(
        &self,
        cfg: &Config,
        ca: &CaConfig,
        account: AcmeAccount,
    ) -> Result<(Reaper, Recovered), LedgerError> {
        let reaper = Reaper::new(self.store.clone(), account, ca.reaper_config(&cfg.reaper));
        // A fleet's peers drive their orders now: recovering all of them
        // would abandon live ones. Each certificate's are recovered by
        // the host that claims its lease (`cas`, `order::recover_certificate`).
        if self.fleet.is_some() {
            return Ok((
                reaper,
                Recovered {
                    resumable: 0,
                    abandoned: 0,
                },
            ));
        }
        let (resumable, abandoned) =
            crate::order::recover(&reaper, |o| wants_same_names(cfg, o)).await?;
        Ok((
            reaper,
            Recovered {
                resumable,
                abandoned,
            },
        ))
    }

    /// What an order at `ca` runs with.
    pub(crate) fn order_context_at(
        &self,
        cfg: &Config,
        ca: &CaConfig,
        reaper: Reaper,
        solvers: Solvers,
        mode: RunMode,
    ) -> Context {
        Context {
            ca: ca.name.clone(),
            replaces_installed: true,
            store: self.store.clone(),
            account: reaper.account().clone(),
            solvers,
            reaper,
            cert_dir: Arc::from(cfg.storage.cert_dir.as_path()),
            renew_remaining: cfg.daemon.renew_remaining,
            trusted_roots: ca.acme.trusted_roots.clone(),
            mode,
            fleet: None,
        }
    }

    /// Closes the ledger.
    pub(crate) async fn close(self) {
        self.store.close().await;
    }
}

/// Whether an unfinished order is still wanted: its certificate is
/// configured with exactly the order's names.
pub(crate) fn wants_same_names(cfg: &Config, order: &OrderRow) -> bool {
    cfg.certificate(&order.cert_name)
        .is_some_and(|c| cert_wants(c, order))
}

/// Whether the unfinished `order` is one `cert` (as configured now) would
/// place: for it, with exactly its names.
pub(crate) fn cert_wants(cert: &CertificateConfig, order: &OrderRow) -> bool {
    order.cert_name == cert.name.as_str()
        && crate::ledger::Identifiers::new(cert.domain_strings()) == order.identifiers
}
