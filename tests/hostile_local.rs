//! certd attacked the way a security review did: network clients flooding
//! its public listener, local users planting files in its directories, the
//! polkit rule asked for more than reloads, and programs it runs that leave
//! children behind or expect certd's environment.

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::util::{
    TestEnv, assert_installed, cert_table as cert, installed, ledger_events, parse_leaf,
    read_pem_certs,
};
use certd::ledger::EventKind;

const DAEMON: &str = crate::util::DAEMON_RETRY_2S;

/// Raises this test process's own descriptor limit so it can hold the
/// flood's connections.
fn raise_own_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit for the duration of both calls.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim), 0);
    }
    assert!(lim.rlim_cur >= 4096, "need 4096 descriptors, have {lim:?}");
}

/// Keeps `n` idle connections open to `addr`, opening a new one for each
/// the server closes, until dropped: an attacker holding sockets.
struct Flood {
    stop: Arc<AtomicBool>,
    opened: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Flood {
    fn start(addr: SocketAddr, n: usize) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let opened = Arc::new(AtomicUsize::new(0));
        let (s, o) = (stop.clone(), opened.clone());
        let thread = std::thread::spawn(move || {
            let mut conns: Vec<TcpStream> = Vec::with_capacity(n);
            while !s.load(Ordering::Relaxed) {
                // Drop what the server closed.
                conns.retain(|c| {
                    let mut b = [0u8; 1];
                    match c.peek(&mut b) {
                        Ok(n) => n > 0,
                        Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
                    }
                });
                while conns.len() < n && !s.load(Ordering::Relaxed) {
                    match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
                        Ok(c) => {
                            let _ = c.set_nonblocking(true);
                            conns.push(c);
                            o.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => break,
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Flood {
            stop,
            opened,
            thread: Some(thread),
        }
    }

    fn opened(&self) -> usize {
        self.opened.load(Ordering::Relaxed)
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn a_flood_of_idle_connections_does_not_stop_renewals_or_reloads() {
    raise_own_fd_limit();
    let env = TestEnv::new();
    env.write_config(&format!("{DAEMON}{}", cert("one", "one.example.test")));
    // As `ulimit -n 1024` (soft and hard), the review's setting.
    let mut daemon = env.command().fd_limit(1024).arg("run").spawn();
    daemon.wait_for_file(
        &env.cert_dir().join("one/cert.pem"),
        Duration::from_secs(60),
    );

    // 1,100 idle connections to the http-01 responder, more than certd has
    // descriptors, held (and reopened when closed) from 127.0.0.1, where
    // Pebble's validation comes from too.
    let addr: SocketAddr = format!("127.0.0.1:{}", env.pebble.http01_port())
        .parse()
        .expect("addr");
    let flood = Flood::start(addr, 1100);
    let deadline = Instant::now() + Duration::from_secs(60);
    while flood.opened() < 1100 {
        assert!(Instant::now() < deadline, "flood opened {}", flood.opened());
        std::thread::sleep(Duration::from_millis(50));
    }

    // During the flood: a config reload adds a certificate, which needs
    // the config file, the CA (new connections) and Pebble's fetch of the
    // token through the flooded listener.
    env.write_config(&format!(
        "{DAEMON}{}{}",
        cert("one", "one.example.test"),
        cert("two", "two.example.test")
    ));
    let two = env.cert_dir().join("two/cert.pem");
    let deadline = Instant::now() + Duration::from_secs(90);
    while !two.exists() {
        assert!(
            Instant::now() < deadline && daemon.is_running(),
            "no certificate for two under the flood\n{}",
            daemon.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(flood.opened() >= 1100);
    drop(flood);
    assert_installed(&env, "two", &["two.example.test"]);

    // Accept failures (if any) are logged once a minute, not every 100 ms.
    let out = daemon.terminate();
    let warnings = out.stderr.matches("accept failed").count();
    assert!(warnings <= 2, "{warnings} accept warnings\n{out}");
}

#[test]
fn state_and_cert_dirs_others_can_write_or_do_not_own_are_refused() {
    let env = TestEnv::new();
    env.write_config(&cert("www", "www.example.test"));

    // World-writable cert_dir (as `umask 000` left it): a local user could
    // plant a key or a symlink there.
    fs::create_dir(env.cert_dir()).expect("cert_dir");
    fs::set_permissions(env.cert_dir(), fs::Permissions::from_mode(0o777)).expect("chmod");
    let out = env.certd(&["renew"]);
    assert_eq!(out.code(), Some(2), "{out}");
    let want = format!("cert_dir {} is writable", env.cert_dir().display());
    assert!(out.stderr.contains(&want), "{out}");
    assert!(out.stderr.contains("chmod go-w"), "{out}");
    assert!(!env.cert_dir().join("www").exists(), "nothing installed");

    // The daemon refuses to start the same way.
    let out = env.certd(&["run"]);
    assert_eq!(out.code(), Some(2), "{out}");

    // A state_dir another user owns.
    fs::set_permissions(env.cert_dir(), fs::Permissions::from_mode(0o755)).expect("chmod");
    if !env.state_dir().exists() {
        fs::create_dir(env.state_dir()).expect("state_dir");
    }
    std::os::unix::fs::chown(env.state_dir(), Some(65534), Some(65534)).expect("chown");
    // Run as root, the way out is to run as the directory's owner (certd's
    // user, as the packaged daemon runs); a file made by root there would
    // lock that user out.
    let out = env.certd(&["renew"]);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("(uid 65534)"), "{out}");
    assert!(out.stderr.contains("run: sudo -u "), "{out}");

    // Fixed as the message says: it runs.
    std::os::unix::fs::chown(env.state_dir(), Some(0), Some(0)).expect("chown");
    fs::set_permissions(env.state_dir(), fs::Permissions::from_mode(0o700)).expect("chmod");
    env.certd(&["renew"]).assert_success();
    assert_installed(&env, "www", &["www.example.test"]);
}

/// Every directory and file below `dir` (and `dir`): no group or other
/// write bit.
fn assert_no_group_or_other_write(dir: &Path) {
    let meta = fs::symlink_metadata(dir).expect("stat");
    assert_eq!(
        meta.mode() & 0o022,
        0,
        "{} is {:o}",
        dir.display(),
        meta.mode() & 0o7777
    );
    if meta.is_dir() {
        for entry in fs::read_dir(dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            if !fs::symlink_metadata(&path).expect("stat").is_symlink() {
                assert_no_group_or_other_write(&path);
            }
        }
    }
}

#[test]
fn under_umask_000_everything_gets_its_own_mode() {
    let env = TestEnv::new();
    env.write_config(&cert("www", "www.example.test"));
    env.command()
        .umask(0)
        .arg("renew")
        .output()
        .assert_success();
    assert_installed(&env, "www", &["www.example.test"]);
    let mode = |p: &Path| fs::metadata(p).expect("stat").mode() & 0o7777;
    assert_eq!(mode(&env.state_dir()), 0o700);
    assert_eq!(mode(&env.cert_dir()), 0o755);
    let base = env.cert_dir().join("www");
    assert_eq!(mode(&base), 0o755);
    assert_eq!(mode(&base.join("versions")), 0o755);
    assert_eq!(mode(&base.join("current")), 0o755);
    assert_eq!(mode(&base.join("current/privkey.pem")), 0o600);
    assert_eq!(mode(&base.join("current/cert.pem")), 0o644);
    assert_no_group_or_other_write(&env.state_dir());
    assert_no_group_or_other_write(&env.cert_dir());
}

#[test]
fn a_planted_key_is_never_reused() {
    let env = TestEnv::new();
    env.write_config(&format!(
        "{}reuse_key = true\nkey_type = \"ecdsa-p256\"\n",
        cert("www", "www.example.test")
    ));
    // A local user got `www/` (an operator's mistake: made for them, or
    // a copy from another machine) and planted a key of their own.
    fs::create_dir(env.cert_dir()).expect("cert_dir");
    let base = env.cert_dir().join("www");
    fs::create_dir(&base).expect("www");
    let planted = rcgen::KeyPair::generate().expect("key");
    fs::write(base.join("privkey.pem"), planted.serialize_pem()).expect("plant");
    std::os::unix::fs::chown(&base, Some(65534), Some(65534)).expect("chown");
    std::os::unix::fs::chown(base.join("privkey.pem"), Some(65534), Some(65534)).expect("chown");
    let planted_spki = {
        use rcgen::PublicKeyData;
        planted.subject_public_key_info()
    };

    let out = env.certd(&["renew"]);
    assert_ne!(
        out.code(),
        Some(0),
        "installed into a directory of another user\n{out}"
    );
    assert!(
        out.stdout.contains(&format!(
            "cannot install into {}: owned by uid 65534",
            base.display()
        )),
        "the error names the directory and its owner\n{out}"
    );
    // Whatever certd did, the CA never certified the planted key.
    if base.join("cert.pem").exists() {
        for der in read_pem_certs(base.join("cert.pem")) {
            let (_, _, _, spki) = parse_leaf(&der);
            assert_ne!(spki, planted_spki, "the planted key was certified");
        }
    }

    // The directory given back to certd's user: the key it reuses is its own.
    std::os::unix::fs::chown(&base, Some(0), Some(0)).expect("chown");
    fs::remove_file(base.join("privkey.pem")).expect("remove the planted key");
    env.certd(&["renew", "--force"]).assert_success();
    let (_, first_serial, first_spki) = installed(&env, "www");
    assert_ne!(first_spki, planted_spki);
    env.certd(&["renew", "--force"]).assert_success();
    let (_, second_serial, second_spki) = installed(&env, "www");
    assert_ne!(first_serial, second_serial);
    assert_eq!(first_spki, second_spki, "reuse_key reused certd's own key");
}

/// Whether `pid` is gone (or a zombie nobody has reaped yet: it has run).
fn is_dead(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

#[test]
fn reload_commands_get_their_own_group_and_a_minimal_environment() {
    let env = TestEnv::new();
    let dir = env.dir().display().to_string();
    env.write_config(&format!(
        r#"{}reload_timeout = "3s"
reload = [
    "env > {dir}/env.txt",
    "sleep 600 & echo $! > {dir}/background.pid; echo started",
    "sleep 600 & echo $! > {dir}/hung.pid; wait",
]
"#,
        cert("www", "www.example.test")
    ));
    let out = env
        .command()
        .env("SECRET_OF_CERTDS_ENVIRONMENT", "leaked")
        .arg("renew")
        .output();
    // Issued and installed; one reload (the hung one) failed.
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(
        out.stdout.contains("but 1 reload command(s) failed"),
        "{out}"
    );
    assert_installed(&env, "www", &["www.example.test"]);
    let pid = |f: &str| -> i32 {
        fs::read_to_string(env.dir().join(f))
            .expect("pid file")
            .trim()
            .parse()
            .expect("pid")
    };
    let (background, hung) = (pid("background.pid"), pid("hung.pid"));

    // Minimal environment: PATH, LANG and the CERTD_* variables only.
    let seen = fs::read_to_string(env.dir().join("env.txt")).expect("env.txt");
    assert!(!seen.contains("SECRET_OF_CERTDS_ENVIRONMENT"), "{seen}");
    assert!(!seen.contains("RUST_LOG"), "{seen}");
    assert!(
        seen.lines()
            .any(|l| l == "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
        "{seen}"
    );
    assert!(seen.lines().any(|l| l == "CERTD_NAME=www"), "{seen}");

    // A backgrounded child holding stdout is not a timeout; the hung
    // command is, and its whole group is killed with it.
    assert_eq!(ledger_events(&env, EventKind::ReloadOk), 2, "{out}");
    assert_eq!(ledger_events(&env, EventKind::ReloadFailed), 1, "{out}");
    assert!(out.stderr.contains("timed out after 3s"), "{out}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !is_dead(hung) {
        assert!(
            Instant::now() < deadline,
            "the hung command's child {hung} outlived its timeout"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!is_dead(background), "the background job was left alone");
    // SAFETY: kill takes no pointers; the pid is our test's own sleep.
    unsafe {
        libc::kill(background, libc::SIGKILL);
    }
}

/// Runs the polkit rule in `rule` under node, as polkitd would run it
/// (a `polkit` object whose `addRule` records the callback), for each case
/// `(user, action id, unit, verb)`; returns each case's result.
fn polkit_decisions(rule: &str, cases: &[(&str, &str, &str, &str)]) -> Vec<String> {
    // A stand-in for polkitd's JavaScript host: running polkitd needs a
    // system bus; the rule's logic is the same JavaScript either way.
    let harness = r#"
const fs = require("fs");
const rules = [];
const polkit = {
    Result: { YES: "yes", NO: "no", NOT_HANDLED: "not_handled",
              AUTH_ADMIN: "auth_admin", AUTH_SELF: "auth_self" },
    addRule: (f) => rules.push(f),
    log: () => {},
};
new Function("polkit", fs.readFileSync(process.argv[1], "utf8"))(polkit);
const cases = JSON.parse(process.argv[2]);
console.log(JSON.stringify(cases.map(([user, id, unit, verb]) => {
    const action = { id, lookup: (k) => ({ unit, verb })[k] };
    const subject = { user, isInGroup: () => false };
    for (const r of rules) {
        const v = r(action, subject);
        if (v !== undefined && v !== polkit.Result.NOT_HANDLED) return v;
    }
    return polkit.Result.NOT_HANDLED;
})));
"#;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("rule.js");
    fs::write(&path, rule).expect("write rule");
    let out = Command::new("node")
        .arg("-e")
        .arg(harness)
        .arg(&path)
        .arg(serde_json::to_string(cases).expect("cases"))
        .output()
        .expect("run node");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("decisions")
}

const MANAGE: &str = "org.freedesktop.systemd1.manage-units";

#[test]
fn the_polkit_rule_allows_only_reloads_of_the_listed_units() {
    let env = TestEnv::new();
    env.write_config(&format!(
        "{}reload = [\"systemctl reload nginx && systemctl reload-or-restart db\", \"systemctl reload-or-try-restart haproxy.service\"]\n",
        cert("www", "www.example.test")
    ));
    let out = env.certd(&["polkit-rule"]);
    out.assert_success();
    let rule = out.stdout;
    let cases = [
        ("certd", MANAGE, "nginx.service", "reload"),
        ("certd", MANAGE, "haproxy.service", "reload-or-try-restart"),
        ("certd", MANAGE, "nginx.service", "reload-or-restart"),
        ("certd", MANAGE, "nginx.service", "restart"),
        ("certd", MANAGE, "nginx.service", "start"),
        ("certd", MANAGE, "nginx.service", "stop"),
        ("certd", MANAGE, "db.service", "reload"),
        ("certd", MANAGE, "poweroff.target", "reload-or-restart"),
        ("certd", MANAGE, "reboot.target", "start"),
        (
            "certd",
            MANAGE,
            "debug-shell.service",
            "reload-or-try-restart",
        ),
        ("www-data", MANAGE, "nginx.service", "reload"),
        ("certd", "org.freedesktop.login1.power-off", "", ""),
    ];
    let got = polkit_decisions(&rule, &cases);
    let want = [
        "yes",
        "yes",
        "no",
        "no",
        "no",
        "no",
        "no",
        "no",
        "no",
        "no",
        "not_handled",
        "not_handled",
    ];
    for ((case, got), want) in cases.iter().zip(&got).zip(want) {
        assert_eq!(got, want, "{case:?}\n{rule}");
    }

    // Units named on the command line instead, no config needed.
    let out = env.certd(&["polkit-rule", "postfix", "dovecot.service"]);
    out.assert_success();
    let got = polkit_decisions(
        &out.stdout,
        &[
            ("certd", MANAGE, "postfix.service", "reload"),
            ("certd", MANAGE, "nginx.service", "reload"),
        ],
    );
    assert_eq!(got, ["yes", "no"]);
    let out = env.certd(&["polkit-rule", "x\"]; return polkit.Result.YES; //"]);
    assert_eq!(out.code(), Some(2), "{out}");

    // The rule the package ships (before its postinst generates one from
    // the configuration) allows the certd user nothing.
    let shipped = fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/polkit/50-certd.rules"),
    )
    .expect("shipped rule");
    let got = polkit_decisions(
        &shipped,
        &[
            ("certd", MANAGE, "nginx.service", "reload"),
            ("certd", MANAGE, "poweroff.target", "reload-or-restart"),
            ("www-data", MANAGE, "nginx.service", "reload"),
        ],
    );
    assert_eq!(got, ["no", "no", "not_handled"]);
}
