//! A real BIND 9 (`named`) for one test: primary for the zones
//! `example.test` and `validation.test`, taking dynamic updates signed with
//! a TSIG key generated here, on a loopback port of its own. Two challenge
//! names in `example.test` are CNAMEs into `validation.test`, as for a
//! delegation to acme-dns or an alias zone.
//!
//! [`Bind::resolver`] starts a second named that resolves (forwarding to
//! the first), as the CA's resolver does: an authoritative server answers
//! a CNAME into another zone with the CNAME alone, and only a resolver
//! follows it.
//!
//! Everything named writes (pid file, journal, session key, logs) stays in
//! a temporary directory; rndc is off (`controls { };`), recursion is off,
//! so it answers only from its zone, like a real authoritative server.

use std::fs::{self, File};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::prelude::BASE64_STANDARD;
use tempfile::TempDir;

use super::free_port;

const START_TIMEOUT: Duration = Duration::from_secs(15);

/// What named logs (with `-g`) once it serves its zones.
const READY_LINE: &str = "running";

/// A running named; killed and reaped when dropped.
#[derive(Debug)]
pub struct Bind {
    dir: TempDir,
    port: u16,
    secret: String,
    child: Option<Child>,
}

impl Bind {
    /// The zone named is primary for.
    pub const ZONE: &'static str = "example.test";
    /// A second zone, that challenge names are delegated to.
    pub const ALIAS_ZONE: &'static str = "validation.test";
    /// `_acme-challenge.cname.example.test` is a CNAME to this name, like a
    /// delegation to acme-dns (a random label in its zone).
    pub const CNAME_TARGET: &'static str = "d41fa2c6.validation.test";
    /// `_acme-challenge.alias.example.test` is a CNAME to this name: where
    /// `dns_alias = "validation.test"` puts its record.
    pub const ALIAS_TARGET: &'static str = "_acme-challenge.alias.example.test.validation.test";
    /// The TSIG key allowed to update it.
    pub const KEY_NAME: &'static str = "certd-key";

    /// Starts named and returns once it answers on TCP and has logged that
    /// it is running. Panics (with the log) otherwise.
    pub fn start() -> Bind {
        let dir = tempfile::Builder::new()
            .prefix("certd-bind-")
            .tempdir()
            .expect("create BIND temp dir");
        let mut secret = [0u8; 32];
        getrandom(&mut secret);
        let mut bind = Bind {
            dir,
            port: free_port(),
            secret: BASE64_STANDARD.encode(secret),
            child: None,
        };
        bind.write_config();
        bind.spawn();
        bind
    }

    /// Starts a recursive named that forwards every question to `auth`
    /// and follows CNAMEs, for Pebble to resolve through.
    pub fn resolver(auth: &Bind) -> Bind {
        let dir = tempfile::Builder::new()
            .prefix("certd-bind-resolver-")
            .tempdir()
            .expect("create BIND temp dir");
        let mut bind = Bind {
            dir,
            port: free_port(),
            secret: String::new(),
            child: None,
        };
        let conf = bind.options(&format!(
            "recursion yes;\n    allow-recursion {{ 127.0.0.1; }};\n    \
             forward only;\n    forwarders {{ 127.0.0.1 port {}; }};",
            auth.port
        ));
        write(&bind.dir.path().join("named.conf"), &conf);
        bind.spawn();
        bind
    }

    /// Address of the server (UDP and TCP).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The TSIG secret, base64, as named knows it.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// Everything named has logged so far (every update is logged).
    pub fn log(&self) -> String {
        fs::read(self.log_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The TXT values at `name`, asked of named directly.
    pub fn txt(&self, name: &str) -> Vec<String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        runtime.block_on(async {
            let fqdn = certd::dns::fqdn(name).expect("DNS name");
            let msg = certd::dns::query(
                self.addr(),
                &fqdn,
                hickory_proto::rr::RecordType::TXT,
                false,
                Duration::from_secs(5),
            )
            .await
            .unwrap_or_else(|e| panic!("query {name} TXT at BIND: {e}"));
            certd::dns::txt_values(&msg, &fqdn)
        })
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("named.log")
    }

    /// named's `options` block for this server (its directory, its port,
    /// loopback only, no DNSSEC, no NOTIFY) with `extra` statements, and
    /// no control channel.
    fn options(&self, extra: &str) -> String {
        let d = self.dir.path().display();
        format!(
            r#"options {{
    directory "{d}";
    pid-file "{d}/named.pid";
    session-keyfile "{d}/session.key";
    managed-keys-directory "{d}";
    listen-on port {port} {{ 127.0.0.1; }};
    listen-on-v6 {{ none; }};
    dnssec-validation no;
    notify no;
    {extra}
}};
controls {{ }};
"#,
            port = self.port,
        )
    }

    fn write_config(&self) {
        let d = self.dir.path().display();
        let conf = self.options("recursion no;")
            + &format!(
                r#"key "{key}" {{
    algorithm hmac-sha256;
    secret "{secret}";
}};
zone "{zone}" {{
    type primary;
    file "{d}/{zone}.zone";
    allow-update {{ key {key}; }};
}};
zone "{alias}" {{
    type primary;
    file "{d}/{alias}.zone";
    allow-update {{ key {key}; }};
}};
"#,
                key = Self::KEY_NAME,
                secret = self.secret,
                zone = Self::ZONE,
                alias = Self::ALIAS_ZONE,
            );
        write(&self.dir.path().join("named.conf"), &conf);
        // A negative-caching TTL of 1 s: a resolver that asked before the
        // record existed asks again soon.
        let soa = |z: &str| {
            format!(
                "$TTL 60\n\
                 @  IN SOA ns.{z}. hostmaster.{z}. 1 3600 600 86400 1\n\
                 \x20  IN NS ns.{z}.\n\
                 ns IN A 127.0.0.1\n"
            )
        };
        let zone = format!(
            "{}*  IN A 127.0.0.1\n\
             _acme-challenge.cname IN CNAME {}.\n\
             _acme-challenge.alias IN CNAME {}.\n",
            soa(Self::ZONE),
            Self::CNAME_TARGET,
            Self::ALIAS_TARGET,
        );
        write(&self.dir.path().join(format!("{}.zone", Self::ZONE)), &zone);
        write(
            &self.dir.path().join(format!("{}.zone", Self::ALIAS_ZONE)),
            &soa(Self::ALIAS_ZONE),
        );
    }

    fn spawn(&mut self) {
        let log = File::create(self.log_path()).expect("create named.log");
        let err = log.try_clone().expect("dup named.log");
        let conf = self.dir.path().join("named.conf");
        // Debian installs named in /usr/sbin, which a user's PATH lacks.
        let program = ["/usr/sbin/named", "/usr/local/sbin/named"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("named");
        let child = Command::new(program)
            // -g: foreground, log to stderr. No -u: as root named stays
            // root, as a user it runs as that user, who owns the temp dir.
            // -4: only IPv4 loopback is configured.
            .arg("-g")
            .arg("-4")
            .arg("-c")
            .arg(&conf)
            .args(["-p", &self.port.to_string()])
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .expect("spawn named (apt-get install bind9; scripts/test does it)");
        self.child = Some(child);

        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "named exited during start-up ({status}); log:\n{}",
                    self.log()
                );
            }
            let addr = self.addr();
            if self.log().contains(READY_LINE)
                && TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "named not ready after {START_TIMEOUT:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for Bind {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn write(path: &Path, contents: &str) {
    fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Fills `buf` from the kernel's random source (a TSIG secret for the test).
fn getrandom(buf: &mut [u8]) {
    use std::io::Read;
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .expect("read /dev/urandom");
}
