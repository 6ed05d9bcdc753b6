//! Installing certificates where web servers read them, and what follows.
//!
//! - [`files`]: the atomic installer (`cert_dir/<name>/versions/…`,
//!   `current`, stable links) and reading an installed certificate back;
//! - [`x509`]: certificate facts ([`CertInfo`]), trusted roots and the
//!   chain check an issuance must pass;
//! - [`reload`]: the reload commands run after an install;
//! - [`renewal`]: when a certificate is due without ARI.

mod files;
mod reload;
mod renewal;
mod x509;
#[cfg(test)]
mod testca;

pub use files::{FILES, InstallError, Issuance, install, installed, read_reusable_key};
pub use reload::{ReloadOutcome, run_command, run_reloads};
pub use renewal::{SHORT_LIFETIME, renewal_time};
pub use x509::{CertInfo, TrustedRoots, verify_chain};
