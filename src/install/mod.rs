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

pub use files::InstallError;
pub(crate) use files::{FILES, Issuance, install, installed, read_reusable_key};
pub use reload::ReloadOutcome;
pub(crate) use reload::{run_command, run_reloads};
pub(crate) use renewal::renewal_time;
pub use x509::CertInfo;
