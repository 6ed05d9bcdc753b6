//! Asking the CA itself what became of the authorizations certd created.
//!
//! Pebble answers authorizations only to signed POST-as-GET requests from
//! the owning account, so this loads certd's account credentials and signs
//! one request per authorization URL. The oracle is the CA's JSON answer;
//! the signing is certd's small JWS helper (a wrong signature would make
//! Pebble refuse, not lie). Orders are not fetched: Pebble reports an order
//! whose authorizations were deactivated as "deactivated", a status RFC 8555
//! does not define and instant-acme refuses to parse.

use std::collections::BTreeMap;

use base64::Engine;
use base64::prelude::BASE64_URL_SAFE_NO_PAD;
use certd::acme::AcmeHttp;
use certd::acme::raw::{AuthzObject, RawSigner, fetch_authz};
use instant_acme::{Account, AccountCredentials};

use super::TestEnv;

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
    let path = certd::acme::credentials_path(&env.state_dir(), &env.directory_url());
    let creds = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("read account credentials {}: {e}", path.display()));
    authz_urls
        .iter()
        .map(|url| {
            let authz = fetch_authz_as(env, &creds, url)
                .unwrap_or_else(|e| panic!("fetch authorization {url}: {e}"));
            (url.clone(), authz)
        })
        .collect()
}

/// Fetches an authorization signed with the account key in `creds` (the
/// JSON of a credentials file); the CA's error text if it refuses.
pub fn fetch_authz_as(env: &TestEnv, creds: &[u8], url: &str) -> Result<AuthzObject, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let http = AcmeHttp::new(Some(&env.pebble.ca_bundle())).expect("HTTP client");
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
        fetch_authz(&http, &signer, url)
            .await
            .map_err(|e| e.to_string())
    })
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
pub fn ledger_events(env: &TestEnv, kind: &str) -> i64 {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let store = certd::store::Store::open(&env.state_dir().join("certd.db"))
            .await
            .expect("open ledger");
        let n = store.count_events(kind).await.expect("count events");
        store.close().await;
        n
    })
}
