//! When the ledger's own storage fails: a full or read-only state
//! directory, a corrupt `certd.db`, the file deleted under a running
//! daemon, two certd processes on one state directory. Each is a clear
//! error naming the file and the cause, exit 2, installed certificates
//! byte-for-byte unchanged, and no half-written ledger.

use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::util::{CmdOutput, TestEnv, TinyDisk, checkpoint, installed, integrity, snapshot};

const CERT: &str = "\n[[certificate]]\nname = \"s\"\ndomains = [\"s.example.test\"]\n";

fn db_path(env: &TestEnv) -> PathBuf {
    env.state_dir().join("certd.db")
}

/// Asserts exit 2 and that standard error holds every one of `needles`.
#[track_caller]
fn assert_refused(out: &CmdOutput, needles: &[&str]) {
    out.assert_code(2);
    for needle in needles {
        assert!(out.stderr.contains(needle), "missing {needle:?}\n{out}");
    }
    assert!(!out.stderr.contains("panicked"), "{out}");
}

#[test]
fn a_second_certd_on_one_state_directory_is_refused_naming_the_holder() {
    let env = TestEnv::new();
    env.write_config(CERT);
    let mut daemon = env.command().arg("run").spawn();
    daemon.wait_for_file(&env.cert_dir().join("s/cert.pem"), Duration::from_secs(60));
    daemon.wait_for_output("certd running", Duration::from_secs(60));
    let before = snapshot(&env.cert_dir());
    let holder = format!("PID {}", daemon.pid());
    let lock = env.state_dir().join("certd.lock");
    let lock = lock.to_str().expect("UTF-8 path");

    let second = env
        .command()
        .arg("run")
        .timeout(Duration::from_secs(60))
        .output();
    assert_refused(&second, &["in use by another certd", &holder, lock]);
    // One-shot writers hand their work to the daemon instead (see
    // tests/control.rs): no second writer, no refusal.
    for args in [
        &["reap", "--older-than", "0s"][..],
        &["authz", "deactivate", "--all-pending"],
    ] {
        let out = env.certd(args);
        out.assert_success();
        assert!(!out.stderr.contains("in use by another certd"), "{out}");
    }
    daemon.wait_for_output("control socket: running a command", Duration::from_secs(10));
    // Readers work alongside the daemon.
    let status: serde_json::Value =
        serde_json::from_str(&env.certd(&["status", "--json"]).assert_success().stdout)
            .expect("status --json");
    assert_eq!(status[0]["name"], "s", "{status}");
    env.certd(&["authz", "list"]).assert_success();
    env.certd(&["reap", "--older-than", "0s", "--dry-run"])
        .assert_success();

    assert!(daemon.is_running(), "the first daemon runs on");
    let out = daemon.terminate();
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(
        snapshot(&env.cert_dir()),
        before,
        "installed files untouched"
    );
    assert_eq!(integrity(&env), "ok");
    // The lock went with the daemon.
    env.certd(&["renew"]).assert_success();
}

#[test]
fn a_corrupt_ledger_is_refused_with_the_way_out() {
    let env = TestEnv::new();
    env.write_config(CERT);
    env.certd(&["renew"]).assert_success();
    let first = installed(&env, "s").1;
    let before = snapshot(&env.cert_dir());
    checkpoint(&env);
    let db = db_path(&env);
    let db_text = db.to_str().expect("UTF-8 path");
    let sound = fs::read(&db).expect("ledger");

    // Its header overwritten, and cut to half its length.
    let mut garbled = sound.clone();
    garbled[..32].copy_from_slice(b"this is not an SQLite database!!");
    let truncated = sound[..sound.len() / 2].to_vec();
    for (what, bytes) in [("overwritten", garbled), ("truncated", truncated)] {
        fs::write(&db, &bytes).expect("damage the ledger");
        for args in [&["renew", "--force"][..], &["run"]] {
            let out = env
                .command()
                .args(args)
                .timeout(Duration::from_secs(60))
                .output();
            assert_refused(
                &out,
                &[
                    db_text,
                    "is corrupt",
                    "move the file aside",
                    "pending authorizations",
                ],
            );
            assert_eq!(
                snapshot(&env.cert_dir()),
                before,
                "{what}: installed files untouched"
            );
            assert_eq!(
                fs::read(&db).expect("ledger"),
                bytes,
                "{what}: left as it was"
            );
        }
    }

    // The way out the message gives: move it aside, start afresh.
    fs::rename(&db, env.state_dir().join("certd.db.corrupt")).expect("move aside");
    env.certd(&["renew", "--force"]).assert_success();
    assert_ne!(installed(&env, "s").1, first, "renewed on a fresh ledger");
    assert_eq!(integrity(&env), "ok");
}

#[test]
fn a_full_or_read_only_state_directory_is_a_clear_error_and_loses_nothing() {
    let env = TestEnv::new();
    env.write_config(CERT);
    let disk = TinyDisk::mount(&env.state_dir(), "1m");
    env.certd(&["renew"]).assert_success();
    let first = installed(&env, "s").1;
    let before = snapshot(&env.cert_dir());
    let state = env.state_dir();
    let state_text = state.to_str().expect("UTF-8 path");

    // Full.
    let filler = disk.fill();
    for args in [&["renew", "--force"][..], &["run"]] {
        let out = env
            .command()
            .args(args)
            .timeout(Duration::from_secs(60))
            .output();
        assert_refused(&out, &[state_text, "No space left on device"]);
        assert_eq!(
            snapshot(&env.cert_dir()),
            before,
            "full: installed files untouched"
        );
    }

    // Read-only.
    fs::remove_file(&filler).expect("free the space");
    disk.remount("ro");
    for args in [&["renew", "--force"][..], &["run"]] {
        let out = env
            .command()
            .args(args)
            .timeout(Duration::from_secs(60))
            .output();
        assert_refused(&out, &[state_text, "Read-only file system"]);
        assert_eq!(
            snapshot(&env.cert_dir()),
            before,
            "read-only: installed files untouched"
        );
    }

    // Writable again: the next attempt works, on a sound ledger.
    disk.remount("rw");
    assert_eq!(integrity(&env), "ok");
    env.certd(&["renew", "--force"]).assert_success();
    assert_ne!(installed(&env, "s").1, first);
    assert_eq!(integrity(&env), "ok");
}

#[test]
fn a_ledger_deleted_under_the_daemon_stops_it_with_exit_2() {
    let env = TestEnv::new();
    env.write_config(CERT);
    let mut daemon = env
        .command()
        .arg("run")
        .timeout(Duration::from_secs(60))
        .spawn();
    daemon.wait_for_file(&env.cert_dir().join("s/cert.pem"), Duration::from_secs(60));
    daemon.wait_for_output("certd running", Duration::from_secs(60));
    // The install's ledger write may trail the file by a moment.
    daemon.wait_for_output("renewed", Duration::from_secs(60));
    let before = snapshot(&env.cert_dir());
    let db = db_path(&env);

    fs::remove_file(&db).expect("delete the ledger");
    let out = daemon.wait();
    assert_refused(
        &out,
        &[
            db.to_str().expect("UTF-8 path"),
            "deleted or replaced while certd was running",
        ],
    );
    assert_eq!(
        snapshot(&env.cert_dir()),
        before,
        "installed files untouched"
    );

    // The next run finds the certificate valid and leaves it be.
    env.certd(&["renew"]).assert_success();
    assert_eq!(snapshot(&env.cert_dir()), before);
}

#[test]
fn a_disk_filling_under_the_daemon_fails_orders_and_retries_without_exiting() {
    let env = TestEnv::new();
    let daemon_toml =
        "[daemon]\nbackoff_min = \"1s\"\nbackoff_max = \"2s\"\nshutdown_grace = \"10s\"\n";
    env.write_config(&format!("{daemon_toml}{CERT}"));
    let disk = TinyDisk::mount(&env.state_dir(), "1m");
    let mut daemon = env.command().arg("run").spawn();
    daemon.wait_for_file(&env.cert_dir().join("s/cert.pem"), Duration::from_secs(60));
    daemon.wait_for_output("renewed", Duration::from_secs(60));
    let before = snapshot(&env.cert_dir().join("s"));

    // Full; a new certificate is added meanwhile.
    let filler = disk.fill();
    env.write_config(&format!(
        "{daemon_toml}{CERT}\n[[certificate]]\nname = \"t\"\ndomains = [\"t.example.test\"]\n"
    ));
    // Failed, retried, failed again: the daemon goes on.
    let deadline = Instant::now() + Duration::from_secs(60);
    while daemon.stderr().matches("renewal failed").count() < 2 {
        assert!(
            Instant::now() < deadline && daemon.is_running(),
            "expected two failed attempts of a running daemon\n{}",
            daemon.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        daemon.stderr().contains("database or disk is full"),
        "{}",
        daemon.stderr()
    );
    assert!(daemon.is_running());
    assert_eq!(
        snapshot(&env.cert_dir().join("s")),
        before,
        "installed files untouched"
    );

    // Space back: the next retry issues it.
    fs::remove_file(&filler).expect("free the space");
    daemon.wait_for_file(&env.cert_dir().join("t/cert.pem"), Duration::from_secs(60));
    let out = daemon.terminate();
    assert_eq!(out.code(), Some(0), "{out}");
    installed(&env, "t");
    assert_eq!(snapshot(&env.cert_dir().join("s")), before);
    assert_eq!(integrity(&env), "ok");
}
