//! certd: a certificate renewal daemon for ACME CAs.
//!
//! It reads certificate jobs from a TOML file, drives ACME orders through
//! instant-acme, installs certificates atomically and reloads the servers
//! that use them, and keeps a ledger (SQLite) of every ACME object it
//! creates so that no authorization is ever left pending at the CA.
//!
//! The modules, one line each, lowest layer first. A module names only the
//! modules above it in this list (`tests/structure.rs` checks it), so the
//! import graph has no cycles.

pub mod clock; // the one wall clock, settable in tests
pub mod memory; // heap returned to the system when idle
pub mod tinyhttp; // the small HTTP/1.1 server the responders and metrics use
pub mod process; // running programs: own process group, minimal environment, timeout
pub mod safefs; // files and directories only certd can change; 0600 secrets
pub mod text; // outside text escaped for terminals, logs and child processes
pub mod config; // the file: parsed purely, then resolved; typed reload diff
pub mod ledger; // every ACME object certd created, and the only SQL
pub mod acme; // HTTP, nonces, the account, the CA's errors, ARI
pub mod dns; // a DNS client and propagation checks
pub mod solver; // challenge responses: http-01, dns-01, tls-alpn-01
pub mod install; // certificate files, X.509 facts, reload commands
pub mod fleet; // several hosts on one PostgreSQL: leases, sealed keys, distribution
pub mod hygiene; // the reaper, settling leftovers, the CA-limit guard
pub mod order; // one order from plan to installed certificate; recovery
pub mod alerts; // notifications when a certificate needs a person
pub mod health; // certificate health as status and exit codes read it
pub mod metrics; // the Prometheus endpoint
pub mod app; // the services every run builds once; one outcome handler
pub mod daemon; // `certd run`: scheduling, reload, control socket, systemd
pub mod cli; // commands, output and exit codes
