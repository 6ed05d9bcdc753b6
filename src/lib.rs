//! certd: a certificate renewal daemon for ACME CAs.
//!
//! It reads certificate jobs from a TOML file, drives ACME orders through
//! instant-acme, installs certificates atomically and reloads the servers
//! that use them, and keeps a ledger (SQLite) of every ACME object it
//! creates so that no authorization is ever left pending at the CA.
//!
//! Modules by responsibility: `config` (the file), `store` (the ledger, the
//! only SQL), `acme` (HTTP, account, CA errors), `driver` (one order),
//! `solver` (challenge responses), `dns` (dns-01 over RFC 2136, propagation), `scheduler` (when things are due),
//! `install` (files and reloads), `memory` (free heap back to the system
//! when idle), `control` (the daemon's control socket), `cli` (commands and
//! exit codes).

pub mod acme;
pub mod alerts;
pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod dns;
pub mod health;
pub mod hygiene;
pub mod install;
pub mod ledger;
pub mod memory;
pub mod metrics;
pub mod order;
pub mod solver;
pub mod tinyhttp;
