//! Keeping the account clean at the CA: the reaper deactivates stale
//! pending authorizations and settles what orders leave behind.

pub mod reaper;
