//! The scheduler's state, without its I/O: every configured certificate's
//! [`Entry`], its deadlines in ordered sets (as mini-redis keeps its
//! expirations, so each wake-up looks only at the certificates it acts
//! on), who waits for which order, and the generation that tells a result
//! from before a configuration change from a current one. The scheduler
//! (`schedule`) plans, orders and records; every change of state it makes
//! goes through here, and here is what the unit tests drive, with no CA
//! and no clock but the times they pass.

use std::collections::{BTreeMap, BTreeSet};

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::acme::LimitScope;
use crate::acme::ari::Window;
use crate::clock::UnixTime;
use crate::config::CertificateConfig;

use super::schedule::Outcome;

/// A window the CA suggested, for which certificate, and when in it.
#[derive(Debug, Clone)]
pub(super) struct AriPlan {
    pub(super) serial: String,
    pub(super) window: Window,
    pub(super) at: UnixTime,
}

/// One configured certificate.
pub(super) struct Entry {
    pub(super) cert: CertificateConfig,
    pub(super) next: UnixTime,
    pub(super) why: String,
    pub(super) failures: u32,
    /// Cancels the running order, if one is running.
    pub(super) running: Option<CancellationToken>,
    /// When to ask the CA for a new ARI window.
    pub(super) ari_recheck: Option<UnixTime>,
    /// The last good ARI window of the installed certificate and the
    /// instant drawn in it.
    pub(super) ari: Option<AriPlan>,
    /// Failed ARI checks since the last good one.
    pub(super) ari_errors: u32,
    /// Bumped on every configuration change, so a result from before a
    /// change is not applied to the changed certificate.
    pub(super) generation: u64,
}

/// What a new configuration changes ([`Timetable::reconcile`]).
pub(super) struct Reconciled {
    /// No longer configured: taken out (a running order cancelled).
    pub(super) removed: Vec<String>,
    /// Changed and not running: taken out, to be planned afresh and put
    /// back.
    pub(super) replan: Vec<(String, Entry)>,
    /// Changed while its order runs: replanned when the result arrives.
    pub(super) changed_running: Vec<String>,
    /// New certificates.
    pub(super) added: Vec<CertificateConfig>,
}

/// How an order's result meets the table ([`Timetable::finish`]).
pub(super) enum Finished {
    /// The certificate was removed meanwhile.
    Gone,
    /// The certificate changed meanwhile: its entry, to plan afresh.
    Stale(Entry),
    /// The result is about the entry as configured.
    Current(Entry),
}

#[derive(Default)]
pub(super) struct Timetable {
    /// Every configured certificate. Changed only through `insert` and
    /// `take`, which keep the two timer sets below in step with it.
    entries: BTreeMap<String, Entry>,
    /// `(next, name)` of every entry without a running order.
    renewals: BTreeSet<(UnixTime, String)>,
    /// `(ari_recheck, name)` of every entry without a running order that
    /// has one.
    ari_rechecks: BTreeSet<(UnixTime, String)>,
    generation: u64,
    /// Who waits for the running (or next) order of a certificate.
    waiters: BTreeMap<String, Vec<oneshot::Sender<Outcome>>>,
}

impl Timetable {
    /// A new entry for `cert`, due at `now` until planned.
    pub(super) fn new_entry(&mut self, cert: CertificateConfig, now: UnixTime) -> Entry {
        self.generation += 1;
        Entry {
            cert,
            next: now,
            why: String::new(),
            failures: 0,
            running: None,
            ari_recheck: None,
            ari: None,
            ari_errors: 0,
            generation: self.generation,
        }
    }

    /// Puts `entry` in the table and, unless its order is running, its
    /// deadlines in the timer sets.
    pub(super) fn insert(&mut self, name: String, entry: Entry) {
        if entry.running.is_none() {
            self.renewals.insert((entry.next, name.clone()));
            if let Some(t) = entry.ari_recheck {
                self.ari_rechecks.insert((t, name.clone()));
            }
        }
        self.entries.insert(name, entry);
    }

    /// Takes `name`'s entry out of the table and its deadlines out of the
    /// timer sets, to change it and `insert` it again.
    pub(super) fn take(&mut self, name: &str) -> Option<Entry> {
        let entry = self.entries.remove(name)?;
        // The set keys own the name; the lookups below borrow a copy once.
        let name = name.to_owned();
        self.renewals.remove(&(entry.next, name.clone()));
        if let Some(t) = entry.ari_recheck {
            self.ari_rechecks.remove(&(t, name));
        }
        Some(entry)
    }

    #[cfg(test)]
    fn get(&self, name: &str) -> Option<&Entry> {
        self.entries.get(name)
    }

    /// The earliest renewal not running, and its certificate.
    pub(super) fn first_renewal(&self) -> Option<(UnixTime, &str)> {
        self.renewals.first().map(|(t, n)| (*t, n.as_str()))
    }

    pub(super) fn first_ari_recheck(&self) -> Option<UnixTime> {
        self.ari_rechecks.first().map(|(t, _)| *t)
    }

    /// The certificates whose ARI re-check time has come.
    pub(super) fn ari_rechecks_due(&self, now: UnixTime) -> Vec<String> {
        self.ari_rechecks
            .iter()
            .take_while(|(at, _)| *at <= now)
            .map(|(_, name)| name.clone())
            .collect()
    }

    /// The certificates without a running order, renewed before `until`,
    /// that name what `scope` names.
    pub(super) fn touched_by(&self, scope: &LimitScope, until: UnixTime) -> Vec<String> {
        self.entries
            .iter()
            .filter(|(_, e)| {
                e.running.is_none() && e.next < until && scope.touches(&e.cert.domain_strings())
            })
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// The certificates with a running order.
    pub(super) fn running(&self) -> impl Iterator<Item = &str> {
        self.entries
            .iter()
            .filter(|(_, e)| e.running.is_some())
            .map(|(n, _)| n.as_str())
    }

    /// `reply` hears how `name`'s next order ends.
    pub(super) fn wait(&mut self, name: String, reply: oneshot::Sender<Outcome>) {
        self.waiters.entry(name).or_default().push(reply);
    }

    /// Applies a new set of certificates: removed ones leave (their order
    /// cancelled, their waiters told the daemon gave up), changed ones get
    /// a new generation (their order cancelled when their names changed)
    /// and, when not running, come out to be planned afresh with their
    /// failures forgotten; new ones are returned to be added.
    pub(super) fn reconcile(&mut self, wanted: Vec<CertificateConfig>) -> Reconciled {
        let wanted: BTreeMap<String, CertificateConfig> = wanted
            .into_iter()
            .map(|c| (c.name.to_string(), c))
            .collect();
        let removed: Vec<String> = self
            .entries
            .keys()
            .filter(|n| !wanted.contains_key(*n))
            .cloned()
            .collect();
        for name in &removed {
            // Dropped: a waiting `certd renew` hears that the daemon gave up.
            self.waiters.remove(name);
            if let Some(entry) = self.take(name)
                && let Some(token) = entry.running
            {
                token.cancel();
            }
        }
        let mut reconciled = Reconciled {
            removed,
            replan: Vec::new(),
            changed_running: Vec::new(),
            added: Vec::new(),
        };
        for (name, cert) in wanted {
            let Some(mut entry) = self.take(&name) else {
                reconciled.added.push(cert);
                continue;
            };
            if entry.cert == cert {
                self.insert(name, entry);
                continue;
            }
            self.generation += 1;
            entry.generation = self.generation;
            let names_changed = entry.cert.domains != cert.domains;
            entry.cert = cert;
            match &entry.running {
                Some(token) => {
                    if names_changed {
                        // Its result carries the old generation and is
                        // replanned when it arrives.
                        token.cancel();
                    }
                    reconciled.changed_running.push(name.clone());
                    self.insert(name, entry);
                }
                None => {
                    entry.failures = 0;
                    reconciled.replan.push((name, entry));
                }
            }
        }
        reconciled
    }

    /// Meets an order's result: its waiters hear `outcome`, and the entry
    /// comes out (no longer running) for the scheduler to record and
    /// plan; stale when its configuration changed after the order began.
    pub(super) fn finish(&mut self, name: &str, generation: u64, outcome: &Outcome) -> Finished {
        for waiter in self.waiters.remove(name).unwrap_or_default() {
            // A client gone away does not matter to the order.
            let _ = waiter.send(outcome.clone());
        }
        let Some(mut entry) = self.take(name) else {
            return Finished::Gone;
        };
        entry.running = None;
        if entry.generation == generation {
            Finished::Current(entry)
        } else {
            Finished::Stale(entry)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::clock::Clock;
    use crate::config::Config;

    fn certs(list: &[(&str, &str)]) -> Vec<CertificateConfig> {
        let mut text = String::from(
            "[acme]\ndirectory = \"https://ca/dir\"\n[storage]\nstate_dir = \"s\"\ncert_dir = \"c\"\n[http01]\nlisten = \"127.0.0.1:80\"\n",
        );
        for (name, domain) in list {
            text.push_str(&format!(
                "[[certificate]]\nname = \"{name}\"\ndomains = [\"{domain}\"]\n"
            ));
        }
        Config::parse(Path::new("/x.toml"), &text)
            .expect("valid")
            .certificates
    }

    fn table(clock: &Clock, list: &[(&str, &str)]) -> Timetable {
        let mut t = Timetable::default();
        for cert in certs(list) {
            let name = cert.name.to_string();
            let mut entry = t.new_entry(cert, clock.now());
            entry.next = clock.now().plus(std::time::Duration::from_secs(3600));
            t.insert(name, entry);
        }
        t
    }

    /// Marks `name` running, as the scheduler does when it starts its
    /// order; the order's token and generation.
    fn start(t: &mut Timetable, name: &str) -> (CancellationToken, u64) {
        let mut e = t.take(name).expect("entry");
        let token = CancellationToken::new();
        e.running = Some(token.clone());
        let generation = e.generation;
        t.insert(name.to_owned(), e);
        (token, generation)
    }

    #[test]
    fn a_running_order_leaves_the_timer_sets_and_comes_back_when_finished() {
        let clock = Clock::fixed(UnixTime::from_secs(1_000_000));
        let mut t = table(&clock, &[("a", "a.example"), ("b", "b.example")]);
        assert_eq!(t.first_renewal().map(|(_, n)| n), Some("a"));
        let (_, generation) = start(&mut t, "a");
        assert_eq!(t.first_renewal().map(|(_, n)| n), Some("b"));
        assert_eq!(t.running().collect::<Vec<_>>(), ["a"]);
        let Finished::Current(mut e) = t.finish("a", generation, &Outcome::Failed("x".into()))
        else {
            panic!("a current result");
        };
        assert!(e.running.is_none());
        e.next = clock.now();
        t.insert("a".into(), e);
        assert_eq!(
            t.first_renewal(),
            Some((UnixTime::from_secs(1_000_000), "a"))
        );
        assert_eq!(t.running().count(), 0);
    }

    #[test]
    fn reconcile_adds_removes_and_replans() {
        let clock = Clock::fixed(UnixTime::from_secs(1_000_000));
        let mut t = table(
            &clock,
            &[("a", "a.example"), ("b", "b.example"), ("c", "c.example")],
        );
        let mut failing = t.take("b").expect("b");
        failing.failures = 4;
        t.insert("b".into(), failing);
        let (token_c, _) = start(&mut t, "c");
        let (reply, heard) = oneshot::channel();
        t.wait("c".into(), reply);

        // a unchanged, b's names changed, c removed, d new.
        let r = t.reconcile(certs(&[
            ("a", "a.example"),
            ("b", "b2.example"),
            ("d", "d.example"),
        ]));
        assert_eq!(r.removed, ["c"]);
        assert!(
            token_c.is_cancelled(),
            "a removed certificate's order stops"
        );
        assert!(
            heard.blocking_recv().is_err(),
            "its waiter hears the daemon gave up"
        );
        assert_eq!(r.added.len(), 1);
        assert_eq!(r.added[0].name.as_str(), "d");
        assert_eq!(r.replan.len(), 1);
        let (name, entry) = &r.replan[0];
        assert_eq!(name, "b");
        assert_eq!(entry.failures, 0, "a changed certificate starts afresh");
        assert_eq!(entry.cert.domain_strings(), ["b2.example"]);
        assert!(t.get("b").is_none(), "taken out to be planned");
        assert!(t.get("a").is_some());
        assert!(r.changed_running.is_empty());
    }

    #[test]
    fn a_result_from_before_a_change_is_stale() {
        let clock = Clock::fixed(UnixTime::from_secs(1_000_000));
        let mut t = table(&clock, &[("a", "a.example")]);
        let (token, generation) = start(&mut t, "a");
        let (reply, heard) = oneshot::channel();
        t.wait("a".into(), reply);

        // Renamed while its order runs: the order is cancelled, and its
        // result, when it comes, is not applied to the new names.
        let r = t.reconcile(certs(&[("a", "a2.example")]));
        assert_eq!(r.changed_running, ["a"]);
        assert!(token.is_cancelled());
        match t.finish("a", generation, &Outcome::Failed("cancelled".into())) {
            Finished::Stale(e) => assert_eq!(e.cert.domain_strings(), ["a2.example"]),
            _ => panic!("a stale result"),
        }
        assert!(matches!(heard.blocking_recv(), Ok(Outcome::Failed(_))));
        // Removed meanwhile: nothing to apply it to.
        assert!(matches!(
            t.finish("a", generation, &Outcome::Unknown),
            Finished::Gone
        ));
    }

    #[test]
    fn a_limit_holds_back_only_the_idle_certificates_naming_its_names() {
        let clock = Clock::fixed(UnixTime::from_secs(1_000_000));
        let mut t = table(
            &clock,
            &[("a", "a.example"), ("b", "b.example"), ("c", "c.example")],
        );
        // c's own order is the one that met the limit: it is running.
        start(&mut t, "c");
        let scope = LimitScope::Names(vec!["a.example".into(), "c.example".into()]);
        let later = clock.now().plus(std::time::Duration::from_secs(7200));
        assert_eq!(t.touched_by(&scope, later), ["a"]);
        // Already renewed after the limit ends: not held back.
        assert!(t.touched_by(&scope, clock.now()).is_empty());
    }
}
