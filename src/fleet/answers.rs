//! Any host answers http-01: the leaseholder stores a challenge's answer
//! in `challenge_responses` (through [`super::FencedTx::put_challenge`])
//! before it tells the CA to validate, then announces the token on
//! [`CHALLENGE_CHANNEL`]. Whichever host the CA's request reaches answers
//! from memory, filled by its LISTEN task, or else from the table, so an
//! answer is served even before (or without) the notification.
//!
//! [`FleetAnswers::respond`] is what the http-01 responder calls with the
//! request target; the counters say how answers were found, for metrics.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::db::{CHALLENGE_CHANNEL, DbError, FleetDb, LiveAnswer};
use super::task::{FleetTask, cancelled_within};
use crate::ledger::fleet::FleetListener;

/// Where an http-01 request's path starts, before the token.
const CHALLENGE_PATH: &str = "/.well-known/acme-challenge/";

/// The fleet's http-01 answers as one host serves them.
#[derive(Debug)]
pub struct FleetAnswers {
    db: FleetDb,
    memory: Mutex<HashMap<String, Cached>>,
    counts: Counters,
}

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerSource {
    Memory,
    Database,
}

/// How this host's answers were found, since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AnswerCounts {
    pub memory: u64,
    pub database: u64,
    /// Tokens no host stored (or whose answer expired).
    pub unknown: u64,
    /// Lookups the database failed (the request got no answer).
    pub db_errors: u64,
}

/// How the LISTEN task behaves.
#[derive(Debug, Clone, Copy)]
pub struct ListenOptions {
    /// How soon to retry after the database failed the listener.
    pub retry_after: Duration,
    /// How often expired answers are dropped from memory.
    pub purge_every: Duration,
}

/// What the LISTEN task has done so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenStatus {
    pub listening: bool,
    pub connects: u64,
    pub connect_failures: u64,
    /// Answers put into memory (on connecting, and on notifications).
    pub loaded: u64,
    pub last_error: Option<String>,
}

#[derive(Debug)]
struct Cached {
    key_authorization: String,
    until: Instant,
}

#[derive(Debug, Default)]
struct Counters {
    memory: AtomicU64,
    database: AtomicU64,
    unknown: AtomicU64,
    db_errors: AtomicU64,
}

impl FleetAnswers {
    pub fn new(db: FleetDb) -> Arc<Self> {
        Arc::new(Self {
            db,
            memory: Mutex::new(HashMap::new()),
            counts: Counters::default(),
        })
    }

    /// The body for an http-01 request to `target`
    /// (`/.well-known/acme-challenge/<token>`), or `None` for a 404.
    pub async fn respond(&self, target: &str) -> Option<String> {
        let token = target.strip_prefix(CHALLENGE_PATH)?;
        // Tokens are base64url (RFC 8555 section 8.1); anything else is not
        // worth a query.
        let valid = !token.is_empty()
            && token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid {
            return None;
        }
        self.answer(token).await.map(|(body, _)| body)
    }

    /// The key authorization for `token`, from memory or else from the
    /// database, and where it came from.
    pub async fn answer(&self, token: &str) -> Option<(String, AnswerSource)> {
        if let Some(found) = self.remembered(token) {
            self.counts.memory.fetch_add(1, Ordering::Relaxed);
            return Some((found, AnswerSource::Memory));
        }
        match self.db.live_answers(Some(token)).await {
            Ok(mut found) => match found.pop() {
                Some(answer) => {
                    self.counts.database.fetch_add(1, Ordering::Relaxed);
                    // Kept for the CA's own request: a pre-flight read it
                    // from the database, and the validation that follows
                    // must not depend on the database still answering.
                    self.memory().insert(
                        answer.token,
                        Cached {
                            key_authorization: answer.key_authorization.clone(),
                            until: Instant::now() + answer.valid_for,
                        },
                    );
                    Some((answer.key_authorization, AnswerSource::Database))
                }
                None => {
                    self.counts.unknown.fetch_add(1, Ordering::Relaxed);
                    None
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "fleet: cannot look up an http-01 answer");
                self.counts.db_errors.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    pub fn counts(&self) -> AnswerCounts {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        AnswerCounts {
            memory: get(&self.counts.memory),
            database: get(&self.counts.database),
            unknown: get(&self.counts.unknown),
            db_errors: get(&self.counts.db_errors),
        }
    }

    /// Fills memory until `cancel` fires: every unexpired answer when the
    /// LISTEN connection (re)connects (announcements sent while it was
    /// down are lost), then each announced one; expired answers are
    /// dropped every `purge_every`.
    pub fn listen(
        self: &Arc<Self>,
        opts: ListenOptions,
        cancel: &CancellationToken,
    ) -> FleetTask<ListenStatus> {
        let this = Arc::clone(self);
        FleetTask::spawn(cancel, move |cancel, status| async move {
            this.listen_loop(opts, &cancel, &status).await;
            status.send_modify(|s| s.listening = false);
        })
    }

    async fn listen_loop(
        &self,
        opts: ListenOptions,
        cancel: &CancellationToken,
        status: &watch::Sender<ListenStatus>,
    ) {
        let mut purge = tokio::time::interval(opts.purge_every);
        loop {
            let connected = tokio::select! {
                () = cancel.cancelled() => return,
                r = self.connect() => r,
            };
            let mut listener = match connected {
                Ok((listener, loaded)) => {
                    status.send_modify(|s| {
                        s.listening = true;
                        s.connects += 1;
                        s.loaded += loaded;
                    });
                    listener
                }
                Err(e) => {
                    tracing::warn!(error = %e, "fleet: cannot listen for challenge answers; retrying");
                    status.send_modify(|s| {
                        s.connect_failures += 1;
                        s.last_error = Some(e.to_string());
                    });
                    if cancelled_within(cancel, opts.retry_after).await {
                        return;
                    }
                    continue;
                }
            };
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    _ = purge.tick() => self.purge(),
                    n = listener.next() => match n {
                        Some(token) => match self.load(Some(&token)).await {
                            Ok(loaded) => status.send_modify(|s| s.loaded += loaded),
                            // The database answers the request instead.
                            Err(e) => tracing::warn!(error = %e, "fleet: cannot load an announced answer"),
                        },
                        None => break,
                    },
                }
            }
            tracing::warn!(
                "fleet: the LISTEN connection for challenge answers was lost; reconnecting"
            );
            status.send_modify(|s| s.listening = false);
        }
    }

    /// Listens, then loads every unexpired answer: one stored before the
    /// LISTEN took effect would otherwise stay out of memory.
    async fn connect(&self) -> Result<(FleetListener, u64), DbError> {
        let listener = self.db.listen(CHALLENGE_CHANNEL).await?;
        let loaded = self.load(None).await?;
        Ok((listener, loaded))
    }

    /// Puts `token`'s answer (or every answer) into memory; returns how
    /// many.
    async fn load(&self, token: Option<&str>) -> Result<u64, DbError> {
        let answers = self.db.live_answers(token).await?;
        let now = Instant::now();
        let mut memory = self.memory();
        let n = answers.len() as u64;
        for LiveAnswer {
            token,
            key_authorization,
            valid_for,
        } in answers
        {
            memory.insert(
                token,
                Cached {
                    key_authorization,
                    until: now + valid_for,
                },
            );
        }
        Ok(n)
    }

    fn remembered(&self, token: &str) -> Option<String> {
        let memory = self.memory();
        let cached = memory.get(token)?;
        (cached.until > Instant::now()).then(|| cached.key_authorization.clone())
    }

    fn purge(&self) {
        let now = Instant::now();
        self.memory().retain(|_, cached| cached.until > now);
    }

    fn memory(&self) -> std::sync::MutexGuard<'_, HashMap<String, Cached>> {
        // Every write is one insert or retain; a panic elsewhere cannot
        // leave the map half-written.
        self.memory.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
