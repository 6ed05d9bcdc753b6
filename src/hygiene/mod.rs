//! Keeping the account clean at the CA: the reaper deactivates stale
//! pending authorizations, settles what orders leave behind within the
//! CA's failure budget, and guards every new order against the CA's
//! limits.

mod guard;
mod reaper;
mod settle;

pub use guard::{Admission, GuardError};
pub use reaper::{ActiveClaim, ActiveOrders, PassCounts, Reaper};
pub use settle::{Policy, Settled};
