//! `certd dns-persist show NAME`: the standing TXT records a certificate
//! that uses dns-persist-01 needs, one per name (a name and its wildcard
//! share one, with `policy=wildcard`), for the operator to publish once.
//!
//! The issuer domain name is the directory's `meta.caaIdentities` (what
//! the CA puts in a dns-persist-01 challenge's `issuer-domain-names`); the
//! account URL is the existing account's. Nothing is written: the command
//! reads the ledger and the credentials like `account show`.

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::Context as _;

use super::account::account_session;
use crate::app::sink::write_stdout;
use crate::config::{ChallengeKind, Config};
use crate::dns::persist::{PersistExpect, persist_record};
use crate::text::escape_control;

pub(super) async fn show(cfg: &Config, name: &str) -> anyhow::Result<ExitCode> {
    let Some(cert) = cfg.certificates.iter().find(|c| c.name.as_str() == name) else {
        warn(&format!(
            "certd: no certificate named {name:?} in {}",
            cfg.path.display()
        ));
        return Ok(ExitCode::from(2));
    };
    if !cert.challenges.contains(&ChallengeKind::DnsPersist01) {
        warn(&format!(
            "certd: certificate {name:?} does not list \"dns-persist-01\" in challenges; the records below take effect once it does"
        ));
    }
    let Some((store, account)) = account_session(cfg).await? else {
        return Ok(ExitCode::FAILURE);
    };
    store.close().await;
    let directory = &cfg
        .cas_of(cert)
        .next()
        .unwrap_or(cfg.primary_ca())
        .acme
        .directory;
    let issuers = caa_identities(&account.http, directory.as_str()).await?;
    if issuers.is_empty() {
        warn(&format!(
            "certd: the directory {directory} names no issuer domain (meta.caaIdentities); the CA may not offer dns-persist-01"
        ));
        return Ok(ExitCode::FAILURE);
    }
    // Record name → whether a wildcard needs it.
    let mut records: BTreeMap<String, bool> = BTreeMap::new();
    for d in &cert.domains {
        *records.entry(persist_record(d.as_str())).or_default() |= d.is_wildcard();
    }
    for (record, wildcard) in records {
        let expect = PersistExpect {
            issuers: issuers.clone(),
            account_uri: account.account().id().to_owned(),
            wildcard,
        };
        write_stdout(&format!("{record}. IN TXT \"{}\"", expect.record_value()));
    }
    Ok(ExitCode::SUCCESS)
}

/// The directory's `meta.caaIdentities`.
async fn caa_identities(http: &crate::acme::AcmeHttp, url: &str) -> anyhow::Result<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Directory {
        #[serde(default)]
        meta: Meta,
    }
    #[derive(Default, serde::Deserialize)]
    struct Meta {
        #[serde(default, rename = "caaIdentities")]
        caa_identities: Vec<String>,
    }
    let body = http
        .plain()
        .get(url)
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .with_context(|| format!("fetching the directory {url}"))?
        .bytes()
        .await
        .with_context(|| format!("reading the directory {url}"))?;
    let dir: Directory = serde_json::from_slice(&body)
        .with_context(|| format!("the directory {url} is not a directory object"))?;
    Ok(dir.meta.caa_identities)
}

/// A line on standard error, control characters escaped.
fn warn(line: &str) {
    eprintln!("{}", escape_control(line));
}
