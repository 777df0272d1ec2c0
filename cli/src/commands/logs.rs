//! `attache logs`: the journal of a service's units on many hosts, merged
//! by time (or, with `-f`, as it comes), each line prefixed with its host.

use serde_json::Value;
use tokio::io::AsyncBufReadExt;

use super::hosts::{self, ssh_options, Policy, Ran, Target};
use crate::cli::LogsArgs;
use crate::deploy::{self, HostError, HostSession, JournalQuery};
use crate::error::Error;
use crate::remote::SshOptions;
use crate::ui::Ui;

pub fn run(args: &LogsArgs, ui: &Ui) -> Result<(), Error> {
    let targets = hosts::resolve(
        std::slice::from_ref(&args.host),
        &args.fleet.flake,
        &args.nix,
        &args.fleet.ssh,
    )?;
    let q = JournalQuery {
        units: Vec::new(),
        since: args.since.clone(),
        lines: args.lines,
        follow: args.follow,
    };
    let width = targets.iter().map(|t| t.0.len()).max().unwrap_or(0);
    let out = Printer {
        ui: ui.clone(),
        width,
        hosts: targets.iter().map(|t| t.0.clone()).collect(),
    };
    let opts = ssh_options(&args.fleet.ssh);
    let service = args.service.clone();
    let rt = hosts::runtime()?;
    let failed = if args.follow {
        rt.block_on(follow(targets, opts, service, q, out))
    } else {
        rt.block_on(read_all(targets, opts, service, q, &out))
    };
    if let (Some(since), true) = (
        &args.since,
        failed
            .iter()
            .any(|e| e.contains("Failed to parse timestamp")),
    ) {
        return Err(Error::Usage(format!(
            "--since {since:?} is not a time journalctl reads: use e.g. '1 hour ago', 'today' or '2026-12-01 10:00'"
        )));
    }
    for e in &failed {
        ui.error(e);
    }
    match failed.into_iter().next() {
        Some(first) => Err(Error::Remote(format!(
            "{first} (the other hosts' entries are above)"
        ))),
        None => Ok(()),
    }
}

/// Prints entries with their host's prefix and colour.
#[derive(Clone)]
struct Printer {
    ui: Ui,
    width: usize,
    hosts: Vec<String>,
}

impl Printer {
    fn print(&self, host: &str, mut entry: Value) {
        let colour = self.hosts.iter().position(|h| h == host).unwrap_or(0);
        let text = format!(
            "{} {}: {}",
            time(&entry),
            ident(&entry),
            field(&entry, "MESSAGE")
        );
        if let Value::Object(m) = &mut entry {
            m.insert("host".into(), Value::String(host.to_owned()));
        }
        let prefix = format!("{host:<w$} |", w = self.width);
        self.ui.stream(&entry, &prefix, colour, &text);
    }
}

/// A journal field as text: journald gives non-UTF-8 values as byte arrays.
fn field(e: &Value, key: &str) -> String {
    match e.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(bytes)) => {
            let b: Vec<u8> = bytes
                .iter()
                .filter_map(|v| v.as_u64().and_then(|n| u8::try_from(n).ok()))
                .collect();
            String::from_utf8_lossy(&b).into_owned()
        }
        _ => String::new(),
    }
}

fn realtime(e: &Value) -> u64 {
    field(e, "__REALTIME_TIMESTAMP").parse().unwrap_or(0)
}

/// `ident[pid]`, as journalctl's short format shows the sender.
fn ident(e: &Value) -> String {
    let mut id = field(e, "SYSLOG_IDENTIFIER");
    if id.is_empty() {
        id = field(e, "_COMM");
    }
    match field(e, "_PID") {
        p if p.is_empty() => id,
        p => format!("{id}[{p}]"),
    }
}

/// The entry's time, UTC, to the millisecond.
fn time(e: &Value) -> String {
    let us = realtime(e);
    format!("{}.{:03}", civil(us / 1_000_000), us / 1000 % 1000)
}

/// A time as journalctl's `--since` reads it: `2026-12-01 17:02:03 UTC`.
pub(super) fn utc(secs: u64) -> String {
    format!("{} UTC", civil(secs))
}

/// `YYYY-MM-DD HH:MM:SS` of seconds since the epoch, UTC.
fn civil(secs: u64) -> String {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn parse_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Connects and finds the units to read; `None` (with a note) when the
/// service is not attached there.
async fn open(
    (name, dest, elev): &Target,
    ssh: &SshOptions,
    service: Option<&str>,
) -> Result<(HostSession, Vec<String>), String> {
    let s = HostSession::connect(name, dest, ssh, *elev)
        .await
        .map_err(|e| e.to_string())?;
    let units = deploy::journal_units(&s, service).await;
    match units {
        Ok(u) if u.is_empty() => {
            s.close().await;
            Err(format!(
                "{name}: {} attached",
                service.map_or("no portable service is".to_owned(), |n| format!(
                    "{n} is not"
                ))
            ))
        }
        Ok(u) => Ok((s, u)),
        Err(e) => {
            s.close().await;
            Err(e.to_string())
        }
    }
}

/// Every host's entries, merged by time. Returns the hosts' errors.
async fn read_all(
    targets: Vec<Target>,
    ssh: SshOptions,
    service: Option<String>,
    q: JournalQuery,
    out: &Printer,
) -> Vec<String> {
    let ran = hosts::on_hosts(
        targets.clone(),
        Policy::all_at_once(8),
        |_| true,
        |t: Target| {
            let (ssh, service, mut q) = (ssh.clone(), service.clone(), q.clone());
            async move {
                let (s, units) = open(&t, &ssh, service.as_deref()).await?;
                q.units = units;
                let r = s
                    .step(&deploy::journal(&q), deploy::Stage::Preflight)
                    .await
                    .map_err(|e: HostError| e.to_string());
                s.close().await;
                Ok::<_, String>((t.0, parse_lines(&r?.stdout)))
            }
        },
    )
    .await;
    let mut errors = Vec::new();
    let mut all: Vec<(u64, String, Value)> = Vec::new();
    for r in ran {
        match r {
            Ran::Done(Ok((host, entries))) => {
                all.extend(entries.into_iter().map(|e| (realtime(&e), host.clone(), e)));
            }
            Ran::Done(Err(e)) => errors.push(e),
            Ran::Skipped(why) => errors.push(why.to_owned()),
        }
    }
    // Stable: a host's own entries keep the journal's order on equal times.
    all.sort_by_key(|(t, _, _)| *t);
    for (_, host, e) in all {
        out.print(&host, e);
    }
    errors
}

/// Follows every host at once until Ctrl-C (or until every host ended);
/// closing each channel ends journalctl on its host.
async fn follow(
    targets: Vec<Target>,
    ssh: SshOptions,
    service: Option<String>,
    q: JournalQuery,
    out: Printer,
) -> Vec<String> {
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let mut set = tokio::task::JoinSet::new();
    for t in targets {
        let (ssh, service, mut q, stop, out) = (
            ssh.clone(),
            service.clone(),
            q.clone(),
            stop.clone(),
            out.clone(),
        );
        set.spawn(async move {
            let (s, units) = open(&t, &ssh, service.as_deref()).await?;
            q.units = units;
            let script = deploy::journal(&q);
            let mut child = match s.remote.spawn_held(&script.text).await {
                Ok(c) => c,
                Err(e) => {
                    s.close().await;
                    return Err(e.to_string());
                }
            };
            let stdout = child.take_stdout();
            let mut stop = stop;
            let stopped = *stop.borrow();
            if let (Some(stdout), false) = (stdout, stopped) {
                let mut lines = tokio::io::BufReader::new(stdout).lines();
                loop {
                    tokio::select! {
                        line = lines.next_line() => match line {
                            Ok(Some(l)) => {
                                if let Ok(v) = serde_json::from_str(&l) {
                                    out.print(&t.0, v);
                                }
                            }
                            _ => break,
                        },
                        _ = stop.changed() => break,
                    }
                }
            }
            let by_itself = !*stop.borrow();
            // Closing stdin ends the remote `cat`, which ends journalctl.
            drop(child.take_stdin());
            let stderr = child.take_stderr();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), child.wait()).await;
            s.close().await;
            if !by_itself {
                return Ok(());
            }
            // journalctl ended before Ctrl-C: say what it said.
            let mut said = String::new();
            if let Some(mut e) = stderr {
                use tokio::io::AsyncReadExt;
                let _ = tokio::time::timeout(
                    std::time::Duration::from_secs(1),
                    e.read_to_string(&mut said),
                )
                .await;
            }
            Err(format!(
                "{}: journalctl stopped: {}",
                t.0,
                said.trim()
                    .lines()
                    .last()
                    .unwrap_or("the connection closed")
            ))
        });
    }
    let mut errors = Vec::new();
    let mut record = |joined: Option<Result<Result<(), String>, tokio::task::JoinError>>| {
        if let Some(Ok(Err(e))) = joined {
            errors.push(e);
        }
    };
    loop {
        tokio::select! {
            joined = set.join_next() => {
                if joined.is_none() {
                    break;
                }
                record(joined);
            }
            _ = tokio::signal::ctrl_c() => {
                let _ = stop_tx.send(true);
                break;
            }
        }
    }
    let drain = async {
        while let Some(j) = set.join_next().await {
            record(Some(j));
        }
    };
    if tokio::time::timeout(std::time::Duration::from_secs(10), drain)
        .await
        .is_err()
    {
        set.abort_all();
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_read_like_journalctl() {
        let e: Value = serde_json::from_str(
            r#"{"__REALTIME_TIMESTAMP":"1764608523456789","SYSLOG_IDENTIFIER":"busybox","_PID":"42","MESSAGE":[104,105]}"#,
        )
        .unwrap();
        assert_eq!(time(&e), "2025-12-01 17:02:03.456");
        assert_eq!(ident(&e), "busybox[42]");
        assert_eq!(field(&e, "MESSAGE"), "hi");
        assert_eq!(utc(1_764_608_523), "2025-12-01 17:02:03 UTC");
    }
}
