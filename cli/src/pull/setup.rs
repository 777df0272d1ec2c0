//! What `attache deploy` sets up on a pull host over SSH, instead of
//! pushing images: the agent executable, its config, the key it verifies
//! `SHA256SUMS.sig` with, and the service and timer that run it. Only
//! files whose content differs are written.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{
    Config, ServiceConfig, State, AGENT, ALLOWED_SIGNERS, CONFIG, SERVICE_UNIT, SIGNER, STATE,
    TIMER_UNIT,
};
use crate::inventory::{Host, Pull};
use crate::remote::{q, Remote};

/// What the host gets, besides the agent.
pub fn config(host: &Host, pull: &Pull, settle: u64, keep: usize, rollback_after: u64) -> Config {
    Config {
        host: host.name.clone(),
        url: pull.url.trim_end_matches('/').to_owned(),
        public_key: pull.public_key.clone(),
        insecure_unsigned: pull.insecure_unsigned,
        services: host
            .services
            .iter()
            .map(|s| ServiceConfig {
                name: s.name.clone(),
                checks: host.checks.get(&s.name).cloned().unwrap_or_default(),
            })
            .collect(),
        settle,
        keep,
        profile: host.profile.clone(),
        rollback_after,
    }
}

/// The files deploy writes, as `(path, content)`. The timer counts from
/// the agent's last run; `OnActiveSec` gives it a first run on a host set
/// up long after boot, where `OnBootSec` has passed and the service has not
/// run yet (the timer would otherwise wait for the next boot).
pub fn files(cfg: &Config, interval: &str) -> Vec<(String, Vec<u8>)> {
    let mut v = vec![(
        CONFIG.to_owned(),
        serde_json::to_vec_pretty(cfg).unwrap_or_default(),
    )];
    if let Some(key) = &cfg.public_key {
        v.push((
            ALLOWED_SIGNERS.to_owned(),
            format!("{SIGNER} namespaces=\"{SIGNER}\" {}\n", key.trim()).into_bytes(),
        ));
    }
    v.push((
        format!("/etc/systemd/system/{SERVICE_UNIT}"),
        format!(
            "[Unit]\nDescription=attache: fetch, verify and switch to the newest published images\nAfter=network-online.target\nWants=network-online.target\n\n[Service]\nType=oneshot\nExecStart={AGENT} agent --config {CONFIG}\n"
        )
        .into_bytes(),
    ));
    v.push((
        format!("/etc/systemd/system/{TIMER_UNIT}"),
        format!(
            "[Unit]\nDescription=attache: look for newer published images every {interval}\n\n[Timer]\nOnBootSec=1min\nOnActiveSec=1min\nOnUnitInactiveSec={interval}\nRandomizedDelaySec={}\n\n[Install]\nWantedBy=timers.target\n",
            tenth(interval)
        )
        .into_bytes(),
    ));
    v
}

/// A tenth of a systemd time span, in seconds (the timer's spread).
fn tenth(interval: &str) -> String {
    let secs: u64 = interval
        .split_whitespace()
        .map(|w| {
            let split = w.find(|c: char| !c.is_ascii_digit()).unwrap_or(w.len());
            let n: u64 = w[..split].parse().unwrap_or(0);
            n * match &w[split..] {
                "" | "s" | "sec" | "second" | "seconds" => 1,
                "m" | "min" | "minute" | "minutes" => 60,
                "h" | "hr" | "hour" | "hours" => 3600,
                "d" | "day" | "days" => 86400,
                "w" | "week" | "weeks" => 604800,
                _ => 0,
            }
        })
        .sum();
    format!("{}s", (secs / 10).max(1))
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// The executable the host runs as its agent: this attache when it is
/// statically linked, else `ATTACHE_AGENT`.
pub fn agent_executable() -> Result<PathBuf, String> {
    let how = "build a static attache with `RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --release --target x86_64-unknown-linux-gnu` and pass it as ATTACHE_AGENT=PATH";
    if let Some(p) = std::env::var_os("ATTACHE_AGENT") {
        let p = PathBuf::from(p);
        return match elf(&p) {
            Some((_, false)) => Ok(p),
            Some((_, true)) => Err(format!(
                "ATTACHE_AGENT={} is dynamically linked, and a pull host may lack its libraries: {how}",
                p.display()
            )),
            None => Err(format!(
                "ATTACHE_AGENT={} is not a 64-bit ELF executable: {how}",
                p.display()
            )),
        };
    }
    let me =
        std::env::current_exe().map_err(|e| format!("cannot find this attache ({e}): {how}"))?;
    match elf(&me) {
        Some((_, false)) => Ok(me),
        _ => Err(format!(
            "this attache is dynamically linked, and a pull host runs attache itself: {how}"
        )),
    }
}

/// An ELF file's machine as `uname -m` says it, and whether it asks for an
/// interpreter (a `PT_INTERP` program header: dynamically linked).
pub fn elf(path: &Path) -> Option<(&'static str, bool)> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).ok()?;
    let mut h = [0u8; 64];
    f.read_exact(&mut h).ok()?;
    // 64-bit little-endian only.
    if &h[..4] != b"\x7fELF" || h[4] != 2 || h[5] != 1 {
        return None;
    }
    let u16_at = |o: usize| u16::from_le_bytes([h[o], h[o + 1]]);
    let machine = match u16_at(0x12) {
        0x3e => "x86_64",
        0xb7 => "aarch64",
        0xf3 => "riscv64",
        _ => "unknown",
    };
    let phoff = u64::from_le_bytes(h[0x20..0x28].try_into().ok()?);
    let (entsize, count) = (u64::from(u16_at(0x36)), u64::from(u16_at(0x38)));
    let mut interp = false;
    for i in 0..count.min(256) {
        f.seek(SeekFrom::Start(phoff + i * entsize)).ok()?;
        let mut t = [0u8; 4];
        f.read_exact(&mut t).ok()?;
        interp |= u32::from_le_bytes(t) == 3;
    }
    Some((machine, interp))
}

/// What the host has now: its machine, the sha256 of each file of the
/// setup (empty when absent), and whether the timer is enabled.
pub fn read_script(paths: &[String]) -> String {
    let mut s = String::from("uname -m\n");
    for p in std::iter::once(AGENT.to_owned()).chain(paths.iter().cloned()) {
        s += &format!(
            "if [ -f {p} ]; then sha256sum < {p} | cut -d' ' -f1; else echo; fi\n",
            p = q(&p)
        );
    }
    s += &format!("systemctl is-enabled {TIMER_UNIT} 2>/dev/null || true\n");
    s
}

/// Receives the agent on stdin under a temporary name; renames it into
/// place only once its sha256 matches and it runs on this host.
fn receive_agent(sha256: &str) -> String {
    format!(
        "set -e; mkdir -p {dir}; rm -f {t}; cat > {t}; chmod 0755 {t}; [ \"$(sha256sum < {t} | cut -d' ' -f1)\" = {sha} ] || {{ rm -f {t}; echo 'the agent arrived damaged (its sha256 differs)' >&2; exit 1; }}; {t} --version >/dev/null || {{ rm -f {t}; echo 'the agent does not run on this host' >&2; exit 1; }}; mv -f {t} {a}",
        dir = q(&parent(AGENT)),
        t = q(&format!("{AGENT}.tmp")),
        a = q(AGENT),
        sha = q(sha256),
    )
}

/// The directory a host path is in.
fn parent(path: &str) -> String {
    Path::new(path)
        .parent()
        .map_or("/".into(), |p| p.display().to_string())
}

/// Writes stdin to `path` through a temporary file beside it.
fn write_file(path: &str) -> String {
    format!(
        "set -e; mkdir -p {d}; cat > {t}; mv -f {t} {p}",
        d = q(&parent(path)),
        t = q(&format!("{path}.tmp")),
        p = q(path)
    )
}

fn enable(reload: bool) -> String {
    let mut s = String::from("set -e\n");
    if reload {
        s += "systemctl daemon-reload\n";
    }
    s + &format!("systemctl enable --now {TIMER_UNIT}\n")
}

/// What [`start_now`] says when the service failed.
const NOW_FAILED: &str = "attache-pull.service failed before it recorded an outcome";

/// The host's clock, then one pull now (the oneshot returns when the
/// agent is done), then the state it wrote; a failed unit is said on
/// stderr.
fn start_now() -> String {
    format!(
        "date +%s; systemctl start {SERVICE_UNIT} >&2 || echo '{NOW_FAILED}' >&2; cat {}",
        q(STATE)
    )
}

/// [`start_now`]'s output: the state, when the run it started wrote it. An
/// agent that died before writing leaves an earlier run's state, whose
/// outcome is not this run's.
fn parse_now(stdout: &str) -> Option<State> {
    let (clock, state) = stdout.split_once('\n')?;
    let started: u64 = clock.trim().parse().ok()?;
    let st: State = serde_json::from_str(state).ok()?;
    (st.checked_at >= started).then_some(st)
}

fn read_state_script() -> String {
    format!("cat {} 2>/dev/null || true", q(STATE))
}

/// What one pull host needs done.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Changes {
    pub agent: bool,
    pub files: Vec<String>,
    pub enable: bool,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        !self.agent && self.files.is_empty() && !self.enable
    }

    pub fn describe(&self) -> String {
        let mut v = Vec::new();
        if self.agent {
            v.push(format!("the agent {AGENT}"));
        }
        v.extend(self.files.iter().cloned());
        if self.enable {
            v.push(format!("enable {TIMER_UNIT}"));
        }
        if v.is_empty() {
            "set up already, nothing to change".into()
        } else {
            v.join(", ")
        }
    }
}

/// Sets up (or, with `dry_run`, only reads) one pull host.
pub async fn set_up(
    remote: &Remote,
    agent: &Path,
    files: &[(String, Vec<u8>)],
    dry_run: bool,
) -> Result<Changes, String> {
    let err = |e: crate::remote::RemoteError| e.to_string();
    let paths: Vec<String> = files.iter().map(|(p, _)| p.clone()).collect();
    let out = remote
        .run(&read_script(&paths), "reading the pull setup")
        .await
        .map_err(err)?;
    if !out.success() {
        return Err(format!("reading the pull setup failed: {}", out.tail()));
    }
    let lines: Vec<&str> = out.stdout.lines().map(str::trim).collect();
    let machine = lines.first().copied().unwrap_or_default();
    let bytes = std::fs::read(agent).map_err(|e| format!("reading {}: {e}", agent.display()))?;
    let (arch, _) = elf(agent).unwrap_or(("unknown", false));
    if arch != machine {
        return Err(format!(
            "the host is {machine} but the agent {} is built for {arch}: build attache for {machine} and pass it as ATTACHE_AGENT",
            agent.display()
        ));
    }
    let agent_sha = sha256_hex(&bytes);
    let mut ch = Changes {
        agent: lines.get(1).copied().unwrap_or_default() != agent_sha,
        ..Default::default()
    };
    for (i, (path, content)) in files.iter().enumerate() {
        if lines.get(2 + i).copied().unwrap_or_default() != sha256_hex(content) {
            ch.files.push(path.clone());
        }
    }
    ch.enable = lines.get(2 + files.len()).copied().unwrap_or_default() != "enabled";
    if dry_run || ch.is_empty() {
        return Ok(ch);
    }
    if ch.agent {
        remote
            .upload(agent, &receive_agent(&agent_sha), &|_| {})
            .await
            .map_err(err)?;
    }
    for (path, content) in files.iter().filter(|(p, _)| ch.files.contains(p)) {
        let out = remote
            .run_with_input(&write_file(path), "writing the pull setup", content)
            .await
            .map_err(err)?;
        if !out.success() {
            return Err(format!("writing {path} failed: {}", out.tail()));
        }
    }
    let units_changed = ch.files.iter().any(|f| f.starts_with("/etc/systemd"));
    let out = remote
        .run(&enable(units_changed), "enabling the pull timer")
        .await
        .map_err(err)?;
    if !out.success() {
        return Err(format!("enabling {TIMER_UNIT} failed: {}", out.tail()));
    }
    Ok(ch)
}

/// `deploy --now`: one pull at once (the oneshot service returns when the
/// agent is done), then the state it wrote.
pub async fn pull_now(remote: &Remote) -> Result<State, String> {
    let out = remote
        .run(&start_now(), "running the pull agent")
        .await
        .map_err(|e| e.to_string())?;
    // The service's own failure is said by `start_now` on stderr.
    parse_now(&out.stdout).ok_or_else(|| {
        if out.stderr.contains(NOW_FAILED) {
            format!("{NOW_FAILED}; see journalctl -u {SERVICE_UNIT} on the host")
        } else {
            format!(
                "the agent recorded no outcome of its own for this run: it joined a run already under way, or another run of the agent held its lock; run `attache deploy --now` again, or see journalctl -u {SERVICE_UNIT} on the host"
            )
        }
    })
}

/// `status`: the host's pull state, `None` when it is not a pull host yet.
pub async fn read_state(remote: &Remote) -> Result<Option<State>, String> {
    let out = remote
        .run(&read_state_script(), "reading the pull state")
        .await
        .map_err(|e| e.to_string())?;
    if out.stdout.trim().is_empty() {
        return Ok(None);
    }
    serde_json::from_str(&out.stdout)
        .map(Some)
        .map_err(|e| format!("{STATE} is not readable ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn now_reports_only_the_run_it_started() {
        let state = |checked_at: u64| {
            serde_json::to_string(&State {
                checked_at,
                ..Default::default()
            })
            .unwrap()
        };
        assert_eq!(
            parse_now(&format!("100\n{}", state(101))).map(|s| s.checked_at),
            Some(101)
        );
        assert_eq!(
            parse_now(&format!("100\n{}", state(100))).map(|s| s.checked_at),
            Some(100)
        );
        assert_eq!(
            parse_now(&format!("100\n{}", state(42))),
            None,
            "an earlier run's"
        );
        assert_eq!(parse_now("100\n"), None, "no state");
        assert_eq!(parse_now(""), None);
    }

    #[test]
    fn timer_spread_is_a_tenth() {
        assert_eq!(tenth("15min"), "90s");
        assert_eq!(tenth("1h 30min"), "540s");
        assert_eq!(tenth("5s"), "1s");
    }

    #[test]
    fn scripts_pass_shellcheck() {
        for script in [
            read_script(&[CONFIG.into(), "/etc/systemd/system/x y.service".into()]),
            receive_agent(&"a".repeat(64)),
            write_file(CONFIG),
            enable(true),
            start_now(),
            read_state_script(),
        ] {
            if let Some(f) = crate::shellcheck::findings(&script, &[]) {
                panic!("{script}\n{f}");
            }
        }
    }

    #[test]
    fn files_say_what_the_contract_says() {
        let cfg = Config {
            host: "p1".into(),
            url: "http://10.0.2.100".into(),
            public_key: Some("ssh-ed25519 AAAA k".into()),
            insecure_unsigned: false,
            services: vec![],
            settle: 3,
            keep: 3,
            profile: "default".into(),
            rollback_after: 300,
        };
        let files = files(&cfg, "15min");
        let get = |p: &str| {
            String::from_utf8(files.iter().find(|(f, _)| f == p).unwrap().1.clone()).unwrap()
        };
        assert_eq!(
            get(ALLOWED_SIGNERS),
            "attache-publish namespaces=\"attache-publish\" ssh-ed25519 AAAA k\n"
        );
        let timer = get("/etc/systemd/system/attache-pull.timer");
        assert!(timer.contains("OnUnitInactiveSec=15min\n"), "{timer}");
        assert!(timer.contains("RandomizedDelaySec=90s\n"), "{timer}");
        assert!(get("/etc/systemd/system/attache-pull.service")
            .contains("Type=oneshot\nExecStart=/var/lib/attache/agent/attache agent --config /var/lib/attache/pull/config.json\n"));
    }

    #[test]
    fn this_test_binary_is_an_elf() {
        let me = std::env::current_exe().unwrap();
        let (machine, _) = elf(&me).unwrap();
        assert_eq!(machine, std::env::consts::ARCH);
        assert_eq!(elf(Path::new("/etc/hostname")), None);
    }
}
