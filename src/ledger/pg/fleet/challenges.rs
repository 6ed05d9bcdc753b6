//! `challenge_responses`: the leaseholder stores each challenge's answer
//! before it asks the CA to validate, so whichever host the CA reaches can
//! answer it; [`CHALLENGE_CHANNEL`] tells every host's listener to load it.
//! Answers expire by the database's clock.

use std::time::Duration;

use super::{DbError, FencedWrite, FleetStore, micros, notify};

/// The channel a new challenge answer is announced on; the payload is the
/// token.
pub const CHALLENGE_CHANNEL: &str = "certd_challenge";

/// A challenge's answer, for whichever host the CA asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChallengeAnswer {
    pub token: String,
    pub kind: ChallengeKind,
    pub identifier: String,
    pub key_authorization: String,
    pub authz_url: String,
    /// How long the answer is kept (the authorization's own expiry).
    pub valid_for: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeKind {
    Http01,
    TlsAlpn01,
}

/// An unexpired http-01 answer, with how long it stays valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveAnswer {
    pub token: String,
    pub key_authorization: String,
    pub valid_for: Duration,
}

impl FleetStore {
    /// The key authorization for an http-01 `token`, if a host stored one
    /// that has not expired.
    pub async fn key_authorization(&self, token: &str) -> Result<Option<String>, DbError> {
        sqlx::query_scalar(
            "SELECT key_authorization FROM challenge_responses
              WHERE token = $1 AND kind = 'http-01' AND expires_at > now()",
        )
        .bind(token)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.error(e))
    }

    /// The key authorization of the newest unexpired tls-alpn-01 answer
    /// for `identifier`, if a host stored one.
    pub async fn tls_alpn_key_authorization(
        &self,
        identifier: &str,
    ) -> Result<Option<String>, DbError> {
        sqlx::query_scalar(
            "SELECT key_authorization FROM challenge_responses
              WHERE kind = 'tls-alpn-01' AND identifier = $1 AND expires_at > now()
              ORDER BY created_at DESC LIMIT 1",
        )
        .bind(identifier)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.error(e))
    }

    /// The unexpired http-01 answer for `token`, or with `None` every
    /// unexpired http-01 answer.
    pub async fn live_answers(&self, token: Option<&str>) -> Result<Vec<LiveAnswer>, DbError> {
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT token, key_authorization,
                    (extract(epoch FROM expires_at - now()) * 1000000)::bigint
               FROM challenge_responses
              WHERE kind = 'http-01' AND expires_at > now()
                AND ($1::text IS NULL OR token = $1)",
        )
        .bind(token)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        Ok(rows
            .into_iter()
            .map(|(token, key_authorization, micros)| LiveAnswer {
                token,
                key_authorization,
                // Unexpired by the query, so positive.
                valid_for: Duration::from_micros(u64::try_from(micros).unwrap_or(0)),
            })
            .collect())
    }

    /// Announces on [`CHALLENGE_CHANNEL`] that `token`'s answer is stored,
    /// so every host's listener loads it into memory. A hint only: a host
    /// that misses it answers from the table.
    pub async fn announce_challenge(&self, token: &str) -> Result<(), DbError> {
        notify(&self.pool, CHALLENGE_CHANNEL, token)
            .await
            .map_err(|e| self.error(e))
    }
}

impl FencedWrite {
    /// Stores (or replaces) a challenge's answer for `cert_name`, under
    /// this transaction's lease and epoch.
    pub async fn put_challenge(
        &mut self,
        cert_name: &str,
        answer: &ChallengeAnswer,
    ) -> Result<(), DbError> {
        let epoch = self.fence().epoch;
        sqlx::query(
            "INSERT INTO challenge_responses
                 (token, kind, identifier, key_authorization, cert_name, authz_url, epoch, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, now() + $8 * interval '1 microsecond')
             ON CONFLICT (token) DO UPDATE
                SET kind = excluded.kind, identifier = excluded.identifier,
                    key_authorization = excluded.key_authorization,
                    cert_name = excluded.cert_name, authz_url = excluded.authz_url,
                    epoch = excluded.epoch, expires_at = excluded.expires_at",
        )
        .bind(&answer.token)
        .bind(answer.kind.as_str())
        .bind(&answer.identifier)
        .bind(&answer.key_authorization)
        .bind(cert_name)
        .bind(&answer.authz_url)
        .bind(epoch)
        .bind(micros(answer.valid_for))
        .execute(&mut *self.tx)
        .await
        .map_err(|e| self.error(e))?;
        Ok(())
    }
}

impl ChallengeKind {
    /// The `kind` column's value.
    fn as_str(self) -> &'static str {
        match self {
            Self::Http01 => "http-01",
            Self::TlsAlpn01 => "tls-alpn-01",
        }
    }
}
