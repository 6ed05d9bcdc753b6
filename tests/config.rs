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

/// A DNS label may not start or end with a hyphen, wherever a name is
/// read: a certificate's domain, and the zone of a `dns_alias` (one rule
/// for both; the zone took `validation-.example.net` before).
#[test]
fn a_label_ending_with_a_hyphen_is_refused() {
    assert_error(
        &BASE.replace("\"example.test\"", "\"example-.com\""),
        13,
        "certificate[0].domains[0]",
        "\"example-.com\" is not a valid domain name",
    );
    assert_error(
        &BASE.replace("\"example.test\"", "\"-example.com\""),
        13,
        "certificate[0].domains[0]",
        "not a valid domain name",
    );
    let alias = |zone: &str| {
        format!(
            "{}challenges = [\"dns-01\"]\ndns_alias = \"{zone}\"\n",
            BASE.replace(
                "[[certificate]]",
                "[dns01]\nhook = \"/bin/true\"\n\n[[certificate]]"
            )
        )
    };
    assert_error(
        &alias("validation-.example.net"),
        18,
        "certificate[0].dns_alias",
        "\"validation-.example.net\" is not a valid DNS name",
    );
    let (code, stderr, _, _dir) = check(&alias("validation.example.net"));
    assert_eq!(code, Some(0), "{stderr}");
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

/// The examples README's first steps show, each also a file in `examples/`.
const QUICK_START: [&str; 2] = ["nginx-webroot.toml", "standalone.toml"];

#[test]
fn every_example_config_is_valid() {
    // What an operator copies must work: every ```toml block of the README
    // and every file in examples/ passes `certd check-config`.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = fs::read_to_string(root.join("README.md")).expect("read README.md");
    let blocks = toml_blocks(&readme);
    assert!(
        blocks.len() >= QUICK_START.len(),
        "README.md has {} ```toml blocks",
        blocks.len()
    );
    let mut examples: Vec<(String, String)> = fs::read_dir(root.join("examples"))
        .expect("read examples/")
        .map(|entry| entry.expect("examples/ entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .map(|path| {
            let text = fs::read_to_string(&path).expect("read example");
            (path.display().to_string(), text)
        })
        .collect();
    examples.sort();
    for name in QUICK_START {
        assert!(
            examples.iter().any(|(path, _)| path.ends_with(name)),
            "examples/{name} is missing"
        );
    }
    let from_readme = blocks
        .iter()
        .enumerate()
        .map(|(i, text)| (format!("README.md ```toml block {}", i + 1), text.clone()));
    for (origin, text) in examples.iter().cloned().chain(from_readme) {
        let dir = tempfile::tempdir().expect("tempdir");
        // One level down, as in the repository, so that a path relative to
        // the file (`../target/demo/…`) stays inside the temporary directory.
        let path = dir.path().join("examples").join("certd.toml");
        fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
        fs::write(&path, &text).expect("write config");
        provide_named_files(&path, &text, &origin);
        let out = TestCommand::new(&path).arg("check-config").output();
        assert_eq!(out.code(), Some(0), "{origin}: {out:?}");
        assert!(out.stdout.contains("OK, "), "{origin}: {}", out.stdout);
    }

    // The README shows the quick-start files as they are (comments aside),
    // and the polkit rule generated from each allows its reload command.
    for (name, unit) in QUICK_START
        .into_iter()
        .zip(["nginx.service", "haproxy.service"])
    {
        let (path, text) = examples
            .iter()
            .find(|(path, _)| path.ends_with(name))
            .expect("checked above");
        assert!(
            blocks.iter().any(|block| settings(block) == settings(text)),
            "README.md shows no ```toml block with the settings of examples/{name}"
        );
        let out = TestCommand::new(std::path::Path::new(path))
            .arg("polkit-rule")
            .output();
        out.assert_success();
        assert!(
            out.stdout.contains(&format!("\"{unit}\"")),
            "{name}: {}",
            out.stdout
        );
    }
}

/// The contents of every fenced ```toml block in `markdown`.
fn toml_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match current.as_mut() {
            None if line.trim_start() == "```toml" => current = Some(String::new()),
            None => {}
            Some(_) if line.trim_start() == "```" => blocks.extend(current.take()),
            Some(block) => {
                block.push_str(line);
                block.push('\n');
            }
        }
    }
    assert!(current.is_none(), "an unclosed ```toml block");
    blocks
}

/// A config's lines without comments and blank lines.
fn settings(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .collect()
}

/// Creates the files `text` names by relative path that validation reads:
/// a CA bundle (a PEM certificate) and secret files (0600). An absolute
/// path must exist already: an example should not name one.
fn provide_named_files(config: &std::path::Path, text: &str, origin: &str) {
    let table: toml::Table = text
        .parse()
        .unwrap_or_else(|e| panic!("{origin}: not TOML: {e}"));
    let get = |section: &[&str], key: &str| {
        let mut at = &table;
        for name in section {
            at = at.get(*name)?.as_table()?;
        }
        at.get(key)?.as_str().map(str::to_owned)
    };
    let dir = config.parent().expect("a parent");
    let bundle = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
        .expect("a self-signed certificate")
        .cert
        .pem();
    let named = [
        (get(&["acme"], "ca_bundle"), bundle.as_str(), 0o644),
        (get(&["acme"], "eab_hmac_key_file"), "c2VjcmV0", 0o600),
        (
            get(&["dns01", "rfc2136"], "secret_file"),
            "c2VjcmV0\n",
            0o600,
        ),
    ];
    for (value, content, mode) in named {
        let Some(value) = value else { continue };
        let file = std::path::Path::new(&value);
        assert!(
            file.is_relative() || file.exists(),
            "{origin}: names {value}, which does not exist here"
        );
        if file.is_relative() {
            let file = dir.join(file);
            fs::create_dir_all(file.parent().expect("a parent")).expect("mkdir");
            fs::write(&file, content).expect("write named file");
            fs::set_permissions(&file, fs::Permissions::from_mode(mode)).expect("chmod");
        }
    }
}

/// A profile of the wrong type, and an address only dns-01 would validate:
/// each names the file, line and key.
#[test]
fn profile_and_ip_errors_name_file_line_and_key() {
    assert_error(
        &format!("{BASE}profile = 5\n"),
        14,
        "certificate[0].profile",
        "a profile name or a list of them",
    );
    assert_error(
        &format!("{BASE}profile = [\"tlsserver\", 5]\n"),
        14,
        "certificate[0].profile",
        "expected a quoted string, found the number 5",
    );
    assert_error(
        &format!("{BASE}profile = []\n"),
        14,
        "certificate[0].profile",
        "empty list",
    );
    assert_error(
        &format!("{BASE}profile_required = true\n"),
        14,
        "certificate[0].profile_required",
        "no `profile` is set",
    );
    let dns01 = "[dns01]\nhook = \"/bin/true\"\n\n";
    assert_error(
        &format!(
            "{}challenges = [\"dns-01\"]\n",
            BASE.replace("[[certificate]]", &format!("{dns01}[[certificate]]"))
                .replace("\"example.test\"", "\"192.0.2.1\"")
        ),
        17,
        "certificate[0].challenges",
        "\"192.0.2.1\", which dns-01 cannot validate",
    );
    assert_error(
        &BASE.replace("\"example.test\"", "\"fe80::1%eth0\""),
        13,
        "certificate[0].domains[0]",
        "zone index",
    );
    assert_error(
        &BASE.replace("\"example.test\"", "\"192.0.2\""),
        13,
        "certificate[0].domains[0]",
        "neither an IP address nor a domain name",
    );
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
        "\"example.test\" is also in certificate \"www\" with the same key type: a name belongs in one certificate per key type",
    );
    // An RSA certificate beside the ECDSA one is the usual dual setup.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("c.toml");
    fs::write(
        &path,
        format!(
            "{BASE}\n[[certificate]]\nname = \"www-rsa\"\ndomains = [\"example.test\"]\nkey_type = \"rsa-2048\"\n"
        ),
    )
    .expect("write");
    TestCommand::new(&path)
        .arg("check-config")
        .output()
        .assert_success();
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

/// Parsing reads no directory: a webroot that does not exist yet passes
/// `check-config`, and nothing, not even a failed `renew`, creates it.
/// Before an order, certd refuses it with the path and the fix
/// (`preorder::an_order_that_cannot_complete_is_never_placed`).
#[test]
fn a_missing_webroot_is_not_created() {
    let text = BASE.replace("listen = \"127.0.0.1:5002\"", "webroot = \"www-typo\"");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("c.toml");
    fs::write(&path, &text).expect("write");
    let webroot = dir.path().join("www-typo");
    TestCommand::new(&path)
        .arg("check-config")
        .output()
        .assert_success();
    let out = TestCommand::new(&path).arg("renew").output();
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(
        !webroot.exists(),
        "nothing is created for a missing webroot"
    );
}

/// The CAs of a configuration with several: each mistake names the file,
/// line and key, exits 2 and creates nothing.
#[test]
fn several_cas_errors_name_file_line_and_key() {
    let storage = "[storage]\nstate_dir = \"state\"\ncert_dir = \"certs\"\n\n[http01]\nlisten = \"127.0.0.1:5002\"\n";
    let cert = "[[certificate]]\nname = \"www\"\ndomains = [\"example.test\"]\n";
    let two = format!("[ca.letsencrypt]\n\n[ca.buypass]\n\n{storage}\n{cert}");
    // Both CAs named, in order: valid.
    let (code, stderr, _, _dir) = check(&format!("{two}ca = [\"buypass\", \"letsencrypt\"]\n"));
    assert_eq!(code, Some(0), "{stderr}");
    // An unknown CA name in a certificate.
    assert_error(
        &format!("{two}ca = [\"letsencrypt\", \"zerossl\"]\n"),
        15,
        "certificate[0].ca[1]",
        "no CA is named \"zerossl\"",
    );
    // An empty list.
    assert_error(
        &format!("{two}ca = []\n"),
        15,
        "certificate[0].ca",
        "an empty list",
    );
    // Several CAs, none `default`, and no `ca`.
    assert_error(
        &two,
        13,
        "certificate[0].ca",
        "ca = [\"letsencrypt\", \"buypass\"]",
    );
    // A preset that needs EAB, without EAB: by name and by `preset`.
    assert_error(
        &format!("[ca.zerossl]\n\n{storage}\n{cert}"),
        1,
        "ca.zerossl",
        "zerossl requires External Account Binding: set eab_kid and eab_hmac_key_file",
    );
    assert_error(
        &format!("[ca.gts]\npreset = \"google\"\n\n{storage}\n{cert}"),
        2,
        "ca.gts.preset",
        "google requires External Account Binding",
    );
    // A duplicate CA name: [acme] is `default`.
    assert_error(
        &format!("{BASE}\n[ca.default]\npreset = \"buypass\"\n"),
        15,
        "ca.default",
        "[ca.default] and [acme] both define the CA named \"default\"",
    );
    // The same table twice is TOML's error, at the second.
    let (code, stderr, path, _dir) = check(&format!(
        "[ca.buypass]\n\n[ca.buypass]\n\n{storage}\n{cert}"
    ));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains(&format!("{path}:3:")), "{stderr}");
    assert!(stderr.contains("ca.buypass"), "{stderr}");
    // Two CAs with one directory: one account, so one CA.
    assert_error(
        &format!(
            "[ca.letsencrypt]\n\n[ca.le]\ndirectory = \"https://acme-v02.api.letsencrypt.org/directory\"\n\n{storage}\n{cert}"
        ),
        3,
        "ca.le",
        "same directory as [ca.letsencrypt]",
    );
    // No CA at all, even with an empty [ca] table.
    for text in [
        format!("{storage}\n{cert}"),
        format!("[ca]\n\n{storage}\n{cert}"),
    ] {
        let (code, stderr, path, dir) = check(&text);
        assert_eq!(code, Some(2), "{stderr}");
        assert_eq!(
            stderr,
            format!("certd: {path}:1:1: (top level): the [acme] section is missing\n")
        );
        assert!(!dir.path().join("state").exists());
    }
}

/// `[acme]` beside `[ca.<name>]` tables: the certificates without `ca` use
/// `default`, and `check-config` accepts each way of naming a CA.
#[test]
fn acme_beside_ca_tables_is_the_default() {
    let text = format!(
        "{BASE}\n[[certificate]]\nname = \"api\"\ndomains = [\"api.test\"]\nca = [\"buypass\", \"default\"]\nca_fallback_after = \"30m\"\nsticky = true\n\n[ca.buypass]\nmax_pending = 20\n\n[ca.private]\ndirectory = \"https://ca.test/dir\"\nnew_orders_per_3h = 10\n\n[daemon]\nca_fallback_after = \"2h\"\n"
    );
    let (code, stderr, _, _dir) = check(&text);
    assert_eq!(code, Some(0), "{stderr}");
    assert_error(
        &text.replace("sticky = true", "sticky = \"yes\""),
        20,
        "certificate[1].sticky",
        "expected true or false",
    );
    assert_error(
        &text.replace("max_pending = 20", "max_pending = -1"),
        23,
        "ca.buypass.max_pending",
        "whole number from 1",
    );
    assert_error(
        &text.replace(
            "ca_fallback_after = \"2h\"",
            "ca_fallback_after = \"2 hours\"",
        ),
        30,
        "daemon.ca_fallback_after",
        "invalid duration",
    );
}
