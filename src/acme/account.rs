//! The ACME account: its key and credentials file (0600, next to the
//! ledger's record of it), loading or registering it, and key rollover.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use base64::prelude::BASE64_URL_SAFE_NO_PAD;
use instant_acme::{Account, AccountCredentials, ExternalAccountKey, NewAccount};

use super::error::{AcmeError, SetupError};
use super::http::AcmeHttp;
use super::nonce::with_nonce_retry;
use super::raw;
use crate::config::AcmeConfig;
use crate::ledger::Ledger;

/// A loaded ACME account and its ledger id.
#[derive(Clone)]
pub struct AcmeAccount {
    key: AccountKey,
    pub http: AcmeHttp,
    pub ledger_id: i64,
    pub directory_url: String,
}

/// The account's key, shared by every clone of an [`AcmeAccount`]: a key
/// rollover in the daemon switches its orders, its reaper and its ARI
/// checks at once, and no request after the CA's confirmation is signed
/// with the old key.
#[derive(Clone)]
struct AccountKey {
    current: Arc<std::sync::RwLock<KeyPair>>,
    /// One rollover at a time (they share the `.next` file).
    rolling: Arc<tokio::sync::Mutex<()>>,
}

#[derive(Clone)]
struct KeyPair {
    account: Account,
    /// The same key, for the requests certd signs itself (`raw`).
    signer: Arc<raw::RawSigner>,
}

impl AccountKey {
    fn new(account: Account, signer: raw::RawSigner) -> Self {
        Self {
            current: Arc::new(std::sync::RwLock::new(KeyPair {
                account,
                signer: Arc::new(signer),
            })),
            rolling: Arc::default(),
        }
    }

    fn get(&self) -> KeyPair {
        // A poisoned lock only means a panic elsewhere; the pair is whole.
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn set(&self, pair: KeyPair) {
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = pair;
    }
}

impl fmt::Debug for AcmeAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AcmeAccount")
            .field("id", &self.key.get().account.id())
            .field("directory_url", &self.directory_url)
            .finish_non_exhaustive()
    }
}

/// Where the account's credentials (its private key) live: one 0600 file
/// per directory URL in the state directory.
pub fn credentials_path(state_dir: &Path, directory_url: &str) -> PathBuf {
    let digest = ring::digest::digest(&ring::digest::SHA256, directory_url.as_bytes());
    let hex: String = digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    state_dir.join(format!("account-{hex}.json"))
}

impl AcmeAccount {
    /// The account, with its current key.
    pub fn account(&self) -> Account {
        self.key.get().account
    }

    /// The current key, for the requests certd signs itself (`raw`).
    pub fn signer(&self) -> Arc<raw::RawSigner> {
        self.key.get().signer
    }

    /// Loads the account for the configured directory, creating and
    /// persisting it on first use.
    pub async fn load_or_create(
        cfg: &AcmeConfig,
        state_dir: &Path,
        store: &Ledger,
        http: AcmeHttp,
    ) -> Result<Self, SetupError> {
        let directory_url = cfg.directory.to_string();
        let path = credentials_path(state_dir, &directory_url);
        warn_interrupted_rollover(&path);
        let (account, key) = match read_credentials(&path)? {
            Some(json) => {
                let creds = parse_credentials(&path, &json)?;
                let key = creds.private_key().secret_pkcs8_der().to_vec();
                let account = http
                    .nonce_scope(builder(&http).from_credentials(creds))
                    .await
                    .map_err(AcmeError::from)?;
                (account, key)
            }
            None => {
                let (account, json) = register(cfg, &http, &path).await?;
                write_credentials(&path, &json)?;
                let key = parse_credentials(&path, &json)?
                    .private_key()
                    .secret_pkcs8_der()
                    .to_vec();
                (account, key)
            }
        };
        Self::with_key(account, &key, &path, store, http, directory_url).await
    }

    /// The account whose credentials (as [`register`] returns them) came
    /// from elsewhere: in fleet mode, the fleet's database. `path` is
    /// where this host keeps its copy, for messages.
    pub(crate) async fn from_credentials(
        cfg: &AcmeConfig,
        path: &Path,
        json: &[u8],
        store: &Ledger,
        http: AcmeHttp,
    ) -> Result<Self, SetupError> {
        let creds = parse_credentials(path, json)?;
        let key = creds.private_key().secret_pkcs8_der().to_vec();
        let account = http
            .nonce_scope(builder(&http).from_credentials(creds))
            .await
            .map_err(AcmeError::from)?;
        Self::with_key(account, &key, path, store, http, cfg.directory.to_string()).await
    }

    /// Takes up the key in `json` (credentials, as [`register`] returns
    /// them) if it is not the key in use: in fleet mode, another host
    /// rolled the account's key over, and the CA refuses the old one
    /// now. Every clone switches at once, as after this host's own
    /// rollover. `Ok(false)`: the key is the one in use. Credentials for
    /// another account are refused, not taken up. `path` is where this
    /// host keeps its copy, for messages.
    pub(crate) async fn adopt_key(&self, path: &Path, json: &[u8]) -> Result<bool, SetupError> {
        let _one_at_a_time = self.key.rolling.lock().await;
        let cred_err = |detail: String| SetupError::Credentials {
            path: path.to_owned(),
            detail,
        };
        let current = self.key.get();
        let id = current.account.id().to_owned();
        let named = serde_json::from_slice::<serde_json::Value>(json)
            .ok()
            .and_then(|v| v.get("id").and_then(|id| id.as_str()).map(str::to_owned));
        if named.as_deref() != Some(id.as_str()) {
            return Err(cred_err(format!(
                "the stored key is for account {}, not {id}",
                named.as_deref().unwrap_or("(none)")
            )));
        }
        let creds = parse_credentials(path, json)?;
        let pkcs8 = creds.private_key().secret_pkcs8_der().to_vec();
        let signer = raw::RawSigner::new(&pkcs8, &id).map_err(cred_err)?;
        if signer.thumbprint() == current.signer.thumbprint() {
            return Ok(false);
        }
        let account = self
            .http
            .nonce_scope(builder(&self.http).from_credentials(creds))
            .await
            .map_err(AcmeError::from)?;
        self.key.set(KeyPair {
            account,
            signer: Arc::new(signer),
        });
        Ok(true)
    }

    /// The account with its key (PKCS#8), recorded in the ledger.
    async fn with_key(
        account: Account,
        key: &[u8],
        path: &Path,
        store: &Ledger,
        http: AcmeHttp,
        directory_url: String,
    ) -> Result<Self, SetupError> {
        let signer =
            raw::RawSigner::new(key, account.id()).map_err(|detail| SetupError::Credentials {
                path: path.to_owned(),
                detail,
            })?;
        let ledger_id = store.upsert_account(&directory_url, account.id()).await?;
        Ok(Self {
            key: AccountKey::new(account, signer),
            http,
            ledger_id,
            directory_url,
        })
    }
}

fn builder(http: &AcmeHttp) -> instant_acme::AccountBuilder {
    Account::builder_with_http(Box::new(http.clone()))
}

/// Says so when a key rollover was interrupted: the new key may be the one
/// the CA knows.
fn warn_interrupted_rollover(path: &Path) {
    let next = path.with_extension("json.next");
    if next.exists() {
        tracing::warn!(
            pending = %next.display(),
            "a key rollover was interrupted; if the CA now rejects the account key, the new key is in this file (move it over the credentials file)"
        );
    }
}

/// The credentials file's bytes, or `None` when there is none yet.
pub(crate) fn read_credentials(path: &Path) -> Result<Option<Vec<u8>>, SetupError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(SetupError::Credentials {
            path: path.to_owned(),
            detail: format!("cannot read: {e}"),
        }),
    }
}

/// Writes the credentials file (0600).
pub(crate) fn write_credentials(path: &Path, json: &[u8]) -> Result<(), SetupError> {
    crate::safefs::write_secret_file(path, json).map_err(|e| SetupError::Credentials {
        path: path.to_owned(),
        detail: format!("cannot write: {e}"),
    })
}

/// Credentials as certd stores them (instant-acme's JSON).
pub(crate) fn parse_credentials(
    path: &Path,
    json: &[u8],
) -> Result<AccountCredentials, SetupError> {
    serde_json::from_slice(json).map_err(|e| SetupError::Credentials {
        path: path.to_owned(),
        detail: format!("not valid account credentials: {e}"),
    })
}

/// Creates an account at the CA (`newAccount`, with the configured
/// contact and EAB); returns it and its credentials, serialized as the
/// credentials file at `path` holds them (the caller writes it).
pub(crate) async fn register(
    cfg: &AcmeConfig,
    http: &AcmeHttp,
    path: &Path,
) -> Result<(Account, Vec<u8>), SetupError> {
    let directory_url = cfg.directory.to_string();
    let contact: Vec<&str> = cfg.contact.iter().map(String::as_str).collect();
    let eab = cfg
        .eab
        .as_ref()
        .map(|e| ExternalAccountKey::new(e.kid.clone(), e.hmac_key.expose()));
    let new_account = NewAccount {
        contact: &contact,
        terms_of_service_agreed: true,
        only_return_existing: false,
    };
    let (account, creds) = with_nonce_retry(|| {
        http.nonce_scope(builder(http).create(&new_account, directory_url.clone(), eab.as_ref()))
    })
    .await
    .map_err(AcmeError::from)?;
    let json = serde_json::to_vec(&creds).map_err(|e| SetupError::Credentials {
        path: path.to_owned(),
        detail: e.to_string(),
    })?;
    tracing::info!(account = account.id(), "created ACME account");
    Ok((account, json))
}

/// Rolls the account key over (RFC 8555 §7.3.5) and returns the new key's
/// thumbprint. The new credentials are written to `<file>.next` (0600)
/// before the CA is asked, so a crash after the CA's confirmation cannot
/// lose the key the account now has; they replace the old file only after
/// the CA confirmed. Until then the old key is the account's key.
pub async fn roll_over_account(
    account: &AcmeAccount,
    state_dir: &Path,
) -> Result<String, SetupError> {
    let _one_at_a_time = account.key.rolling.lock().await;
    let KeyPair {
        account: acme,
        signer,
    } = account.key.get();
    let path = credentials_path(state_dir, &account.directory_url);
    let next = path.with_extension("json.next");
    let cred_err = |detail: String| SetupError::Credentials {
        path: path.clone(),
        detail,
    };
    let key_change = account
        .http
        .key_change_url()
        .ok_or_else(|| cred_err("the CA's directory has no keyChange URL".into()))?;
    let (pkcs8, new_signer) = raw::generate_account_key(acme.id())?;
    let creds = serde_json::json!({
        "id": acme.id(),
        "key_pkcs8": BASE64_URL_SAFE_NO_PAD.encode(&pkcs8),
        "directory": account.directory_url,
    });
    crate::safefs::write_secret_file(&next, creds.to_string().as_bytes())
        .map_err(|e| cred_err(format!("cannot write {}: {e}", next.display())))?;
    // The new key's `Account`, built before the CA is asked: after its
    // confirmation nothing may fail before the switch.
    let new_account = account
        .http
        .nonce_scope(
            Account::builder_with_http(Box::new(account.http.clone())).from_parts(
                acme.id().to_owned(),
                rustls_pki_types::PrivatePkcs8KeyDer::from(pkcs8.as_slice()),
                account.directory_url.clone(),
            ),
        )
        .await
        .map_err(AcmeError::from)?;
    if let Err(e) = raw::roll_over(&account.http, &signer, &new_signer, &key_change).await {
        let _ = std::fs::remove_file(&next);
        return Err(e.into());
    }
    std::fs::rename(&next, &path).map_err(|e| {
        cred_err(format!(
            "the CA took the new key, but it is still in {}: {e}",
            next.display()
        ))
    })?;
    let thumbprint = new_signer.thumbprint();
    account.key.set(KeyPair {
        account: new_account,
        signer: Arc::new(new_signer),
    });
    tracing::info!(account = acme.id(), "account key rolled over");
    Ok(thumbprint)
}
