//! A controllable dns-01 hook for tests that need certd to stop, hang or
//! fail at a known point of an order.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use super::TestEnv;

/// Wraps the dns-01 hook: while `<dir>/block` exists, `present` announces
/// itself in `<dir>/presenting` and hangs, so a test can kill certd after
/// `newOrder` and before any challenge is answered; `<dir>/fail` makes the
/// hook fail; otherwise it publishes the record as usual.
pub fn install_hook_wrapper(env: &TestEnv) {
    let hook = env.dns_hook_path();
    let real = env.dir().join("real-hook.sh");
    fs::rename(&hook, &real).expect("move hook");
    let dir = env.dir().display();
    let script = format!(
        "#!/bin/sh\n\
         if [ -e '{dir}/fail' ]; then echo 'DNS provider API unreachable' >&2; exit 1; fi\n\
         if [ \"$1\" = present ] && [ -e '{dir}/block' ]; then touch '{dir}/presenting'; sleep 60; fi\n\
         if [ \"$1\" = present ] && [ -e '{dir}/slow' ]; then sleep 1; fi\n\
         exec '{real}' \"$@\"\n",
        real = real.display()
    );
    fs::write(&hook, script).expect("write hook");
    fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).expect("chmod hook");
}

pub fn flag(env: &TestEnv, name: &str, on: bool) {
    let path = env.dir().join(name);
    if on {
        fs::write(path, "").expect("set flag");
    } else {
        let _ = fs::remove_file(path);
    }
}

pub fn wait_for(path: &Path, timeout: Duration) {
    let start = Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < timeout,
            "{} did not appear",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
