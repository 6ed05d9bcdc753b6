//! dns-persist-01: check the standing record; write nothing.

use std::time::Duration;

use async_trait::async_trait;

use super::{ChallengeSpec, Solver, SolverError};
use crate::clock::Clock;
use crate::config::PropagationConfig;
use crate::dns::persist::persist_record;
use crate::dns::propagation::{Expect, PropagationCheck};

/// dns-persist-01: the operator published `_validation-persist.<name>`
/// once (`certd dns-persist show`); certd writes nothing and only checks,
/// before the CA is asked, that the record is visible and names this CA
/// and account, so a missing record costs no failed validation.
pub(crate) struct DnsPersistSolver {
    check: PropagationCheck,
}

impl DnsPersistSolver {
    /// The record stands for months: one that is missing now was not
    /// published, rather than being on its way, so the check gives up
    /// sooner than dns-01's (the authorization stays pending for the next
    /// attempt).
    const CHECK_TIMEOUT: Duration = Duration::from_secs(15);

    pub(super) fn new(cfg: &PropagationConfig, clock: Clock) -> Self {
        Self {
            check: PropagationCheck::always(cfg, Self::CHECK_TIMEOUT, clock),
        }
    }
}

#[async_trait]
impl Solver for DnsPersistSolver {
    async fn present(&self, _c: &ChallengeSpec) -> Result<(), SolverError> {
        Ok(())
    }

    async fn cleanup(&self, _c: &ChallengeSpec) -> Result<(), SolverError> {
        Ok(())
    }

    async fn preflight(&self, c: &ChallengeSpec) -> Result<(), SolverError> {
        let record = persist_record(&c.identifier);
        let Some(expect) = c.persist.as_ref().filter(|p| !p.issuers.is_empty()) else {
            return Err(SolverError::PersistIssuer(c.identifier.clone()));
        };
        let err = |source| SolverError::Persist {
            record: record.clone(),
            source: Box::new(source),
        };
        let target = self.check.follow_cnames(&record, None).await.map_err(err)?;
        self.check
            .wait(
                &crate::dns::display_name(&target),
                Expect::Persist(expect),
                None,
            )
            .await
            .map_err(err)
    }
}
