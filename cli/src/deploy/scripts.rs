//! What attache runs on a host: the shell scripts it sends over SSH and the
//! parsers of what they print. Pure functions of their arguments, so they
//! are tested here without a host; the e2e suite runs them on real ones.

use std::collections::BTreeMap;

use crate::build::BuiltUnit;
use crate::inventory::Check;
use crate::remote::q;
use crate::spec::unit_matches_prefix;

use super::PORTABLES;

/// What the host has now for one prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attached {
    /// Full path of the attached image, if any.
    pub image: Option<String>,
    /// The units attached from it.
    pub units: Vec<String>,
}

/// Parses `UNIT<TAB>FIRST LINE OF 20-portable.conf` lines into what is
/// attached for `prefix`.
pub fn parse_attached(listing: &str, prefix: &str) -> Attached {
    let mut a = Attached::default();
    for line in listing.lines() {
        let Some((unit, first)) = line.split_once('\t') else {
            continue;
        };
        if !unit_matches_prefix(unit, prefix) {
            continue;
        }
        if let Some(img) = dropin_image(first) {
            a.image.get_or_insert_with(|| img.to_owned());
        }
        a.units.push(unit.to_owned());
    }
    a.units.sort();
    a.units.dedup();
    a
}

/// The image a portable drop-in names in its first line:
/// `# Drop-in created for image '/var/lib/portables/x_1.raw', do not edit.`
pub fn dropin_image(first_line: &str) -> Option<&str> {
    let (_, rest) = first_line.split_once("image '")?;
    rest.split_once('\'').map(|(img, _)| img)
}

/// Lists `UNIT<TAB>first line` for every portable drop-in, persistent and
/// runtime.
pub const LIST_ATTACHED: &str = r#"for f in /etc/systemd/system.attached/*.d/20-portable.conf /run/systemd/system.attached/*.d/20-portable.conf; do
  [ -f "$f" ] || continue
  d=${f%/20-portable.conf}; u=${d##*/}; u=${u%.d}
  printf '%s\t%s\n' "$u" "$(head -n1 "$f")"
done"#;

/// Facts the preflight prints as KEY=VALUE lines.
pub fn preflight_script() -> String {
    format!(
        r#"set -u
mkdir -p {PORTABLES} /var/lib/attache 2>/dev/null
echo systemd=$(systemctl --version | head -n1 | awk '{{print $2}}')
p=$(command -v portablectl || {{ [ -x /usr/lib/systemd/portablectl ] && echo /usr/lib/systemd/portablectl; }} || true)
echo portablectl=$p
d={PORTABLES}; [ -d $d ] || d=/var/lib
echo free_kb=$(df -Pk $d | awk 'NR==2 {{print $4}}')
"#
    )
}

/// Takes the per-host lock and holds it while our stdin stays open: the lock
/// ends with the connection, so a killed attache never leaves it behind.
pub fn lock_script(holder: &str) -> String {
    format!(
        r#"mkdir -p /run/attache
exec 9>>/run/attache/lock
if ! flock -n 9; then echo BUSY; cat /run/attache/lock.holder 2>/dev/null; exit 75; fi
echo {holder} > /run/attache/lock.holder
echo LOCKED
exec cat >/dev/null"#,
        holder = q(holder)
    )
}

/// Runs portablectl in a transient unit, so a dropped SSH connection cannot
/// cut an attach or reattach in half; waits for it and prints its output and
/// exit code.
pub fn activation_script(id: &str, portablectl_args: &[String]) -> String {
    let cmd = portablectl_args
        .iter()
        .map(|a| q(a))
        .collect::<Vec<_>>()
        .join(" ");
    let log = format!("/run/attache/{id}.log");
    let rc = format!("/run/attache/{id}.rc");
    let inner = format!(
        "{cmd} >{log} 2>&1; echo $? >{rc}",
        log = q(&log),
        rc = q(&rc)
    );
    format!(
        r#"mkdir -p /run/attache
rm -f {log} {rc}
systemd-run --quiet --collect --wait --unit={unit} /bin/sh -c {inner} >/dev/null 2>&1
cat {log} 2>/dev/null
exit $(cat {rc} 2>/dev/null || echo 1)"#,
        log = q(&log),
        rc = q(&rc),
        unit = q(&format!("attache-{id}")),
        inner = q(&inner)
    )
}

/// `systemctl show` of the properties health needs, one block per unit.
pub fn show_script(units: &[String]) -> String {
    let list = units.iter().map(|u| q(u)).collect::<Vec<_>>().join(" ");
    format!(
        "for u in {list}; do echo \"@unit=$u\"; systemctl show -p ActiveState -p SubState -p NRestarts -p Result -p Type -p RootImage -p ActiveEnterTimestampMonotonic \"$u\"; done"
    )
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnitState {
    pub active: String,
    pub sub: String,
    pub restarts: String,
    pub result: String,
    pub kind: String,
    pub root_image: String,
    pub since: String,
}

pub fn parse_show(out: &str) -> BTreeMap<String, UnitState> {
    let mut m = BTreeMap::new();
    let mut cur: Option<(String, UnitState)> = None;
    for line in out.lines() {
        if let Some(u) = line.strip_prefix("@unit=") {
            if let Some((n, s)) = cur.take() {
                m.insert(n, s);
            }
            cur = Some((u.to_owned(), UnitState::default()));
            continue;
        }
        let Some((_, s)) = cur.as_mut() else { continue };
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.to_owned();
        match k {
            "ActiveState" => s.active = v,
            "SubState" => s.sub = v,
            "NRestarts" => s.restarts = v,
            "Result" => s.result = v,
            "Type" => s.kind = v,
            "RootImage" => s.root_image = v,
            "ActiveEnterTimestampMonotonic" => s.since = v,
            _ => {}
        }
    }
    if let Some((n, s)) = cur {
        m.insert(n, s);
    }
    m
}

/// The units whose state proves the service runs: those attach enables
/// (they have an `[Install]` section), never templates, which cannot run
/// by themselves.
pub fn units_to_check(units: &[BuiltUnit]) -> Vec<String> {
    units
        .iter()
        .filter(|u| u.install && !u.name.contains("@."))
        .map(|u| u.name.clone())
        .collect()
}

/// Judges two samples taken a settle time apart.
pub fn judge(
    units: &[String],
    before: &BTreeMap<String, UnitState>,
    after: &BTreeMap<String, UnitState>,
    image: &str,
) -> Result<(), String> {
    for u in units {
        let (Some(b), Some(a)) = (before.get(u), after.get(u)) else {
            return Err(format!("{u} is not known to systemd"));
        };
        let oneshot_done = a.kind == "oneshot" && a.result == "success";
        if a.active != "active" && !oneshot_done {
            return Err(format!(
                "{u} is {} ({}, result {})",
                a.active, a.sub, a.result
            ));
        }
        if u.ends_with(".service") && a.kind != "oneshot" {
            if b.restarts != a.restarts || b.since != a.since {
                return Err(format!(
                    "{u} restarted during the settle time (restarts {} -> {})",
                    b.restarts, a.restarts
                ));
            }
            if !a.root_image.is_empty() && a.root_image != image {
                return Err(format!("{u} runs {} instead of {image}", a.root_image));
            }
        }
    }
    Ok(())
}

/// A check from the inventory as a shell snippet that exits 0 when healthy.
/// HTTP goes through bash's /dev/tcp, so hosts need no curl.
pub fn check_script(c: &Check) -> (String, u64, u32) {
    match c {
        Check::Command {
            command,
            timeout,
            retries,
        } => (
            format!("timeout {} sh -c {}", timeout.unwrap_or(10), q(command)),
            timeout.unwrap_or(10),
            retries.unwrap_or(5),
        ),
        Check::Http {
            url,
            timeout,
            retries,
        } => {
            let t = timeout.unwrap_or(10);
            let (host, port, path) = split_url(url);
            let script = format!(
                r#"if command -v curl >/dev/null; then curl -fsS -o /dev/null --max-time {t} {url}; else timeout {t} bash -c {inner}; fi"#,
                url = q(url),
                inner = q(&format!(
                    r#"exec 3<>/dev/tcp/{host}/{port} && printf 'GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n' >&3 && head -n1 <&3 | grep -q ' [23][0-9][0-9] '"#
                ))
            );
            (script, t, retries.unwrap_or(5))
        }
    }
}

fn split_url(url: &str) -> (String, u16, String) {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .unwrap_or(url);
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].to_owned()),
        None => (rest, "/".to_owned()),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (h.to_owned(), p.parse().unwrap_or(80)),
        None => (hostport.to_owned(), 80),
    };
    (host, port, path)
}

/// Which images of `name` to delete: all but the `keep` newest and the
/// attached one. `listing` is `MTIME PATH` lines.
pub fn prune_candidates(
    listing: &str,
    keep: usize,
    attached: Option<&str>,
    name: &str,
) -> Vec<String> {
    let mut files: Vec<(u64, String)> = listing
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter_map(|(t, p)| Some((t.parse().ok()?, p.to_owned())))
        .filter(|(_, p)| {
            p.rsplit('/')
                .next()
                .and_then(|f| f.strip_prefix(name))
                .is_some_and(|r| r.starts_with('_') && r.ends_with(".raw"))
        })
        .collect();
    files.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| b.1.cmp(&a.1)));
    files
        .into_iter()
        .enumerate()
        .filter(|(i, (_, p))| *i >= keep && Some(p.as_str()) != attached)
        .map(|(_, (_, p))| p)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attached_from_dropins() {
        let listing = "demo.service\t# Drop-in created for image '/var/lib/portables/demo_1.0.raw', do not edit.\n\
                       demo-tick.timer\t# Drop-in created for image '/var/lib/portables/demo_1.0.raw', do not edit.\n\
                       echo.socket\t# Drop-in created for image '/var/lib/portables/echo_1.0.raw', do not edit.\n\
                       demox.service\t# Drop-in created for image '/var/lib/portables/demox_1.raw', do not edit.\n";
        let a = parse_attached(listing, "demo");
        assert_eq!(a.image.as_deref(), Some("/var/lib/portables/demo_1.0.raw"));
        assert_eq!(a.units, ["demo-tick.timer", "demo.service"]);
        assert_eq!(parse_attached(listing, "nope"), Attached::default());
    }

    #[test]
    fn show_parsing_and_judging() {
        let out = "@unit=demo.service\nActiveState=active\nSubState=running\nNRestarts=0\nResult=success\nType=simple\nRootImage=/var/lib/portables/demo_1.0.raw\nActiveEnterTimestampMonotonic=5\n\
                   @unit=echo.socket\nActiveState=active\nSubState=listening\nResult=success\nType=\nRootImage=\n";
        let s = parse_show(out);
        assert_eq!(s["echo.socket"].sub, "listening");
        let units = vec!["demo.service".to_owned(), "echo.socket".to_owned()];
        judge(&units, &s, &s, "/var/lib/portables/demo_1.0.raw").unwrap();
        assert!(judge(&units, &s, &s, "/var/lib/portables/demo_2.0.raw")
            .unwrap_err()
            .contains("runs /var/lib/portables/demo_1.0.raw"));
        let mut after = s.clone();
        after.get_mut("demo.service").unwrap().restarts = "1".into();
        assert!(judge(&units, &s, &after, "/var/lib/portables/demo_1.0.raw")
            .unwrap_err()
            .contains("restarted"));
        after.get_mut("demo.service").unwrap().active = "failed".into();
        assert!(judge(&units, &s, &after, "x")
            .unwrap_err()
            .starts_with("demo.service is failed"));
    }

    #[test]
    fn templates_and_uninstalled_units_are_not_checked() {
        let u = |n: &str, i: bool| BuiltUnit {
            name: n.into(),
            install: i,
        };
        let units = [
            u("echo.socket", true),
            u("echo@.service", true),
            u("demo-tick.service", false),
            u("demo.service", true),
        ];
        assert_eq!(units_to_check(&units), ["echo.socket", "demo.service"]);
    }

    #[test]
    fn pruning_keeps_newest_and_attached() {
        let listing = "100 /var/lib/portables/demo_1.0.raw\n200 /var/lib/portables/demo_2.0.raw\n300 /var/lib/portables/demo_3.0.raw\n50 /var/lib/portables/demox_1.raw\n";
        assert_eq!(
            prune_candidates(listing, 2, Some("/var/lib/portables/demo_3.0.raw"), "demo"),
            ["/var/lib/portables/demo_1.0.raw"]
        );
        assert_eq!(
            prune_candidates(listing, 1, Some("/var/lib/portables/demo_1.0.raw"), "demo"),
            ["/var/lib/portables/demo_2.0.raw"]
        );
    }

    #[test]
    fn scripts_quote_their_arguments() {
        let s = activation_script(
            "demo-1",
            &[
                "portablectl".into(),
                "attach".into(),
                "/var/lib/portables/a b.raw".into(),
            ],
        );
        assert!(s.contains("systemd-run --quiet --collect --wait --unit=attache-demo-1"));
        assert!(s.contains("a b.raw"));
        let (c, t, r) = check_script(&Check::Http {
            url: "http://127.0.0.1:8080/x".into(),
            timeout: None,
            retries: Some(2),
        });
        assert!(c.contains("/dev/tcp/127.0.0.1/8080"), "{c}");
        assert!(c.contains("GET /x HTTP/1.0"));
        assert_eq!((t, r), (10, 2));
        assert!(lock_script("me; rm -rf /").contains("'me; rm -rf /'"));
    }
}
