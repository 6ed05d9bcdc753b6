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
use std::time::{Duration, Instant};

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
    runtime().block_on(async {
        let (http, signer) = account_signer(env, creds).await;
        fetch_authz(&http, &signer, url)
            .await
            .map_err(|e| e.to_string())
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
    runtime().block_on(async {
        let (http, signer) = account_signer(env, &creds).await;
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

/// certd's account at the CA, from the JSON of a credentials file: an
/// HTTP client that knows the CA's newNonce URL, and the account key.
async fn account_signer(env: &TestEnv, creds: &[u8]) -> (AcmeHttp, RawSigner) {
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
    (http, signer)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
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
