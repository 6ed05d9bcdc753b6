//! Never spend the CA's budget on an order that cannot complete: the
//! checks before `newOrder`, the durable record of an issued certificate
//! before it is installed, reload retries, and `renew --dry-run`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::util::{
    TestEnv, TinyDisk, assert_installed, ca_orders, installed, ledger_events, parse_leaf,
    read_pem_certs, snapshot,
};
use certd::ledger::EventKind;

const DOMAIN: &str = "pre.example.test";

fn cert(extra: &str) -> String {
    format!("\n[[certificate]]\nname = \"p\"\ndomains = [\"{DOMAIN}\"]\n{extra}\n")
}

/// Adds `line` to the `[http01]` table of the config written by `write_config`.
fn add_to_http01(env: &TestEnv, line: &str) {
    let config = fs::read_to_string(env.config_path()).expect("config");
    env.write_raw_config(&config.replacen("[http01]\n", &format!("[http01]\n{line}\n"), 1));
}

/// What the CA holds for the account: (status, identifiers) of every order.
fn orders_at_ca(env: &TestEnv) -> Vec<String> {
    ca_orders(env)
        .into_iter()
        .map(|o| format!("{} {}", o.status, o.identifiers.join(",")))
        .collect()
}

#[test]
fn an_order_that_cannot_complete_is_never_placed() {
    let env = TestEnv::new();
    let webroot = env.dir().join("www");
    // Case 1: cert_dir on a read-only file system.
    env.write_config(&cert(""));
    let disk = TinyDisk::mount(&env.cert_dir(), "1m");
    disk.remount("ro");
    let out = env.certd(&["renew"]);
    assert_eq!(out.code(), Some(1), "{out}");
    let cert_dir = env.cert_dir().display().to_string();
    assert!(out.stdout.contains(&cert_dir), "names the path: {out}");
    assert!(out.stdout.contains("Read-only file system"), "{out}");
    assert!(out.stdout.contains("fix: remount"), "says the fix: {out}");
    assert_eq!(orders_at_ca(&env), Vec::<String>::new(), "no newOrder");
    disk.remount("rw");

    // Case 2: a webroot that does not exist.
    add_to_http01(
        &env,
        &format!("webroot = {:?}", webroot.display().to_string()),
    );
    let out = env.certd(&["renew"]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.stdout.contains(&webroot.display().to_string()), "{out}");
    assert!(out.stdout.contains("mkdir -p"), "says the fix: {out}");
    assert_eq!(orders_at_ca(&env), Vec::<String>::new(), "no newOrder");
    fs::create_dir(&webroot).expect("webroot");

    // Case 3: a dns-01 hook that is not executable.
    let config = fs::read_to_string(env.config_path()).expect("config");
    env.write_raw_config(&config.replace(
        &format!("domains = [\"{DOMAIN}\"]"),
        &format!("domains = [\"{DOMAIN}\"]\nchallenges = [\"dns-01\"]"),
    ));
    let hook = env.dns_hook_path();
    fs::set_permissions(&hook, fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = env.certd(&["renew"]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.stdout.contains(&hook.display().to_string()), "{out}");
    assert!(out.stdout.contains("not executable"), "{out}");
    assert!(out.stdout.contains("chmod +x"), "says the fix: {out}");
    assert_eq!(orders_at_ca(&env), Vec::<String>::new(), "no newOrder");

    // Everything fixed: one order, and the certificate is installed.
    fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).expect("chmod");
    env.certd(&["renew"]).assert_success();
    assert_installed(&env, "p", &[DOMAIN]);
    assert_eq!(orders_at_ca(&env), vec![format!("valid {DOMAIN}")]);
}

#[test]
fn a_failed_install_is_retried_from_disk_not_ordered_again() {
    let env = TestEnv::new();
    let disk = TinyDisk::mount(&env.cert_dir(), "1m");
    // A dns-01 hook that, once armed, makes cert_dir read-only while the
    // order runs: after the checks before newOrder, before the install.
    let armed = env.dir().join("armed");
    let wrapper = env.dir().join("ro-hook.sh");
    fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n{hook:?} \"$@\" || exit $?\nif [ \"$1\" = present ] && [ -e {armed:?} ]; then\n  rm {armed:?}\n  mount -o remount,ro {dir:?} || exit 1\nfi\n",
            hook = env.dns_hook_path().display().to_string(),
            armed = armed.display().to_string(),
            dir = env.cert_dir().display().to_string(),
        ),
    )
    .expect("hook");
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).expect("chmod");
    env.write_config_with_dns01(
        &format!(
            "[dns01]\nhook = {:?}\nnameservers = [\"{}\"]\n",
            wrapper.display().to_string(),
            env.pebble.dns_addr()
        ),
        &cert("challenges = [\"dns-01\"]"),
    );
    fs::write(&armed, "").expect("arm");

    let out = env.certd(&["renew"]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.stdout.contains("Read-only file system"), "{out}");
    assert!(!armed.exists(), "the hook ran");
    let orders = ca_orders(&env);
    assert_eq!(orders.len(), 1, "{orders:?}");
    assert_eq!(orders[0].status, "valid", "the CA issued: {orders:?}");

    // The issued chain and its key wait under state_dir, private.
    let issued: Vec<_> = fs::read_dir(env.state_dir().join("issued"))
        .expect("state_dir/issued")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(issued.len(), 1, "{issued:?}");
    let mode = fs::metadata(&issued[0])
        .expect("record")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let record = fs::read_to_string(&issued[0]).expect("record");
    assert!(record.contains("PRIVATE KEY"), "the key is recorded");
    let issued_serial = serial_of_pem(&record);
    let at_ca = crate::util::ca_certificate(
        &env,
        orders[0].certificate.as_deref().expect("certificate URL"),
    );
    assert_eq!(issued_serial, serial_of_pem(&at_ca), "the CA's certificate");

    // Writable again: the next run installs that certificate from disk.
    disk.remount("rw");
    env.certd(&["renew"]).assert_success();
    let (_, serial, _) = installed(&env, "p");
    assert_eq!(
        serial, issued_serial,
        "the recorded certificate is installed"
    );
    assert_installed(&env, "p", &[DOMAIN]);
    assert_eq!(ledger_events(&env, EventKind::InstallFromDisk), 1);
    let orders = ca_orders(&env);
    assert_eq!(
        orders.len(),
        1,
        "exactly one certificate issued: {orders:?}"
    );
    assert!(
        fs::read_dir(env.state_dir().join("issued"))
            .expect("state_dir/issued")
            .next()
            .is_none(),
        "the record goes once installed"
    );
}

fn serial_of_pem(pem: &str) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("c.pem");
    fs::write(&path, pem).expect("write");
    let certs = read_pem_certs(&path);
    parse_leaf(&certs[0]).1
}

#[test]
fn the_daemon_retries_a_failed_reload_until_it_succeeds() {
    let env = TestEnv::new();
    let counter = env.dir().join("reloads");
    // Fails the first two times, then succeeds.
    let reload = format!(
        "n=$(cat {c:?} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {c:?}; [ $n -ge 3 ]",
        c = counter.display().to_string()
    );
    env.write_config(&cert(&format!(
        "reload = [{}]",
        serde_json::to_string(&reload).expect("TOML string")
    )));
    let mut daemon = env.command().arg("run").spawn();
    let deadline = Instant::now() + Duration::from_secs(120);
    while read_count(&counter) < 3 {
        assert!(
            Instant::now() < deadline,
            "reload ran {} time(s)",
            read_count(&counter)
        );
        assert!(daemon.is_running(), "the daemon exited");
        std::thread::sleep(Duration::from_millis(200));
    }
    daemon.wait_for_output("retrying", Duration::from_secs(10));
    let out = daemon.terminate();
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(read_count(&counter), 3, "no reload after it succeeded");
    assert_eq!(ledger_events(&env, EventKind::ReloadFailed), 2);
    assert_eq!(ledger_events(&env, EventKind::ReloadOk), 1);
    let status: serde_json::Value =
        serde_json::from_str(&env.certd(&["status", "--json"]).stdout).expect("status");
    assert!(status[0]["last_error"].is_null(), "{status}");
}

fn read_count(path: &Path) -> u32 {
    fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn dry_run_issues_but_installs_and_reloads_nothing() {
    let env = TestEnv::new();
    let marker = env.dir().join("reloaded");
    env.write_config(&cert(&format!("reload = [\"touch {}\"]", marker.display())));
    env.certd(&["renew"]).assert_success();
    assert!(marker.exists(), "the real run reloads");
    fs::remove_file(&marker).expect("reset");
    let before = snapshot(&env.cert_dir());
    let links_before = fs::read_link(env.cert_dir().join("p/current")).expect("current");

    let out = env.certd(&["renew", "--dry-run"]);
    out.assert_success();
    assert!(out.stdout.contains("dry run"), "{out}");
    assert!(
        out.stdout.contains("nothing installed, nothing reloaded"),
        "{out}"
    );
    let orders = ca_orders(&env);
    assert_eq!(
        orders.iter().filter(|o| o.status == "valid").count(),
        2,
        "the CA issued for the dry run: {orders:?}"
    );
    assert_eq!(snapshot(&env.cert_dir()), before, "cert_dir unchanged");
    assert_eq!(
        fs::read_link(env.cert_dir().join("p/current")).expect("current"),
        links_before
    );
    assert!(!marker.exists(), "no reload ran");
    assert_eq!(ledger_events(&env, EventKind::DryRun), 1);
}

#[test]
fn a_hung_reload_is_killed_at_the_shutdown_grace_and_says_why() {
    let env = TestEnv::new();
    let pid_file = env.dir().join("reload.pid");
    // The shell records its pid, then hangs in a child of its own group.
    let reload = format!(
        "echo $$ > {p:?}; sleep 600",
        p = pid_file.display().to_string()
    );
    env.write_config(&format!(
        "[daemon]\nshutdown_grace = \"2s\"\n{}",
        cert(&format!(
            "reload = [{}]\nreload_timeout = \"900s\"",
            serde_json::to_string(&reload).expect("TOML string")
        ))
    ));
    let mut daemon = env.command().arg("run").spawn();
    daemon.wait_for_file(&pid_file, Duration::from_secs(60));
    // The shell's redirection creates the file before `echo` fills it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let pid: i32 = loop {
        if let Ok(pid) = fs::read_to_string(&pid_file).expect("pid").trim().parse() {
            break pid;
        }
        assert!(
            Instant::now() < deadline,
            "no pid in {}",
            pid_file.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let (out, _) = daemon.terminate_within(Duration::from_secs(60));
    assert!(out.success(), "{out}");
    let log = format!("{}{}", out.stdout, out.stderr);
    assert!(log.contains("shutdown grace ran out"), "{log}");
    // The group is gone: the shell and its sleep (a zombie waiting for a
    // parent to reap it counts as gone).
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Some(alive) = group_members(pid).first() {
        assert!(
            Instant::now() < deadline,
            "process {alive} of the reload's group {pid} still runs"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The live (not zombie) processes of process group `pgid`, from /proc.
fn group_members(pgid: i32) -> Vec<String> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| {
            let stat = fs::read_to_string(e.ok()?.path().join("stat")).ok()?;
            // pid (comm) state ppid pgrp …; comm may hold spaces.
            let (head, rest) = stat.rsplit_once(')')?;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let (state, pgrp) = (*fields.first()?, fields.get(2)?.parse::<i32>().ok()?);
            (pgrp == pgid && state != "Z").then(|| head.to_owned())
        })
        .collect()
}
