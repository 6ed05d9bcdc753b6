//! Fleet mode's foundations: several hosts sharing one ledger in
//! PostgreSQL (15 or newer), with no consensus of certd's own.
//!
//! - [`db`]: the fleet's handle on its database: connecting (errors name
//!   `host:port`, never the password), refusing servers older than 15,
//!   the migrations in `migrations/postgres/`, and the shared tables'
//!   reads and fenced writes in the fleet's types. The statements
//!   themselves are the ledger's (`ledger::fleet`): SQL only there.
//! - [`lease`]: a lease per certificate (`cert:<name>`), per account's
//!   reaper and for account creation, with an epoch as the fencing token,
//!   expiry judged by the database's clock only, renewal from a task of
//!   its own, and a local deadline on `CLOCK_BOOTTIME` after which the
//!   holder sends nothing.
//! - [`seal`]: private keys sealed with AES-256-GCM under the fleet key
//!   before they reach the database.
//! - [`distribute`]: every host installs: the leaseholder publishes an
//!   issuance, every host pulls, verifies, installs and reloads it, and
//!   reconciles at start, after its LISTEN connection was lost, and
//!   periodically.
//! - [`answers`]: any host answers http-01, from memory filled by LISTEN
//!   or else from the database.
//! - [`members`]: each host's heartbeat.
//! - [`task`]: the handle every fleet task is owned through.
//!
//! The daemon does not use this yet; it is wired in with the PostgreSQL
//! ledger backend. The design and the lab checks of the lease protocol:
//! `research/fleet-design.md`.

pub mod answers;
pub mod db;
pub mod distribute;
pub mod lease;
pub mod members;
pub mod seal;
pub mod task;

pub use self::answers::{AnswerCounts, AnswerSource, FleetAnswers, ListenOptions, ListenStatus};
pub use self::db::{
    CHALLENGE_CHANNEL, ChallengeAnswer, ChallengeKind, DbError, DbOptions, FleetDb, ISSUED_CHANNEL,
    InstallLag, InstallRecord, InstallRow, Issued, LeaseRow, LiveAnswer, MIN_SERVER_VERSION,
    Member, ServerVersion, Target, account_key_context,
};
pub use self::distribute::{
    CertTarget, DistributeOptions, DistributeStatus, FleetHost, PublishError, PullError, Pulled,
};
pub use self::lease::{
    Epoch, Fenced, FencedTx, HolderId, Lease, LeaseError, LeaseName, LeaseTiming, RenewEnd,
    RenewStatus, Renewer, TimingError,
};
pub use self::members::{HeartbeatStatus, keep_heartbeat};
pub use self::seal::{
    FleetKey, KeyFileError, KeyFileProblem, KeyId, SealContext, SealError, Sealed,
};
pub use self::task::FleetTask;
