//! The human form of what `status` and `inspect` found (their `--json` is
//! the data itself).

use std::path::Path;

use crate::deploy::ServiceStatus;
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
