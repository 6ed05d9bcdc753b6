//! The crate's single integration-test binary.
//!
//! Following ripgrep's layout, every integration test lives in a module of
//! this one binary: the crate is linked once, and the shared harness in
//! `util` is compiled once. Add a new area of tests as another `mod` line
//! (e.g. `mod config;`, `mod issuance;`) next to a file of the same name.

mod util;

mod ari;
mod ca_features;
mod config;
mod control;
mod daemon;
mod dns01;
mod dns_persist;
mod faults;
mod fleet;
mod fleet_daemon;
mod fleet_durable;
mod fleet_faults;
mod fleet_setup;
mod fleet_hosts;
mod harness;
mod hostile_ca;
mod hostile_local;
mod hostile_verify;
mod issuance;
mod lifecycle;
mod multi_ca;
mod ops;
mod output;
mod preorder;
mod profiles_ip;
mod rate_limits;
mod reaper;
mod storage;
mod structure;
