//! The checks that turn the file's raw shape into the typed configuration:
//! every value parsed, every rule between values held (a challenge type
//! needs its section, a wildcard needs dns-01, a name belongs in one
//! certificate per key type…). Pure: no file is read here; the files the
//! configuration names are listed for `resolve`.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use crate::config::error::{CertKey, ConfigError, Located, reword};
use crate::config::model::{
    AcmeConfig, CaConfig, CaLimits, CaName, CertificateConfig, Config, DaemonConfig, Dns01Config,
    Dns01Mode, FleetConfig, Http01Config, NotifyConfig, Preflight, Preset, ProfilePreference,
    PropagationConfig, ReaperConfig, Rfc2136Config, Secret, StorageConfig, TlsAlpn01Config,
};
use crate::config::names::{CertName, DnsAlias, Identifier, Underscore, domain_like};
use crate::config::raw;
use crate::config::resolve::{FileKind, FileRef, Parsed};
use crate::config::values::{
    ChallengeKind, KeyType, TsigAlgorithm, parse_contact, parse_directory, parse_duration,
    parse_log_level, parse_profile_name, parse_socket_addr,
};

impl Parsed {
    /// Parses `text` as if it had been read from `path`: every value and
    /// every rule between values is checked, and no file is read.
    pub(crate) fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: raw::Config = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            let at = Located::new(path, text);
            let message = e.message().trim_end();
            // A field missing from the whole file is a missing section: the
            // span covers the document, and the table above its first line
            // is not where anything is missing.
            if let Some(field) = message
                .strip_prefix("missing field `")
                .and_then(|m| m.strip_suffix('`'))
                && span.start == 0
            {
                return at.error(
                    span,
                    Some("(top level)".into()),
                    format!("the [{field}] section is missing"),
                );
            }
            let key = at.guess_key_at(span.start);
            at.error(span, None, reword(&key, message))
        })?;
        Validator {
            at: Located::new(path, text),
        }
        .config(raw)
    }
}

/// Checks a raw configuration, turning it into the typed one.
struct Validator<'a> {
    at: Located<'a>,
}

impl Validator<'_> {
    /// The typed configuration, with the files it names still to be read.
    fn config(&self, raw: raw::Config) -> Result<Parsed, ConfigError> {
        let relative = |p: &str| resolve_path(self.at.path, p);
        let mut files = Vec::new();

        let reaper = self.reaper(raw.reaper)?;
        let cas = self.cas(raw.acme, raw.ca, &reaper, &relative, &mut files)?;
        let storage = StorageConfig {
            state_dir: relative(&raw.storage.state_dir),
            cert_dir: relative(&raw.storage.cert_dir),
        };
        let http01 = match raw.http01 {
            None => None,
            Some(h) => {
                let listen = h
                    .listen
                    .map(|l| self.parse_spanned(&l, "http01.listen", parse_socket_addr))
                    .transpose()?;
                if listen.is_none() && h.webroot.is_none() {
                    return Err(self.at.error(
                        h.span,
                        Some("http01".into()),
                        "set `listen` (standalone responder) or `webroot` (or both)".into(),
                    ));
                }
                let webroot = h.webroot.as_deref().map(&relative);
                // A webroot that does not exist is refused before any order
                // (`Solvers::check`), not here: parsing reads no directory,
                // and a webroot created after the file is written is fine.
                // On by default: a failed self-check costs nothing, a
                // doomed validation costs failure budget.
                let preflight = match (h.preflight, listen) {
                    (Some(false), _) => Preflight::Off,
                    (Some(true), _) | (None, Some(_)) => Preflight::On,
                    (None, None) => Preflight::IfServed,
                };
                Some(Http01Config {
                    listen,
                    webroot,
                    preflight,
                })
            }
        };
        let dns01 = raw
            .dns01
            .map(|d| self.dns01(d, &relative, &mut files))
            .transpose()?;
        let tls_alpn01 = match raw.tls_alpn01 {
            None => None,
            Some(t) => Some(TlsAlpn01Config {
                listen: self.parse_spanned(&t.listen, "tls_alpn01.listen", parse_socket_addr)?,
            }),
        };
        let daemon = self.daemon(raw.daemon)?;
        let metrics_listen = match raw.metrics {
            Some(m) => Some(self.parse_spanned(&m.listen, "metrics.listen", parse_socket_addr)?),
            None => None,
        };
        let notify = match raw.notify {
            None => None,
            Some(n) => Some(NotifyConfig {
                command: n.command,
                after_failures: match n.after_failures {
                    Some(v) => self.positive(&v, "notify.after_failures")?,
                    None => 3,
                },
                timeout: match n.timeout {
                    Some(t) => self.duration(&t, "notify.timeout")?,
                    None => Duration::from_secs(30),
                },
            }),
        };

        let fleet = raw.fleet.map(|f| self.fleet(f, &relative)).transpose()?;

        let defaults = CertDefaults {
            cas: &cas,
            ca: if cas.len() == 1 {
                Some(cas[0].name.clone())
            } else {
                cas.iter()
                    .map(|c| c.name.clone())
                    .find(|n| n.as_str() == CaName::DEFAULT)
            },
            ca_fallback_after: daemon.ca_fallback_after,
        };
        let mut certificates = Vec::with_capacity(raw.certificate.len());
        let mut names = HashSet::new();
        // Each (domain, key type) with the certificate that first lists it.
        let mut owners: HashMap<(String, KeyType), String> = HashMap::new();
        for (i, c) in raw.certificate.into_iter().enumerate() {
            let solvers = (http01.is_some(), dns01.is_some(), tls_alpn01.is_some());
            let spans = c
                .domains
                .get_ref()
                .iter()
                .map(|d| d.span())
                .collect::<Vec<_>>();
            let cert = self.certificate(i, c, solvers, &defaults, &mut names)?;
            // Two certificates for one name and key type are two orders for
            // it, each renewed on its own, against the CA's duplicate
            // limits; which one a web server uses is left to chance. With
            // different key types they are the usual RSA-beside-ECDSA
            // setup, which web servers pick from by the client's support.
            for (j, domain) in cert.domains.iter().enumerate() {
                if let Some(first) = owners.insert(
                    (domain.as_str().to_owned(), cert.key_type),
                    cert.name.as_str().to_owned(),
                ) {
                    return Err(self.at.error(
                        spans[j].clone(),
                        Some(format!("certificate[{i}].domains[{j}]")),
                        format!(
                            "{:?} is also in certificate {first:?} with the same key type: a name belongs in one certificate per key type",
                            domain.as_str()
                        ),
                    ));
                }
            }
            certificates.push(cert);
        }

        let config = Config {
            path: self.at.path.to_owned(),
            cas,
            storage,
            http01,
            dns01,
            tls_alpn01,
            reaper,
            daemon,
            metrics_listen,
            notify,
            fleet,
            certificates,
        };
        Ok(Parsed::new(config, files))
    }

    /// `[fleet]`. Nothing is read or connected here: the key file and the
    /// database are checked when certd starts in fleet mode.
    fn fleet(
        &self,
        raw: Spanned<raw::Fleet>,
        relative: &dyn Fn(&str) -> PathBuf,
    ) -> Result<FleetConfig, ConfigError> {
        let span = raw.span();
        let f = raw.into_inner();
        let url = f.database_url.get_ref();
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(self.at.error(
                f.database_url.span(),
                Some("fleet.database_url".into()),
                "must be a PostgreSQL URL: postgres://user:password@host:port/database".into(),
            ));
        }
        if f.key_file.is_empty() {
            return Err(self.at.error(
                span,
                Some("fleet.key_file".into()),
                "must name a file of 32 random bytes (head -c 32 /dev/urandom)".into(),
            ));
        }
        let lease_ttl = match f.lease_ttl {
            None => FleetConfig::DEFAULT_LEASE_TTL,
            Some(t) => {
                let ttl = self.duration(&t, "fleet.lease_ttl")?;
                // Renewal runs at a third of the ttl with a safety margin
                // below it; under 6 s that leaves no room for a database
                // round trip, over 10 min a dead host holds its
                // certificates too long.
                if ttl < Duration::from_secs(6) || ttl > Duration::from_secs(600) {
                    return Err(self.at.error(
                        t.span(),
                        Some("fleet.lease_ttl".into()),
                        "must be between 6s and 10m".into(),
                    ));
                }
                ttl
            }
        };
        let host_id = match f.host_id {
            None => None,
            Some(h) => {
                let id = h.get_ref();
                let ok = !id.is_empty()
                    && id.len() <= 64
                    && id
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
                if !ok {
                    return Err(self.at.error(
                        h.span(),
                        Some("fleet.host_id".into()),
                        "must be 1 to 64 letters, digits, '-', '_' or '.'".into(),
                    ));
                }
                Some(id.clone())
            }
        };
        let advertise = f
            .advertise
            .map(|a| self.parse_spanned(&a, "fleet.advertise", parse_socket_addr))
            .transpose()?;
        Ok(FleetConfig {
            database_url: f.database_url.into_inner(),
            key_file: relative(&f.key_file),
            lease_ttl,
            host_id,
            advertise,
        })
    }

    fn dns01(
        &self,
        d: raw::Dns01,
        relative: &impl Fn(&str) -> PathBuf,
        files: &mut Vec<FileRef>,
    ) -> Result<Dns01Config, ConfigError> {
        let mode = match (d.hook, d.rfc2136) {
            (Some(hook), None) => Dns01Mode::Hook(relative(hook.get_ref())),
            (None, Some(r)) => Dns01Mode::Rfc2136(self.rfc2136(r, relative, files)?),
            (Some(hook), Some(_)) => {
                return Err(self.at.error(
                    hook.span(),
                    Some("dns01.hook".into()),
                    "set either `hook` or a [dns01.rfc2136] section, not both".into(),
                ));
            }
            (None, None) => {
                return Err(self.at.error(
                    d.span,
                    Some("dns01".into()),
                    "set `hook` (a program of yours) or a [dns01.rfc2136] section (dynamic update)"
                        .into(),
                ));
            }
        };
        let hook_timeout = match d.hook_timeout {
            Some(t) => self.duration(&t, "dns01.hook_timeout")?,
            None => Duration::from_secs(120),
        };
        let mut propagation = PropagationConfig::default();
        if let Some(b) = d.propagation_check {
            propagation.enabled = b;
        }
        if let Some(t) = d.propagation_timeout {
            propagation.timeout = self.duration(&t, "dns01.propagation_timeout")?;
            if propagation.timeout.is_zero() {
                return Err(self.at.error(
                    t.span(),
                    Some("dns01.propagation_timeout".into()),
                    "must be greater than zero (set propagation_check = false to skip the check)"
                        .into(),
                ));
            }
        }
        for (i, ns) in d.nameservers.iter().enumerate() {
            let key = format!("dns01.nameservers[{i}]");
            propagation
                .nameservers
                .push(self.parse_spanned(ns, &key, |s| s.parse())?);
        }
        Ok(Dns01Config {
            mode,
            hook_timeout,
            propagation,
        })
    }

    fn rfc2136(
        &self,
        r: raw::Rfc2136,
        relative: &impl Fn(&str) -> PathBuf,
        files: &mut Vec<FileRef>,
    ) -> Result<Rfc2136Config, ConfigError> {
        let server = self.parse_spanned(&r.server, "dns01.rfc2136.server", |s| s.parse())?;
        let zone = r
            .zone
            .map(|z| {
                self.parse_spanned(&z, "dns01.rfc2136.zone", |s| {
                    domain_like(s, Underscore::Refused)
                })
            })
            .transpose()?;
        let key_name = self.parse_spanned(&r.key_name, "dns01.rfc2136.key_name", |s| {
            domain_like(s, Underscore::Allowed)
        })?;
        let algorithm = match &r.algorithm {
            Some(a) => self.parse_spanned(a, "dns01.rfc2136.algorithm", |s| s.parse())?,
            None => TsigAlgorithm::default(),
        };
        files.push(self.file(
            &r.secret_file,
            "dns01.rfc2136.secret_file",
            relative,
            FileKind::TsigSecret,
        ));
        Ok(Rfc2136Config {
            server,
            zone,
            key_name,
            algorithm,
            // Read by `resolve`, which fills it in.
            secret: Secret::new(Vec::new()),
        })
    }

    fn daemon(&self, raw: Option<raw::Daemon>) -> Result<DaemonConfig, ConfigError> {
        let mut cfg = DaemonConfig::default();
        let Some(raw) = raw else { return Ok(cfg) };
        if let Some(n) = raw.max_concurrent {
            cfg.max_concurrent = self.positive(&n, "daemon.max_concurrent")? as usize;
        }
        if let Some(f) = raw.renew_remaining {
            let v = *f.get_ref();
            if !(v > 0.0 && v < 1.0) {
                return Err(self.at.error(
                    f.span(),
                    Some("daemon.renew_remaining".into()),
                    format!("must be a fraction between 0 and 1 (exclusive), not {v}"),
                ));
            }
            cfg.renew_remaining = v;
        }
        if let Some(d) = raw.ari_interval {
            cfg.ari_interval = self.duration(&d, "daemon.ari_interval")?;
        }
        if let Some(d) = raw.backoff_min {
            cfg.backoff_min = self.duration(&d, "daemon.backoff_min")?;
        }
        if let Some(d) = raw.backoff_max {
            cfg.backoff_max = self.duration(&d, "daemon.backoff_max")?;
            if cfg.backoff_max < cfg.backoff_min {
                return Err(self.at.error(
                    d.span(),
                    Some("daemon.backoff_max".into()),
                    "must not be shorter than backoff_min".into(),
                ));
            }
        }
        if let Some(d) = raw.shutdown_grace {
            cfg.shutdown_grace = self.duration(&d, "daemon.shutdown_grace")?;
        }
        if let Some(l) = raw.log_level {
            cfg.log_level = self.parse_spanned(&l, "daemon.log_level", parse_log_level)?;
        }
        if let Some(d) = raw.ca_fallback_after {
            cfg.ca_fallback_after = self.duration(&d, "daemon.ca_fallback_after")?;
        }
        Ok(cfg)
    }

    /// The CAs: `[acme]` (named `default`) and each `[ca.<name>]`, in
    /// file order, their limits defaulting to `reaper`'s.
    fn cas(
        &self,
        acme: Option<Spanned<raw::Acme>>,
        tables: raw::CaTables,
        reaper: &ReaperConfig,
        relative: &impl Fn(&str) -> PathBuf,
        files: &mut Vec<FileRef>,
    ) -> Result<Vec<CaConfig>, ConfigError> {
        // (where the table starts, name, its span, table key, its keys)
        let mut entries = Vec::with_capacity(tables.0.len() + 1);
        let has_acme = acme.is_some();
        if let Some(acme) = acme {
            let span = acme.span();
            let name = Spanned::new(span.clone(), CaName::DEFAULT.to_owned());
            entries.push((
                span.start,
                name,
                "acme".to_owned(),
                raw::Ca::from(acme.into_inner()),
            ));
        }
        for (name, table) in tables.0 {
            let key = format!("ca.{}", name.get_ref());
            if has_acme && name.get_ref() == CaName::DEFAULT {
                return Err(self.at.error(
                    name.span(),
                    Some(key),
                    "[ca.default] and [acme] both define the CA named \"default\"; keep one of them"
                        .into(),
                ));
            }
            entries.push((name.span().start, name, key, table));
        }
        if entries.is_empty() {
            // Worded for the one-CA file most operators write.
            return Err(self.at.error(
                0..0,
                Some("(top level)".into()),
                "the [acme] section is missing".into(),
            ));
        }
        entries.sort_by_key(|e| e.0);
        let mut cas: Vec<CaConfig> = Vec::with_capacity(entries.len());
        for (index, (_, name, table, raw)) in entries.into_iter().enumerate() {
            let ca = self.ca(index, &name, table, raw, reaper, relative, files)?;
            if let Some(other) = cas.iter().find(|c| c.acme.directory == ca.acme.directory) {
                return Err(self.at.error(
                    name.span(),
                    Some(ca.table.clone()),
                    format!(
                        "has the same directory as [{}] ({}): certd holds one account per directory, so one table per CA",
                        other.table, ca.acme.directory
                    ),
                ));
            }
            cas.push(ca);
        }
        Ok(cas)
    }

    /// One CA table (`table` is `acme` or `ca.<name>`); `index` is its
    /// place in `Config::cas`, where `resolve` puts what its files hold.
    #[allow(clippy::too_many_arguments)]
    fn ca(
        &self,
        index: usize,
        name: &Spanned<String>,
        table: String,
        raw: raw::Ca,
        reaper: &ReaperConfig,
        relative: &impl Fn(&str) -> PathBuf,
        files: &mut Vec<FileRef>,
    ) -> Result<CaConfig, ConfigError> {
        let key = |field: &str| format!("{table}.{field}");
        let ca_name: CaName = self.parse_spanned(name, &table, |s| s.parse())?;
        let (directory, preset) = match (&raw.directory, &raw.preset) {
            (Some(_), Some(p)) => {
                return Err(self.at.error(
                    p.span(),
                    Some(key("preset")),
                    "set either `directory` or `preset`, not both".into(),
                ));
            }
            (Some(d), None) => (
                self.parse_spanned(d, key("directory"), parse_directory)?,
                None,
            ),
            (None, Some(p)) => {
                let preset = self.parse_spanned(p, key("preset"), parse_preset)?;
                (preset.directory(), Some(preset))
            }
            (None, None) => match Preset::from_name(ca_name.as_str()) {
                Some(preset) => (preset.directory(), Some(preset)),
                None => {
                    return Err(self.at.error(
                        name.span(),
                        Some(table),
                        format!(
                            "needs `directory` (the CA's ACME directory URL) or `preset` (one of {})",
                            preset_names()
                        ),
                    ));
                }
            },
        };
        let mut contact = Vec::new();
        for (i, c) in raw.contact.iter().enumerate() {
            contact.push(self.parse_spanned(c, key(&format!("contact[{i}]")), parse_contact)?);
        }
        let ca_bundle = raw.ca_bundle.map(|p| {
            let file = self.file(&p, &key("ca_bundle"), relative, FileKind::CaBundle);
            let path = file.path.clone();
            files.push(file);
            path
        });
        match (raw.eab_kid, &raw.eab_hmac_key_file) {
            (None, None) => {
                if let Some(preset) = preset.filter(|p| p.needs_eab()) {
                    let (span, at) = match &raw.preset {
                        Some(p) => (p.span(), key("preset")),
                        None => (name.span(), table.clone()),
                    };
                    return Err(self.at.error(
                        span,
                        Some(at),
                        format!(
                            "{} requires External Account Binding: set eab_kid and eab_hmac_key_file (the CA's account page gives both)",
                            preset.name()
                        ),
                    ));
                }
            }
            (Some(kid), Some(file)) => files.push(self.file(
                file,
                &key("eab_hmac_key_file"),
                relative,
                FileKind::EabKey {
                    ca: index,
                    kid: kid.into_inner(),
                },
            )),
            (Some(kid), None) => {
                return Err(self.at.error(
                    kid.span(),
                    Some(key("eab_kid")),
                    "needs eab_hmac_key_file as well".into(),
                ));
            }
            (None, Some(file)) => {
                return Err(self.at.error(
                    file.span(),
                    Some(key("eab_hmac_key_file")),
                    "needs eab_kid as well".into(),
                ));
            }
        }
        if let Some(p) = &raw.trusted_roots {
            files.push(self.file(
                p,
                &key("trusted_roots"),
                relative,
                FileKind::TrustedRoots { ca: index },
            ));
        }
        let mut limits = CaLimits::of(reaper);
        for (value, field, limit) in [
            (&raw.max_pending, "max_pending", &mut limits.max_pending),
            (
                &raw.failed_authz_per_identifier_per_hour,
                "failed_authz_per_identifier_per_hour",
                &mut limits.failed_authz_per_identifier_per_hour,
            ),
            (
                &raw.new_orders_per_3h,
                "new_orders_per_3h",
                &mut limits.new_orders_per_3h,
            ),
            (
                &raw.duplicate_certificates_per_week,
                "duplicate_certificates_per_week",
                &mut limits.duplicate_certificates_per_week,
            ),
        ] {
            if let Some(v) = value {
                *limit = self.positive(v, &key(field))?;
            }
        }
        Ok(CaConfig {
            name: ca_name,
            table,
            acme: AcmeConfig {
                directory,
                contact,
                ca_bundle,
                // Both read by `resolve`.
                eab: None,
                trusted_roots: None,
            },
            limits,
            preset,
        })
    }

    /// A file the configuration names, for `resolve` to read.
    fn file(
        &self,
        value: &Spanned<String>,
        key: &str,
        relative: &impl Fn(&str) -> PathBuf,
        kind: FileKind,
    ) -> FileRef {
        FileRef {
            at: self.at.spot(value.span(), Some(key.to_owned())),
            path: relative(value.get_ref()),
            kind,
        }
    }

    fn reaper(&self, raw: Option<raw::Reaper>) -> Result<ReaperConfig, ConfigError> {
        let mut cfg = ReaperConfig::default();
        let Some(raw) = raw else { return Ok(cfg) };
        if let Some(d) = raw.pending_max_age {
            cfg.pending_max_age = self.duration(&d, "reaper.pending_max_age")?;
        }
        if let Some(d) = raw.interval {
            cfg.interval = self.duration(&d, "reaper.interval")?;
            if cfg.interval.is_zero() {
                return Err(self.at.error(
                    d.span(),
                    Some("reaper.interval".into()),
                    "must be greater than zero".into(),
                ));
            }
        }
        if let Some(n) = raw.max_pending {
            cfg.max_pending = self.positive(&n, "reaper.max_pending")?;
        }
        if let Some(n) = raw.failed_authz_per_identifier_per_hour {
            cfg.failed_authz_per_identifier_per_hour =
                self.positive(&n, "reaper.failed_authz_per_identifier_per_hour")?;
        }
        if let Some(b) = raw.deactivate_valid_after_issue {
            cfg.deactivate_valid_after_issue = b;
        }
        if let Some(n) = raw.new_orders_per_3h {
            cfg.new_orders_per_3h = self.positive(&n, "reaper.new_orders_per_3h")?;
        }
        if let Some(n) = raw.duplicate_certificates_per_week {
            cfg.duplicate_certificates_per_week =
                self.positive(&n, "reaper.duplicate_certificates_per_week")?;
        }
        Ok(cfg)
    }

    /// `solvers`: whether [http01], [dns01] and [tls_alpn01] are configured.
    fn certificate(
        &self,
        index: usize,
        raw: raw::Certificate,
        solvers: (bool, bool, bool),
        defaults: &CertDefaults<'_>,
        names: &mut HashSet<String>,
    ) -> Result<CertificateConfig, ConfigError> {
        let key = |field| CertKey {
            index,
            field,
            item: None,
        };
        let item = |field, i| CertKey {
            index,
            field,
            item: Some(i),
        };
        let name: CertName = self.parse_spanned(&raw.name, key("name"), |s| s.parse())?;
        if !names.insert(name.as_str().to_owned()) {
            return Err(self.at.error(
                raw.name.span(),
                Some(key("name").to_string()),
                format!("duplicate certificate name {:?}", name.as_str()),
            ));
        }

        if raw.domains.get_ref().is_empty() {
            return Err(self.at.error(
                raw.domains.span(),
                Some(key("domains").to_string()),
                "needs at least one domain".into(),
            ));
        }
        let mut domains: Vec<Identifier> = Vec::with_capacity(raw.domains.get_ref().len());
        for (i, d) in raw.domains.get_ref().iter().enumerate() {
            let domain: Identifier = self.parse_spanned(d, item("domains", i), |s| s.parse())?;
            // A linear scan: certificates list a handful of names, and a
            // set per certificate would cost more than it saves.
            if domains.contains(&domain) {
                return Err(self.at.error(
                    d.span(),
                    Some(item("domains", i).to_string()),
                    format!("duplicate identifier {:?}", domain.as_str()),
                ));
            }
            domains.push(domain);
        }

        let key_type = match &raw.key_type {
            Some(k) => self.parse_spanned(k, key("key_type"), |s| s.parse())?,
            None => KeyType::default(),
        };

        let challenges = match &raw.challenges {
            None => vec![ChallengeKind::Http01],
            Some(list) => {
                if list.get_ref().is_empty() {
                    return Err(self.at.error(
                        list.span(),
                        Some(key("challenges").to_string()),
                        "needs at least one challenge type".into(),
                    ));
                }
                let mut out = Vec::new();
                for (i, c) in list.get_ref().iter().enumerate() {
                    let kind: ChallengeKind =
                        self.parse_spanned(c, item("challenges", i), |s| s.parse())?;
                    if out.contains(&kind) {
                        return Err(self.at.error(
                            c.span(),
                            Some(item("challenges", i).to_string()),
                            format!("{kind} is listed twice"),
                        ));
                    }
                    out.push(kind);
                }
                out
            }
        };
        let challenges_span = raw
            .challenges
            .as_ref()
            .map_or(raw.name.span(), |c| c.span());
        for kind in &challenges {
            let missing = match kind {
                ChallengeKind::Http01 if !solvers.0 => Some("[http01]"),
                ChallengeKind::Dns01 if !solvers.1 => Some("[dns01]"),
                ChallengeKind::TlsAlpn01 if !solvers.2 => Some("[tls_alpn01]"),
                _ => None,
            };
            if let Some(section) = missing {
                return Err(self.at.error(
                    challenges_span.clone(),
                    Some(key("challenges").to_string()),
                    format!(
                        "certificate {:?} uses {kind} but the config has no {section} section",
                        name.as_str()
                    ),
                ));
            }
        }
        if let Some(w) = domains.iter().find(|d| d.is_wildcard())
            && !challenges
                .iter()
                .any(|k| matches!(k, ChallengeKind::Dns01 | ChallengeKind::DnsPersist01))
        {
            return Err(self.at.error(
                challenges_span,
                Some(key("challenges").to_string()),
                format!(
                    "certificate {:?} has the wildcard {:?}, which only dns-01 (or dns-persist-01) can validate; add \"dns-01\" to challenges",
                    name.as_str(),
                    w.as_str()
                ),
            ));
        }

        // RFC 8738 section 7: no dns-01 for an address. dns-01 may still
        // stand in the list for the certificate's DNS names, as long as
        // another type can validate the addresses.
        if let Some(ip) = domains.iter().find(|d| matches!(d, Identifier::Ip(_)))
            && !challenges
                .iter()
                .any(|k| matches!(k, ChallengeKind::Http01 | ChallengeKind::TlsAlpn01))
        {
            return Err(self.at.error(
                challenges_span,
                Some(key("challenges").to_string()),
                format!(
                    "certificate {:?} has the IP address {:?}, which dns-01 cannot validate (RFC 8738); use \"http-01\" or \"tls-alpn-01\"",
                    name.as_str(),
                    ip.as_str()
                ),
            ));
        }

        let reload_timeout = match &raw.reload_timeout {
            Some(t) => self.duration(t, key("reload_timeout"))?,
            None => Duration::from_secs(60),
        };

        let profile = self.profile(&raw, index)?;

        let dns_alias = match &raw.dns_alias {
            Some(a) => {
                let alias: DnsAlias = self.parse_spanned(a, key("dns_alias"), |s| s.parse())?;
                if !challenges.contains(&ChallengeKind::Dns01) {
                    return Err(self.at.error(
                        a.span(),
                        Some(key("dns_alias").to_string()),
                        format!(
                            "certificate {:?} sets dns_alias but does not use dns-01; add \"dns-01\" to challenges",
                            name.as_str()
                        ),
                    ));
                }
                Some(alias)
            }
            None => None,
        };

        let ca = self.certificate_cas(index, &raw, defaults)?;
        let ca_fallback_after = match &raw.ca_fallback_after {
            Some(t) => self.duration(t, key("ca_fallback_after"))?,
            None => defaults.ca_fallback_after,
        };

        Ok(CertificateConfig {
            name,
            domains,
            key_type,
            challenges,
            reload: raw.reload,
            reload_timeout,
            profile,
            reuse_key: raw.reuse_key,
            dns_alias,
            ca,
            ca_fallback_after,
            sticky: raw.sticky.unwrap_or(false),
        })
    }

    /// A certificate's `ca`: configured CA names, best first, each once;
    /// without the key, the only CA or `default`.
    fn certificate_cas(
        &self,
        index: usize,
        raw: &raw::Certificate,
        defaults: &CertDefaults<'_>,
    ) -> Result<Vec<CaName>, ConfigError> {
        let key = CertKey {
            index,
            field: "ca",
            item: None,
        };
        let Some(list) = &raw.ca else {
            return match &defaults.ca {
                Some(name) => Ok(vec![name.clone()]),
                None => {
                    let names: Vec<String> = defaults
                        .cas
                        .iter()
                        .map(|c| format!("{:?}", c.name.as_str()))
                        .collect();
                    Err(self.at.error(
                        raw.name.span(),
                        Some(key.to_string()),
                        format!(
                            "there are several CAs and none is named \"default\": say which this certificate uses, best first, e.g. ca = [{}]",
                            names.join(", ")
                        ),
                    ))
                }
            };
        };
        if list.get_ref().is_empty() {
            return Err(self.at.error(
                list.span(),
                Some(key.to_string()),
                "an empty list; name at least one CA, or leave `ca` out for the default".into(),
            ));
        }
        let mut out: Vec<CaName> = Vec::with_capacity(list.get_ref().len());
        for (i, name) in list.get_ref().iter().enumerate() {
            let at = || CertKey {
                index,
                field: "ca",
                item: Some(i),
            };
            let Some(ca) = defaults
                .cas
                .iter()
                .find(|c| c.name.as_str() == name.get_ref())
            else {
                let known: Vec<&str> = defaults.cas.iter().map(|c| c.name.as_str()).collect();
                return Err(self.at.error(
                    name.span(),
                    Some(at().to_string()),
                    format!(
                        "no CA is named {:?}; the configured ones are {} (a [ca.<name>] table, or [acme] for \"default\")",
                        name.get_ref(),
                        known.join(", ")
                    ),
                ));
            };
            if out.contains(&ca.name) {
                return Err(self.at.error(
                    name.span(),
                    Some(at().to_string()),
                    format!("CA {:?} is listed twice", ca.name.as_str()),
                ));
            }
            out.push(ca.name.clone());
        }
        Ok(out)
    }

    /// `profile` (one name or a list, best first) and `profile_required`.
    fn profile(
        &self,
        raw: &raw::Certificate,
        index: usize,
    ) -> Result<ProfilePreference, ConfigError> {
        let key = |field| CertKey {
            index,
            field,
            item: None,
        };
        let check = |value: &Spanned<String>, at: CertKey| {
            self.parse_spanned(value, at, parse_profile_name)
        };
        let mut names: Vec<String> = Vec::new();
        if let Some(profile) = &raw.profile {
            let span = profile.span();
            match profile.get_ref() {
                // The visitor sees no span of its own: the key's is the value's.
                raw::Profile::One(p) => {
                    names.push(check(&Spanned::new(span, p.clone()), key("profile"))?);
                }
                raw::Profile::List(list) if list.is_empty() => {
                    return Err(self.at.error(
                        span,
                        Some(key("profile").to_string()),
                        "an empty list; leave `profile` out to let the CA choose".into(),
                    ));
                }
                raw::Profile::List(list) => {
                    for (i, p) in list.iter().enumerate() {
                        let at = || CertKey {
                            index,
                            field: "profile",
                            item: Some(i),
                        };
                        let name = check(p, at())?;
                        if names.contains(&name) {
                            return Err(self.at.error(
                                p.span(),
                                Some(at().to_string()),
                                format!("profile {name:?} is listed twice"),
                            ));
                        }
                        names.push(name);
                    }
                }
            }
        }
        let required = match &raw.profile_required {
            None => false,
            Some(r) if *r.get_ref() && names.is_empty() => {
                return Err(self.at.error(
                    r.span(),
                    Some(key("profile_required").to_string()),
                    "is true, but no `profile` is set".into(),
                ));
            }
            Some(r) => *r.get_ref(),
        };
        Ok(ProfilePreference { names, required })
    }

    /// `key` is only formatted for an error: a configuration of 10,000
    /// certificates has 30,000 values that parse fine.
    fn parse_spanned<T>(
        &self,
        value: &Spanned<impl AsRef<str>>,
        key: impl fmt::Display,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        parse(value.get_ref().as_ref())
            .map_err(|m| self.at.error(value.span(), Some(key.to_string()), m))
    }

    fn duration(
        &self,
        value: &Spanned<String>,
        key: impl fmt::Display,
    ) -> Result<Duration, ConfigError> {
        self.parse_spanned(value, key, parse_duration)
    }

    fn positive(&self, value: &Spanned<i64>, key: &str) -> Result<u32, ConfigError> {
        u32::try_from(*value.get_ref())
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| {
                self.at.error(
                    value.span(),
                    Some(key.to_owned()),
                    format!("must be a whole number from 1 to {}", u32::MAX),
                )
            })
    }
}

/// What a certificate's CA settings default to.
struct CertDefaults<'a> {
    cas: &'a [CaConfig],
    /// The CA of a certificate without `ca`: the only one, or `default`.
    ca: Option<CaName>,
    ca_fallback_after: Duration,
}

/// `preset = "..."`: one of the presets' names.
fn parse_preset(s: &str) -> Result<Preset, String> {
    Preset::from_name(s)
        .ok_or_else(|| format!("unknown preset {s:?}; expected one of {}", preset_names()))
}

/// The presets' names, for messages.
fn preset_names() -> String {
    let names: Vec<&str> = Preset::ALL.iter().map(|p| p.name()).collect();
    names.join(", ")
}

/// A path from the file: relative paths are taken from the file's directory.
pub(super) fn resolve_path(config_path: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_owned()
    } else {
        config_path.parent().unwrap_or(Path::new(".")).join(p)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::tests::{BASE, expect_error, parse, secret_file, with_cert};

    #[test]
    fn valid_config_resolves_relative_paths_and_defaults() {
        let cfg = parse(&with_cert(
            r#"name = "www"
domains = ["Example.COM", "www.example.com."]"#,
        ))
        .expect("valid");
        assert_eq!(cfg.storage.state_dir, Path::new("/etc/certd/state"));
        assert_eq!(cfg.storage.cert_dir, Path::new("/srv/certs"));
        let c = &cfg.certificates[0];
        assert_eq!(c.domain_strings(), ["example.com", "www.example.com"]);
        assert_eq!(c.key_type, KeyType::EcdsaP256);
        assert_eq!(c.challenges, [ChallengeKind::Http01]);
        assert_eq!(cfg.reaper.max_pending, 100);
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let text = with_cert("name = \"www\"\ndomains = [\"a.example\"]\nkeytype = \"rsa-2048\"");
        expect_error(
            &text,
            16,
            "certificate[0].keytype",
            "unknown field `keytype`",
        );
    }

    #[test]
    fn malformed_domain_names_index() {
        let text = with_cert("name = \"www\"\ndomains = [\"a.example\", \"bad domain.example\"]");
        expect_error(
            &text,
            15,
            "certificate[0].domains[1]",
            "not a valid domain name",
        );
    }

    #[test]
    fn duplicate_names_point_at_second() {
        let text = format!(
            "{}\n[[certificate]]\nname = \"www\"\ndomains = [\"b.example\"]\n",
            with_cert("name = \"www\"\ndomains = [\"a.example\"]")
        );
        expect_error(
            &text,
            18,
            "certificate[1].name",
            "duplicate certificate name",
        );
    }

    #[test]
    fn empty_domains_and_bad_key_type() {
        expect_error(
            &with_cert("name = \"www\"\ndomains = []"),
            15,
            "certificate[0].domains",
            "at least one domain",
        );
        expect_error(
            &with_cert("name = \"www\"\ndomains = [\"a.example\"]\nkey_type = \"dsa\""),
            16,
            "certificate[0].key_type",
            "unknown key type",
        );
    }

    #[test]
    fn wrong_type_guesses_key_from_line() {
        let text = with_cert("name = \"www\"\ndomains = [\"a.example\"]\nkey_type = 5");
        expect_error(
            &text,
            16,
            "certificate[0].key_type",
            "expected a quoted string, found the number 5",
        );
    }

    #[test]
    fn bad_url_and_contact() {
        let text = BASE.replace("https://acme.example/dir", "ftp://x");
        expect_error(&text, 3, "acme.directory", "https://");
        let text = BASE.replace("mailto:ops@example.com", "ops@example.com");
        expect_error(&text, 4, "acme.contact[0]", "mailto:");
    }

    #[test]
    fn challenge_needs_its_section_and_wildcards_need_dns() {
        let text = with_cert("name = \"w\"\ndomains = [\"a.example\"]\nchallenges = [\"dns-01\"]");
        expect_error(&text, 16, "certificate[0].challenges", "no [dns01] section");
        let text = with_cert("name = \"w\"\ndomains = [\"*.a.example\"]");
        expect_error(&text, 14, "certificate[0].challenges", "only dns-01");
    }

    /// dns-01 cannot validate an address (RFC 8738); it may stay in the
    /// list for the DNS names beside one that can.
    #[test]
    fn ip_addresses_need_http_or_tls_alpn() {
        let dns = "[dns01]\nhook = \"/bin/true\"\n";
        let text = format!(
            "{BASE}{dns}[[certificate]]\nname = \"ip\"\ndomains = [\"192.0.2.1\"]\nchallenges = [\"dns-01\"]\n"
        );
        expect_error(
            &text,
            17,
            "certificate[0].challenges",
            "dns-01 cannot validate",
        );
        let text = format!(
            "{BASE}{dns}[[certificate]]\nname = \"ip\"\ndomains = [\"*.a.example\", \"192.0.2.1\"]\nchallenges = [\"dns-01\", \"http-01\"]\n"
        );
        assert!(parse(&text).is_ok());
    }

    #[test]
    fn profile_is_a_name_or_a_preference_list() {
        let profile = |extra: &str| {
            let text = with_cert(&format!("name = \"w\"\ndomains = [\"a.example\"]\n{extra}"));
            parse(&text).map(|mut c| c.certificates.remove(0).profile)
        };
        let p = profile("").expect("valid");
        assert_eq!(
            (p.names.len(), p.required, p.ledger_key()),
            (0, false, String::new())
        );
        let p = profile("profile = \"tlsserver\"").expect("valid");
        assert_eq!((p.names, p.required), (vec!["tlsserver".to_owned()], false));
        let p = profile("profile = [\"tlsserver\", \"classic\"]\nprofile_required = true")
            .expect("valid");
        assert_eq!(p.ledger_key(), "tlsserver,classic!");

        let cert =
            |extra: &str| with_cert(&format!("name = \"w\"\ndomains = [\"a.example\"]\n{extra}"));
        expect_error(
            &cert("profile = 5"),
            16,
            "certificate[0].profile",
            "a profile name or a list",
        );
        expect_error(
            &cert("profile = { a = 1 }"),
            16,
            "certificate[0].profile",
            "a profile name or a list",
        );
        expect_error(
            &cert("profile = [\"a\", 5]"),
            16,
            "certificate[0].profile",
            "found the number 5",
        );
        expect_error(
            &cert("profile = []"),
            16,
            "certificate[0].profile",
            "empty list",
        );
        expect_error(
            &cert("profile = [\"a\", \"a b\"]"),
            16,
            "certificate[0].profile[1]",
            "not a profile name",
        );
        expect_error(
            &cert("profile = [\"a\", \"a\"]"),
            16,
            "certificate[0].profile[1]",
            "listed twice",
        );
        expect_error(
            &cert("profile_required = true"),
            16,
            "certificate[0].profile_required",
            "no `profile`",
        );
        expect_error(
            &cert("profile_required = \"yes\""),
            16,
            "certificate[0].profile_required",
            "expected true or false, found the string \"yes\"",
        );
    }

    #[test]
    fn dns01_hook_with_propagation_defaults_and_overrides() {
        let cfg = parse(&format!("{BASE}\n[dns01]\nhook = \"hooks/dns\"\n")).expect("valid");
        let d = cfg.dns01.expect("dns01");
        assert_eq!(
            d.mode,
            Dns01Mode::Hook(PathBuf::from("/etc/certd/hooks/dns"))
        );
        assert_eq!(d.propagation, PropagationConfig::default());
        assert!(d.propagation.enabled);
        assert_eq!(d.propagation.timeout, Duration::from_secs(120));

        let text = format!(
            "{BASE}\n[dns01]\nhook = \"/h\"\npropagation_check = false\npropagation_timeout = \"30s\"\nnameservers = [\"127.0.0.1:8053\", \"ns1.example.com\", \"[::1]:53\"]\n"
        );
        let p = parse(&text)
            .expect("valid")
            .dns01
            .expect("dns01")
            .propagation;
        assert!(!p.enabled);
        assert_eq!(p.timeout, Duration::from_secs(30));
        let ns: Vec<String> = p.nameservers.iter().map(|n| n.to_string()).collect();
        assert_eq!(ns, ["127.0.0.1:8053", "ns1.example.com:53", "[::1]:53"]);

        let text =
            format!("{BASE}\n[dns01]\nhook = \"/h\"\nnameservers = [\"ns1.example.com:99999\"]\n");
        expect_error(&text, 15, "dns01.nameservers[0]", "not a server address");
        let text = format!("{BASE}\n[dns01]\nhook = \"/h\"\npropagation_timeout = \"0s\"\n");
        expect_error(&text, 15, "dns01.propagation_timeout", "greater than zero");
    }

    #[test]
    fn dns_alias_is_a_zone_or_a_record_name_and_needs_dns01() {
        let cert = |extra: &str| {
            format!(
                "{BASE}\n[dns01]\nhook = \"/h\"\n\n[[certificate]]\nname = \"a\"\ndomains = [\"*.a.example\", \"a.example\"]\nchallenges = [\"dns-01\"]\n{extra}\n"
            )
        };
        let alias = |text: &str| {
            parse(text).expect("valid").certificates[0]
                .dns_alias
                .clone()
        };
        let zone = alias(&cert("dns_alias = \"Validation.Example.NET.\""));
        assert_eq!(zone, Some(DnsAlias::Zone("validation.example.net".into())));
        let zone = zone.expect("alias");
        assert_eq!(
            zone.record_for("*.a.example"),
            "_acme-challenge.a.example.validation.example.net"
        );
        let record = alias(&cert(
            "dns_alias = \"_acme-challenge.x.validation.example.net\"",
        ))
        .expect("alias");
        assert_eq!(
            record.record_for("a.example"),
            "_acme-challenge.x.validation.example.net"
        );
        assert_eq!(alias(&cert("")), None);

        for bad in ["not a zone", "net", "192.0.2.1", "a_b.example.net"] {
            let text = cert(&format!("dns_alias = {bad:?}"));
            expect_error(&text, 20, "certificate[0].dns_alias", bad);
        }
        let text = format!(
            "{BASE}\n[[certificate]]\nname = \"a\"\ndomains = [\"a.example\"]\ndns_alias = \"v.example\"\n"
        );
        expect_error(&text, 16, "certificate[0].dns_alias", "does not use dns-01");
    }

    #[test]
    fn dns_persist_01_needs_no_section_and_may_cover_wildcards() {
        let text = format!(
            "{BASE}\n[[certificate]]\nname = \"p\"\ndomains = [\"*.p.example\", \"p.example\"]\nchallenges = [\"dns-persist-01\", \"http-01\"]\n"
        );
        let cfg = parse(&text).expect("valid");
        assert_eq!(
            cfg.certificates[0].challenges,
            [ChallengeKind::DnsPersist01, ChallengeKind::Http01]
        );
        assert_eq!(ChallengeKind::DnsPersist01.as_str(), "dns-persist-01");
    }

    #[test]
    fn dns01_needs_exactly_one_of_hook_and_rfc2136() {
        let text = format!("{BASE}\n[dns01]\nhook_timeout = \"10s\"\n");
        expect_error(&text, 13, "dns01", "set `hook`");
        let (_dir, secret) = secret_file(0o600);
        let text = format!(
            "{BASE}\n[dns01]\nhook = \"/h\"\n\n[dns01.rfc2136]\nserver = \"127.0.0.1:53\"\nkey_name = \"k\"\nsecret_file = {secret:?}\n"
        );
        expect_error(&text, 14, "dns01.hook", "not both");
    }

    #[test]
    fn ari_interval_defaults_to_twice_a_day() {
        let cfg = parse(&with_cert("name = \"w\"\ndomains = [\"a.example\"]")).expect("valid");
        assert_eq!(cfg.daemon.ari_interval, Duration::from_secs(12 * 3600));
        let text = format!(
            "{}[daemon]\nari_interval = \"1h\"\n",
            with_cert("name = \"w\"\ndomains = [\"a.example\"]")
        );
        let cfg = parse(&text).expect("valid");
        assert_eq!(cfg.daemon.ari_interval, Duration::from_secs(3600));
        let bad = text.replace("\"1h\"", "\"soon\"");
        assert!(
            matches!(parse(&bad), Err(ConfigError::Invalid { key, .. }) if key == "daemon.ari_interval")
        );
    }
}

#[cfg(test)]
mod ca_tests {
    use std::time::Duration;

    use super::*;
    use crate::config::tests::{BASE, expect_error, parse};

    const STORAGE: &str =
        "[storage]\nstate_dir = \"s\"\ncert_dir = \"c\"\n[http01]\nlisten = \"127.0.0.1:80\"\n";

    fn cas_of(text: &str, cert: usize) -> Vec<String> {
        let cfg = parse(text).expect("valid");
        let c = &cfg.certificates[cert];
        cfg.cas_of(c).map(|ca| ca.name.to_string()).collect()
    }

    #[test]
    fn presets() {
        for preset in Preset::ALL {
            assert_eq!(Preset::from_name(preset.name()), Some(preset));
            assert_eq!(preset.directory().scheme(), "https");
        }
        assert_eq!(
            Preset::LetsEncrypt.directory().as_str(),
            "https://acme-v02.api.letsencrypt.org/directory"
        );
        assert_eq!(
            Preset::ZeroSsl.directory().as_str(),
            "https://acme.zerossl.com/v2/DV90"
        );
        let eab: Vec<&str> = Preset::ALL
            .into_iter()
            .filter(|p| p.needs_eab())
            .map(Preset::name)
            .collect();
        assert_eq!(eab, ["zerossl", "google"]);

        // By name, by `preset`, and a directory of one's own.
        let text = format!(
            "[ca.letsencrypt]\n[ca.le2]\npreset = \"letsencrypt-staging\"\n[ca.private]\ndirectory = \"https://ca.example/dir\"\n{STORAGE}"
        );
        let cfg = parse(&text).expect("valid");
        let got: Vec<(&str, Option<Preset>, &str)> = cfg
            .cas
            .iter()
            .map(|c| (c.name.as_str(), c.preset, c.acme.directory.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "letsencrypt",
                    Some(Preset::LetsEncrypt),
                    "https://acme-v02.api.letsencrypt.org/directory"
                ),
                (
                    "le2",
                    Some(Preset::LetsEncryptStaging),
                    "https://acme-staging-v02.api.letsencrypt.org/directory"
                ),
                ("private", None, "https://ca.example/dir"),
            ]
        );
        assert_eq!(cfg.primary_ca().name.as_str(), "letsencrypt");

        expect_error(
            &format!("[ca.x]\npreset = \"letsencrypt\"\ndirectory = \"https://a/d\"\n{STORAGE}"),
            2,
            "ca.x.preset",
            "not both",
        );
        expect_error(
            &format!("[ca.x]\npreset = \"lets-encrypt\"\n{STORAGE}"),
            2,
            "ca.x.preset",
            "unknown preset \"lets-encrypt\"; expected one of letsencrypt, letsencrypt-staging",
        );
        expect_error(
            &format!("[ca.mine]\ncontact = []\n{STORAGE}"),
            1,
            "ca.mine",
            "needs `directory`",
        );
        expect_error(
            &format!("[ca.Big]\npreset = \"letsencrypt\"\n{STORAGE}"),
            1,
            "ca.Big",
            "not a CA name",
        );
        expect_error(
            &format!("[ca.zerossl]\n{STORAGE}"),
            1,
            "ca.zerossl",
            "zerossl requires External Account Binding",
        );
        expect_error(
            &format!("[ca.g]\npreset = \"google\"\n{STORAGE}"),
            2,
            "ca.g.preset",
            "google requires External Account Binding",
        );
        // With EAB, the file is read by `resolve`: parsing alone passes.
        let text = format!(
            "[ca.zerossl]\neab_kid = \"k\"\neab_hmac_key_file = \"/nonexistent/eab\"\n{STORAGE}"
        );
        assert!(Parsed::parse(Path::new("/etc/certd/c.toml"), &text).is_ok());
    }

    #[test]
    fn default_ca_of_a_certificate() {
        let cert = "[[certificate]]\nname = \"w\"\ndomains = [\"a.example\"]\n";
        // [acme] alone: `default`.
        let text = format!("[acme]\ndirectory = \"https://a/d\"\n{STORAGE}{cert}");
        assert_eq!(cas_of(&text, 0), ["default"]);
        // One [ca.<name>]: that one.
        let text = format!("[ca.letsencrypt]\n{STORAGE}{cert}");
        assert_eq!(cas_of(&text, 0), ["letsencrypt"]);
        // [acme] beside others: `default`, wherever [acme] stands.
        let text =
            format!("[ca.letsencrypt]\n[acme]\ndirectory = \"https://a/d\"\n{STORAGE}{cert}");
        assert_eq!(cas_of(&text, 0), ["default"]);
        // [ca.default] beside another: `default` too.
        let text =
            format!("[ca.default]\ndirectory = \"https://a/d\"\n[ca.buypass]\n{STORAGE}{cert}");
        assert_eq!(cas_of(&text, 0), ["default"]);
        // Several, none `default`: the certificate must say.
        let text = format!("[ca.letsencrypt]\n[ca.buypass]\n{STORAGE}{cert}");
        expect_error(
            &text,
            9,
            "certificate[0].ca",
            "ca = [\"letsencrypt\", \"buypass\"]",
        );
    }

    #[test]
    fn cas_of_follows_the_certificates_order() {
        let text = format!(
            "[ca.letsencrypt]\n[ca.buypass]\n[ca.private]\ndirectory = \"https://ca.example/dir\"\n{STORAGE}\
             [[certificate]]\nname = \"a\"\ndomains = [\"a.example\"]\nca = [\"private\", \"letsencrypt\"]\n\
             [[certificate]]\nname = \"b\"\ndomains = [\"b.example\"]\nca = [\"buypass\", \"private\", \"letsencrypt\"]\n"
        );
        assert_eq!(cas_of(&text, 0), ["private", "letsencrypt"]);
        assert_eq!(cas_of(&text, 1), ["buypass", "private", "letsencrypt"]);
        // The file's order of the CAs themselves is kept too.
        let cfg = parse(&text).expect("valid");
        let names: Vec<&str> = cfg.cas.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["letsencrypt", "buypass", "private"]);
        let name: CaName = "buypass".parse().expect("a name");
        assert_eq!(cfg.ca(&name).map(|c| c.table.as_str()), Some("ca.buypass"));
        assert!(cfg.ca(&CaName::default_ca()).is_none());

        expect_error(
            &text.replace(
                "[\"private\", \"letsencrypt\"]",
                "[\"private\", \"private\"]",
            ),
            13,
            "certificate[0].ca[1]",
            "listed twice",
        );
    }

    #[test]
    fn fallback_and_sticky_default_from_daemon() {
        let text = format!(
            "[ca.letsencrypt]\n{STORAGE}[daemon]\nca_fallback_after = \"2h\"\n\
             [[certificate]]\nname = \"a\"\ndomains = [\"a.example\"]\n\
             [[certificate]]\nname = \"b\"\ndomains = [\"b.example\"]\nca_fallback_after = \"30m\"\nsticky = true\n"
        );
        let cfg = parse(&text).expect("valid");
        assert_eq!(cfg.daemon.ca_fallback_after, Duration::from_secs(7200));
        let got: Vec<(Duration, bool)> = cfg
            .certificates
            .iter()
            .map(|c| (c.ca_fallback_after, c.sticky))
            .collect();
        assert_eq!(
            got,
            [
                (Duration::from_secs(7200), false),
                (Duration::from_secs(1800), true)
            ]
        );
        let text = format!(
            "[ca.letsencrypt]\n{STORAGE}[[certificate]]\nname = \"a\"\ndomains = [\"a.example\"]\n"
        );
        let cfg = parse(&text).expect("valid");
        assert_eq!(cfg.daemon.ca_fallback_after, Duration::from_secs(3600));
        assert_eq!(
            cfg.certificates[0].ca_fallback_after,
            Duration::from_secs(3600)
        );
        expect_error(
            &format!("{text}ca_fallback_after = \"soon\"\n"),
            10,
            "certificate[0].ca_fallback_after",
            "invalid duration",
        );
    }

    #[test]
    fn limits_inherit_reaper() {
        let text = format!(
            "[acme]\ndirectory = \"https://a/d\"\n[ca.letsencrypt]\nmax_pending = 7\nnew_orders_per_3h = 50\n{STORAGE}\
             [reaper]\nmax_pending = 20\nfailed_authz_per_identifier_per_hour = 3\nduplicate_certificates_per_week = 4\ninterval = \"1m\"\n"
        );
        let cfg = parse(&text).expect("valid");
        assert_eq!(
            cfg.cas[0].limits,
            CaLimits {
                max_pending: 20,
                failed_authz_per_identifier_per_hour: 3,
                new_orders_per_3h: 300,
                duplicate_certificates_per_week: 4,
            }
        );
        assert_eq!(
            cfg.cas[1].limits,
            CaLimits {
                max_pending: 7,
                failed_authz_per_identifier_per_hour: 3,
                new_orders_per_3h: 50,
                duplicate_certificates_per_week: 4,
            }
        );
        // The reaper of a CA: [reaper]'s timings, the CA's limits.
        let reaper = cfg.cas[1].reaper_config(&cfg.reaper);
        assert_eq!(reaper.interval, Duration::from_secs(60));
        assert_eq!((reaper.max_pending, reaper.new_orders_per_3h), (7, 50));
        assert_eq!(cfg.cas[0].reaper_config(&cfg.reaper), cfg.reaper);
        expect_error(
            &text.replace("max_pending = 7", "max_pending = 0"),
            4,
            "ca.letsencrypt.max_pending",
            "whole number from 1",
        );
    }

    #[test]
    fn ca_tables_refused() {
        expect_error(
            &format!(
                "[acme]\ndirectory = \"https://a/d\"\n[ca.default]\ndirectory = \"https://b/d\"\n{STORAGE}"
            ),
            3,
            "ca.default",
            "[ca.default] and [acme] both",
        );
        expect_error(
            &format!(
                "[ca.letsencrypt]\n[ca.le]\ndirectory = \"https://acme-v02.api.letsencrypt.org/directory\"\n{STORAGE}"
            ),
            2,
            "ca.le",
            "same directory as [ca.letsencrypt]",
        );
        expect_error(STORAGE, 1, "(top level)", "the [acme] section is missing");
        expect_error(
            &format!("[ca]\n{STORAGE}"),
            1,
            "(top level)",
            "the [acme] section is missing",
        );
        expect_error(
            &format!("[ca.letsencrypt]\nmax_pending = \"x\"\n{STORAGE}"),
            2,
            "ca.letsencrypt.max_pending",
            "expected a whole number",
        );
        expect_error(
            &format!("[ca.letsencrypt]\ndirectry = \"x\"\n{STORAGE}"),
            2,
            "ca.letsencrypt.directry",
            "unknown field `directry`",
        );
        let cert = "[[certificate]]\nname = \"w\"\ndomains = [\"a.example\"]\n";
        expect_error(
            &format!("[ca.letsencrypt]\n{STORAGE}{cert}ca = []\n"),
            10,
            "certificate[0].ca",
            "an empty list",
        );
        expect_error(
            &format!("[ca.letsencrypt]\n{STORAGE}{cert}ca = [\"letsencrypt\", \"zerossl\"]\n"),
            10,
            "certificate[0].ca[1]",
            "no CA is named \"zerossl\"; the configured ones are letsencrypt",
        );
    }

    #[test]
    fn fleet_section_defaults_and_refusals() {
        let with_fleet = |fleet: &str| {
            format!(
                "{BASE}\n[fleet]\n{fleet}\n[[certificate]]\nname = \"www\"\ndomains = [\"a.example\"]\n"
            )
        };
        let cfg = parse(&with_fleet(
            "database_url = \"postgres://certd:pw@db.example:5432/certd\"\nkey_file = \"fleet.key\"",
        ))
        .expect("valid");
        let fleet = cfg.fleet.as_ref().expect("fleet mode");
        assert_eq!(fleet.lease_ttl, FleetConfig::DEFAULT_LEASE_TTL);
        assert_eq!(fleet.key_file, Path::new("/etc/certd/fleet.key"));
        assert_eq!((fleet.host_id.as_deref(), fleet.advertise), (None, None));
        assert!(
            !format!("{fleet:?}").contains("pw@"),
            "the password must not show in Debug"
        );
        let line = BASE.lines().count() + 3;
        expect_error(
            &with_fleet("database_url = \"mysql://db/certd\"\nkey_file = \"k\""),
            line,
            "fleet.database_url",
            "must be a PostgreSQL URL",
        );
        expect_error(
            &with_fleet(
                "database_url = \"postgres://db/certd\"\nkey_file = \"k\"\nlease_ttl = \"2s\"",
            ),
            line + 2,
            "fleet.lease_ttl",
            "between 6s and 10m",
        );
        expect_error(
            &with_fleet(
                "database_url = \"postgres://db/certd\"\nkey_file = \"k\"\nhost_id = \"a b\"",
            ),
            line + 2,
            "fleet.host_id",
            "letters, digits",
        );
    }
}
