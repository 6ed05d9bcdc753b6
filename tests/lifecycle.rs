//! The daemon's lifecycle against a real Pebble: how it hears about
//! configuration changes, what it tells systemd, and that SIGTERM ends it
//! within `shutdown_grace` whatever else is happening.

use std::fs;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::util::{TestEnv, cert_table as cert};

/// Fast retries, and a grace short enough for many shutdowns per test.
const DAEMON: &str = r#"
[daemon]
backoff_min = "1s"
backoff_max = "2s"
shutdown_grace = "5s"
"#;
const GRACE: Duration = Duration::from_secs(5);
/// What the daemon may take beyond `shutdown_grace` to exit.
const EXIT_MARGIN: Duration = Duration::from_secs(5);

/// Replaces `path` the way editors save: a new file renamed over it.
fn editor_replace(path: &Path, text: &str) {
    let tmp = path.with_extension("toml.swp");
    fs::write(&tmp, text).expect("write temp config");
    fs::rename(&tmp, path).expect("rename over config");
}

/// Polls `cond` until it holds (true) or `timeout` passes (false).
fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Every notification queued on `socket`, without waiting.
fn drain_notifications(socket: &UnixDatagram) -> Vec<String> {
    socket.set_nonblocking(true).expect("non-blocking");
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while let Ok(n) = socket.recv(&mut buf) {
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    got
}

#[test]
fn a_notify_socket_nobody_reads_does_not_hold_up_shutdown() {
    let env = TestEnv::new();
    env.write_config(&format!("{DAEMON}{}", cert("n", "n.example.test")));
    // Bound and never read, like a systemd that is busy: its queue
    // (net.unix.max_dgram_qlen, 10 by default) fills.
    let socket_path = env.dir().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind notify socket");
    let mut daemon = env
        .command()
        .arg("run")
        .env("NOTIFY_SOCKET", &socket_path)
        .spawn();
    daemon.wait_for_file(&env.cert_dir().join("n/cert.pem"), Duration::from_secs(60));
    daemon.wait_for_output("certd running", Duration::from_secs(10));
    // Each SIGHUP is a reload: more notifications than the queue holds.
    // A daemon that stops hearing them is stuck; SIGTERM then shows where.
    for i in 1..=8 {
        daemon.signal("HUP");
        if !wait_until(Duration::from_secs(20), || {
            daemon.stderr().matches("SIGHUP: reloading").count() >= i
        }) {
            break;
        }
    }
    let (out, took) = daemon.terminate_within(GRACE + EXIT_MARGIN);
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(took < GRACE + EXIT_MARGIN, "shutdown took {took:?}");
    // What did arrive is a consistent story: it starts ready and never
    // leaves systemd believing a reload is still under way.
    let heard = drain_notifications(&socket);
    assert_eq!(
        heard.first().map(String::as_str),
        Some("READY=1"),
        "{heard:?}"
    );
    assert_ne!(
        heard.last().map(String::as_str),
        Some("RELOADING=1"),
        "{heard:?}"
    );
}

#[test]
fn only_content_changes_reload_and_systemd_hears_each_once() {
    let env = TestEnv::new();
    env.write_config(&format!("{DAEMON}{}", cert("n", "n.example.test")));
    let socket_path = env.dir().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind notify socket");
    let mut daemon = env
        .command()
        .arg("run")
        .env("NOTIFY_SOCKET", &socket_path)
        .spawn();
    daemon.wait_for_file(&env.cert_dir().join("n/cert.pem"), Duration::from_secs(60));
    daemon.wait_for_output("certd running", Duration::from_secs(10));

    // A touch changes no content: no reload. The daemon's own read of the
    // file once started a reload loop from here.
    let status = std::process::Command::new("touch")
        .arg(env.config_path())
        .status()
        .expect("run touch");
    assert!(status.success());
    // An editor's save: a new certificate, issued without a restart.
    let config = fs::read_to_string(env.config_path()).expect("config");
    editor_replace(
        &env.config_path(),
        &format!("{config}{}", cert("m", "m.example.test")),
    );
    daemon.wait_for_file(&env.cert_dir().join("m/cert.pem"), Duration::from_secs(60));

    let (out, _) = daemon.terminate_within(GRACE + EXIT_MARGIN);
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(out.stderr.matches("reloading").count(), 1, "{}", out.stderr);
    assert_eq!(
        drain_notifications(&socket),
        ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]
    );
}

#[test]
fn reload_applies_live_settings_and_status_names_the_rest() {
    let env = TestEnv::new();
    env.write_config(&format!("{DAEMON}{}", cert("s", "s.example.test")));
    let mut daemon = env.command().arg("run").spawn();
    daemon.wait_for_file(&env.cert_dir().join("s/cert.pem"), Duration::from_secs(60));
    daemon.wait_for_output("certd running", Duration::from_secs(10));
    assert!(!env.certd(&["status"]).stdout.contains("restart needed"));

    // A metrics listener (live) and a new contact address (restart).
    let port = crate::util::free_port();
    let config = fs::read_to_string(env.config_path()).expect("config");
    let edited = config
        .replace("mailto:test@example.com", "mailto:ops@example.com")
        .replace(
            "[daemon]",
            &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n\n[daemon]"),
        );
    editor_replace(&env.config_path(), &edited);
    daemon.wait_for_output("configuration reloaded", Duration::from_secs(20));
    assert!(
        daemon.stderr().contains("keys=acme.contact"),
        "{}",
        daemon.stderr()
    );
    let body = get_metrics(port);
    assert!(body.contains("certd_"), "{body}");
    let status = env.certd(&["status"]);
    assert!(
        status.stdout.contains("restart needed: acme.contact"),
        "{status}"
    );

    // A restart applies it: status says nothing more.
    let (out, _) = daemon.terminate_within(GRACE + EXIT_MARGIN);
    assert_eq!(out.code(), Some(0), "{out}");
    let mut daemon = env.command().arg("run").spawn();
    daemon.wait_for_output("certd running", Duration::from_secs(30));
    let status = env.certd(&["status"]);
    assert!(!status.stdout.contains("restart needed"), "{status}");
    let (out, _) = daemon.terminate_within(GRACE + EXIT_MARGIN);
    assert_eq!(out.code(), Some(0), "{out}");
}

/// GET /metrics on `port`, retried while the listener comes up.
fn get_metrics(port: u16) -> String {
    use std::io::{Read, Write};
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let attempt = std::net::TcpStream::connect(("127.0.0.1", port)).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
            let mut body = String::new();
            s.read_to_string(&mut body)?;
            Ok(body)
        });
        match attempt {
            Ok(body) => return body,
            Err(e) if Instant::now() > deadline => panic!("GET /metrics on {port}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Where an order is when SIGTERM arrives.
#[derive(Debug, Clone, Copy)]
enum Stage {
    /// Just after start: the first order's newOrder is on its way.
    Starting,
    /// The dns-01 hook is presenting (and blocks until killed).
    Presenting,
    /// The challenge is answered: certd is polling, finalizing or
    /// downloading, as the CA's timing falls (the soak runs sample them).
    Polling,
    /// The certificate is installed and its reload command runs (sleeps).
    ReloadCommand,
}

/// What happens just before SIGTERM.
#[derive(Debug, Clone, Copy)]
enum Before {
    Nothing,
    Sighup,
    /// An editor-style replace of the file adding a certificate (a new
    /// order starts as the daemon stops).
    EditorReplace,
}

const STAGES: [Stage; 4] = [
    Stage::Starting,
    Stage::Presenting,
    Stage::Polling,
    Stage::ReloadCommand,
];
const BEFORE: [Before; 3] = [Before::Nothing, Before::Sighup, Before::EditorReplace];

/// Every (stage, event) pair `CERTD_LIFECYCLE_ROUNDS` times (default 1;
/// `./scripts/soak` runs many): certd exits within `shutdown_grace` plus
/// the margin, with status 0, and leaves no authorization pending at the
/// CA (asked of Pebble, for every authorization the ledger knows).
#[test]
fn sigterm_exits_in_time_at_every_stage_and_event() {
    let rounds: usize = std::env::var("CERTD_LIFECYCLE_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(1);
    // No authorization reuse: every order has pending authorizations of
    // its own to leave behind.
    let env = TestEnv::without_authz_reuse();
    // Written once, with the hook script the wrapper then wraps; each run
    // writes the file anew from this base (write_config would rewrite the
    // hook too).
    env.write_config(DAEMON);
    crate::util::install_hook_wrapper(&env);
    let base = fs::read_to_string(env.config_path()).expect("config");
    let mut run = 0;
    for _ in 0..rounds {
        for stage in STAGES {
            for before in BEFORE {
                run += 1;
                sigterm_at(&env, &base, run, stage, before);
            }
        }
    }
}

fn sigterm_at(env: &TestEnv, base: &str, run: usize, stage: Stage, before: Before) {
    let what = format!("run {run}: {stage:?}, {before:?}");
    let dir = env.dir();
    let presenting = dir.join("presenting");
    let reloading = dir.join("reloading");
    let _ = fs::remove_file(&presenting);
    let _ = fs::remove_file(&reloading);
    crate::util::flag(env, "block", matches!(stage, Stage::Presenting));
    let name = format!("c{run}");
    let mut certificate =
        format!("\n[[certificate]]\nname = \"{name}\"\ndomains = [\"{name}.example.test\"]\n");
    certificate.push_str(match stage {
        Stage::Presenting => "challenges = [\"dns-01\"]\n",
        _ => "challenges = [\"http-01\"]\n",
    });
    if let Stage::ReloadCommand = stage {
        certificate.push_str(&format!(
            "reload = [\"sh\", \"-c\", \"touch '{}'; exec sleep 60\"]\nreload_timeout = \"120s\"\n",
            reloading.display()
        ));
    }
    env.write_raw_config(&format!("{base}{certificate}"));
    let mut daemon = env.command().arg("run").spawn();
    match stage {
        Stage::Starting => daemon.wait_for_output("certd running", Duration::from_secs(30)),
        Stage::Presenting => daemon.wait_for_file(&presenting, Duration::from_secs(30)),
        Stage::Polling => daemon.wait_for_output("challenge answered", Duration::from_secs(30)),
        Stage::ReloadCommand => daemon.wait_for_file(&reloading, Duration::from_secs(60)),
    }
    match before {
        Before::Nothing => {}
        Before::Sighup => daemon.signal("HUP"),
        Before::EditorReplace => {
            let config = fs::read_to_string(env.config_path()).expect("config");
            editor_replace(
                &env.config_path(),
                &format!(
                    "{config}{}",
                    cert(&format!("{name}x"), &format!("{name}x.example.test"))
                ),
            );
        }
    }
    let (out, took) = daemon.terminate_within(GRACE + EXIT_MARGIN);
    assert_eq!(out.code(), Some(0), "{what}: {out}");
    assert!(took < GRACE + EXIT_MARGIN, "{what}: shutdown took {took:?}");
    eprintln!("{what}: exited in {took:?}");
    let authz = crate::util::ledger_authz(env);
    let at_ca = crate::util::ca_authz_statuses(env, &crate::util::ledger_authz_urls(&authz));
    let pending: Vec<_> = at_ca.iter().filter(|(_, s)| *s == "pending").collect();
    assert!(
        pending.is_empty(),
        "{what}: pending at the CA: {pending:?}\n{}",
        out.stderr
    );
}

#[test]
fn a_new_dns01_hook_applies_without_a_restart() {
    let env = TestEnv::new();
    env.write_config(&format!("{DAEMON}{}", cert("h", "h.example.test")));
    let mut daemon = env.command().arg("run").spawn();
    daemon.wait_for_file(&env.cert_dir().join("h/cert.pem"), Duration::from_secs(60));
    daemon.wait_for_output("certd running", Duration::from_secs(10));

    // A second hook that says it ran, then does the real work.
    let hook2 = env.dir().join("hook2.sh");
    let hook2_log = env.dir().join("hook2.log");
    fs::write(
        &hook2,
        format!(
            "#!/bin/sh\necho \"$1\" >> '{}'\nexec '{}' \"$@\"\n",
            hook2_log.display(),
            env.dns_hook_path().display()
        ),
    )
    .expect("write hook");
    fs::set_permissions(&hook2, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod hook");
    let config = fs::read_to_string(env.config_path()).expect("config");
    let hook_path = env.dns_hook_path().display().to_string();
    assert!(config.contains(&hook_path), "{config}");
    let edited = format!(
        "{}\n[[certificate]]\nname = \"d\"\ndomains = [\"d.example.test\"]\nchallenges = [\"dns-01\"]\n",
        config.replace(&hook_path, &hook2.display().to_string())
    );
    editor_replace(&env.config_path(), &edited);
    daemon.wait_for_file(&env.cert_dir().join("d/cert.pem"), Duration::from_secs(60));
    let ran = fs::read_to_string(&hook2_log).unwrap_or_default();
    assert!(ran.contains("present"), "the new hook did not run: {ran:?}");
    assert!(daemon.stderr().contains("\"dns01\""), "{}", daemon.stderr());
    assert!(!env.certd(&["status"]).stdout.contains("restart needed"));
    let (out, _) = daemon.terminate_within(GRACE + EXIT_MARGIN);
    assert_eq!(out.code(), Some(0), "{out}");
}

#[test]
fn a_corrected_eab_key_is_taken_while_the_account_cannot_be_created() {
    const KID: &str = "kid-1";
    const KEY: &str = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W";
    let env = TestEnv::with_pebble_opts(crate::util::PebbleOpts {
        eab_keys: vec![(KID.into(), KEY.into())],
        ..crate::util::PebbleOpts::default()
    });
    env.write_config(&format!("{DAEMON}{}", cert("e", "e.example.test")));
    // A key the CA does not know: it refuses the account.
    let key_file = env.dir().join("eab.key");
    fs::write(&key_file, KEY.replace('z', "y")).expect("key file");
    fs::set_permissions(
        &key_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .expect("chmod");
    let config = fs::read_to_string(env.config_path()).expect("config");
    env.write_raw_config(&config.replacen(
        "[acme]\n",
        &format!(
            "[acme]\neab_kid = \"{KID}\"\neab_hmac_key_file = \"{}\"\n",
            key_file.display()
        ),
        1,
    ));
    let mut daemon = env.command().arg("run").spawn();
    daemon.wait_for_output("cannot load the ACME account", Duration::from_secs(30));

    // The key file is fixed (the configuration file itself is not
    // touched): the next attempt uses it.
    fs::write(&key_file, KEY).expect("key file");
    daemon.wait_for_file(&env.cert_dir().join("e/cert.pem"), Duration::from_secs(60));
    let (out, _) = daemon.terminate_within(GRACE + EXIT_MARGIN);
    assert_eq!(out.code(), Some(0), "{out}");
}

#[test]
fn a_moved_http01_listener_applies_without_a_restart() {
    // No reuse: the retry after the edit validates afresh.
    let env = TestEnv::without_authz_reuse();
    env.write_config(&format!(
        "{DAEMON}\n[[certificate]]\nname = \"l\"\ndomains = [\"l.example.test\"]\nchallenges = [\"http-01\"]\n"
    ));
    // The responder listens where the CA does not look: validation fails.
    let config = fs::read_to_string(env.config_path()).expect("config");
    let right = format!("listen = \"127.0.0.1:{}\"", env.pebble.http01_port());
    assert!(config.contains(&right), "{config}");
    let wrong = format!(
        "listen = \"127.0.0.1:{}\"\npreflight = false",
        crate::util::free_port()
    );
    env.write_raw_config(&config.replace(&right, &wrong));
    let mut daemon = env.command().arg("run").spawn();
    daemon.wait_for_output("renewal failed", Duration::from_secs(60));

    // Moved to where the CA looks: the next attempt succeeds.
    editor_replace(&env.config_path(), &config);
    daemon.wait_for_file(&env.cert_dir().join("l/cert.pem"), Duration::from_secs(60));
    assert!(
        daemon.stderr().contains("\"http01\""),
        "{}",
        daemon.stderr()
    );
    let (out, _) = daemon.terminate_within(GRACE + EXIT_MARGIN);
    assert_eq!(out.code(), Some(0), "{out}");
}
