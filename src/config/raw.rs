//! The file's shape as serde sees it. Values a later step may reject keep
//! their byte span (`Spanned`), so its error can name the line;
//! `deny_unknown_fields` turns typos into errors.

use std::ops::Range;

use serde::Deserialize;
use toml::Spanned;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Config {
    /// The one-CA form: the CA named `default`.
    pub acme: Option<Spanned<Acme>>,
    /// `[ca.<name>]` tables, in file order.
    #[serde(default)]
    pub ca: CaTables,
    pub storage: Storage,
    pub http01: Option<Http01>,
    pub dns01: Option<Dns01>,
    pub tls_alpn01: Option<TlsAlpn01>,
    pub reaper: Option<Reaper>,
    pub daemon: Option<Daemon>,
    pub metrics: Option<Metrics>,
    pub notify: Option<Notify>,
    pub fleet: Option<Spanned<Fleet>>,
    #[serde(default)]
    pub certificate: Vec<Certificate>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Fleet {
    pub database_url: Spanned<String>,
    pub key_file: String,
    pub lease_ttl: Option<Spanned<String>>,
    pub host_id: Option<Spanned<String>>,
    pub advertise: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Metrics {
    pub listen: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Notify {
    pub command: String,
    pub after_failures: Option<Spanned<i64>>,
    pub timeout: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Daemon {
    pub max_concurrent: Option<Spanned<i64>>,
    pub renew_remaining: Option<Spanned<f64>>,
    pub backoff_min: Option<Spanned<String>>,
    pub backoff_max: Option<Spanned<String>>,
    pub ari_interval: Option<Spanned<String>>,
    pub shutdown_grace: Option<Spanned<String>>,
    pub log_level: Option<Spanned<String>>,
    pub ca_fallback_after: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Acme {
    pub directory: Spanned<String>,
    #[serde(default)]
    pub contact: Vec<Spanned<String>>,
    pub ca_bundle: Option<Spanned<String>>,
    pub eab_kid: Option<Spanned<String>>,
    pub eab_hmac_key_file: Option<Spanned<String>>,
    pub trusted_roots: Option<Spanned<String>>,
}

/// `[ca.<name>]`: what `[acme]` takes, a directory that a preset may
/// fill, and the guard's limits at this CA.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Ca {
    pub directory: Option<Spanned<String>>,
    pub preset: Option<Spanned<String>>,
    #[serde(default)]
    pub contact: Vec<Spanned<String>>,
    pub ca_bundle: Option<Spanned<String>>,
    pub eab_kid: Option<Spanned<String>>,
    pub eab_hmac_key_file: Option<Spanned<String>>,
    pub trusted_roots: Option<Spanned<String>>,
    pub max_pending: Option<Spanned<i64>>,
    pub failed_authz_per_identifier_per_hour: Option<Spanned<i64>>,
    pub new_orders_per_3h: Option<Spanned<i64>>,
    pub duplicate_certificates_per_week: Option<Spanned<i64>>,
}

impl From<Acme> for Ca {
    /// `[acme]` is a CA table without a preset or limits of its own.
    fn from(a: Acme) -> Self {
        Self {
            directory: Some(a.directory),
            preset: None,
            contact: a.contact,
            ca_bundle: a.ca_bundle,
            eab_kid: a.eab_kid,
            eab_hmac_key_file: a.eab_hmac_key_file,
            trusted_roots: a.trusted_roots,
            max_pending: None,
            failed_authz_per_identifier_per_hour: None,
            new_orders_per_3h: None,
            duplicate_certificates_per_week: None,
        }
    }
}

/// The `[ca.<name>]` tables with their names' spans, in the order the
/// file gives them (a map type would sort them).
#[derive(Default)]
pub(super) struct CaTables(pub Vec<(Spanned<String>, Ca)>);

impl<'de> Deserialize<'de> for CaTables {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = CaTables;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a table per CA, like [ca.letsencrypt]")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<CaTables, A::Error> {
                let mut tables = Vec::new();
                while let Some(entry) = map.next_entry::<Spanned<String>, Ca>()? {
                    tables.push(entry);
                }
                Ok(CaTables(tables))
            }
        }
        d.deserialize_map(Visitor)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TlsAlpn01 {
    pub listen: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Storage {
    pub state_dir: String,
    pub cert_dir: String,
}

pub(super) struct Http01 {
    pub listen: Option<Spanned<String>>,
    pub webroot: Option<String>,
    pub preflight: Option<bool>,
    pub span: Range<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Http01Fields {
    listen: Option<Spanned<String>>,
    webroot: Option<String>,
    preflight: Option<bool>,
}

// The section's own span lets "set listen or webroot" point at it.
impl<'de> Deserialize<'de> for Http01 {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let spanned = Spanned::<Http01Fields>::deserialize(d)?;
        let span = spanned.span();
        let fields = spanned.into_inner();
        Ok(Self {
            listen: fields.listen,
            webroot: fields.webroot,
            preflight: fields.preflight,
            span,
        })
    }
}

pub(super) struct Dns01 {
    pub hook: Option<Spanned<String>>,
    pub hook_timeout: Option<Spanned<String>>,
    pub propagation_check: Option<bool>,
    pub propagation_timeout: Option<Spanned<String>>,
    pub nameservers: Vec<Spanned<String>>,
    pub rfc2136: Option<Rfc2136>,
    pub span: Range<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Dns01Fields {
    hook: Option<Spanned<String>>,
    hook_timeout: Option<Spanned<String>>,
    propagation_check: Option<bool>,
    propagation_timeout: Option<Spanned<String>>,
    #[serde(default)]
    nameservers: Vec<Spanned<String>>,
    rfc2136: Option<Rfc2136>,
}

// The section's own span lets "set hook or [dns01.rfc2136]" point at it.
impl<'de> Deserialize<'de> for Dns01 {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let spanned = Spanned::<Dns01Fields>::deserialize(d)?;
        let span = spanned.span();
        let f = spanned.into_inner();
        Ok(Self {
            hook: f.hook,
            hook_timeout: f.hook_timeout,
            propagation_check: f.propagation_check,
            propagation_timeout: f.propagation_timeout,
            nameservers: f.nameservers,
            rfc2136: f.rfc2136,
            span,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Rfc2136 {
    pub server: Spanned<String>,
    pub zone: Option<Spanned<String>>,
    pub key_name: Spanned<String>,
    pub algorithm: Option<Spanned<String>>,
    pub secret_file: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Reaper {
    pub pending_max_age: Option<Spanned<String>>,
    pub interval: Option<Spanned<String>>,
    pub max_pending: Option<Spanned<i64>>,
    pub failed_authz_per_identifier_per_hour: Option<Spanned<i64>>,
    pub deactivate_valid_after_issue: Option<bool>,
    pub new_orders_per_3h: Option<Spanned<i64>>,
    pub duplicate_certificates_per_week: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Certificate {
    pub name: Spanned<String>,
    pub domains: Spanned<Vec<Spanned<String>>>,
    pub key_type: Option<Spanned<String>>,
    pub challenges: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    pub reload: Vec<String>,
    pub reload_timeout: Option<Spanned<String>>,
    pub profile: Option<Spanned<Profile>>,
    pub profile_required: Option<Spanned<bool>>,
    #[serde(default)]
    pub reuse_key: bool,
    pub dns_alias: Option<Spanned<String>>,
    pub ca: Option<Spanned<Vec<Spanned<String>>>>,
    pub ca_fallback_after: Option<Spanned<String>>,
    pub sticky: Option<bool>,
}

/// `profile = "name"` or `profile = ["first", "second"]`; anything
/// else is refused by serde, with the key's position.
pub(super) enum Profile {
    One(String),
    List(Vec<Spanned<String>>),
}

impl<'de> Deserialize<'de> for Profile {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Profile;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "a profile name or a list of them, best first, like [\"tlsserver\", \"classic\"]",
                )
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Profile, E> {
                Ok(Profile::One(v.to_owned()))
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Profile, A::Error> {
                let mut list = Vec::new();
                while let Some(item) = seq.next_element::<Spanned<String>>()? {
                    list.push(item);
                }
                Ok(Profile::List(list))
            }
        }
        d.deserialize_any(Visitor)
    }
}
