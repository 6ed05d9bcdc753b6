//! Asking the CA itself what became of the authorizations certd created.
//!
//! Pebble answers authorizations only to signed POST-as-GET requests from
//! the owning account, so this loads certd's account credentials and signs
//! one request per authorization URL. The oracle is the CA's JSON answer;
//! the signing is certd's small JWS helper (a wrong signature would make
//! Pebble refuse, not lie). Orders are read as raw JSON: Pebble reports an
//! order whose authorizations were deactivated as "deactivated", a status
//! RFC 8555 does not define and instant-acme refuses to parse.
//!
//! What the CA holds is found through the CA itself, not through certd's
//! ledger: the account object names its orders list (RFC 8555 §7.1.2.1;
//! Pebble serves it at `/list-orderz/<account id>`, three orders a page,
//! leaving `invalid` orders out), so an order certd never recorded (a kill
//! between `newOrder` and the ledger) is seen too.
//!
//! With several CAs, each is asked as certd's account there
//! ([`CaAccount`]): its directory, the roots of its TLS, and the
//! credentials file certd keeps for that directory.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::prelude::BASE64_URL_SAFE_NO_PAD;
use certd::acme::AcmeHttp;
use certd::acme::raw::{
    AuthzObject, RawSigner, account_orders, deactivate_authz, fetch_authz, fetch_order,
};
use instant_acme::{Account, AccountCredentials};

use super::{CaTable, TestEnv};

/// certd's account at one CA, as a test reaches it: the directory URL
/// certd's configuration names (a front's, where one stands before the
/// CA), the PEM its TLS chains to, and certd's credentials file for that
/// directory.
#[derive(Debug, Clone)]
pub struct CaAccount {
    directory: String,
    ca_bundle: PathBuf,
    credentials: PathBuf,
}

impl CaAccount {
    /// The account at the environment's one CA (`[acme]`).
    pub fn of_env(env: &TestEnv) -> CaAccount {
        let directory = env.directory_url();
        CaAccount {
            credentials: certd::acme::credentials_path(&env.state_dir(), &directory),
            ca_bundle: env.pebble.ca_bundle(),
            directory,
        }
    }

    /// The account at the CA of `table`, one of several.
    pub fn at(env: &TestEnv, table: &CaTable) -> CaAccount {
        CaAccount {
            credentials: certd::acme::credentials_path(&env.state_dir(), &table.directory),
            ca_bundle: table.ca_bundle.clone(),
            directory: table.directory.clone(),
        }
    }

    /// The account whose credentials file is `credentials`, at the CA
    /// whose directory is `directory` (a fleet host's copy of the fleet's
    /// one account).
    pub fn new(directory: String, ca_bundle: PathBuf, credentials: PathBuf) -> CaAccount {
        CaAccount {
            directory,
            ca_bundle,
            credentials,
        }
    }

    /// Whether certd has created this account (written its credentials).
    pub fn exists(&self) -> bool {
        self.credentials.exists()
    }

    /// Whether `url` is served by this CA: the same scheme, host and port
    /// as its directory.
    pub fn serves(&self, url: &str) -> bool {
        origin(url) == origin(&self.directory)
    }

    fn credentials(&self) -> Vec<u8> {
        std::fs::read(&self.credentials).unwrap_or_else(|e| {
            panic!(
                "read account credentials {}: {e}",
                self.credentials.display()
            )
        })
    }
}

/// `scheme://host:port` of a URL.
fn origin(url: &str) -> &str {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    url[after_scheme..]
        .find('/')
        .map_or(url, |i| &url[..after_scheme + i])
}

/// Authorization URL → status at the CA ("pending", "valid", …).
pub fn ca_authz_statuses(env: &TestEnv, authz_urls: &[String]) -> BTreeMap<String, String> {
    ca_authz_objects(env, authz_urls)
        .into_iter()
        .map(|(url, a)| (url, a.status))
        .collect()
}

/// Panics unless the CA reports every authorization in `urls` as `status`.
pub fn assert_ca_status(env: &TestEnv, urls: &[String], status: &str) {
    let at_ca = ca_authz_statuses(env, urls);
    assert_eq!(at_ca.len(), urls.len());
    assert!(
        at_ca.values().all(|s| s == status),
        "expected all {status} at the CA: {at_ca:?}"
    );
}

/// Authorization URL → the CA's authorization object.
pub fn ca_authz_objects(env: &TestEnv, authz_urls: &[String]) -> BTreeMap<String, AuthzObject> {
    authz_objects_at(&CaAccount::of_env(env), authz_urls)
}

/// Authorization URL → the authorization object at the CA of `ca`.
fn authz_objects_at(ca: &CaAccount, authz_urls: &[String]) -> BTreeMap<String, AuthzObject> {
    if authz_urls.is_empty() {
        return BTreeMap::new();
    }
    let urls = authz_urls.to_vec();
    as_account_at(
        &ca.ca_bundle,
        &ca.credentials(),
        |http, signer| async move {
            let mut objects = BTreeMap::new();
            for url in urls {
                let authz = fetch_authz(&http, &signer, &url)
                    .await
                    .unwrap_or_else(|e| panic!("fetch authorization {url}: {e}"));
                objects.insert(url, authz);
            }
            objects
        },
    )
}

/// Fetches an authorization signed with the account key in `creds` (the
/// JSON of a credentials file); the CA's error text if it refuses.
pub fn fetch_authz_as(env: &TestEnv, creds: &[u8], url: &str) -> Result<AuthzObject, String> {
    let url = url.to_owned();
    as_account(env, creds, |http, signer| async move {
        fetch_authz(&http, &signer, &url)
            .await
            .map_err(|e| e.to_string())
    })
}

/// Runs `f` with an HTTP client and a signer for the account in `creds`.
fn as_account<T, F, Fut>(env: &TestEnv, creds: &[u8], f: F) -> T
where
    F: FnOnce(AcmeHttp, RawSigner) -> Fut,
    Fut: Future<Output = T>,
{
    as_account_at(&env.pebble.ca_bundle(), creds, f)
}

/// Runs `f` with an HTTP client trusting `ca_bundle` and a signer for the
/// account in `creds`.
fn as_account_at<T, F, Fut>(ca_bundle: &Path, creds: &[u8], f: F) -> T
where
    F: FnOnce(AcmeHttp, RawSigner) -> Fut,
    Fut: Future<Output = T>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let http =
            AcmeHttp::new(Some(ca_bundle), certd::clock::Clock::system()).expect("HTTP client");
        let parsed: AccountCredentials = serde_json::from_slice(creds).expect("credentials JSON");
        // Loading the account fetches the directory, which teaches the
        // client the CA's newNonce URL.
        let account = Account::builder_with_http(Box::new(http.clone()))
            .from_credentials(parsed)
            .await
            .expect("load account");
        let json: serde_json::Value = serde_json::from_slice(creds).expect("credentials JSON");
        let key = BASE64_URL_SAFE_NO_PAD
            .decode(json["key_pkcs8"].as_str().expect("key_pkcs8"))
            .expect("base64 key");
        let signer = RawSigner::new(&key, account.id()).expect("account key");
        f(http, signer).await
    })
}

/// One order the CA lists for certd's account, as the CA reports it.
#[derive(Debug)]
pub struct CaOrder {
    pub url: String,
    pub status: String,
    /// Sorted.
    pub identifiers: Vec<String>,
    /// The certificate URL of a valid order.
    pub certificate: Option<String>,
    /// Authorization URL → status.
    pub authz: BTreeMap<String, String>,
}

/// Every order the CA lists for certd's account, each with the status of
/// every one of its authorizations. Panics if the CA offers no list.
pub fn ca_orders(env: &TestEnv) -> Vec<CaOrder> {
    ca_orders_at(&CaAccount::of_env(env))
}

/// Every order the CA of `ca` lists for certd's account there, as
/// `ca_orders`. Panics if certd has no account there (`CaAccount::exists`
/// says whether it has).
pub fn ca_orders_at(ca: &CaAccount) -> Vec<CaOrder> {
    as_account_at(
        &ca.ca_bundle,
        &ca.credentials(),
        |http, signer| async move {
            let urls = account_orders(&http, &signer)
                .await
                .expect("the account's orders list")
                .expect("Pebble names the account's orders list");
            let mut orders = Vec::with_capacity(urls.len());
            for url in urls {
                let order = fetch_order(&http, &signer, &url)
                    .await
                    .unwrap_or_else(|e| panic!("fetch order {url}: {e}"));
                let mut authz = BTreeMap::new();
                for a in &order.authorizations {
                    let object = fetch_authz(&http, &signer, a)
                        .await
                        .unwrap_or_else(|e| panic!("fetch authorization {a}: {e}"));
                    authz.insert(a.clone(), object.status);
                }
                orders.push(CaOrder {
                    identifiers: order.sorted_identifiers(),
                    status: order.status,
                    certificate: order.certificate,
                    authz,
                    url,
                });
            }
            orders
        },
    )
}

/// The certificate chain (PEM) the CA serves at `url`.
pub fn ca_certificate(env: &TestEnv, url: &str) -> String {
    let creds = account_credentials(env);
    let url = url.to_owned();
    as_account(env, &creds, |http, signer| async move {
        let rsp = http
            .signed_post(&signer, &url, None)
            .await
            .unwrap_or_else(|e| panic!("download {url}: {e}"));
        String::from_utf8(rsp.body.to_vec()).expect("PEM is text")
    })
}

/// The oracle of every kill test: no authorization of any order the CA
/// holds for the account is pending, nor any the ledger recorded (Pebble
/// leaves `invalid` orders out of its list, and such an order may still
/// have a pending authorization for another name).
pub fn assert_nothing_pending_at_ca(env: &TestEnv) {
    let ca = CaAccount::of_env(env);
    assert_nothing_pending(&ca, ledger_authz_urls(&ledger_authz(env)));
}

/// As `assert_nothing_pending_at_ca`, at the CA of `ca`, one of several:
/// of the ledger's authorizations, those this CA serves. Without an
/// account there, the ledger must hold none of them.
pub fn assert_nothing_pending_at(env: &TestEnv, ca: &CaAccount) {
    let recorded: Vec<String> = ledger_authz_urls(&ledger_authz(env))
        .into_iter()
        .filter(|u| ca.serves(u))
        .collect();
    if ca.exists() {
        assert_nothing_pending(ca, recorded);
    } else {
        assert!(
            recorded.is_empty(),
            "the ledger has authorizations at {} but certd no account there: {recorded:#?}",
            ca.directory
        );
    }
}

/// As `assert_nothing_pending_at_ca`, for the account `ca` and the
/// authorizations `recorded` in a ledger the test read itself (a
/// fleet's, in PostgreSQL).
pub fn assert_nothing_pending_among(ca: &CaAccount, recorded: Vec<String>) {
    assert_nothing_pending(ca, recorded);
}

/// Panics if any authorization of an order the CA lists, or of
/// `recorded` (the ledger's, at this CA), is pending there.
fn assert_nothing_pending(ca: &CaAccount, recorded: Vec<String>) {
    let orders = ca_orders_at(ca);
    let listed: BTreeSet<&String> = orders.iter().flat_map(|o| o.authz.keys()).collect();
    let unlisted: Vec<String> = recorded
        .into_iter()
        .filter(|u| !listed.contains(u))
        .collect();
    let mut pending: Vec<String> = orders
        .iter()
        .flat_map(|o| {
            o.authz
                .iter()
                .filter(|(_, s)| *s == "pending")
                .map(move |(a, _)| format!("{a} (order {}, {})", o.url, o.status))
        })
        .collect();
    pending.extend(
        authz_objects_at(ca, &unlisted)
            .into_iter()
            .filter(|(_, a)| a.status == "pending")
            .map(|(a, _)| format!("{a} (in the ledger only)")),
    );
    pending.sort();
    pending.dedup();
    assert!(
        pending.is_empty(),
        "left pending at the CA {}: {pending:#?}",
        ca.directory
    );
}

fn account_credentials(env: &TestEnv) -> Vec<u8> {
    CaAccount::of_env(env).credentials()
}

/// The ledger's authorizations (`certd authz list --json`).
pub fn ledger_authz(env: &TestEnv) -> Vec<serde_json::Value> {
    let out = env.certd(&["authz", "list", "--json"]);
    out.assert_success();
    serde_json::from_str(&out.stdout).expect("authz list JSON")
}

/// The URLs of the ledger's authorizations.
pub fn ledger_authz_urls(authz: &[serde_json::Value]) -> Vec<String> {
    authz
        .iter()
        .filter_map(|a| a["url"].as_str().map(str::to_owned))
        .collect()
}

/// How many events of `kind` the ledger holds, read from the SQLite file.
pub fn ledger_events(env: &TestEnv, kind: certd::ledger::EventKind) -> i64 {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let store = certd::ledger::Ledger::open(
            &env.state_dir().join("certd.db"),
            certd::clock::Clock::system(),
        )
        .await
        .expect("open ledger");
        let n = store.count_events(kind).await.expect("count events");
        store.close().await;
        n
    })
}

/// Has the CA validate an authorization certd left pending, acting as
/// certd's account but outside certd: publishes the dns-01 TXT record in
/// challtestsrv, answers the challenge, and waits until the CA says
/// `valid`. Afterwards the ledger still says `pending` for an authorization
/// the CA has validated, as when certd stops before polling it.
pub fn validate_outside_certd(env: &TestEnv, authz_url: &str) {
    let path = certd::acme::credentials_path(&env.state_dir(), &env.directory_url());
    let creds = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("read account credentials {}: {e}", path.display()));
    let authz_url = authz_url.to_owned();
    as_account(env, &creds, |http, signer| async move {
        let authz_url = authz_url.as_str();
        // The token is not in certd's `AuthzObject`: read the raw answer.
        let rsp = http
            .signed_post(&signer, authz_url, None)
            .await
            .expect("fetch authorization");
        let authz: serde_json::Value = serde_json::from_slice(&rsp.body).expect("authz JSON");
        let name = authz["identifier"]["value"].as_str().expect("identifier");
        let challenge = authz["challenges"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == "dns-01"))
            .expect("a dns-01 challenge");
        let token = challenge["token"].as_str().expect("token");
        let url = challenge["url"].as_str().expect("challenge URL");
        let key_authorization = format!("{token}.{}", signer.thumbprint());
        let value = BASE64_URL_SAFE_NO_PAD.encode(ring::digest::digest(
            &ring::digest::SHA256,
            key_authorization.as_bytes(),
        ));
        let published = http
            .plain()
            .post(format!("{}/set-txt", env.pebble.challtestsrv_url()))
            .body(
                serde_json::json!({ "host": format!("_acme-challenge.{name}."), "value": value })
                    .to_string(),
            )
            .send()
            .await
            .expect("challtestsrv");
        assert!(published.status().is_success(), "set-txt: {published:?}");
        http.signed_post(&signer, url, Some(&serde_json::json!({})))
            .await
            .expect("answer the challenge");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let status = fetch_authz(&http, &signer, authz_url)
                .await
                .expect("poll authorization")
                .status;
            match status.as_str() {
                "valid" => break,
                "pending" if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => panic!("{authz_url} is {other} at the CA, not valid"),
            }
        }
    });
}

/// Deactivates, as certd's account but outside certd, every valid
/// authorization of the account's orders at the CA. Pebble reuses a valid
/// authorization 1 % of the time even at `PEBBLE_AUTHZREUSE=0`; a test that
/// counts the requests of a fresh validation first makes sure there is
/// none to reuse.
pub fn forget_valid_authz(env: &TestEnv) {
    let valid: Vec<String> = ca_orders(env)
        .into_iter()
        .flat_map(|o| o.authz.into_iter())
        .filter(|(_, status)| status == "valid")
        .map(|(url, _)| url)
        .collect();
    let creds = account_credentials(env);
    as_account(env, &creds, |http, signer| async move {
        for a in valid {
            deactivate_authz(&http, &signer, &a)
                .await
                .unwrap_or_else(|e| panic!("deactivate {a}: {e}"));
        }
    });
}
