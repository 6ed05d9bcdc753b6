//! Fleet mode's foundations: several hosts sharing one ledger in
//! PostgreSQL (15 or newer), with no consensus of certd's own.
//!
//! - [`db`]: connecting (errors name `host:port`, never the password),
//!   refusing servers older than 15, the migrations in
//!   `migrations/postgres/`, and the shared tables' reads and writes.
//! - [`lease`]: a lease per certificate (`cert:<name>`), per account's
//!   reaper and for account creation, with an epoch as the fencing token,
//!   expiry judged by the database's clock only, renewal from a task of
//!   its own, and a local deadline on `CLOCK_BOOTTIME` after which the
//!   holder sends nothing.
//! - [`seal`]: private keys sealed with AES-256-GCM under the fleet key
//!   before they reach the database.
//!
//! The daemon does not use this yet; it is wired in with the PostgreSQL
//! ledger backend. The design and the lab checks of the lease protocol:
//! `research/fleet-design.md`.

pub mod db;
pub mod lease;
pub mod seal;

pub use self::db::{
    ChallengeAnswer, ChallengeKind, DbError, DbOptions, FleetDb, Issued, MIN_SERVER_VERSION,
    Member, ServerVersion, Target, account_key_context,
};
pub use self::lease::{
    Epoch, Fenced, FencedTx, HolderId, Lease, LeaseError, LeaseName, LeaseTiming, RenewEnd,
    RenewStatus, Renewer, TimingError,
};
pub use self::seal::{
    FleetKey, KeyFileError, KeyFileProblem, KeyId, SealContext, SealError, Sealed,
};
