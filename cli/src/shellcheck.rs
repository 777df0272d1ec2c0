//! Test-only: shellcheck over the scripts attache runs on hosts, so that the
//! deploy's and the pull setup's tests share one runner.

/// shellcheck's findings on `script` read as POSIX sh, with `extra`
/// arguments (severity, exclusions); none when it passes, or when
/// shellcheck is not installed (CI installs it).
pub fn findings(script: &str, extra: &[&str]) -> Option<String> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let out = Command::new("shellcheck")
        .args(["-s", "sh"])
        .args(extra)
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(script.as_bytes())?;
            c.wait_with_output()
        })
        .ok()?;
    (!out.status.success()).then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}
