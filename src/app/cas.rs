//! The CAs of a run and the fallback between them.
//!
//! [`Cas`] holds one order context per CA: the first CA's is built at the
//! start, as with one CA; the others' (their own account, HTTP client with
//! their CA bundle, reaper with their limits) on first use, then shared by
//! every order of the run. [`Cas::obtain`] picks the CA of each attempt
//! (`ca_choice`), and when an attempt ends in a reason to fall back it
//! tries the next CA in the same round: what the first CA's order left is
//! settled by the driver as after any failure (pending authorizations
//! deactivated within that CA's budget) before the next CA is asked.
//!
//! The ledger keeps, per CA, the start of its current streak of failures
//! (`ca_state`), so that "unreachable for longer than `ca_fallback_after`"
//! holds across runs of `certd renew`; and, per certificate, the CA that
//! issued it (`certificates.issuer_ca`). Rate limits and paused
//! identifiers seen at a CA are kept for the run.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

use crate::acme::{AcmeError, Disposition, SetupError, error_chain};
use crate::app::ca_choice::{self, CaFacts, Wants};
use crate::app::fleet_order::{self, LeaseHooks};
use crate::app::{Services, cert_wants, fleet_hosts, lease};
use crate::clock::UnixTime;
use crate::config::{CaName, CertificateConfig, Config};
use crate::fleet::{FleetHost, FleetKey};
use crate::hygiene::{GuardError, Reaper};
use crate::install;
use crate::ledger::{Ledger, LedgerError};
use crate::order::{self, Context, DriveError, FleetHooks, Issued};
use crate::solver::Unready;

/// The order contexts of every CA, created on first use.
#[derive(Clone)]
pub(crate) struct Cas {
    inner: Arc<Inner>,
}

struct Inner {
    services: Services,
    /// The configuration the contexts were built from: CA tables need a
    /// restart, so the started one stays right for them.
    cfg: Arc<Config>,
    /// The first CA's context, which holds the solvers and mode for all.
    first: Context,
    contexts: Mutex<HashMap<CaName, Arc<OnceCell<Context>>>>,
    /// Rate limits and pauses seen this run, per CA and certificate.
    limited: Mutex<HashMap<(CaName, String), Limited>>,
    /// Called with the reaper of each CA created after the start (the
    /// daemon gives it its periodic passes).
    on_new_reaper: Mutex<Option<NewReaper>>,
    /// Fleet mode: this host's side of distribution, for installing a
    /// certificate another host renewed instead of ordering it again.
    fleet_host: OnceCell<Arc<FleetHost>>,
}

/// What the daemon does with a CA's reaper created on first use.
type NewReaper = Box<dyn Fn(Reaper) + Send + Sync>;

#[derive(Debug, Clone, Copy, Default)]
struct Limited {
    until: Option<UnixTime>,
    paused: bool,
}

impl Cas {
    /// The CAs of `cfg`, the first one's context being `first`.
    pub(crate) fn new(services: &Services, cfg: Arc<Config>, first: Context) -> Self {
        let cell = Arc::new(OnceCell::new_with(Some(first.clone())));
        let contexts = HashMap::from([(first.ca.clone(), cell)]);
        Self {
            inner: Arc::new(Inner {
                services: services.clone(),
                cfg,
                first,
                contexts: Mutex::new(contexts),
                limited: Mutex::new(HashMap::new()),
                on_new_reaper: Mutex::new(None),
                fleet_host: OnceCell::new(),
            }),
        }
    }

    /// Hands each reaper created from now on to `f`.
    pub(crate) fn on_new_reaper(&self, f: impl Fn(Reaper) + Send + Sync + 'static) {
        *lock(&self.inner.on_new_reaper) = Some(Box::new(f));
    }

    /// The first CA's context: the reaper loop, metrics and the control
    /// socket's one-CA operations use it.
    pub(crate) fn first(&self) -> &Context {
        &self.inner.first
    }

    /// A reload's reaper settings, for every CA whose account is in use:
    /// `[reaper]` with each CA's own limits (which apply live).
    pub(crate) fn apply_reaper_settings(&self, new: &Config) {
        let contexts = lock(&self.inner.contexts);
        for (name, cell) in contexts.iter() {
            let (Some(ctx), Some(ca)) = (cell.get(), new.ca(name)) else {
                continue;
            };
            ctx.reaper.set_config(ca.reaper_config(&new.reaper));
        }
    }

    /// Fleet mode's lease length: how soon a certificate another host
    /// holds is looked at again.
    pub(crate) fn lease_ttl(&self) -> Option<std::time::Duration> {
        self.inner.services.fleet.as_ref().map(|f| f.timing.ttl())
    }

    /// The services the contexts were made from (the ledger, the fleet).
    pub(crate) fn services(&self) -> &Services {
        &self.inner.services
    }

    /// The context of `ca` if it was created already.
    pub(crate) fn ready(&self, ca: &CaName) -> Option<Context> {
        lock(&self.inner.contexts)
            .get(ca)
            .and_then(|c| c.get().cloned())
    }

    /// The context of `ca`, creating its account on first use.
    pub(crate) async fn context(&self, ca: &CaName) -> Result<Context, DriveError> {
        let cell = lock(&self.inner.contexts)
            .entry(ca.clone())
            .or_default()
            .clone();
        cell.get_or_try_init(|| self.build(ca)).await.cloned()
    }

    async fn build(&self, name: &CaName) -> Result<Context, DriveError> {
        let Inner {
            services,
            cfg,
            first,
            ..
        } = &*self.inner;
        let ca = cfg.ca(name).ok_or_else(|| {
            DriveError::NotReady(Unready {
                what: format!("CA {name}"),
                problem: "not configured when certd started".into(),
                fix: "restart certd to use a CA added since".into(),
            })
        })?;
        let account = services
            .account_at(cfg, ca)
            .await
            .map_err(|e| setup_error(name, e))?;
        let (reaper, _) = services.reaper_at(cfg, ca, account).await?;
        if let Some(f) = &*lock(&self.inner.on_new_reaper) {
            f(reaper.clone());
        }
        tracing::info!(ca = %name, directory = %ca.acme.directory, "account ready");
        Ok(services.order_context_at(cfg, ca, reaper, first.solvers.clone(), first.mode))
    }

    /// Obtains and installs `cert` at the first CA of its list that can
    /// issue it, falling back to the next while the reason allows. In
    /// fleet mode, only under the certificate's lease (`lease`), claimed
    /// only if this host defines it the fleet's way, and only if the
    /// fleet's newest issuance of it is due too (or `forced`): else that
    /// one is installed here (`Source::Fleet`).
    pub(crate) async fn obtain(
        &self,
        cert: &CertificateConfig,
        forced: bool,
        cancel: &CancellationToken,
    ) -> Result<Issued, DriveError> {
        let services = &self.inner.services;
        let Some(fleet) = &services.fleet else {
            return self.obtain_with(cert, None, None, cancel).await;
        };
        let name = cert.name.as_str();
        let ours = fleet_order::definition(cert);
        fleet_order::may_claim(services, name, &ours).await?;
        lease::under_lease(
            fleet,
            &services.leases,
            &services.store,
            name,
            cancel,
            |fenced, held, token| async move {
                fleet_order::hold_definition(services, &fenced, name, &ours).await?;
                let host = self.fleet_host().await?;
                let current =
                    fleet_order::install_current(services, &host, cert, &fenced, forced).await?;
                if let Some(issued) = current {
                    return Ok(issued);
                }
                // The backoff is the daemon's; `certd renew` tries now.
                let daemon = self.inner.first.mode == order::RunMode::Daemon;
                if daemon && !forced {
                    fleet_order::check_held_back(services, &fenced, cert).await?;
                }
                let hooks = LeaseHooks::shared(services, held);
                let result = self
                    .obtain_with(cert, Some(&fenced), Some(hooks), &token)
                    .await;
                if let Err(e) = &result
                    && daemon
                    && !e.is_elsewhere()
                    && !matches!(e, DriveError::Cancelled)
                {
                    fleet_order::hold_after_failure(services, &fenced, cert, e).await;
                }
                result
            },
        )
        .await
    }

    /// This host's side of distribution (fleet mode), made on first use.
    async fn fleet_host(&self) -> Result<Arc<FleetHost>, DriveError> {
        let Inner { services, cfg, .. } = &*self.inner;
        let make = || async {
            let fleet = services
                .fleet
                .as_ref()
                .ok_or_else(|| DriveError::Fleet("not in fleet mode".into()))?;
            // Its own copy: the key is not cloned in memory.
            let key = FleetKey::load(&fleet.cfg.key_file)
                .map_err(|e| DriveError::Fleet(format!("fleet.key_file: {e}")))?;
            Ok(Arc::new(fleet_hosts::fleet_host(services, fleet, cfg, key)))
        };
        self.inner.fleet_host.get_or_try_init(make).await.cloned()
    }

    /// [`Cas::obtain`], its ledger writes made through `fenced` and the
    /// fleet's part done by `hooks` when given (fleet mode: the lease is
    /// held).
    async fn obtain_with(
        &self,
        cert: &CertificateConfig,
        fenced: Option<&Ledger>,
        hooks: Option<Arc<dyn FleetHooks>>,
        cancel: &CancellationToken,
    ) -> Result<Issued, DriveError> {
        let name = cert.name.as_str();
        let store = fenced.unwrap_or(&self.inner.services.store);
        let now = self.inner.services.clock.now();
        let issuer = store
            .issuer_ca(name)
            .await?
            .and_then(|s| s.parse::<CaName>().ok());
        let installed = install::installed(&self.inner.first.cert_dir, name)
            .map(|i| (i.not_before, i.not_after));
        let required = required_profiles(cert);
        let wants = wants_of(cert, issuer.as_ref(), installed, &required, now);
        let mut tried: Vec<&CaName> = Vec::new();
        loop {
            // An unreachable CA is tried all the same (its streak is only
            // ended by an answer); the attempt's failure decides.
            let choice = ca_choice::choose(&wants, |ca| self.facts(ca, name), &tried, now);
            let Some(ca) = choice.ca else {
                return Err(DriveError::NotReady(Unready {
                    what: format!("certificate {name}"),
                    problem: "no CA is configured for it".into(),
                    fix: "list a CA in its `ca`".into(),
                }));
            };
            for (skipped, why) in &choice.skipped {
                tracing::warn!(cert = name, ca = %skipped, "falling back to CA {ca}: {why}");
            }
            tried.extend(choice.skipped.iter().map(|(c, _)| *c));
            let result = self
                .attempt(ca, issuer.as_ref(), cert, fenced, hooks.clone(), cancel)
                .await;
            let e = match result {
                Ok(issued) => {
                    store.ca_answered(ca.as_str()).await?;
                    if self.inner.first.mode != order::RunMode::DryRun {
                        store.set_issuer_ca(name, ca.as_str()).await?;
                    }
                    return Ok(issued);
                }
                // The lease, not the CA: no other CA may be asked either.
                Err(e) if e.is_elsewhere() || fenced.is_some() && e.is_self_fenced() => {
                    return Err(e);
                }
                Err(e) => e,
            };
            tried.push(ca);
            let Some(reason) = self.fallback_reason(ca, name, &e, &wants, store).await? else {
                // Said where the operator looks (`status`): the other CAs
                // were left alone on purpose.
                if matches!(e, DriveError::Validation { .. } | DriveError::Preflight(_))
                    && let Some(next) =
                        ca_choice::choose(&wants, |c| self.facts(c, name), &tried, now).ca
                {
                    return Err(DriveError::NoFallback {
                        source: Box::new(e),
                        next: next.to_string(),
                    });
                }
                return Err(e);
            };
            let next = ca_choice::choose(&wants, |c| self.facts(c, name), &tried, now).ca;
            let Some(next) = next else {
                return Err(e);
            };
            tracing::warn!(cert = name, ca = %ca, error = %error_chain(&e), "falling back to CA {next}: {reason}");
        }
    }

    /// One attempt at `ca`: `replaces` only towards the issuer. Under a
    /// lease (`fenced`), the orders earlier holders left for `cert` at
    /// this CA are recovered first, so the order resumes theirs.
    async fn attempt(
        &self,
        ca: &CaName,
        issuer: Option<&CaName>,
        cert: &CertificateConfig,
        fenced: Option<&Ledger>,
        hooks: Option<Arc<dyn FleetHooks>>,
        cancel: &CancellationToken,
    ) -> Result<Issued, DriveError> {
        let mut ctx = match self.context(ca).await {
            Ok(ctx) => ctx,
            Err(e) => {
                if let DriveError::Acme(a) = &e
                    && is_unreachable(a)
                {
                    fenced
                        .unwrap_or(&self.inner.services.store)
                        .ca_failed(ca.as_str(), &a.to_string())
                        .await?;
                }
                return Err(e);
            }
        };
        // Certificates installed before the issuer was recorded came from
        // the only CA there was: `[acme]`, the primary.
        let primary = &self.inner.cfg.primary_ca().name;
        ctx.replaces_installed = issuer.unwrap_or(primary) == ca;
        ctx.fleet = hooks;
        if let Some(fenced) = fenced {
            if let Some(fleet) = &self.inner.services.fleet {
                fleet
                    .refresh_account_key(&ctx.account, &self.inner.cfg.storage.state_dir)
                    .await
                    .map_err(|e| DriveError::Fleet(e.to_string()))?;
            }
            ctx.store = fenced.clone();
            // The reaper's writes for this order (guard events, settled
            // authorizations) go through the lease's fence too.
            ctx.reaper = ctx.reaper.writing_to(fenced.clone());
            let name = cert.name.as_str();
            // Whether an earlier holder's order is still wanted is judged
            // by `cert` as configured now, not by the contexts'
            // configuration (the one certd started with): a certificate a
            // reload added or changed since is missing or different there,
            // and its order would be abandoned and placed a second time.
            let (resumable, abandoned) =
                order::recover_certificate(&ctx.reaper, fenced, name, |o| cert_wants(cert, o))
                    .await?;
            if resumable + abandoned > 0 {
                tracing::info!(
                    cert = name,
                    resumable,
                    abandoned,
                    "recovered the orders earlier holders of the lease left"
                );
            }
        }
        order::obtain(&ctx, cert, cancel).await
    }

    /// What this run knows of `ca` for the certificate `name`.
    fn facts(&self, ca: &CaName, name: &str) -> CaFacts {
        let limited = lock(&self.inner.limited)
            .get(&(ca.clone(), name.to_owned()))
            .copied()
            .unwrap_or_default();
        CaFacts {
            failing_since: None,
            rate_limited_until: limited.until,
            paused: limited.paused,
            profiles: self.ready(ca).map(|c| {
                let account = c.account.account();
                account.profiles().map(|p| p.name.to_owned()).collect()
            }),
        }
    }

    /// Why the failure `e` at `ca` lets the certificate `name` go to the
    /// next CA, if it does; records what it learnt of the CA.
    async fn fallback_reason(
        &self,
        ca: &CaName,
        name: &str,
        e: &DriveError,
        wants: &Wants<'_>,
        store: &Ledger,
    ) -> Result<Option<String>, LedgerError> {
        let now = self.inner.services.clock.now();
        let reason = match e {
            DriveError::Profile(why) => Some(why.clone()),
            DriveError::NoChallenge { .. } => Some(e.to_string()),
            DriveError::Guard(GuardError::Limit { until, .. }) => {
                (*until > wants.deadline).then(|| format!("certd's limit at this CA: {e}"))
            }
            DriveError::Acme(a) => {
                if let Some(limit) = a.rate_limit() {
                    let until = match a.disposition() {
                        Disposition::RateLimited { until } => until.map(UnixTime::from_system),
                        _ => None,
                    };
                    lock(&self.inner.limited).insert(
                        (ca.clone(), name.to_owned()),
                        Limited {
                            until,
                            paused: limit.paused,
                        },
                    );
                    if limit.paused {
                        Some("an identifier is paused at this CA".to_owned())
                    } else {
                        // No Retry-After: the CA did not say it ends in time.
                        let late = until.is_none_or(|u| u > wants.deadline);
                        late.then(|| a.to_string())
                    }
                } else if is_unreachable(a) {
                    store.ca_failed(ca.as_str(), &a.to_string()).await?;
                    let since = store
                        .ca_states()
                        .await?
                        .into_iter()
                        .find(|s| s.ca == ca.as_str())
                        .map(|s| UnixTime::from_secs(s.failing_since));
                    since
                        .filter(|s| s.plus(wants.fallback_after) <= now)
                        .map(|s| ca_choice::Skip::Unreachable { since: s }.to_string())
                } else {
                    store.ca_answered(ca.as_str()).await?;
                    None
                }
            }
            // A validation failure is the operator's to fix; anything else
            // is local.
            _ => None,
        };
        Ok(reason)
    }
}

/// The CA the next renewal of `cert` will try, as `status` shows it:
/// `issuer` is the CA of the installed certificate, `states` the CAs
/// failing now, `installed` its certificate's validity (not before, not
/// after).
pub(crate) fn next_ca(
    cert: &CertificateConfig,
    issuer: Option<&str>,
    installed: Option<(i64, i64)>,
    now: UnixTime,
) -> Option<CaName> {
    let issuer = issuer.and_then(|s| s.parse::<CaName>().ok());
    let required = required_profiles(cert);
    let wants = wants_of(cert, issuer.as_ref(), installed, &required, now);
    // A failing CA is asked first all the same, as `obtain` does: only an
    // answer ends its streak, so the next renewal tries it before falling
    // back.
    ca_choice::choose(&wants, |_| CaFacts::default(), &[], now)
        .ca
        .cloned()
}

/// What the CA choice needs to know of `cert`: `installed` is its
/// certificate's validity (not before, not after), `required` its
/// required profiles.
fn wants_of<'a>(
    cert: &'a CertificateConfig,
    issuer: Option<&'a CaName>,
    installed: Option<(i64, i64)>,
    required: &'a [String],
    now: UnixTime,
) -> Wants<'a> {
    Wants {
        cas: &cert.ca,
        sticky: cert.sticky,
        issuer,
        fallback_after: cert.ca_fallback_after,
        deadline: installed.map_or(now, |(from, to)| safe_deadline(from, to)),
        has_ip: cert.has_ip(),
        required_profiles: required,
    }
}

/// When a certificate valid from `not_before` to `not_after` must be
/// renewed at the latest: with a third of its lifetime left.
fn safe_deadline(not_before: i64, not_after: i64) -> UnixTime {
    let lifetime = (not_after - not_before).max(0);
    UnixTime::from_secs(not_after - lifetime / 3)
}

fn required_profiles(cert: &CertificateConfig) -> Vec<String> {
    if cert.profile.required {
        cert.profile.names.clone()
    } else {
        Vec::new()
    }
}

/// Whether `e` says the CA could not be reached or failed on its side.
fn is_unreachable(e: &AcmeError) -> bool {
    !matches!(e, AcmeError::Gated(_))
        && matches!(e.disposition(), Disposition::Retryable)
        && e.problem()
            .is_none_or(|p| p.status.is_none_or(|s| s >= 500))
}

fn setup_error(ca: &CaName, e: SetupError) -> DriveError {
    match e {
        SetupError::Acme(a) => DriveError::Acme(a),
        SetupError::Ledger(l) => DriveError::Ledger(l),
        other => DriveError::NotReady(Unready {
            what: format!("CA {ca}"),
            problem: other.to_string(),
            fix: format!("correct [ca.{ca}] (or [acme]) in the configuration"),
        }),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::*;
    use crate::clock::Clock;

    fn cert(list: &[&str], sticky: bool) -> CertificateConfig {
        let text = r#"
[acme]
directory = "https://ca.test/dir"
[storage]
state_dir = "/var/lib/certd"
cert_dir = "/etc/certd/live"
[http01]
listen = "127.0.0.1:80"
[[certificate]]
name = "www"
domains = ["www.example.test"]
challenges = ["http-01"]
"#;
        let cfg = Config::parse(Path::new("/etc/certd/config.toml"), text).expect("config");
        let mut c = cfg.certificates[0].clone();
        c.ca = list.iter().map(|n| n.parse().expect("a CA name")).collect();
        c.sticky = sticky;
        c
    }

    /// What `status` says the next renewal tries: the first CA, or the
    /// issuer when sticky; a CA failing for longer than
    /// `ca_fallback_after` is still the one tried first.
    #[test]
    fn next_ca_follows_the_list_stickiness_and_failures() {
        let clock = Clock::fixed(UnixTime::from_secs(1_800_000_000));
        let start = clock.now();
        let installed = Some((start.secs() - 86_400, start.secs() + 89 * 86_400));
        let c = cert(&["le", "zerossl"], false);
        let next = |c: &CertificateConfig, issuer, now| {
            next_ca(c, issuer, installed, now).map(|n| n.to_string())
        };
        assert_eq!(next(&c, Some("zerossl"), start).as_deref(), Some("le"));
        let sticky = cert(&["le", "zerossl"], true);
        assert_eq!(
            next(&sticky, Some("zerossl"), start).as_deref(),
            Some("zerossl")
        );
        clock.advance(c.ca_fallback_after + Duration::from_secs(1));
        assert_eq!(next(&c, None, clock.now()).as_deref(), Some("le"));
    }

    #[test]
    fn the_safe_deadline_leaves_a_third_of_the_lifetime() {
        assert_eq!(safe_deadline(0, 90), UnixTime::from_secs(60));
        assert_eq!(safe_deadline(10, 0), UnixTime::from_secs(0));
    }
}
