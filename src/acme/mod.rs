//! The ACME side: one HTTP stack, the account, and what a CA's errors mean.
//!
//! `AcmeHttp` is the only HTTP client in certd (reqwest on rustls with the
//! ring provider). instant-acme drives the protocol through it, and it adds
//! what instant-acme leaves to its caller:
//!
//! - a **nonce pool**: every `Replay-Nonce` the CA sends is kept until a
//!   request spends it, and instant-acme's `HEAD newNonce` is answered from
//!   the pool when it can be, so a running daemon's next order costs no
//!   extra round trip;
//! - **observations** per URL of what instant-acme does not surface:
//!   `Retry-After`, `Link: rel="up"`, and an object's `expires`;
//! - request **counts** per endpoint, for the benchmarks and metrics;
//! - **limits** on what the CA can make it read. The CA is untrusted input
//!   (RFC 8555 lets a client check everything it uses): requests go to
//!   https URLs only and redirects are not followed; bodies are read up to
//!   a cap while they stream; the headers certd and instant-acme read are
//!   bounded, and `Retry-After` is clamped before anyone sees it.
//!
//! The files:
//!
//! - [`http`]: the client (reqwest on rustls/ring), what it refuses, and
//!   the limits on what a CA can make it read;
//! - [`nonce`]: the nonce pool, the per-order scope that feeds it, and
//!   retrying a request the CA rejected for its nonce;
//! - [`observe`]: what responses said per URL, endpoints learned from the
//!   directory and objects, request counts;
//! - [`account`]: the account, its stored credentials, key rollover;
//! - [`error`]: the CA's problems, what they mean for the caller
//!   (`Disposition`, `RateLimit`), and error text for people;
//! - [`raw`]: the requests instant-acme does not make (reading any object,
//!   deactivation, the account's order list);
//! - [`trust`]: certificate verification against a bundle, then the
//!   system's roots;
//! - [`ari`]: ACME Renewal Information (RFC 9773).

mod account;
pub(crate) mod ari;
mod error;
mod http;
mod nonce;
mod observe;
pub mod raw;
mod transport;
mod trust;

pub use account::credentials_path;
pub(crate) use account::{
    AcmeAccount, parse_credentials, read_credentials, register, roll_over_account,
    write_credentials,
};
pub use error::{AcmeError, Disposition, LimitScope, ProblemRecord, RateLimit};
pub(crate) use error::{SetupError, bounded, error_chain};
pub use http::{AcmeHttp, GateClosed, RequestGate, gated};
pub(crate) use http::{MAX_JSON_BODY, parse_retry_after};
pub(crate) use nonce::{NONCE_ATTEMPTS, is_bad_nonce, with_nonce_retry};
