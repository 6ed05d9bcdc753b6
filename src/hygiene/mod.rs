//! Keeping the account clean at the CA: the reaper deactivates stale
//! pending authorizations, settles what orders leave behind within the
//! CA's failure budget, and guards every new order against the CA's
//! limits.

mod guard;
mod reaper;
mod settle;

pub(crate) use guard::Admission;
pub use guard::GuardError;
pub(crate) use reaper::{PassCounts, Reaper};
pub(crate) use settle::{Policy, Settled};
