//! Shared harness for the integration tests: a private ACME CA (Pebble plus
//! its DNS server), a BIND 9 taking dynamic updates, a scratch environment with a certd config pointing at
//! it, a runner for the `certd` binary, and certificate helpers.
//!
//! Everything is re-exported here so tests write `use crate::util::...`
//! without caring which file an item lives in.

// Each test module uses a different subset of the harness; without this,
// every helper some module does not call would warn as dead code.
#![allow(dead_code)]

mod ari;
mod balancer;
mod bind;
mod ca;
mod cert;
mod cmd;
mod disk;
mod egress;
mod env;
pub mod fleet;
mod front;
mod hooks;
mod installed;
mod pebble;
pub mod postgres;
mod ports;
mod proxy;

// Re-exported so tests need not know the file layout; which of these a
// given set of test modules names varies, hence the allow.
#[allow(unused_imports)]
pub use self::{
    ari::{AriServer, Window},
    balancer::Balancer,
    bind::Bind,
    ca::{
        CaAccount, CaOrder, assert_ca_status, assert_nothing_pending_among,
        assert_nothing_pending_at, assert_nothing_pending_at_ca, ca_authz_objects,
        ca_authz_statuses, ca_certificate, ca_orders, ca_orders_at, fetch_authz_as,
        forget_valid_authz, ledger_authz, ledger_authz_urls, ledger_events, validate_outside_certd,
    },
    cert::{parse_leaf, private_key_spki, read_pem_certs},
    cmd::{CmdOutput, Daemon, TestCommand},
    disk::{TinyDisk, checkpoint, integrity, snapshot},
    egress::Egress,
    env::{CaTable, DAEMON_RETRY_2S, DAEMON_RETRY_4S, TestEnv, cert_table},
    front::{Fault, FaultyFront, ForgedCert, Forgery},
    hooks::{flag, install_hook_wrapper, wait_for},
    installed::{assert_installed, installed, issuing_roots},
    pebble::{Pebble, PebbleOpts, Release},
    ports::free_port,
    proxy::TcpProxy,
};
