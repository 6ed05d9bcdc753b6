//! What responses said beyond their bodies, per URL: status,
//! `Retry-After`, `Link: rel="up"`, an object's `expires`; the endpoint
//! each URL is (learned from the directory and from objects) for request
//! counts; the orders the CA created recently.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, LINK, RETRY_AFTER};
use http::{HeaderMap, Method, StatusCode};
use serde::Deserialize;

use super::http::{AcmeHttp, https_url, lock, parse_retry_after};

const OBSERVATIONS_MAX: usize = 4096;
/// How long what a response said about an object is kept once the daemon
/// idles (`forget_old`): the driver and the reaper read it within
/// milliseconds of their own request.
const OBSERVATION_TTL: Duration = Duration::from_secs(5);
/// Endpoints learned from the directory, which outlive any order.
const DIRECTORY_ROLES: [&str; 5] = [
    "newNonce",
    "newAccount",
    "newOrder",
    "revokeCert",
    "keyChange",
];

/// What the last response from one URL said beyond its body.
#[derive(Debug, Clone, Default)]
pub struct Observation {
    pub status: u16,
    pub retry_after: Option<SystemTime>,
    /// `Link: <…>;rel="up"`: a challenge's parent authorization at some CAs.
    pub link_up: Option<String>,
    /// The object's `expires` field, Unix seconds.
    pub expires: Option<i64>,
}

#[derive(Default)]
struct Stats {
    /// URL → endpoint name, learned from the directory and from objects,
    /// and when it was learned.
    roles: HashMap<String, (&'static str, Instant)>,
    /// (endpoint, outcome) → count
    counts: BTreeMap<(&'static str, String), u64>,
}

/// What responses said, per URL and per endpoint; shared by every clone
/// of one [`AcmeHttp`].
#[derive(Default)]
pub(super) struct Observer {
    /// With when it was recorded, for `forget_before`.
    observations: Mutex<HashMap<String, (Observation, Instant)>>,
    stats: Mutex<Stats>,
    /// The directory's newNonce URL, once a directory has been seen.
    new_nonce: Mutex<Option<String>>,
    /// The directory's keyChange URL, likewise.
    key_change: Mutex<Option<String>>,
    /// Recently created orders: (sorted identifiers, order URL). Lets the
    /// driver find an order instant-acme refused to hand over (a CA that
    /// ignored `replaces`).
    created_orders: Mutex<VecDeque<(String, String)>>,
}

impl AcmeHttp {
    /// Drops what responses said about orders, authorizations and
    /// challenges more than a few seconds ago, for a daemon about to idle:
    /// 1,000 orders leave some 7,000 URLs behind, and none is read again.
    pub fn forget_old(&self) {
        self.inner.observer.forget_before(Instant::now());
    }

    /// What the last response from `url` said in its headers.
    pub fn observed(&self, url: &str) -> Option<Observation> {
        lock(&self.inner.observer.observations)
            .get(url)
            .map(|(o, _)| o.clone())
    }

    /// The CA's newNonce URL, known once instant-acme fetched the directory.
    pub fn new_nonce_url(&self) -> Option<String> {
        lock(&self.inner.observer.new_nonce).clone()
    }

    /// The CA's keyChange URL, known once the directory was fetched.
    pub fn key_change_url(&self) -> Option<String> {
        lock(&self.inner.observer.key_change).clone()
    }

    /// The URL of the order the CA last created for exactly `identifiers`
    /// (sorted), taken out of the record.
    pub fn take_created_order(&self, identifiers: &[String]) -> Option<String> {
        let key = identifiers.join(",");
        let mut created = lock(&self.inner.observer.created_orders);
        let i = created.iter().rposition(|(k, _)| *k == key)?;
        created.remove(i).map(|(_, url)| url)
    }

    /// Requests sent so far, per (endpoint, outcome).
    pub fn request_counts(&self) -> BTreeMap<(&'static str, String), u64> {
        lock(&self.inner.observer.stats).counts.clone()
    }
}

impl Observer {
    pub(super) fn forget_before(&self, now: Instant) {
        let fresh = |at: &Instant| now.duration_since(*at) < OBSERVATION_TTL;
        let mut map = lock(&self.observations);
        map.retain(|_, (_, at)| fresh(at));
        map.shrink_to_fit();
        drop(map);
        let mut stats = lock(&self.stats);
        stats
            .roles
            .retain(|_, (role, at)| DIRECTORY_ROLES.contains(role) || fresh(at));
        stats.roles.shrink_to_fit();
    }

    pub(super) fn remember_created_order(&self, headers: &HeaderMap, body: &Bytes) {
        #[derive(Deserialize)]
        struct Created {
            identifiers: Vec<CreatedIdentifier>,
        }
        #[derive(Deserialize)]
        struct CreatedIdentifier {
            value: String,
        }
        let Some(location) = headers
            .get(http::header::LOCATION)
            .and_then(|v| v.to_str().ok())
        else {
            return;
        };
        let Ok(created) = serde_json::from_slice::<Created>(body) else {
            return;
        };
        let mut names: Vec<String> = created.identifiers.into_iter().map(|i| i.value).collect();
        names.sort();
        let mut list = lock(&self.created_orders);
        if list.len() >= 64 {
            list.pop_front();
        }
        list.push_back((names.join(","), location.to_owned()));
    }

    /// Files what the answer from `url`, received at `now`, said.
    pub(super) fn observe(
        &self,
        url: &str,
        status: StatusCode,
        headers: &HeaderMap,
        body: &Bytes,
        now: SystemTime,
    ) {
        let retry_after = headers
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, now));
        let link_up = headers
            .get_all(LINK)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|v| link_with_rel(v, "up"))
            .filter(|u| https_url(u).is_ok());
        let is_json = headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.contains("json"));
        let mut expires = None;
        if is_json && let Ok(shape) = serde_json::from_slice::<ObjectShape>(body) {
            expires = shape
                .expires
                .as_deref()
                .and_then(crate::clock::parse_rfc3339);
            self.learn_roles(&shape);
        }
        let observation = Observation {
            status: status.as_u16(),
            retry_after,
            link_up,
            expires,
        };
        let now = Instant::now();
        let mut map = lock(&self.observations);
        if map.len() >= OBSERVATIONS_MAX {
            map.clear();
        }
        // A created object (newOrder's answer) is filed under its own URL
        // too, so its `expires` can be looked up by the order URL.
        if let Some(location) = headers
            .get(http::header::LOCATION)
            .and_then(|v| v.to_str().ok())
        {
            map.insert(location.to_owned(), (observation.clone(), now));
        }
        map.insert(url.to_owned(), (observation, now));
    }

    fn learn_roles(&self, shape: &ObjectShape) {
        if let Some(url) = &shape.new_nonce {
            *lock(&self.new_nonce) = Some(url.clone());
        }
        if let Some(url) = &shape.key_change {
            *lock(&self.key_change) = Some(url.clone());
        }
        let now = Instant::now();
        let mut stats = lock(&self.stats);
        let roles = &mut stats.roles;
        if roles.len() >= OBSERVATIONS_MAX {
            roles.retain(|_, (role, _)| DIRECTORY_ROLES.contains(role));
        }
        for (url, role) in [
            (&shape.new_nonce, "newNonce"),
            (&shape.new_account, "newAccount"),
            (&shape.new_order, "newOrder"),
            (&shape.revoke_cert, "revokeCert"),
            (&shape.key_change, "keyChange"),
            (&shape.finalize, "finalize"),
            (&shape.certificate, "certificate"),
        ] {
            if let Some(url) = url {
                roles.insert(url.clone(), (role, now));
            }
        }
        for url in &shape.authorizations {
            roles.insert(url.clone(), ("authz", now));
        }
        for c in &shape.challenges {
            roles.insert(c.url.clone(), ("challenge", now));
        }
    }

    pub(super) fn endpoint(&self, method: &Method, url: &str) -> &'static str {
        if *method == Method::GET {
            return if url.contains("renewal") {
                "renewalInfo"
            } else {
                "directory"
            };
        }
        if *method == Method::HEAD {
            return "newNonce";
        }
        lock(&self.stats)
            .roles
            .get(url)
            .map_or("order", |(role, _)| role)
    }

    pub(super) fn count(&self, endpoint: &'static str, outcome: &str) {
        *lock(&self.stats)
            .counts
            .entry((endpoint, outcome.to_owned()))
            .or_insert(0) += 1;
    }
}

/// The fields of directory, order, authorization and challenge objects that
/// the HTTP layer learns from; serde ignores the rest.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct ObjectShape {
    expires: Option<String>,
    new_nonce: Option<String>,
    new_account: Option<String>,
    new_order: Option<String>,
    revoke_cert: Option<String>,
    key_change: Option<String>,
    finalize: Option<String>,
    certificate: Option<String>,
    authorizations: Vec<String>,
    challenges: Vec<ChallengeShape>,
}

#[derive(Deserialize)]
struct ChallengeShape {
    url: String,
}

/// Extracts the target of a `Link` header entry with the given relation.
pub(super) fn link_with_rel(header: &str, rel: &str) -> Option<String> {
    header.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
        params
            .split(';')
            .any(|p| {
                let p = p.trim();
                p == format!("rel=\"{rel}\"") || p == format!("rel={rel}")
            })
            .then(|| target.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Clock;

    /// An idle daemon keeps the directory's endpoints and forgets the
    /// objects of finished orders.
    #[test]
    fn forget_old_keeps_only_the_directory() {
        let http = AcmeHttp::new(None, Clock::system()).expect("client");
        let json = |body: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(
                CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            (headers, Bytes::from_static(body.as_bytes()))
        };
        let (h, b) = json(r#"{"newNonce": "https://ca/nonce", "newOrder": "https://ca/order"}"#);
        http.inner
            .observer
            .observe("https://ca/dir", StatusCode::OK, &h, &b, SystemTime::now());
        let (h, b) = json(r#"{"status": "pending", "authorizations": ["https://ca/authz/1"]}"#);
        http.inner.observer.observe(
            "https://ca/order/1",
            StatusCode::OK,
            &h,
            &b,
            SystemTime::now(),
        );
        assert_eq!(
            http.inner
                .observer
                .endpoint(&Method::POST, "https://ca/authz/1"),
            "authz"
        );
        assert!(http.observed("https://ca/order/1").is_some());

        // Just now: everything is still in use.
        http.inner.observer.forget_before(Instant::now());
        assert!(http.observed("https://ca/order/1").is_some());

        http.inner
            .observer
            .forget_before(Instant::now() + OBSERVATION_TTL * 2);
        assert!(http.observed("https://ca/order/1").is_none());
        assert!(http.observed("https://ca/dir").is_none());
        let endpoint = |url| http.inner.observer.endpoint(&Method::POST, url);
        assert_eq!(
            endpoint("https://ca/authz/1"),
            "order",
            "an object's role outlived idling"
        );
        assert_eq!(endpoint("https://ca/order"), "newOrder");
        assert_eq!(endpoint("https://ca/nonce"), "newNonce");
    }

    #[test]
    fn link_up_is_found() {
        let h = r#"<https://ca/dir>;rel="index", <https://ca/authz/7>;rel="up""#;
        assert_eq!(
            link_with_rel(h, "up").as_deref(),
            Some("https://ca/authz/7")
        );
        assert_eq!(link_with_rel(h, "next"), None);
    }
}
