//! The human form of what `status`, `inspect` and `diff` found (their `--json` is
//! the data itself).

use std::path::Path;

use crate::deploy::ServiceStatus;
use crate::diff::{Change, ClosureDiff};
use crate::image::Inspection;

/// One host's part of `attache status`: each attached service with its
/// units' states, or why the host could not be read.
pub fn host_status(host: &str, services: Result<&[ServiceStatus], &str>) -> String {
    let mut human = format!("{host}\n");
    let services = match services {
        Ok(services) => services,
        Err(e) => return human + &format!("  error: {e}\n"),
    };
    if services.is_empty() {
        human += "  (no portable services attached)\n";
    }
    for s in services {
        human += &format!(
            "  {:<12} {:<10} {}  sha256 {}\n",
            s.name,
            s.version,
            s.image,
            s.sha256.get(..12).unwrap_or(&s.sha256)
        );
        for (u, st) in &s.units {
            human += &format!("      {u}: {st}\n");
        }
        for c in &s.secrets {
            human += &format!(
                "      secret {}: {} bytes, {}, stored {} s ago\n",
                c.name,
                c.size,
                if c.encrypted {
                    "encrypted"
                } else {
                    "not encrypted"
                },
                c.age_secs
            );
        }
    }
    human
}

/// `attache status` without `--wide`: one line per host and service, hosts
/// that agree (same image, same unit states and restarts) on one line; the
/// earliest start of a group is its "since". Unreachable hosts say why.
pub fn fleet_status(hosts: &[(&str, Result<&[ServiceStatus], &str>)]) -> String {
    // (key, hosts, since) in first-seen order.
    let mut rows: Vec<([String; 4], Vec<&str>, String)> = Vec::new();
    for (host, r) in hosts {
        let lines: Vec<([String; 4], String)> = match r {
            Err(e) => vec![(
                [
                    format!("error: {e}"),
                    String::new(),
                    String::new(),
                    String::new(),
                ],
                String::new(),
            )],
            Ok([]) => vec![(
                [
                    "(no portable services attached)".into(),
                    String::new(),
                    String::new(),
                    String::new(),
                ],
                String::new(),
            )],
            Ok(services) => services
                .iter()
                .map(|s| {
                    let state = if s.units_total == 0 {
                        "no units".to_owned()
                    } else {
                        format!("{}/{} active", s.units_active, s.units_total)
                    };
                    (
                        [
                            s.name.clone(),
                            s.version.clone(),
                            state,
                            s.restarts.to_string(),
                        ],
                        s.since.clone(),
                    )
                })
                .collect(),
        };
        for (key, since) in lines {
            match rows.iter_mut().find(|(k, _, _)| *k == key) {
                Some((_, hs, first)) => {
                    hs.push(host);
                    if !since.is_empty() && (first.is_empty() || since < *first) {
                        *first = since;
                    }
                }
                None => rows.push((key, vec![host], since)),
            }
        }
    }
    let header = [
        "HOSTS".to_owned(),
        "SERVICE".into(),
        "VERSION".into(),
        "UNITS".into(),
        "RESTARTS".into(),
        "SINCE".into(),
    ];
    let table: Vec<[String; 6]> = std::iter::once(header)
        .chain(rows.into_iter().map(|(k, hs, since)| {
            let [a, b, c, d] = k;
            [hs.join(", "), a, b, c, d, since]
        }))
        .collect();
    let spans = |row: &[String; 6]| row[2..].iter().all(String::is_empty);
    let mut widths = [0usize; 6];
    for row in table.iter().filter(|r| !spans(r)) {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &table {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            // An error or "no services" spans the rest of the line.
            if i == 5 || (i == 1 && spans(row)) {
                line += cell;
                break;
            }
            line += &format!("{cell:<w$}  ", w = widths[i]);
        }
        out += line.trim_end();
        out.push('\n');
    }
    out
}

/// What `attache inspect` found in the image at `path`.
pub fn inspection(path: &Path, i: &Inspection) -> String {
    let mut h = String::new();
    let pretty = i
        .os_release
        .get("PORTABLE_PRETTY_NAME")
        .or_else(|| i.os_release.get("PRETTY_NAME"))
        .cloned()
        .unwrap_or_default();
    h += &format!("image        {}\n", path.display());
    h += &format!(
        "name         {}  version {}  ({pretty})\n",
        i.name, i.version
    );
    h += &format!(
        "size         {} bytes, {} compression, {} KiB blocks\n",
        i.size,
        i.compression,
        i.block_size / 1024
    );
    h += &format!("sha256       {}\n", i.sha256);
    h += "os-release\n";
    for (k, v) in &i.os_release {
        h += &format!("  {k}={v}\n");
    }
    h += &format!("units ({})\n", i.units.len());
    for u in &i.units {
        h += &format!("  {}\n", u.name);
        for e in &u.exec_start {
            h += &format!("    ExecStart={e}\n");
        }
    }
    h += &format!("store paths ({})\n", i.store_paths.len());
    for p in &i.store_paths {
        h += &format!("  {p}\n");
    }
    if i.problems.is_empty() {
        h += "portabled would accept this image\n";
    }
    h
}

/// A size as `nix store diff-closures` prints it: KiB with one decimal,
/// MiB from 1 MiB on.
pub fn size(bytes: u64) -> String {
    let b = bytes as f64;
    if bytes >= 1 << 20 {
        format!("{:.1} MiB", b / f64::from(1u32 << 20))
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}

fn delta(d: i64) -> String {
    let sign = if d < 0 { "-" } else { "+" };
    format!("{sign}{}", size(d.unsigned_abs()))
}

fn versions(v: &[String]) -> String {
    if v.is_empty() {
        return "∅".into();
    }
    v.iter()
        .map(|v| if v.is_empty() { "ε" } else { v.as_str() })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The body of one image diff, like `nix store diff-closures`: a line per
/// package that changed (versions and size delta; a rebuild names its new
/// store path and size), the units, the total. Empty when nothing differs.
pub fn closure_diff(d: &ClosureDiff) -> String {
    let mut h = String::new();
    for p in &d.packages {
        if p.rebuilt() {
            let paths: Vec<String> = p
                .added
                .iter()
                .map(|a| format!("{} ({})", a.path, size(a.nar_size)))
                .collect();
            h += &format!(
                "  {}: {} rebuilt, {}: {}\n",
                p.name,
                versions(&p.new_versions),
                delta(p.size_delta),
                paths.join(", ")
            );
        } else {
            h += &format!(
                "  {}: {} → {}, {}\n",
                p.name,
                versions(&p.old_versions),
                versions(&p.new_versions),
                delta(p.size_delta)
            );
        }
    }
    for u in &d.units {
        let what = match u.change {
            Change::Added => "added",
            Change::Removed => "removed",
            Change::Changed => "changed",
        };
        h += &format!("  unit {}: {what}\n", u.name);
    }
    if !h.is_empty() {
        h += &format!(
            "  total: {} ({} → {})\n",
            delta(d.size_delta()),
            size(d.old_size),
            size(d.new_size)
        );
    }
    h
}

/// The heading of one image diff: `OLD → NEW`.
pub fn diff_heading(d: &ClosureDiff) -> String {
    let side = |s: &Option<String>| s.clone().unwrap_or_else(|| "nothing".into());
    if d.is_empty() {
        format!("{}: no change", side(&d.new))
    } else {
        format!("{} → {}", side(&d.old), side(&d.new))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::image::UnitInfo;

    #[test]
    fn status_per_host() {
        let services = [ServiceStatus {
            name: "demo".into(),
            version: "1.0".into(),
            image: "demo_1.0.raw".into(),
            sha256: "0123456789abcdef0123".into(),
            units: BTreeMap::from([
                ("demo.service".into(), "active (running)".into()),
                ("demo@.service".into(), "template".into()),
            ]),
            units_total: 1,
            units_active: 1,
            restarts: 0,
            since: "2026-12-01 17:05:07 UTC".into(),
            secrets: vec![crate::deploy::SecretStatus {
                name: "db".into(),
                size: 12,
                encrypted: true,
                age_secs: 60,
            }],
        }];
        assert_eq!(
            host_status("web1", Ok(&services)),
            "web1
  demo         1.0        demo_1.0.raw  sha256 0123456789ab
      demo.service: active (running)
      demo@.service: template
      secret db: 12 bytes, encrypted, stored 60 s ago
"
        );
        assert_eq!(
            host_status("db", Ok(&[])),
            "db\n  (no portable services attached)\n"
        );
        assert_eq!(
            host_status("down", Err("down: connection refused")),
            "down\n  error: down: connection refused\n"
        );
    }

    #[test]
    fn fleet_status_groups_hosts_that_agree() {
        let svc = |since: &str, restarts| ServiceStatus {
            name: "shop".into(),
            version: "1.0".into(),
            image: "/var/lib/portables/shop_1.0.raw".into(),
            sha256: String::new(),
            units: BTreeMap::new(),
            units_total: 1,
            units_active: 1,
            restarts,
            since: since.into(),
            secrets: Vec::new(),
        };
        let (a, b, c) = (
            [svc("2026-12-01 17:05:09 UTC", 0)],
            [svc("2026-12-01 17:05:07 UTC", 0)],
            [svc("2026-12-01 17:05:08 UTC", 2)],
        );
        let text = fleet_status(&[
            ("h1", Ok(&a)),
            ("h2", Ok(&b)),
            ("h3", Ok(&c)),
            ("h0", Err("h0: cannot connect over SSH: no such host")),
        ]);
        assert_eq!(
            text,
            "HOSTS   SERVICE  VERSION  UNITS       RESTARTS  SINCE
h1, h2  shop     1.0      1/1 active  0         2026-12-01 17:05:07 UTC
h3      shop     1.0      1/1 active  2         2026-12-01 17:05:08 UTC
h0      error: h0: cannot connect over SSH: no such host
"
        );
    }

    #[test]
    fn inspection_lists_everything() {
        let i = Inspection {
            name: "demo".into(),
            version: "1.0".into(),
            os_release: BTreeMap::from([
                ("ID".into(), "nixos".into()),
                ("PRETTY_NAME".into(), "Demo".into()),
            ]),
            units: vec![UnitInfo {
                name: "demo.service".into(),
                exec_start: vec!["/nix/store/aaa-demo/bin/demo".into()],
                install: true,
            }],
            store_paths: vec!["/nix/store/aaa-demo".into()],
            size: 4096,
            compression: "zstd".into(),
            block_size: 1 << 20,
            sha256: "ab".into(),
            problems: vec![],
        };
        assert_eq!(
            inspection(Path::new("demo_1.0.raw"), &i),
            "image        demo_1.0.raw
name         demo  version 1.0  (Demo)
size         4096 bytes, zstd compression, 1024 KiB blocks
sha256       ab
os-release
  ID=nixos
  PRETTY_NAME=Demo
units (1)
  demo.service
    ExecStart=/nix/store/aaa-demo/bin/demo
store paths (1)
  /nix/store/aaa-demo
portabled would accept this image
"
        );
        let refused = Inspection {
            problems: vec!["no units".into()],
            ..i
        };
        assert!(!inspection(Path::new("x.raw"), &refused).contains("would accept"));
    }
}
