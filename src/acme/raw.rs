//! Signed requests certd makes itself, for what instant-acme only offers
//! through an order it holds in memory: fetching an authorization or a
//! challenge by URL (POST-as-GET) and deactivating an authorization by URL.
//! The reaper and `certd authz deactivate` start from URLs in the ledger,
//! often long after the order object is gone.
//!
//! The JWS is the RFC 8555 §6.2 flattened form with the account URL as
//! `kid`, ES256 over the account's P-256 key (the key type instant-acme
//! creates), signed with ring like everything else in certd.

use std::time::SystemTime;

use base64::Engine;
use base64::prelude::BASE64_URL_SAFE_NO_PAD;
use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, Method, Request, StatusCode};
use instant_acme::{BodyWrapper, HttpClient};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use serde::Deserialize;

use super::http::USER_AGENT;
use super::{AcmeError, AcmeHttp, Disposition, ProblemRecord};

/// The account key, able to sign requests by itself.
pub struct RawSigner {
    key: EcdsaKeyPair,
    kid: String,
    rng: SystemRandom,
}

impl RawSigner {
    pub fn new(pkcs8: &[u8], account_url: &str) -> Result<Self, String> {
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8, &rng)
            .map_err(|e| format!("the account key is not a P-256 PKCS#8 key: {e}"))?;
        Ok(Self {
            key,
            kid: account_url.to_owned(),
            rng,
        })
    }

    /// The account URL the requests name as `kid`.
    pub fn account_url(&self) -> &str {
        &self.kid
    }

    /// The public key as a JWK (RFC 7517), for key rollover.
    pub fn jwk(&self) -> serde_json::Value {
        use ring::signature::KeyPair;
        // An uncompressed P-256 point: 0x04, then 32 bytes of x and of y.
        let point = self.key.public_key().as_ref();
        serde_json::json!({
            "crv": "P-256",
            "kty": "EC",
            "x": BASE64_URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": BASE64_URL_SAFE_NO_PAD.encode(&point[33..65]),
        })
    }

    /// The RFC 7638 thumbprint of the public key.
    pub fn thumbprint(&self) -> String {
        let jwk = self.jwk();
        // RFC 7638: the required members in lexicographic order, no spaces.
        let canonical = format!(
            r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
            jwk["x"].as_str().unwrap_or_default(),
            jwk["y"].as_str().unwrap_or_default()
        );
        BASE64_URL_SAFE_NO_PAD.encode(ring::digest::digest(
            &ring::digest::SHA256,
            canonical.as_bytes(),
        ))
    }

    /// A JWS with the public key itself in the header (not a `kid`) and no
    /// nonce: the inner object of a key change (RFC 8555 §7.3.5).
    fn inner_jws(
        &self,
        url: &str,
        payload: &serde_json::Value,
    ) -> Result<serde_json::Value, AcmeError> {
        let protected = serde_json::json!({ "alg": "ES256", "jwk": self.jwk(), "url": url });
        let protected = BASE64_URL_SAFE_NO_PAD.encode(protected.to_string());
        let payload = BASE64_URL_SAFE_NO_PAD.encode(payload.to_string());
        let signature = self
            .key
            .sign(&self.rng, format!("{protected}.{payload}").as_bytes())
            .map_err(|_| AcmeError::Protocol("signing failed".into()))?;
        Ok(serde_json::json!({
            "protected": protected,
            "payload": payload,
            "signature": BASE64_URL_SAFE_NO_PAD.encode(signature.as_ref()),
        }))
    }

    fn jws(
        &self,
        url: &str,
        nonce: &str,
        payload: Option<&serde_json::Value>,
    ) -> Result<Vec<u8>, AcmeError> {
        let protected = serde_json::json!({
            "alg": "ES256",
            "kid": self.kid,
            "nonce": nonce,
            "url": url,
        });
        let protected = BASE64_URL_SAFE_NO_PAD.encode(protected.to_string());
        let payload = match payload {
            Some(p) => BASE64_URL_SAFE_NO_PAD.encode(p.to_string()),
            None => String::new(),
        };
        let signature = self
            .key
            .sign(&self.rng, format!("{protected}.{payload}").as_bytes())
            .map_err(|_| AcmeError::Protocol("signing failed".into()))?;
        let body = serde_json::json!({
            "protected": protected,
            "payload": payload,
            "signature": BASE64_URL_SAFE_NO_PAD.encode(signature.as_ref()),
        });
        Ok(body.to_string().into_bytes())
    }
}

/// A response to a request certd signed itself.
#[derive(Debug)]
pub struct RawResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// An authorization object, as much of it as certd reads.
#[derive(Debug, Clone, Deserialize)]
pub struct AuthzObject {
    pub status: String,
    pub identifier: IdentifierObject,
    #[serde(default)]
    pub wildcard: bool,
    pub expires: Option<String>,
    #[serde(default)]
    pub challenges: Vec<ChallengeObject>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct IdentifierObject {
    pub value: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChallengeObject {
    #[serde(rename = "type")]
    pub kind: String,
    pub url: String,
    pub status: String,
}

impl AuthzObject {
    /// The identifier as certd records it (`*.` for a wildcard).
    pub fn identifier(&self) -> String {
        if self.wildcard {
            format!("*.{}", self.identifier.value)
        } else {
            self.identifier.value.clone()
        }
    }
}

/// Tries a request again with a fresh nonce when the CA rejects the nonce
/// (RFC 8555 §6.5: it sends a new one with the error).
const BAD_NONCE_RETRIES: usize = 20;

impl AcmeHttp {
    /// POSTs a JWS signed by `signer` to `url`; `None` payload is a
    /// POST-as-GET. Non-2xx answers become classified `AcmeError`s.
    pub async fn signed_post(
        &self,
        signer: &RawSigner,
        url: &str,
        payload: Option<&serde_json::Value>,
    ) -> Result<RawResponse, AcmeError> {
        let mut attempt = 0;
        let mut nonce = self.fresh_nonce().await?;
        loop {
            attempt += 1;
            let body = signer.jws(url, &nonce, payload)?;
            let rsp = self.raw(Method::POST, url, Some(body)).await?;
            if rsp.status.is_success() {
                return Ok(rsp);
            }
            let problem: ProblemRecord =
                serde_json::from_slice(&rsp.body).unwrap_or(ProblemRecord {
                    kind: None,
                    detail: Some(format!(
                        "HTTP {} with a body that is not a problem document",
                        rsp.status
                    )),
                    status: Some(rsp.status.as_u16()),
                    subproblems: Vec::new(),
                });
            if problem.short_type() == "badNonce" && attempt < BAD_NONCE_RETRIES {
                // RFC 8555 §6.5: the rejection carries a fresh nonce.
                nonce = match rsp
                    .headers
                    .get("replay-nonce")
                    .and_then(|v| v.to_str().ok())
                {
                    Some(n) => n.to_owned(),
                    None => self.fresh_nonce().await?,
                };
                continue;
            }
            let retry_after = self.observed(url).and_then(|o| o.retry_after);
            let now = self.inner.clock.system_time();
            return Err(problem_error(problem, rsp.status, retry_after, now));
        }
    }

    /// A nonce from the pool, else from `newNonce`.
    async fn fresh_nonce(&self) -> Result<String, AcmeError> {
        if let Some(n) = self.inner.nonces.take() {
            return Ok(n);
        }
        let url = self
            .new_nonce_url()
            .ok_or_else(|| AcmeError::Protocol("the directory has no newNonce URL".into()))?;
        let rsp = self.raw(Method::HEAD, &url, None).await?;
        rsp.headers
            .get("replay-nonce")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .ok_or_else(|| AcmeError::Protocol("newNonce answered without a Replay-Nonce".into()))
    }

    /// One request through the shared client (nonce harvesting, counting).
    async fn raw(
        &self,
        method: Method,
        url: &str,
        body: Option<Vec<u8>>,
    ) -> Result<RawResponse, AcmeError> {
        let mut req = Request::builder()
            .method(method)
            .uri(url)
            .header(http::header::USER_AGENT, USER_AGENT);
        if body.is_some() {
            req = req.header(CONTENT_TYPE, "application/jose+json");
        }
        let req = req
            .body(BodyWrapper::from(body.unwrap_or_default()))
            .map_err(|e| AcmeError::Protocol(format!("bad URL {url}: {e}")))?;
        let rsp = self.request(req).await.map_err(AcmeError::from)?;
        let status = rsp.parts.status;
        let headers = rsp.parts.headers.clone();
        let mut body = rsp.body;
        let body = body.into_bytes().await.map_err(|e| {
            AcmeError::Transport(format!("{e}: reading the CA's answer from {url}"))
        })?;
        Ok(RawResponse {
            status,
            headers,
            body,
        })
    }
}

fn problem_error(
    problem: ProblemRecord,
    status: StatusCode,
    retry_after: Option<SystemTime>,
    now: SystemTime,
) -> AcmeError {
    let disposition = match (problem.short_type(), status.as_u16()) {
        ("rateLimited", _) | (_, 429) => Disposition::rate_limited(retry_after, now),
        ("badNonce" | "serverInternal", _) => Disposition::Retryable,
        (_, s) if s >= 500 => Disposition::Retryable,
        _ => Disposition::Final,
    };
    AcmeError::Problem {
        problem,
        disposition,
    }
}

/// Fetches an authorization by URL.
pub async fn fetch_authz(
    http: &AcmeHttp,
    signer: &RawSigner,
    url: &str,
) -> Result<AuthzObject, AcmeError> {
    let rsp = http.signed_post(signer, url, None).await?;
    serde_json::from_slice(&rsp.body)
        .map_err(|e| AcmeError::Protocol(format!("{url} is not an authorization: {e}")))
}

/// Deactivates an authorization by URL; returns the CA's new view of it.
pub async fn deactivate_authz(
    http: &AcmeHttp,
    signer: &RawSigner,
    url: &str,
) -> Result<AuthzObject, AcmeError> {
    let payload = serde_json::json!({ "status": "deactivated" });
    let rsp = http.signed_post(signer, url, Some(&payload)).await?;
    serde_json::from_slice(&rsp.body)
        .map_err(|e| AcmeError::Protocol(format!("{url}: unexpected answer: {e}")))
}

/// An order object, as much of it as recovery reads. The status is kept as
/// a string: Pebble reports an order whose authorizations were deactivated
/// as `deactivated`, which RFC 8555 does not define.
#[derive(Debug, Clone, Deserialize)]
pub struct OrderObject {
    pub status: String,
    #[serde(default)]
    pub identifiers: Vec<IdentifierObject>,
    #[serde(default)]
    pub authorizations: Vec<String>,
    pub expires: Option<String>,
    pub certificate: Option<String>,
}

impl OrderObject {
    /// The identifiers, sorted, as the ledger records an order's names.
    pub fn sorted_identifiers(&self) -> Vec<String> {
        let mut names: Vec<String> = self.identifiers.iter().map(|i| i.value.clone()).collect();
        names.sort();
        names
    }
}

/// Fetches an order by URL.
pub async fn fetch_order(
    http: &AcmeHttp,
    signer: &RawSigner,
    url: &str,
) -> Result<OrderObject, AcmeError> {
    let rsp = http.signed_post(signer, url, None).await?;
    serde_json::from_slice(&rsp.body)
        .map_err(|e| AcmeError::Protocol(format!("{url} is not an order: {e}")))
}

/// Every order URL the CA lists for the account (RFC 8555 §7.1.2.1), page
/// by page; `None` where the account object names no `orders` list (Let's
/// Encrypt does not offer one). Pebble leaves out `invalid` orders.
pub async fn account_orders(
    http: &AcmeHttp,
    signer: &RawSigner,
) -> Result<Option<Vec<String>>, AcmeError> {
    #[derive(Deserialize)]
    struct AccountObject {
        orders: Option<String>,
    }
    #[derive(Deserialize)]
    struct OrdersList {
        #[serde(default)]
        orders: Vec<String>,
    }
    let account_url = signer.account_url();
    let rsp = http.signed_post(signer, account_url, None).await?;
    let account: AccountObject = serde_json::from_slice(&rsp.body)
        .map_err(|e| AcmeError::Protocol(format!("{account_url} is not an account: {e}")))?;
    let Some(mut page) = account.orders else {
        return Ok(None);
    };
    let mut all = Vec::new();
    let mut seen = std::collections::HashSet::new();
    // A CA whose `next` links loop must not keep certd here.
    while seen.insert(page.clone()) {
        let rsp = http.signed_post(signer, &page, None).await?;
        let list: OrdersList = serde_json::from_slice(&rsp.body)
            .map_err(|e| AcmeError::Protocol(format!("{page} is not an orders list: {e}")))?;
        all.extend(list.orders);
        match next_link(&rsp.headers) {
            Some(next) => page = next,
            None => break,
        }
    }
    Ok(Some(all))
}

/// The target of a `Link: <…>;rel="next"` header, if any.
fn next_link(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(http::header::LINK)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|link| {
            let (target, params) = link.trim().split_once(';')?;
            let is_next = params
                .split(';')
                .any(|p| p.trim().replace(' ', "") == "rel=\"next\"");
            let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
            is_next.then(|| target.to_owned())
        })
}

/// What a URL of the CA's turned out to be.
#[derive(Debug)]
pub enum Fetched {
    Authz(AuthzObject),
    /// Anything else (a challenge, typically), with the authorization its
    /// `Link: rel="up"` header names, where the CA sends one (seed 000).
    Other {
        up: Option<String>,
    },
}

/// Fetches a URL the ledger does not know with one POST-as-GET and tells
/// what it is. One request only: some servers start validating a
/// challenge when its URL is fetched.
pub async fn fetch_unknown(
    http: &AcmeHttp,
    signer: &RawSigner,
    url: &str,
) -> Result<Fetched, AcmeError> {
    let rsp = http.signed_post(signer, url, None).await?;
    Ok(match serde_json::from_slice(&rsp.body) {
        Ok(authz) => Fetched::Authz(authz),
        Err(_) => Fetched::Other {
            up: http.observed(url).and_then(|o| o.link_up),
        },
    })
}

/// A fresh account key: (PKCS#8 DER, signer for `account_url`).
pub fn generate_account_key(account_url: &str) -> Result<(Vec<u8>, RawSigner), AcmeError> {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
        .map_err(|_| AcmeError::Protocol("cannot generate a P-256 key".into()))?;
    let signer = RawSigner::new(pkcs8.as_ref(), account_url).map_err(AcmeError::Protocol)?;
    Ok((pkcs8.as_ref().to_vec(), signer))
}

/// Account key rollover (RFC 8555 §7.3.5): the CA's `keyChange` resource
/// receives, signed by the old key, an object signed by the new key that
/// names the account and the old key. Until this returns `Ok` the old key
/// is the account's key.
pub async fn roll_over(
    http: &AcmeHttp,
    old: &RawSigner,
    new: &RawSigner,
    key_change_url: &str,
) -> Result<(), AcmeError> {
    let inner = new.inner_jws(
        key_change_url,
        &serde_json::json!({ "account": old.kid, "oldKey": old.jwk() }),
    )?;
    http.signed_post(old, key_change_url, Some(&inner)).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_link_is_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.append(
            http::header::LINK,
            "<https://ca/dir>;rel=\"index\"".parse().expect("header"),
        );
        assert_eq!(next_link(&headers), None);
        headers.append(
            http::header::LINK,
            "<https://ca/list-orderz/1/page/2>; rel=\"next\""
                .parse()
                .expect("header"),
        );
        assert_eq!(
            next_link(&headers).as_deref(),
            Some("https://ca/list-orderz/1/page/2")
        );
    }
}
