//! Per-host settings and secrets of one service: the unit drop-ins attache
//! writes next to an attached image (`/etc/systemd/system/UNIT.d/attache.conf`),
//! and the credentials they hand to the units. Secrets are read here, on the
//! machine that deploys, and travel only on an SSH session's stdin.

use std::collections::BTreeMap;
use std::io::Read;
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use super::ops::credential_path;
use crate::inventory::{SecretSource, UnitSettings};

/// A secret's bytes. Its `Debug` shows the size only, so no log, report or
/// panic message can carry it.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretBytes(Vec<u8>);

impl std::fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<secret, {} bytes>", self.0.len())
    }
}

impl SecretBytes {
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// What the host records to tell a rotation without holding the value:
    /// sha256 of a random salt followed by the value.
    pub fn salted_hash(&self, salt: &str) -> String {
        let mut h = Sha256::new();
        h.update(salt.as_bytes());
        h.update(&self.0);
        hex::encode(h.finalize())
    }
}

/// One secret of a service, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Secret {
    pub name: String,
    pub value: SecretBytes,
}

/// A service's settings on one host: drop-in text per unit (without the
/// credential lines, which depend on whether the host can encrypt) and its
/// secrets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceSettings {
    /// Unit -> the body of its drop-in (sections and keys).
    pub units: BTreeMap<String, BTreeMap<String, Vec<String>>>,
    pub secrets: Vec<Secret>,
    /// The inventory allows plain root-only credential files where the
    /// host cannot encrypt.
    pub unencrypted: bool,
    /// Leave the host's settings and secrets as they are: a pull host's
    /// agent switches images only, settings stay push-only.
    pub as_is: bool,
    /// Only the settings may change: the image must be the one attached
    /// (a pull host's, which its agent switches; a push never does).
    pub image_as_is: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SettingsError {
    #[error("settings.{service} name unit {unit}, which {service}'s image does not have (its units: {units}); fix the unit name in the inventory")]
    UnknownUnit {
        service: String,
        unit: String,
        units: String,
    },
    #[error("settings.{service}.\"{unit}\".{section}.{key}: {why}")]
    BadValue {
        service: String,
        unit: String,
        section: String,
        key: String,
        why: String,
    },
    #[error("secrets.{service}.{name}: '{name}' is not a credential name systemd takes; use letters, digits, '-', '_' and '.' (not first)")]
    BadName { service: String, name: String },
    #[error("secrets.{service}.{name}: {why}")]
    Unreadable {
        service: String,
        name: String,
        why: String,
    },
    #[error("secrets.{service}: {service}'s image has no .service unit to hand credentials to")]
    NoServiceUnit { service: String },
}

/// One setting value as systemd's unit syntax: lists give one line each.
fn render_value(v: &serde_json::Value) -> Result<Vec<String>, String> {
    let one = |v: &serde_json::Value| -> Result<String, String> {
        let s = match v {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::Bool(b) => (if *b { "yes" } else { "no" }).to_owned(),
            serde_json::Value::Null => String::new(),
            _ => return Err("a value must be a string, number, boolean or a list of them".into()),
        };
        if s.contains(['\n', '\r']) {
            return Err("a value must be one line".into());
        }
        Ok(s)
    };
    match v {
        serde_json::Value::Array(a) if a.is_empty() => Ok(vec![String::new()]),
        serde_json::Value::Array(a) => a.iter().map(one).collect(),
        v => Ok(vec![one(v)?]),
    }
}

/// A name for a section or key: what systemd's unit syntax can hold.
fn plain_word(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | ' ' | '.'))
}

/// systemd's rule for credential names, made stricter: a file name too.
pub fn valid_credential_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 200
        && !n.starts_with('.')
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl ServiceSettings {
    /// Checks the inventory's settings of `service` against its image's
    /// `units` and reads its secrets (a file, or a command's stdout).
    pub fn load(
        service: &str,
        units: &[String],
        settings: Option<&UnitSettings>,
        secrets: Option<&BTreeMap<String, SecretSource>>,
        unencrypted: bool,
    ) -> Result<Self, SettingsError> {
        let mut out = ServiceSettings {
            unencrypted,
            ..Default::default()
        };
        for (unit, sections) in settings.into_iter().flatten() {
            if !units.contains(unit) {
                return Err(SettingsError::UnknownUnit {
                    service: service.to_owned(),
                    unit: unit.clone(),
                    units: units.join(", "),
                });
            }
            let body = out.units.entry(unit.clone()).or_default();
            for (section, keys) in sections {
                for (key, value) in keys {
                    let bad = |why: String| SettingsError::BadValue {
                        service: service.to_owned(),
                        unit: unit.clone(),
                        section: section.clone(),
                        key: key.clone(),
                        why,
                    };
                    if !plain_word(section) || !plain_word(key) {
                        return Err(bad(
                            "section and key names are letters, digits, '-', '_' and '.'".into(),
                        ));
                    }
                    let lines = body.entry(section.clone()).or_default();
                    for v in render_value(value).map_err(bad)? {
                        lines.push(format!("{key}={v}"));
                    }
                }
            }
        }
        for (name, source) in secrets.into_iter().flatten() {
            if !valid_credential_name(name) {
                return Err(SettingsError::BadName {
                    service: service.to_owned(),
                    name: name.clone(),
                });
            }
            let value = read_secret(source).map_err(|why| SettingsError::Unreadable {
                service: service.to_owned(),
                name: name.clone(),
                why,
            })?;
            out.secrets.push(Secret {
                name: name.clone(),
                value,
            });
        }
        if !out.secrets.is_empty() && !units.iter().any(|u| u.ends_with(".service")) {
            return Err(SettingsError::NoServiceUnit {
                service: service.to_owned(),
            });
        }
        Ok(out)
    }

    pub fn is_empty(&self) -> bool {
        self.units.is_empty() && self.secrets.is_empty()
    }

    /// Unit -> its drop-in on the host. Every `.service` unit of the image
    /// (`units`) gets the credentials: encrypted ones when `encrypted`,
    /// else plain root-only files.
    pub fn dropins(
        &self,
        service: &str,
        units: &[String],
        encrypted: bool,
    ) -> BTreeMap<String, String> {
        let mut bodies = self.units.clone();
        if !self.secrets.is_empty() {
            let key = if encrypted {
                "LoadCredentialEncrypted"
            } else {
                "LoadCredential"
            };
            for u in units.iter().filter(|u| u.ends_with(".service")) {
                let lines = bodies
                    .entry(u.clone())
                    .or_default()
                    .entry("Service".into())
                    .or_default();
                for s in &self.secrets {
                    lines.push(format!(
                        "{key}={}:{}",
                        s.name,
                        credential_path(service, &s.name)
                    ));
                }
            }
        }
        bodies
            .into_iter()
            .map(|(unit, sections)| {
                let mut text = format!(
                    "# Written by attache deploy: {service}'s settings on this host, from the inventory. attache replaces this file.\n"
                );
                for (section, lines) in sections {
                    text += &format!("[{section}]\n");
                    for l in lines {
                        text += &l;
                        text.push('\n');
                    }
                }
                (unit, text)
            })
            .collect()
    }
}

/// Reads a secret from a file (a string path) or a command's stdout; the
/// value stays in memory.
fn read_secret(source: &SecretSource) -> Result<SecretBytes, String> {
    match source {
        SecretSource::File(path) => {
            if !path.starts_with('/') {
                return Err(format!(
                    "file \"{path}\" is not an absolute path; give the full path"
                ));
            }
            if path.starts_with("/nix/store/") {
                return Err(format!(
                    "file \"{path}\" is in the Nix store, which every user can read; keep secrets outside it"
                ));
            }
            let mut v = Vec::new();
            std::fs::File::open(path)
                .and_then(|mut f| f.read_to_end(&mut v))
                .map_err(|e| format!("cannot read {path}: {e}"))?;
            Ok(SecretBytes(v))
        }
        SecretSource::Command(argv) => {
            let Some((prog, args)) = argv.split_first() else {
                return Err("command is empty".into());
            };
            let out = Command::new(prog)
                .args(args)
                .stdin(Stdio::null())
                .stderr(Stdio::piped())
                .output()
                .map_err(|e| format!("cannot run {prog}: {e}"))?;
            if !out.status.success() {
                let err = String::from_utf8_lossy(&out.stderr);
                return Err(format!(
                    "command {} failed ({}): {}",
                    argv.join(" "),
                    out.status,
                    err.trim()
                ));
            }
            Ok(SecretBytes(out.stdout))
        }
    }
}

/// A fresh salt for [`SecretBytes::salted_hash`].
pub fn new_salt() -> String {
    let mut b = [0u8; 16];
    let ok = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    if ok.is_err() {
        // Without /dev/urandom: time and pid still differ per write.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b.copy_from_slice(&(t ^ u128::from(std::process::id())).to_le_bytes());
    }
    hex::encode(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn units() -> Vec<String> {
        vec!["demo.service".into(), "demo.socket".into()]
    }

    fn settings(v: serde_json::Value) -> UnitSettings {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn dropins_render_settings_and_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("db");
        std::fs::write(&f, b"hunter2\n").unwrap();
        let secrets = BTreeMap::from([(
            "db-password".to_owned(),
            SecretSource::File(f.display().to_string()),
        )]);
        let s = ServiceSettings::load(
            "demo",
            &units(),
            Some(&settings(json!({"demo.service": {"Service": {
                "Environment": ["PORT=8081", "MODE=x y"], "Restart": "on-failure", "RestartSec": 2}}}))),
            Some(&secrets),
            false,
        )
        .unwrap();
        assert_eq!(format!("{:?}", s.secrets[0].value), "<secret, 8 bytes>");
        let d = s.dropins("demo", &units(), true);
        assert_eq!(d.len(), 1);
        assert_eq!(
            d["demo.service"].lines().skip(1).collect::<Vec<_>>(),
            [
                "[Service]",
                "Environment=PORT=8081",
                "Environment=MODE=x y",
                "Restart=on-failure",
                "RestartSec=2",
                "LoadCredentialEncrypted=db-password:/var/lib/attache/settings/live/demo/credentials/db-password.cred",
            ]
        );
        assert!(s.dropins("demo", &units(), false)["demo.service"]
            .contains("\nLoadCredential=db-password:"));
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn bad_settings_are_refused_with_a_sentence() {
        let e = ServiceSettings::load(
            "demo",
            &units(),
            Some(&settings(json!({"web.service": {"Service": {"A": "b"}}}))),
            None,
            false,
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "settings.demo name unit web.service, which demo's image does not have (its units: demo.service, demo.socket); fix the unit name in the inventory");
        let e = ServiceSettings::load(
            "demo",
            &units(),
            Some(&settings(
                json!({"demo.service": {"Service": {"Environment": "A=1\nB=2"}}}),
            )),
            None,
            false,
        )
        .unwrap_err();
        assert!(e.to_string().ends_with("a value must be one line"), "{e}");
        let bad = BTreeMap::from([("../x".to_owned(), SecretSource::File("/x".into()))]);
        assert!(matches!(
            ServiceSettings::load("demo", &units(), None, Some(&bad), false),
            Err(SettingsError::BadName { .. })
        ));
    }

    #[test]
    fn secrets_come_from_commands_and_files() {
        let cmd = SecretSource::Command(vec!["printf".into(), "s3cret".into()]);
        assert_eq!(read_secret(&cmd).unwrap().bytes(), b"s3cret");
        let fails = SecretSource::Command(vec!["false".into()]);
        assert!(read_secret(&fails)
            .unwrap_err()
            .starts_with("command false failed"));
        let rel = SecretSource::File("secrets/db".into());
        assert!(read_secret(&rel)
            .unwrap_err()
            .contains("not an absolute path"));
        let a = SecretBytes(b"x".to_vec());
        assert_ne!(a.salted_hash("1"), a.salted_hash("2"));
        assert_eq!(new_salt().len(), 32);
    }
}
