//! A private ACME CA for one test: Pebble and pebble-challtestsrv (its DNS
//! server) as child processes, each in its own temporary directory and on
//! ports of its own.
//!
//! Pebble serves its ACME API over TLS with a certificate from a throwaway CA
//! generated here; that CA's PEM (`ca_bundle()`) is what certd must trust.
//! Names resolve through challtestsrv, which answers every A query with
//! 127.0.0.1, so Pebble validates http-01 against 127.0.0.1:`http01_port()`
//! and tls-alpn-01 against 127.0.0.1:`tls_port()`.

use std::fs::{self, File, OpenOptions};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use tempfile::TempDir;

use super::free_port;

/// Pebble generates its root and intermediate keys at start-up (about 1 s);
/// a loaded CI machine may take much longer, but not this long.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// What Pebble logs as it starts serving the ACME API.
const READY_LINE: &[u8] = b"Listening on";

/// Knobs for Pebble's deliberate misbehaviour.
#[derive(Debug, Clone, Default)]
pub struct PebbleOpts {
    /// Percentage of valid nonces Pebble rejects as `badNonce`
    /// (`PEBBLE_WFE_NONCEREJECT`). `None` keeps Pebble's default of 5%, which
    /// tests want: certd must retry bad nonces.
    pub nonce_reject: Option<u32>,
    /// Percentage of authorizations Pebble reuses across orders
    /// (`PEBBLE_AUTHZREUSE`). `None` keeps Pebble's default.
    pub authz_reuse: Option<u32>,
    /// Further environment variables for the Pebble process.
    pub env: Vec<(String, String)>,
    /// External Account Binding keys (kid, base64url HMAC key); when any
    /// are given Pebble requires EAB for new accounts.
    pub eab_keys: Vec<(String, String)>,
    /// The DNS server Pebble resolves through instead of challtestsrv
    /// (which still runs), e.g. a `Bind` for dns-01 by dynamic update.
    pub dns_server: Option<SocketAddr>,
    /// Which Pebble release runs.
    pub release: Release,
    /// `-strict`: Pebble refuses what upcoming API changes will refuse
    /// (e.g. a GET where RFC 8555 wants POST-as-GET).
    pub strict: bool,
    /// The http-01 and tls-alpn-01 ports Pebble validates at, instead of
    /// ports of its own: another Pebble's, so that one certd listener
    /// answers two CAs.
    pub validation_ports: Option<(u16, u16)>,
    /// The profiles Pebble 2.10 offers (name, validity in seconds) instead
    /// of `default` (90 days) and `shortlived` (6 days).
    pub profiles: Option<Vec<(&'static str, u64)>>,
}

/// A Pebble release. Every test runs against the current one unless it
/// says otherwise; one test shows that certd still works with the older
/// CA that Debian's stable suite ships.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Release {
    /// Pebble 2.10 or later (ARI, profiles, IP identifiers,
    /// dns-persist-01), from Debian's sid suite: `scripts/pebble-sid` puts
    /// it under `target/pebble-sid/`, and `scripts/test` names that
    /// directory in `CERTD_TEST_PEBBLE_BIN`.
    #[default]
    Current,
    /// Pebble 2.4, Debian bookworm's package (`/usr/bin/pebble`): no ARI,
    /// no profiles, five-year certificates.
    Bookworm,
}

impl Release {
    /// The directory holding `pebble` and `pebble-challtestsrv`.
    fn bin_dir(self) -> PathBuf {
        match self {
            Release::Bookworm => PathBuf::from("/usr/bin"),
            Release::Current => {
                let dir = std::env::var_os("CERTD_TEST_PEBBLE_BIN").map_or_else(
                    || Path::new(env!("CARGO_MANIFEST_DIR")).join("target/pebble-sid/usr/bin"),
                    PathBuf::from,
                );
                assert!(
                    dir.join("pebble").is_file(),
                    "no current Pebble in {}: run scripts/pebble-sid (scripts/test does)",
                    dir.display()
                );
                dir
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Ports {
    listen: u16,
    management: u16,
    http01: u16,
    tls: u16,
    dns: u16,
    challtestsrv: u16,
}

/// A running Pebble with its DNS server. Both processes are killed when this
/// is dropped.
#[derive(Debug)]
pub struct Pebble {
    dir: TempDir,
    ports: Ports,
    opts: PebbleOpts,
    pebble: Option<Child>,
    challtestsrv: Option<Child>,
}

impl Pebble {
    /// Starts Pebble with its default behaviour (5% nonce rejection on).
    pub fn start() -> Pebble {
        Pebble::with_opts(PebbleOpts::default())
    }

    /// Starts challtestsrv and Pebble and returns once both accept
    /// connections. Panics (with the logs) if they do not within 15 s.
    pub fn with_opts(opts: PebbleOpts) -> Pebble {
        let dir = tempfile::Builder::new()
            .prefix("certd-pebble-")
            .tempdir()
            .expect("create Pebble temp dir");
        let (http01, tls) = opts
            .validation_ports
            .unwrap_or_else(|| (free_port(), free_port()));
        let ports = Ports {
            listen: free_port(),
            management: free_port(),
            http01,
            tls,
            dns: free_port(),
            challtestsrv: free_port(),
        };
        let mut pebble = Pebble {
            dir,
            ports,
            opts,
            pebble: None,
            challtestsrv: None,
        };
        pebble.write_tls_files();
        pebble.write_config();
        pebble.start_challtestsrv();
        pebble.start_pebble();
        pebble
    }

    /// The ACME directory URL, e.g. `https://127.0.0.1:14000/dir`.
    pub fn directory_url(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.ports.listen)
    }

    /// PEM of the CA that issued Pebble's TLS certificate (not Pebble's ACME
    /// root, which signs the certificates certd obtains).
    pub fn ca_bundle(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The port Pebble connects to for http-01: certd's http-01 listener
    /// must bind 127.0.0.1 on it.
    pub fn http01_port(&self) -> u16 {
        self.ports.http01
    }

    /// The port Pebble connects to for tls-alpn-01.
    pub fn tls_port(&self) -> u16 {
        self.ports.tls
    }

    /// Address of the DNS server Pebble resolves names with.
    pub fn dns_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ports.dns))
    }

    /// challtestsrv's management API (`/set-txt`, `/clear-txt`, ...).
    pub fn challtestsrv_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.challtestsrv)
    }

    /// Pebble's management API over TLS (`/roots/0`, `/intermediates/0`,
    /// ...), trusted through `ca_bundle()` like the ACME API.
    pub fn management_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.ports.management)
    }

    /// The DER of the root Pebble issues under now (its management API's
    /// `/roots/0`). Pebble makes a new root at every start, so a
    /// certificate from before a `restart()` chains to the old one.
    pub fn root(&self) -> Vec<u8> {
        self.try_root()
            .unwrap_or_else(|e| panic!("{}'s root: {e}", self.directory_url()))
    }

    /// Like `root`, or why not (a stopped Pebble serves none).
    pub fn try_root(&self) -> Result<Vec<u8>, String> {
        use rustls_pki_types::CertificateDer;
        use rustls_pki_types::pem::PemObject;
        let url = format!("{}/roots/0", self.management_url());
        let out = Command::new("curl")
            .args(["-fsS", "--max-time", "10", "--cacert"])
            .arg(self.ca_bundle())
            .arg(&url)
            .output()
            .expect("run curl");
        if !out.status.success() {
            return Err(format!("GET {url}: {out:?}"));
        }
        CertificateDer::from_pem_slice(&out.stdout)
            .map(|c| c.to_vec())
            .map_err(|e| format!("GET {url}: not a PEM certificate: {e}"))
    }

    /// The temporary directory holding config, TLS files and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything Pebble has logged so far, across restarts. Each ACME
    /// request is one line, so tests can count requests in it.
    pub fn pebble_log(&self) -> String {
        read_log(&self.pebble_log_path())
    }

    /// Orders Pebble created, for any account, from its log: `newOrder`
    /// requests it acted on. One it refused for its nonce (5 % of
    /// requests, unless the test turned that off) created nothing and is
    /// sent again, so counting requests would count it twice.
    pub fn orders_created(&self) -> usize {
        self.pebble_log().matches("Added order ").count()
    }

    /// Everything challtestsrv has logged so far.
    pub fn challtestsrv_log(&self) -> String {
        read_log(&self.dir.path().join("challtestsrv.log"))
    }

    /// Whether the Pebble process (not challtestsrv) is running.
    pub fn is_running(&mut self) -> bool {
        match &mut self.pebble {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills Pebble, leaving challtestsrv up, to simulate a CA outage. The
    /// ACME port refuses connections until `restart()`.
    pub fn stop(&mut self) {
        kill_and_wait(&mut self.pebble);
    }

    /// Starts Pebble again on the same ports, with the same config and TLS
    /// certificate. Pebble keeps all state in memory, so accounts, orders
    /// and its ACME root are new after a restart.
    pub fn restart(&mut self) {
        self.stop();
        self.start_pebble();
    }

    fn pebble_log_path(&self) -> PathBuf {
        self.dir.path().join("pebble.log")
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("pebble.json")
    }

    /// A rustls server config presenting Pebble's own TLS certificate, for
    /// test servers that stand in front of it (the client trusts it through
    /// the same `ca_bundle`).
    pub fn tls_server_config(&self) -> std::sync::Arc<rustls::ServerConfig> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(self.tls_cert_path())
                .expect("TLS cert")
                .collect::<Result<_, _>>()
                .expect("TLS cert PEM");
        let key = PrivateKeyDer::from_pem_file(self.tls_key_path()).expect("TLS key");
        let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("TLS config");
        std::sync::Arc::new(config)
    }

    pub fn tls_cert_path(&self) -> PathBuf {
        self.dir.path().join("pebble-tls-cert.pem")
    }

    pub fn tls_key_path(&self) -> PathBuf {
        self.dir.path().join("pebble-tls-key.pem")
    }

    /// Generates a CA and a leaf for `localhost` and 127.0.0.1 signed by it.
    /// A separate CA (rather than a self-signed leaf) keeps the setup close
    /// to production, where certd trusts a root and not a server's own cert.
    fn write_tls_files(&self) {
        let ca_key = KeyPair::generate().expect("generate test CA key");
        let mut ca_params =
            CertificateParams::new(Vec::<String>::new()).expect("empty SAN list is valid");
        ca_params.distinguished_name = distinguished_name("certd test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).expect("self-sign test CA");
        let issuer = Issuer::new(ca_params, &ca_key);

        let leaf_key = KeyPair::generate().expect("generate Pebble TLS key");
        let mut leaf_params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("localhost and 127.0.0.1 are valid SANs");
        leaf_params.distinguished_name = distinguished_name("localhost");
        leaf_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        leaf_params.use_authority_key_identifier_extension = true;
        let leaf_cert = leaf_params
            .signed_by(&leaf_key, &issuer)
            .expect("sign Pebble TLS certificate");

        write(&self.ca_bundle(), &ca_cert.pem());
        write(&self.tls_cert_path(), &leaf_cert.pem());
        write(&self.tls_key_path(), &leaf_key.serialize_pem());
    }

    fn write_config(&self) {
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{}", self.ports.listen),
                "managementListenAddress": format!("127.0.0.1:{}", self.ports.management),
                "certificate": self.tls_cert_path(),
                "privateKey": self.tls_key_path(),
                "httpPort": self.ports.http01,
                "tlsPort": self.ports.tls,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": !self.opts.eab_keys.is_empty(),
                "externalAccountMACKeys": self
                    .opts
                    .eab_keys
                    .iter()
                    .map(|(kid, key)| (kid.clone(), serde_json::Value::from(key.as_str())))
                    .collect::<serde_json::Map<String, serde_json::Value>>(),
            }
        });
        let mut config = config;
        if self.opts.release == Release::Current {
            // Let's Encrypt's two lifetimes that matter to renewal: the
            // classic 90 days, and the 6-day `shortlived` profile.
            // ECDSA keys for Pebble's own root and intermediates: its
            // default, RSA, costs seconds of CPU at every start, which on a
            // loaded machine ran past the start-up timeout.
            config["pebble"]["keyAlgorithm"] = serde_json::json!("ecdsa");
            let profiles = self
                .opts
                .profiles
                .clone()
                .unwrap_or_else(|| vec![("default", 7_776_000), ("shortlived", 518_400)]);
            config["pebble"]["profiles"] = profiles
                .into_iter()
                .map(|(name, secs)| {
                    let days = secs / 86_400;
                    let profile = serde_json::json!({
                        "description": format!("{days}-day certificates"),
                        "validityPeriod": secs,
                    });
                    (name.to_owned(), profile)
                })
                .collect::<serde_json::Map<String, serde_json::Value>>()
                .into();
        }
        let text = serde_json::to_string_pretty(&config).expect("JSON value serializes");
        write(&self.config_path(), &text);
    }

    fn start_challtestsrv(&mut self) {
        let log_path = self.dir.path().join("challtestsrv.log");
        let (stdout, stderr) = log_files(&log_path);
        let dns = format!("127.0.0.1:{}", self.ports.dns);
        let mut command = Command::new(self.opts.release.bin_dir().join("pebble-challtestsrv"));
        match self.opts.release {
            // 2.10 renamed the DNS listener's flag and added DNS over HTTPS.
            Release::Current => command.args(["-dnsserver", &dns, "-doh", ""]),
            Release::Bookworm => command.args(["-dns01", &dns]),
        };
        let child = command
            .args([
                "-management",
                &format!("127.0.0.1:{}", self.ports.challtestsrv),
            ])
            // Only the DNS server: certd itself answers http-01 and
            // tls-alpn-01 on the ports Pebble validates against.
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("spawn pebble-challtestsrv (apt-get install pebble; scripts/test does it)");
        self.challtestsrv = Some(child);

        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = exited(&mut self.challtestsrv) {
                panic!(
                    "pebble-challtestsrv exited during start-up ({status}); log:\n{}",
                    read_log(&log_path)
                );
            }
            if can_connect(self.ports.challtestsrv) && can_connect(self.ports.dns) {
                return;
            }
            assert!(
                Instant::now() <= deadline,
                "pebble-challtestsrv not ready after {START_TIMEOUT:?}; log:\n{}",
                read_log(&log_path)
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn start_pebble(&mut self) {
        let log_path = self.pebble_log_path();
        // The log is appended to across restarts; readiness is judged only
        // on what this start wrote.
        let log_start = fs::read(&log_path).map_or(0, |log| log.len());
        let (stdout, stderr) = log_files(&log_path);
        let mut command = Command::new(self.opts.release.bin_dir().join("pebble"));
        command
            .arg("-config")
            .arg(self.config_path())
            .args([
                "-dnsserver",
                &self.opts.dns_server.unwrap_or(self.dns_addr()).to_string(),
            ])
            // Validate at once instead of after Pebble's random 0-15 s sleep.
            .env("PEBBLE_VA_NOSLEEP", "1")
            .args(self.opts.strict.then_some("-strict"))
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        if let Some(percent) = self.opts.nonce_reject {
            command.env("PEBBLE_WFE_NONCEREJECT", percent.to_string());
        }
        if let Some(percent) = self.opts.authz_reuse {
            command.env("PEBBLE_AUTHZREUSE", percent.to_string());
        }
        for (key, value) in &self.opts.env {
            command.env(key, value);
        }
        let child = command
            .spawn()
            .expect("spawn pebble (apt-get install pebble; scripts/test does it)");
        self.pebble = Some(child);

        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = exited(&mut self.pebble) {
                panic!(
                    "pebble exited during start-up ({status}); log:\n{}",
                    self.pebble_log()
                );
            }
            // Pebble logs "Listening on" just before it binds, so the port
            // check is what proves readiness; the log check keeps a stray
            // process that happens to hold the port from passing for Pebble.
            let logged = fs::read(&log_path).is_ok_and(|log| {
                log.get(log_start..)
                    .is_some_and(|new| new.windows(READY_LINE.len()).any(|w| w == READY_LINE))
            });
            if logged && can_connect(self.ports.listen) && can_connect(self.ports.management) {
                return;
            }
            assert!(
                Instant::now() <= deadline,
                "pebble not ready after {START_TIMEOUT:?}; log:\n{}",
                self.pebble_log()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        kill_and_wait(&mut self.pebble);
        kill_and_wait(&mut self.challtestsrv);
    }
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name
}

fn write(path: &Path, contents: &str) {
    fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Opens `path` for appending twice, for a child's stdout and stderr.
fn log_files(path: &Path) -> (File, File) {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let clone = file
        .try_clone()
        .unwrap_or_else(|e| panic!("dup {}: {e}", path.display()));
    (file, clone)
}

/// Reads a log that may not exist yet (or contain partial UTF-8 mid-write).
fn read_log(path: &Path) -> String {
    fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

fn can_connect(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// The exit status if the child has exited.
fn exited(child: &mut Option<Child>) -> Option<std::process::ExitStatus> {
    child.as_mut().and_then(|c| c.try_wait().ok().flatten())
}

/// Kills and reaps the child, if any, so that its ports are free when this
/// returns. Errors are ignored: the child may already have exited.
fn kill_and_wait(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}
