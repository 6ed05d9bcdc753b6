//! The ledger's vocabulary as types: the states, event kinds and actors it
//! stores as text, and the set of names an order is for.
//!
//! Each enum maps to its stored text through one table (`stored_text!`),
//! which gives `as_str`, `FromStr`, `Display`, serde and sqlx's
//! encode/decode from the same lines. The texts are what existing ledgers
//! hold, so they never change; a text the table does not know decodes to
//! [`UnknownValue`], an error, not a panic.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArgumentBuffer, PgTypeInfo, PgValueRef};
use sqlx::sqlite::{SqliteArgumentValue, SqliteTypeInfo, SqliteValueRef};
use sqlx::{Postgres, Sqlite};

/// A stored text that names no variant of the type it is read as.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the ledger holds {value:?}, which is not a known {what}")]
pub struct UnknownValue {
    pub(crate) what: &'static str,
    pub(crate) value: String,
}

/// Declares an enum stored as text, with its one mapping to and from it.
macro_rules! stored_text {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident ($what:literal) {
            $( $(#[$vmeta:meta])* $variant:ident = $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every variant, in declaration order.
            #[allow(dead_code)]
            pub(crate) const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The text the ledger stores for this value.
            pub(crate) fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $text, )+
                }
            }
        }

        impl FromStr for $name {
            type Err = UnknownValue;

            fn from_str(s: &str) -> Result<Self, UnknownValue> {
                match s {
                    $( $text => Ok($name::$variant), )+
                    other => Err(UnknownValue { what: $what, value: other.to_owned() }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = std::borrow::Cow::<'de, str>::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }

        impl sqlx::Type<Sqlite> for $name {
            fn type_info() -> SqliteTypeInfo {
                <&str as sqlx::Type<Sqlite>>::type_info()
            }

            fn compatible(ty: &SqliteTypeInfo) -> bool {
                <&str as sqlx::Type<Sqlite>>::compatible(ty)
            }
        }

        impl<'q> sqlx::Encode<'q, Sqlite> for $name {
            fn encode_by_ref(
                &self,
                buf: &mut Vec<SqliteArgumentValue<'q>>,
            ) -> Result<IsNull, BoxDynError> {
                <&str as sqlx::Encode<'q, Sqlite>>::encode(self.as_str(), buf)
            }
        }

        impl<'r> sqlx::Decode<'r, Sqlite> for $name {
            fn decode(value: SqliteValueRef<'r>) -> Result<Self, BoxDynError> {
                let text = <&str as sqlx::Decode<'r, Sqlite>>::decode(value)?;
                Ok(text.parse()?)
            }
        }

        impl sqlx::Type<Postgres> for $name {
            fn type_info() -> PgTypeInfo {
                <&str as sqlx::Type<Postgres>>::type_info()
            }

            fn compatible(ty: &PgTypeInfo) -> bool {
                <&str as sqlx::Type<Postgres>>::compatible(ty)
            }
        }

        impl<'q> sqlx::Encode<'q, Postgres> for $name {
            fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
                <&str as sqlx::Encode<'q, Postgres>>::encode(self.as_str(), buf)
            }
        }

        impl<'r> sqlx::Decode<'r, Postgres> for $name {
            fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
                let text = <&str as sqlx::Decode<'r, Postgres>>::decode(value)?;
                Ok(text.parse()?)
            }
        }
    };
}

stored_text! {
    /// Where certd is with an order: its own state machine, beside the
    /// CA's status of the order.
    pub(crate) enum OrderStep ("order step") {
        /// Recorded with its authorizations; challenges being answered.
        Authorizing = "authorizing",
        /// Left unfinished by a process that stopped; the next order for
        /// the same names picks it up.
        Resumable = "resumable",
        /// The CSR is sent.
        Finalizing = "finalizing",
        /// The CA issued the certificate; it is not installed yet.
        Issued = "issued",
        /// Installed (or a dry run completed).
        Done = "done",
        Failed = "failed",
        /// Given up on by recovery or the reaper.
        Abandoned = "abandoned",
    }
}

impl OrderStep {
    /// Whether an order at this step is still being worked on (not done,
    /// failed, abandoned, or issued and waiting to be installed): what
    /// recovery looks at after a restart.
    pub(crate) fn in_flight(self) -> bool {
        match self {
            OrderStep::Authorizing | OrderStep::Resumable | OrderStep::Finalizing => true,
            OrderStep::Issued | OrderStep::Done | OrderStep::Failed | OrderStep::Abandoned => false,
        }
    }

    /// Whether a new order for the same names reuses an order at this step.
    /// A finalizing order is not: recovery first decides whether its key
    /// survived, and marks it `Resumable` if so.
    pub(crate) fn resumable(self) -> bool {
        match self {
            OrderStep::Authorizing | OrderStep::Resumable => true,
            OrderStep::Finalizing
            | OrderStep::Issued
            | OrderStep::Done
            | OrderStep::Failed
            | OrderStep::Abandoned => false,
        }
    }
}

stored_text! {
    /// An order's status as the CA last reported it (RFC 8555 §7.1.6),
    /// plus certd's own `Abandoned`.
    pub enum OrderStatus ("order status") {
        Pending = "pending",
        Ready = "ready",
        Processing = "processing",
        Valid = "valid",
        Invalid = "invalid",
        /// certd gave up on the order (it is not a status the CA reports).
        Abandoned = "abandoned",
    }
}

impl OrderStatus {
    /// Whether the CA may still take the order somewhere: what makes an
    /// unfinished order worth resuming.
    pub(crate) fn live(self) -> bool {
        match self {
            OrderStatus::Pending
            | OrderStatus::Ready
            | OrderStatus::Processing
            | OrderStatus::Valid => true,
            OrderStatus::Invalid | OrderStatus::Abandoned => false,
        }
    }
}

stored_text! {
    /// An authorization's status as the CA last reported it (RFC 8555
    /// §7.1.6), plus certd's own `Gone`.
    pub enum AuthzStatus ("authorization status") {
        Pending = "pending",
        Valid = "valid",
        Invalid = "invalid",
        Deactivated = "deactivated",
        Expired = "expired",
        Revoked = "revoked",
        /// The CA no longer knows the authorization (404).
        Gone = "gone",
    }
}

stored_text! {
    /// A challenge's status as the CA reported it; a challenge certd
    /// answered follows its authorization to a final state, so it can hold
    /// an authorization's status too.
    pub(crate) enum ChallengeStatus ("challenge status") {
        Pending = "pending",
        Processing = "processing",
        Valid = "valid",
        Invalid = "invalid",
        Deactivated = "deactivated",
        Expired = "expired",
        Revoked = "revoked",
        Gone = "gone",
    }
}

impl From<AuthzStatus> for ChallengeStatus {
    fn from(s: AuthzStatus) -> Self {
        match s {
            AuthzStatus::Pending => ChallengeStatus::Pending,
            AuthzStatus::Valid => ChallengeStatus::Valid,
            AuthzStatus::Invalid => ChallengeStatus::Invalid,
            AuthzStatus::Deactivated => ChallengeStatus::Deactivated,
            AuthzStatus::Expired => ChallengeStatus::Expired,
            AuthzStatus::Revoked => ChallengeStatus::Revoked,
            AuthzStatus::Gone => ChallengeStatus::Gone,
        }
    }
}

stored_text! {
    /// How a certificate's last attempt ended (`certificates.last_result`).
    pub enum LastResult ("last result") {
        /// Issued and installed, or nothing was due.
        Ok = "ok",
        /// Failed: `last_error` says why.
        Error = "error",
    }
}

stored_text! {
    /// Who deactivated an authorization (`deactivated_by`).
    pub(crate) enum Actor ("actor") {
        /// An order settling its own authorizations.
        Driver = "driver",
        /// The reaper's periodic pass.
        Reaper = "reaper",
        /// An operator's command.
        Cli = "cli",
    }
}

stored_text! {
    /// What an event row records.
    pub enum EventKind ("event kind") {
        DaemonStarted = "daemon-started",
        RestartNeeded = "restart-needed",
        CaReachable = "ca-reachable",
        CaUnreachable = "ca-unreachable",
        RateLimited = "rate-limited",
        Notified = "notified",
        NotifyFailed = "notify-failed",
        Deactivated = "deactivated",
        DeactivateRefused = "deactivate-refused",
        HeldBack = "held-back",
        ReaperPass = "reaper-pass",
        ReaperError = "reaper-error",
        AriExempt = "ari-exempt",
        CaLimitGuard = "ca-limit-guard",
        PendingAuthzGuard = "pending-authz-guard",
        OrderResumed = "order-resumed",
        OrderRecovered = "order-recovered",
        OrderAdopted = "order-adopted",
        OrderAbandoned = "order-abandoned",
        CleanupFailed = "cleanup-failed",
        DryRun = "dry-run",
        InstallFromDisk = "install-from-disk",
        IssuedDropped = "issued-dropped",
        Installed = "installed",
        Revoked = "revoked",
        ReloadOk = "reload-ok",
        ReloadFailed = "reload-failed",
    }
}

/// The names an order is for: sorted and without duplicates, so that two
/// orders for the same names compare equal however they were listed. The
/// ledger stores it as a JSON array of strings, which SQL compares as text.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Identifiers(Vec<String>);

impl Identifiers {
    /// The set of `names`.
    pub(crate) fn new<I, S>(names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut v: Vec<String> = names.into_iter().map(Into::into).collect();
        v.sort();
        v.dedup();
        Self(v)
    }

    /// The stored form: a JSON array.
    fn to_json(&self) -> String {
        // Serializing a list of strings cannot fail.
        serde_json::to_string(&self.0).unwrap_or_default()
    }
}

/// Read as the sorted list of names; never changed through it, so the set
/// stays sorted and free of duplicates.
impl std::ops::Deref for Identifiers {
    type Target = [String];

    fn deref(&self) -> &[String] {
        &self.0
    }
}

impl FromStr for Identifiers {
    type Err = UnknownValue;

    fn from_str(s: &str) -> Result<Self, UnknownValue> {
        serde_json::from_str::<Vec<String>>(s)
            .map(Identifiers::new)
            .map_err(|_| UnknownValue {
                what: "list of names",
                value: s.to_owned(),
            })
    }
}

impl sqlx::Type<Sqlite> for Identifiers {
    fn type_info() -> SqliteTypeInfo {
        <String as sqlx::Type<Sqlite>>::type_info()
    }

    fn compatible(ty: &SqliteTypeInfo) -> bool {
        <String as sqlx::Type<Sqlite>>::compatible(ty)
    }
}

impl<'q> sqlx::Encode<'q, Sqlite> for Identifiers {
    fn encode_by_ref(&self, buf: &mut Vec<SqliteArgumentValue<'q>>) -> Result<IsNull, BoxDynError> {
        <String as sqlx::Encode<'q, Sqlite>>::encode(self.to_json(), buf)
    }
}

impl<'r> sqlx::Decode<'r, Sqlite> for Identifiers {
    fn decode(value: SqliteValueRef<'r>) -> Result<Self, BoxDynError> {
        let text = <&str as sqlx::Decode<'r, Sqlite>>::decode(value)?;
        Ok(text.parse()?)
    }
}

impl sqlx::Type<Postgres> for Identifiers {
    fn type_info() -> PgTypeInfo {
        <String as sqlx::Type<Postgres>>::type_info()
    }

    fn compatible(ty: &PgTypeInfo) -> bool {
        <String as sqlx::Type<Postgres>>::compatible(ty)
    }
}

impl<'q> sqlx::Encode<'q, Postgres> for Identifiers {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        <String as sqlx::Encode<'q, Postgres>>::encode(self.to_json(), buf)
    }
}

impl<'r> sqlx::Decode<'r, Postgres> for Identifiers {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        let text = <&str as sqlx::Decode<'r, Postgres>>::decode(value)?;
        Ok(text.parse()?)
    }
}

/// A window the CA suggested for renewal (ARI), as the ledger stores it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AriWindow<'a> {
    /// Unix seconds; `start < end`.
    pub(crate) start: i64,
    pub(crate) end: i64,
    pub(crate) explanation_url: Option<&'a str>,
}

/// One ARI check's outcome, as `record_ari` stores it: the window on
/// success, the error otherwise.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AriRecord<'a> {
    pub(crate) window: Option<AriWindow<'a>>,
    pub(crate) next_check: Option<i64>,
    pub(crate) error: Option<&'a str>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_round_trips_through_its_text() {
        for s in OrderStep::ALL {
            assert_eq!(s.as_str().parse::<OrderStep>(), Ok(*s));
        }
        for s in OrderStatus::ALL {
            assert_eq!(s.as_str().parse::<OrderStatus>(), Ok(*s));
        }
        for s in AuthzStatus::ALL {
            assert_eq!(s.as_str().parse::<AuthzStatus>(), Ok(*s));
            let c = ChallengeStatus::from(*s);
            assert_eq!(c.as_str(), s.as_str());
        }
        for s in Actor::ALL {
            assert_eq!(s.as_str().parse::<Actor>(), Ok(*s));
        }
        for s in EventKind::ALL {
            assert_eq!(s.as_str().parse::<EventKind>(), Ok(*s));
        }
    }

    #[test]
    fn an_unknown_text_is_an_error_naming_it() {
        let e = "created".parse::<OrderStep>().unwrap_err();
        assert_eq!(e.value, "created");
        assert!(e.to_string().contains("order step"), "{e}");
    }

    #[test]
    fn identifiers_are_a_sorted_set_stored_as_before() {
        let ids = Identifiers::new(["b.example", "a.example", "b.example"]);
        assert_eq!(*ids, ["a.example", "b.example"]);
        // The text earlier versions stored: `serde_json::to_string` of the
        // sorted list.
        assert_eq!(ids.to_json(), r#"["a.example","b.example"]"#);
        assert_eq!(ids.to_json().parse::<Identifiers>(), Ok(ids));
        assert!("not json".parse::<Identifiers>().is_err());
    }
}
