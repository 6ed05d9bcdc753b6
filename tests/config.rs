//! Configuration errors: every one names the file, the line and the key,
//! and exits with status 2 before anything is touched.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use crate::util::TestCommand;

const BASE: &str = r#"[acme]
directory = "https://127.0.0.1:14000/dir"

[storage]
state_dir = "state"
cert_dir = "certs"

[http01]
listen = "127.0.0.1:5002"

[[certificate]]
name = "www"
domains = ["example.test"]
"#;

/// Runs `certd check-config` on `text`; returns (exit code, stderr, path).
fn check(text: &str) -> (Option<i32>, String, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("certd.toml");
    fs::write(&path, text).expect("write config");
    let out = TestCommand::new(&path).arg("check-config").output();
    (out.code(), out.stderr, path.display().to_string(), dir)
}

fn assert_error(text: &str, line: usize, key: &str, needle: &str) {
    let (code, stderr, path, dir) = check(text);
    assert_eq!(code, Some(2), "{stderr}");
    let located = format!("{path}:{line}:");
    assert!(stderr.contains(&located), "expected {located} in {stderr}");
    assert!(
        stderr.contains(&format!(" {key}: ")),
        "expected key {key} in {stderr}"
    );
    assert!(stderr.contains(needle), "expected {needle:?} in {stderr}");
    // A rejected config creates nothing.
    assert!(!dir.path().join("state").exists());
}

#[test]
fn valid_config_is_summarized() {
    let (code, stderr, _, _dir) = check(BASE);
    assert_eq!(code, Some(0), "{stderr}");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("c.toml");
    fs::write(&path, BASE).expect("write");
    let out = TestCommand::new(&path).arg("check-config").output();
    out.assert_success();
    assert!(
        out.stdout.contains("OK, 1 certificate(s)"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("www: example.test (ecdsa-p256, http-01)"),
        "{}",
        out.stdout
    );
}

#[test]
fn errors_name_file_line_and_key() {
    assert_error(
        &format!("{BASE}keytype = \"rsa-2048\"\n"),
        14,
        "certificate[0].keytype",
        "unknown field `keytype`",
    );
    assert_error(
        &BASE.replace("\"example.test\"", "\"exa mple.test\""),
        13,
        "certificate[0].domains[0]",
        "not a valid domain name",
    );
    assert_error(
        &BASE.replace("\"example.test\"", ""),
        13,
        "certificate[0].domains",
        "at least one domain",
    );
    assert_error(
        &format!("{BASE}\n[[certificate]]\nname = \"www\"\ndomains = [\"b.test\"]\n"),
        16,
        "certificate[1].name",
        "duplicate certificate name",
    );
    assert_error(
        &BASE.replace("https://127.0.0.1:14000/dir", "not a url"),
        2,
        "acme.directory",
        "not a URL",
    );
    assert_error(
        &BASE.replace("[acme]\n", "[acme]\nca_bundle = \"/nonexistent/ca.pem\"\n"),
        2,
        "acme.ca_bundle",
        "cannot read",
    );
    assert_error(
        &format!("{BASE}key_type = 5\n"),
        14,
        "certificate[0].key_type",
        "expected a quoted string, found the number 5",
    );
    assert_error(
        &BASE.replace("listen = \"127.0.0.1:5002\"", "listen = \"localhost\""),
        9,
        "http01.listen",
        "socket address",
    );
}

#[test]
fn unreadable_file_and_unknown_names_are_usage_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing.toml");
    let out = TestCommand::new(&missing).arg("check-config").output();
    assert_eq!(out.code(), Some(2));
    assert!(
        out.stderr.contains("missing.toml") && out.stderr.contains("cannot read"),
        "{}",
        out.stderr
    );

    let path = dir.path().join("c.toml");
    fs::write(&path, BASE).expect("write");
    let out = TestCommand::new(&path).args(["renew", "nope"]).output();
    assert_eq!(out.code(), Some(2));
    assert!(
        out.stderr.contains("no certificate named \"nope\""),
        "{}",
        out.stderr
    );
    let out = TestCommand::new(&path).args(["renew", "--bogus"]).output();
    assert_eq!(out.code(), Some(2), "clap usage errors exit 2");
}

#[test]
fn example_config_is_valid() {
    // config.example.toml documents every key; parsing it keeps it honest.
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
    let out = TestCommand::new(&path).arg("check-config").output();
    out.assert_success();
    assert!(
        out.stdout.contains("www: example.com, www.example.com"),
        "{}",
        out.stdout
    );
}

#[test]
fn example_config_dns01_keys_are_valid_in_both_modes() {
    // The example leaves [dns01] commented out (a real hook or secret file
    // is needed); uncommented, each mode must parse, so its keys stay honest.
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
    let text = fs::read_to_string(&path).expect("read example");
    let start = text.find("# [dns01]\n").expect("dns01 block");
    let end = start + text[start..].find("\n[").expect("a table after dns01");
    let live = |line: &str| {
        line.strip_prefix("# ")
            .filter(|rest| {
                rest.starts_with("[dns01")
                    || rest
                        .split_once(" = ")
                        .is_some_and(|(k, _)| k.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
            })
            .unwrap_or(line)
            .to_owned()
    };
    let block: Vec<String> = text[start..end].lines().map(live).collect();

    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("tsig.key");
    fs::write(&secret, "c2VjcmV0\n").expect("secret");
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).expect("chmod");
    let rfc_at = block
        .iter()
        .position(|l| l == "[dns01.rfc2136]")
        .expect("rfc2136 table");
    let hook_mode = block[..rfc_at].join("\n");
    let rfc_mode = block
        .iter()
        .filter(|l| !l.starts_with("hook = "))
        .map(|l| {
            if l.starts_with("secret_file = ") {
                format!("secret_file = {:?}", secret.display().to_string())
            } else {
                l.clone()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    for (mode, dns01) in [("hook", hook_mode), ("rfc2136", rfc_mode)] {
        assert!(dns01.contains("\npropagation_timeout = "), "{dns01}");
        let config = format!("{}{dns01}\n{}", &text[..start], &text[end..]);
        let file = dir.path().join(format!("{mode}.toml"));
        fs::write(&file, config).expect("write");
        let out = TestCommand::new(&file).arg("check-config").output();
        assert_eq!(out.code(), Some(0), "{mode}: {out:?}\n{dns01}");
    }
}

/// serde's wording ("invalid type: map, expected a sequence") is said in
/// the file's terms, with the fix, at the right key.
#[test]
fn type_errors_are_worded_for_the_file() {
    assert_error(
        &BASE.replace("[[certificate]]", "[certificate]"),
        11,
        "certificate",
        "`[certificate]` must be written `[[certificate]]` (double brackets)",
    );
    assert_error(
        &BASE.replace("[\"example.test\"]", "\"example.test\""),
        13,
        "certificate[0].domains",
        "expected a list in brackets, like [\"a\", \"b\"], found the string \"example.test\"",
    );
    assert_error(
        &format!("{BASE}\n[reaper]\nmax_pending = \"many\"\n"),
        16,
        "reaper.max_pending",
        "expected a whole number, found the string \"many\"",
    );
    // Not `certificate][0]`: a header that lacks a bracket is located at
    // the table it opens.
    assert_error(
        &format!("{BASE}\n[[certificate]\nname = \"api\"\n"),
        15,
        "certificate[1]",
        "unclosed array table",
    );
    // Not `certificate[0]: missing field acme`: the section is missing
    // from the file.
    let (code, stderr, path, _dir) =
        check(&BASE.replace("[acme]\ndirectory = \"https://127.0.0.1:14000/dir\"\n", ""));
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(
        stderr,
        format!("certd: {path}:1:1: (top level): the [acme] section is missing\n")
    );
}

/// A name in two certificates is refused, naming both.
#[test]
fn a_name_in_two_certificates_is_refused() {
    assert_error(
        &format!(
            "{BASE}\n[[certificate]]\nname = \"api\"\ndomains = [\"api.test\", \"EXAMPLE.test.\"]\n"
        ),
        17,
        "certificate[1].domains[1]",
        "\"example.test\" is also in certificate \"www\": a name belongs in one certificate",
    );
}

/// Non-ASCII names are taken and ordered in Punycode; a name IDNA refuses
/// says what to write instead.
#[test]
fn internationalized_names_become_punycode() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("c.toml");
    fs::write(&path, BASE.replace("example.test", "Bücher.example.test")).expect("write");
    let out = TestCommand::new(&path).arg("check-config").output();
    out.assert_success();
    assert!(
        out.stdout
            .contains("www: xn--bcher-kva.example.test (ecdsa-p256, http-01)"),
        "{}",
        out.stdout
    );
    assert_error(
        &BASE.replace("example.test", "b\u{00fc}cher\u{200d}x.-example.test"),
        13,
        "certificate[0].domains[0]",
        "write it in Punycode",
    );
}

/// A webroot that does not exist is a configuration error, and nothing is
/// created for it.
#[test]
fn a_missing_webroot_is_refused() {
    let text = BASE.replace("listen = \"127.0.0.1:5002\"", "webroot = \"www-typo\"");
    assert_error(&text, 8, "http01.webroot", "www-typo is not a directory");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("c.toml");
    fs::write(&path, &text).expect("write");
    assert_eq!(
        TestCommand::new(&path).arg("renew").output().code(),
        Some(2)
    );
    assert!(!dir.path().join("www-typo").exists());
    // Once it exists, the configuration is good.
    fs::create_dir(dir.path().join("www-typo")).expect("mkdir");
    TestCommand::new(&path)
        .arg("check-config")
        .output()
        .assert_success();
}
