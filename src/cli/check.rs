//! `certd check-config`: the file validated, and each certificate in a
//! line.

use std::process::ExitCode;

use crate::config::{CertificateConfig, Config};

pub(super) fn check_config(cfg: &Config) -> ExitCode {
    outln!(
        "{}: OK, {} certificate(s)",
        cfg.path.display(),
        cfg.certificates.len()
    );
    for c in &cfg.certificates {
        outln!("{}", describe(c));
    }
    ExitCode::SUCCESS
}

fn describe(c: &CertificateConfig) -> String {
    let challenges: Vec<&str> = c.challenges.iter().map(|k| k.as_str()).collect();
    format!(
        "{}: {} ({}, {})",
        c.name,
        c.domain_strings().join(", "),
        c.key_type.as_str(),
        challenges.join(" > ")
    )
}
