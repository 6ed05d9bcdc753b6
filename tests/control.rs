//! One-shot commands beside a running daemon (its control socket), and
//! commands run as the wrong user.

use std::fs;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::Path;
use std::time::Duration;

use crate::ca_features::cert_status_at_ca;
use crate::util::{TestEnv, flag, install_hook_wrapper, installed};

/// Failed orders are retried an hour later: what a test sees after a
/// failure stays as it is while it looks.
const SLOW_RETRY: &str = r#"
[daemon]
backoff_min = "1h"
backoff_max = "2h"
shutdown_grace = "10s"
"#;

fn cert(name: &str, domain: &str, challenge: &str) -> String {
    format!(
        "\n[[certificate]]\nname = \"{name}\"\ndomains = [\"{domain}\"]\nchallenges = [\"{challenge}\"]\n"
    )
}

#[test]
fn renew_revoke_and_rollover_are_handed_to_the_running_daemon() {
    // Every order answers a challenge, on the daemon's http-01 listener.
    let env = TestEnv::without_authz_reuse();
    env.write_config(&format!(
        "{SLOW_RETRY}{}",
        cert("api", "api.example.test", "http-01")
    ));
    let mut daemon = env.command().arg("run").spawn();
    daemon.wait_for_file(
        &env.cert_dir().join("api/cert.pem"),
        Duration::from_secs(60),
    );
    // Its first order ended (a request during an order joins that order).
    daemon.wait_for_output("renewed", Duration::from_secs(30));
    let socket = env.state_dir().join("control.sock");
    let meta = fs::metadata(&socket).expect("control socket");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let (_, first, _) = installed(&env, "api");

    // The daemon holds the http-01 port; its own listener answers.
    let out = env.certd(&["renew", "--force", "api"]);
    out.assert_success();
    assert!(!out.stderr.contains("Address already in use"), "{out}");
    let (_, forced, _) = installed(&env, "api");
    assert_ne!(forced, first, "a new certificate installed");
    assert!(
        out.stdout.contains(&format!("api: issued serial {forced}")),
        "{out}"
    );
    daemon.wait_for_output("control socket: running a command", Duration::from_secs(10));

    // Revoked and replaced at once, by the daemon.
    let out = env.certd(&["revoke", "api"]);
    out.assert_success();
    assert!(
        out.stdout
            .contains(&format!("api: revoked serial {forced}")),
        "{out}"
    );
    let (_, replacement, _) = installed(&env, "api");
    assert_ne!(replacement, forced, "replaced at once");
    assert!(
        out.stdout
            .contains(&format!("api: issued serial {replacement}")),
        "{out}"
    );
    assert!(cert_status_at_ca(&env, &forced).contains("Revoked"));
    assert!(cert_status_at_ca(&env, &replacement).contains("Valid"));
    env.certd(&["status", "--check"]).assert_code(0);

    // A key rollover switches the daemon's key: its next order works.
    let out = env.certd(&["account", "rollover"]);
    out.assert_success();
    let out = env.certd(&["renew", "--force", "api"]);
    out.assert_success();
    assert!(!out.stdout.contains("JWS"), "{out}");
    assert_ne!(installed(&env, "api").1, replacement);

    let out = daemon.terminate();
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(!socket.exists(), "the socket is removed at shutdown");
}

#[test]
fn a_revoked_certificate_the_daemon_cannot_replace_is_critical() {
    // Every order validates afresh: a reused authorization would let the
    // replacement through without the failing hook. Pebble still reuses a
    // valid one 1 % of the time at PEBBLE_AUTHZREUSE=0, so certd also
    // deactivates each after the install.
    let env = TestEnv::without_authz_reuse();
    env.write_config(&format!(
        "{SLOW_RETRY}\n[reaper]\ndeactivate_valid_after_issue = true\n{}",
        cert("blog", "blog.example.test", "dns-01")
    ));
    install_hook_wrapper(&env);
    env.certd(&["renew"]).assert_success();
    let (_, serial, _) = installed(&env, "blog");
    let mut daemon = env.command().arg("run").spawn();
    daemon.wait_for_output("certd running", Duration::from_secs(30));

    // The replacement's challenge fails: the revoked one stays installed.
    flag(&env, "fail", true);
    let out = env.certd(&["revoke", "blog"]);
    out.assert_code(1);
    assert!(
        out.stdout
            .contains(&format!("blog: revoked serial {serial}")),
        "{out}"
    );
    assert!(out.stdout.contains("blog: failed:"), "{out}");
    assert_eq!(installed(&env, "blog").1, serial);
    let check = env.certd(&["status", "--check"]);
    check.assert_code(2);
    assert!(
        check.stdout.contains("revoked") && check.stdout.contains(&serial),
        "{check}"
    );

    // Fixed: the revoked certificate is due, and `renew` replaces it.
    flag(&env, "fail", false);
    env.certd(&["renew", "blog"]).assert_success();
    assert_ne!(installed(&env, "blog").1, serial);
    env.certd(&["status", "--check"]).assert_code(0);
    assert_eq!(daemon.terminate().code(), Some(0));
}

/// Files under `dir` (recursively) owned by `uid`.
fn owned_by(dir: &Path, uid: u32) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.uid() == uid {
            found.push(path.display().to_string());
        }
        if meta.is_dir() {
            found.extend(owned_by(&path, uid));
        }
    }
    found
}

fn chown_tree(dir: &Path, uid: u32) {
    let status = std::process::Command::new("chown")
        .arg("-R")
        .arg(uid.to_string())
        .arg(dir)
        .status()
        .expect("chown");
    assert!(status.success());
}

#[test]
fn commands_as_root_leave_nothing_the_daemons_user_cannot_write() {
    // SAFETY: geteuid takes no arguments and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "this test runs as root, as `sudo certd` does");
    let env = TestEnv::new();
    env.write_config(&cert("w", "w.example.test", "http-01"));

    // Reading commands in a state directory that does not exist yet
    // create nothing.
    for args in [
        &["status"][..],
        &["status", "--check"],
        &["authz", "list"],
        &["account", "show"],
        &["check-config"],
    ] {
        let out = env.certd(args);
        assert_ne!(out.code(), None, "{out}");
        assert!(
            !env.state_dir().exists(),
            "`certd {}` created the state directory",
            args.join(" ")
        );
    }

    // A ledger certd's own user (here uid 65534) owns.
    env.certd(&["renew"]).assert_success();
    let nobody = 65_534;
    chown_tree(&env.state_dir(), nobody);
    chown_tree(&env.cert_dir(), nobody);

    // Reading works, and leaves nothing of root's behind.
    env.certd(&["status"]).assert_success();
    env.certd(&["authz", "list"]).assert_success();
    let shown = env.certd(&["account", "show"]);
    shown.assert_success();
    assert!(shown.stdout.contains("thumbprint:"), "{shown}");
    let root_files = owned_by(&env.state_dir(), 0);
    assert!(root_files.is_empty(), "root-owned: {root_files:?}");

    // Writing refuses, and says how to run it as certd's user.
    let before = fs::read(env.state_dir().join("certd.db")).expect("ledger");
    for args in [&["renew", "--force", "w"][..], &["reap"]] {
        let out = env.certd(args);
        out.assert_code(2);
        assert!(
            out.stderr.contains("runs as root") && out.stderr.contains("run: sudo -u "),
            "{out}"
        );
        assert!(
            out.stderr
                .contains(&format!("certd --config {}", env.config_path().display())),
            "{out}"
        );
    }
    assert_eq!(
        fs::read(env.state_dir().join("certd.db")).expect("ledger"),
        before,
        "the ledger is untouched"
    );
    let root_files = owned_by(&env.state_dir(), 0);
    assert!(root_files.is_empty(), "root-owned: {root_files:?}");
    let root_files = owned_by(&env.cert_dir(), 0);
    assert!(root_files.is_empty(), "root-owned: {root_files:?}");
}

#[test]
fn a_user_who_cannot_read_the_configuration_is_told_whom_to_run_as() {
    let env = TestEnv::new();
    env.write_config(&cert("w", "w.example.test", "http-01"));
    // As packaged: the file 0640 root:<certd's group> (here nogroup,
    // 65534), its directory traversable.
    fs::set_permissions(env.dir(), fs::Permissions::from_mode(0o755)).expect("chmod dir");
    let config = env.config_path();
    let status = std::process::Command::new("chgrp")
        .arg("65534")
        .arg(&config)
        .status()
        .expect("chgrp");
    assert!(status.success());
    fs::set_permissions(&config, fs::Permissions::from_mode(0o640)).expect("chmod config");
    let group = std::process::Command::new("getent")
        .args(["group", "65534"])
        .output()
        .expect("getent");
    let group = String::from_utf8_lossy(&group.stdout);
    let group = group.split(':').next().expect("group name").to_owned();

    // A normal user (uid 1, gid 1) runs the README's status command.
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=1", "--regid=1", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_certd"))
        .arg("--config")
        .arg(&config)
        .arg("status")
        .output()
        .expect("setpriv certd");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("Permission denied"), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "run: sudo -u {group} certd --config {} status",
            config.display()
        )),
        "{stderr}"
    );
    assert!(!env.state_dir().exists(), "nothing created");
}

#[test]
fn a_ledger_file_of_another_user_is_named_with_its_owner() {
    let env = TestEnv::new();
    env.write_config(&cert("w", "w.example.test", "http-01"));
    env.certd(&["renew"]).assert_success();
    fs::set_permissions(env.dir(), fs::Permissions::from_mode(0o755)).expect("chmod dir");
    let nobody = 65_534;
    chown_tree(&env.state_dir(), nobody);
    chown_tree(&env.cert_dir(), nobody);
    // What `sudo certd …` of an older certd left: root's ledger.
    let db = env.state_dir().join("certd.db");
    std::os::unix::fs::chown(&db, Some(0), Some(0)).expect("chown ledger");
    let before = fs::read(&db).expect("ledger");

    // The daemon's user runs a writing command.
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_certd"))
        .arg("--config")
        .arg(env.config_path())
        .args(["renew", "--force"])
        .output()
        .expect("setpriv certd");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("{} is owned by user root (uid 0)", db.display())),
        "{stderr}"
    );
    assert!(stderr.contains("Fix: chown "), "{stderr}");
    assert_eq!(
        fs::read(&db).expect("ledger"),
        before,
        "the ledger is untouched"
    );
}
