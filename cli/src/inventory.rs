//! Which hosts to deploy to, and what each runs: read from the user's flake
//! (`attache.hosts`, made with `nix/hosts.nix`), or given ad hoc with `--to`.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::nix::{Installable, Nix, NixError};
use crate::remote::Destination;

/// A health check from the inventory, run on the host (and, for a pull
/// host, written into its agent's config as it is).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Check {
    Http {
        url: String,
        #[serde(default)]
        timeout: Option<u64>,
        #[serde(default)]
        retries: Option<u32>,
    },
    Command {
        command: String,
        #[serde(default)]
        timeout: Option<u64>,
        #[serde(default)]
        retries: Option<u32>,
    },
}

impl Check {
    /// Why the check cannot run as written, if it cannot: said before
    /// anything is built or touched.
    fn invalid(&self) -> Option<String> {
        let (Check::Http { timeout, .. } | Check::Command { timeout, .. }) = self;
        if *timeout == Some(0) {
            return Some("has timeout = 0, which would fail at once: give it a timeout of 1 s or more, or leave timeout out (10 s)".into());
        }
        match self {
            Check::Http { url, .. } => HttpUrl::parse(url).err(),
            Check::Command { command, .. } if command.trim().is_empty() => {
                Some("has an empty command".into())
            }
            Check::Command { .. } => None,
        }
    }

    /// What the user wrote, for messages.
    pub fn describe(&self) -> String {
        match self {
            Check::Http { url, .. } => format!("the HTTP check {url}"),
            Check::Command { command, .. } => format!("the check `{command}`"),
        }
    }
}

/// An HTTP check's URL, taken apart for hosts without curl (where bash
/// speaks HTTP/1.0 itself, given each part as an argument).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    pub https: bool,
    pub host: String,
    pub port: u16,
    /// `host[:port]` as written: the `Host` header.
    pub authority: String,
    /// Path and query, `/` when empty.
    pub path: String,
}

impl HttpUrl {
    pub fn parse(url: &str) -> Result<HttpUrl, String> {
        let bad = |why: &str| format!("has the URL '{url}', which {why}");
        let (https, rest) = if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else {
            return Err(bad("does not start with http:// or https://"));
        };
        if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad(
                "contains a space or a control character: percent-encode it (%20)",
            ));
        }
        let rest = rest.split('#').next().unwrap_or_default();
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest[i..].starts_with('?') => (&rest[..i], format!("/{}", &rest[i..])),
            Some(i) => (&rest[..i], rest[i..].to_owned()),
            None => (rest, "/".to_owned()),
        };
        if authority.contains('@') {
            return Err(bad("carries credentials: health checks do not send any"));
        }
        let default_port = if https { 443 } else { 80 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let Some((h, after)) = v6.split_once(']') else {
                return Err(bad("has no closing ] after its IPv6 address"));
            };
            match after.strip_prefix(':') {
                Some(p) => (h, Some(p)),
                None if after.is_empty() => (h, None),
                None => return Err(bad("has something other than :PORT after its IPv6 address")),
            }
        } else {
            match authority.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(bad("names no host"));
        }
        let port = match port {
            None => default_port,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 => n,
                _ => return Err(bad("has a port that is not a number from 1 to 65535")),
            },
        };
        Ok(HttpUrl {
            https,
            host: host.to_owned(),
            port,
            authority: authority.to_owned(),
            path,
        })
    }
}
/// Where the CLI reads a secret at deploy time; the inventory never holds
/// its value.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SecretSource {
    File(String),
    Command(Vec<String>),
}

/// Per-host settings of one service: unit -> section -> key -> value (a
/// string, number, boolean, or a list of them).
pub type UnitSettings = BTreeMap<String, BTreeMap<String, BTreeMap<String, serde_json::Value>>>;

/// One service of a host: its name in the inventory and how to build it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRef {
    pub name: String,
    pub installable: Installable,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub name: String,
    pub destination: Destination,
    pub tags: Vec<String>,
    pub services: Vec<ServiceRef>,
    pub profile: String,
    pub sudo: bool,
    pub checks: BTreeMap<String, Vec<Check>>,
    /// Service -> its per-host settings.
    pub settings: BTreeMap<String, UnitSettings>,
    /// Service -> credential name -> where to read it.
    pub secrets: BTreeMap<String, BTreeMap<String, SecretSource>>,
    /// Hand secrets over unencrypted where the host cannot encrypt them.
    pub unencrypted_secrets: bool,
    /// Set for a pull host: it fetches its images from a published
    /// directory instead of having them pushed.
    pub pull: Option<Pull>,
}

/// How a pull host finds and trusts the images `attache publish` writes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Pull {
    /// The URL at which the publish directory is served (no trailing `/`).
    pub url: String,
    /// How often the host looks for a newer version: a systemd time span.
    pub interval: String,
    /// The OpenSSH public key `SHA256SUMS.sig` must be made with
    /// (`ssh-keygen -Y sign`), as one `ssh-ed25519 AAAA… comment` line.
    #[serde(rename = "publicKey")]
    pub public_key: Option<String>,
    /// Accept an unsigned `SHA256SUMS`: only when the user asked for it.
    #[serde(default, rename = "insecureUnsigned")]
    pub insecure_unsigned: bool,
}

impl Pull {
    /// Why the host could not pull as written, if it could not.
    fn invalid(&self) -> Option<String> {
        let url = self.url.trim_end_matches('/');
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Some(format!(
                "pull.url '{}' does not start with http:// or https://",
                self.url
            ));
        }
        if let Err(why) = HttpUrl::parse(url) {
            return Some(format!("pull.url {why}"));
        }
        let span_ok = !self.interval.trim().is_empty()
            && self
                .interval
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == ' ' || c == '.');
        if !span_ok {
            return Some(format!(
                "pull.interval '{}' is not a systemd time span: write e.g. \"15min\" or \"1h\"",
                self.interval
            ));
        }
        match (&self.public_key, self.insecure_unsigned) {
            (None, false) => Some("pull has no publicKey: give the public half of the key `attache publish --key` signs with, or set insecureUnsigned = true to accept unsigned images".into()),
            (Some(_), true) => Some("pull has both publicKey and insecureUnsigned: keep one".into()),
            (Some(k), false) if k.lines().count() != 1 || k.split_whitespace().count() < 2 || !k.trim_start().starts_with("ssh-") && !k.trim_start().starts_with("ecdsa-") && !k.trim_start().starts_with("sk-") => Some(format!(
                "pull.publicKey is not one OpenSSH public key line (like the contents of KEY.pub): '{}'",
                k.trim()
            )),
            _ => None,
        }
    }
}

#[derive(Debug, Deserialize)]
struct RawHost {
    host: String,
    user: Option<String>,
    port: Option<u16>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    services: Vec<String>,
    #[serde(default)]
    profile: Option<String>,
    #[serde(default)]
    sudo: Option<bool>,
    #[serde(default)]
    checks: BTreeMap<String, Vec<Check>>,
    #[serde(default)]
    settings: BTreeMap<String, UnitSettings>,
    #[serde(default)]
    secrets: BTreeMap<String, BTreeMap<String, SecretSource>>,
    #[serde(default, rename = "unencryptedSecrets")]
    unencrypted_secrets: bool,
    #[serde(default)]
    pull: Option<Pull>,
}

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error(transparent)]
    Nix(#[from] NixError),
    #[error("{flake}#attache.hosts is not an inventory attache understands ({detail}): build it with attache.lib.hosts")]
    Shape { flake: String, detail: String },
    #[error("no host or tag matches '{selector}'. Known hosts: {hosts}; tags: {tags}")]
    Unknown {
        selector: String,
        hosts: String,
        tags: String,
    },
    #[error("the inventory has no hosts: add some to attache.hosts, or deploy ad hoc with --to USER@HOST INSTALLABLE")]
    Empty,
    #[error("host {host} has checks for '{service}', which is not one of its services ({services}): fix the name in checks, or add the service")]
    CheckForUnknownService {
        host: String,
        service: String,
        services: String,
    },
    #[error("host {host}: {why}")]
    BadPull { host: String, why: String },
    #[error("host {host}: {check} of {service} {why}")]
    BadCheck {
        host: String,
        service: String,
        check: String,
        why: String,
    },
}

/// Applied by `nix eval`: services become their names, so nothing is built
/// just to list hosts.
const HOSTS_APPLY: &str =
    "hs: builtins.mapAttrs (n: h: h // { services = builtins.attrNames (h.services or {}); }) hs";

pub fn load(nix: &Nix, flake: &str) -> Result<Vec<Host>, InventoryError> {
    let inst = Installable::Flake(format!("{flake}#attache.hosts"));
    let v = nix.eval_json(&inst, HOSTS_APPLY)?;
    parse(flake, v)
}

/// Lets hosts that run the same derivation share one build: each service's
/// installable becomes that of the first service with the same `drvPath`.
/// One `nix eval` for all of `hosts` instead of one evaluation and build per
/// host. Best effort: if that evaluation fails, nothing changes and each
/// build reports its own error, naming its host.
pub fn share_builds(nix: &Nix, flake: &str, hosts: &mut [Host]) {
    let names: Vec<String> = hosts
        .iter()
        .map(|h| format!("{} = null;", nix_string(&h.name)))
        .collect();
    let apply = format!(
        "hs: builtins.mapAttrs (n: h: builtins.mapAttrs (_: s: s.drvPath or null) (h.services or {{}})) (builtins.intersectAttrs {{ {} }} hs)",
        names.join(" ")
    );
    let inst = Installable::Flake(format!("{flake}#attache.hosts"));
    let Ok(v) = nix.eval_json(&inst, &apply) else {
        return;
    };
    let Ok(drvs) = serde_json::from_value::<BTreeMap<String, BTreeMap<String, Option<String>>>>(v)
    else {
        return;
    };
    unify(hosts, &drvs);
}

/// [`share_builds`] once the `drvPath`s (host -> service -> path) are known.
fn unify(hosts: &mut [Host], drvs: &BTreeMap<String, BTreeMap<String, Option<String>>>) {
    let mut first: BTreeMap<&str, Installable> = BTreeMap::new();
    for h in hosts.iter_mut() {
        for s in &mut h.services {
            let Some(Some(drv)) = drvs.get(&h.name).and_then(|m| m.get(&s.name)) else {
                continue;
            };
            s.installable = first
                .entry(drv.as_str())
                .or_insert_with(|| s.installable.clone())
                .clone();
        }
    }
}

/// `s` as a Nix string literal.
fn nix_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '$' => out.push_str("\\$"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

pub fn parse(flake: &str, v: serde_json::Value) -> Result<Vec<Host>, InventoryError> {
    let raw: BTreeMap<String, RawHost> =
        serde_json::from_value(v).map_err(|e| InventoryError::Shape {
            flake: flake.to_owned(),
            detail: e.to_string(),
        })?;
    for (name, h) in &raw {
        validate_checks(name, h)?;
        if let Some(why) = h.pull.as_ref().and_then(Pull::invalid) {
            return Err(InventoryError::BadPull {
                host: name.clone(),
                why,
            });
        }
    }
    Ok(raw
        .into_iter()
        .map(|(name, h)| Host {
            destination: Destination {
                host: h.host,
                user: h.user,
                port: h.port,
            },
            tags: h.tags,
            services: h
                .services
                .iter()
                .map(|s| ServiceRef {
                    name: s.clone(),
                    installable: Installable::Flake(format!(
                        "{flake}#attache.hosts.\"{name}\".services.\"{s}\""
                    )),
                })
                .collect(),
            profile: h.profile.unwrap_or_else(|| "default".into()),
            sudo: h.sudo.unwrap_or(false),
            checks: h.checks,
            settings: h.settings,
            secrets: h.secrets,
            unencrypted_secrets: h.unencrypted_secrets,
            pull: h.pull.map(|p| Pull {
                url: p.url.trim_end_matches('/').to_owned(),
                ..p
            }),
            name,
        })
        .collect())
}

/// Every check belongs to one of the host's services and can run as written.
fn validate_checks(host: &str, h: &RawHost) -> Result<(), InventoryError> {
    for (service, checks) in &h.checks {
        if !h.services.contains(service) {
            return Err(InventoryError::CheckForUnknownService {
                host: host.to_owned(),
                service: service.clone(),
                services: if h.services.is_empty() {
                    "it has none".into()
                } else {
                    h.services.join(", ")
                },
            });
        }
        for c in checks {
            if let Some(why) = c.invalid() {
                return Err(InventoryError::BadCheck {
                    host: host.to_owned(),
                    service: service.clone(),
                    check: c.describe(),
                    why,
                });
            }
        }
    }
    Ok(())
}

/// Picks hosts by name, `@tag`, or a `--on` glob; no selector means all.
pub fn select(
    hosts: Vec<Host>,
    selectors: &[String],
    on: Option<&str>,
) -> Result<Vec<Host>, InventoryError> {
    if hosts.is_empty() {
        return Err(InventoryError::Empty);
    }
    let unknown = |selector: &str, hosts: &[Host]| {
        let mut tags: Vec<&str> = hosts
            .iter()
            .flat_map(|h| h.tags.iter().map(String::as_str))
            .collect();
        tags.sort_unstable();
        tags.dedup();
        InventoryError::Unknown {
            selector: selector.to_owned(),
            hosts: hosts
                .iter()
                .map(|h| h.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            tags: if tags.is_empty() {
                "(none)".into()
            } else {
                tags.iter()
                    .map(|t| format!("@{t}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        }
    };
    let mut keep = vec![false; hosts.len()];
    for sel in selectors {
        let mut matched = false;
        for (i, h) in hosts.iter().enumerate() {
            let hit = match sel.strip_prefix('@') {
                Some(tag) => h.tags.iter().any(|t| t == tag),
                None => &h.name == sel,
            };
            if hit {
                keep[i] = true;
                matched = true;
            }
        }
        if !matched {
            return Err(unknown(sel, &hosts));
        }
    }
    if selectors.is_empty() {
        keep.iter_mut().for_each(|k| *k = true);
    }
    if let Some(pattern) = on {
        let mut any = false;
        for (i, h) in hosts.iter().enumerate() {
            let m = glob_match(pattern, &h.name);
            keep[i] &= m;
            any |= keep[i];
        }
        if !any {
            return Err(unknown(pattern, &hosts));
        }
    }
    Ok(hosts
        .into_iter()
        .zip(keep)
        .filter_map(|(h, k)| k.then_some(h))
        .collect())
}

/// `*` and `?` globbing, enough for `--on 'web-*'`.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Vec<Host> {
        parse(
            ".",
            json!({
                "h1": {"host": "h1", "user": null, "port": null, "tags": ["web"], "services": ["demo"],
                       "profile": "default", "sudo": false,
                       "settings": {"demo": {"demo.service": {"Service": {"Environment": ["PORT=8081"]}}}},
                       "secrets": {"demo": {"db": {"file": "/etc/db"}, "api": {"command": ["pass", "show", "api"]}}},
                       "checks": {"demo": [{"type": "http", "url": "http://127.0.0.1:8080/", "timeout": null, "retries": null}]}},
                "h2": {"host": "h2.example", "user": "deploy", "port": 2222, "tags": ["web", "canary"],
                       "services": ["demo", "echo"], "profile": "default", "sudo": true,
                       "checks": {"echo": [{"type": "command", "command": "true", "timeout": 5, "retries": 2}]}},
                "db1": {"host": "db1", "user": null, "port": null, "tags": [], "services": [],
                        "profile": "trusted", "sudo": false, "checks": {}},
                "p1": {"host": "p1", "user": null, "port": null, "tags": ["pull"], "services": ["demo"],
                       "profile": "default", "sudo": false, "checks": {},
                       "pull": {"url": "http://images.example/attache/", "interval": "15min",
                                "publicKey": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE publisher", "insecureUnsigned": false}}
            }),
        )
        .unwrap()
    }

    fn names(h: &[Host]) -> Vec<&str> {
        h.iter().map(|h| h.name.as_str()).collect()
    }

    #[test]
    fn parse_inventory() {
        let h = sample();
        let h2 = h.iter().find(|h| h.name == "h2").unwrap();
        assert_eq!(h2.destination.to_string(), "deploy@h2.example:2222");
        assert_eq!(
            h2.services[1].installable,
            Installable::Flake(".#attache.hosts.\"h2\".services.\"echo\"".into())
        );
        let h1 = h.iter().find(|h| h.name == "h1").unwrap();
        assert_eq!(
            h1.settings["demo"]["demo.service"]["Service"]["Environment"],
            json!(["PORT=8081"])
        );
        assert_eq!(
            h1.secrets["demo"]["db"],
            SecretSource::File("/etc/db".into())
        );
        assert_eq!(
            h1.secrets["demo"]["api"],
            SecretSource::Command(vec!["pass".into(), "show".into(), "api".into()])
        );
        assert!(!h1.unencrypted_secrets);
        assert!(matches!(
            h2.checks["echo"][0],
            Check::Command {
                timeout: Some(5),
                ..
            }
        ));
    }

    #[test]
    fn pull_hosts() {
        let h = sample();
        let p1 = h.iter().find(|h| h.name == "p1").unwrap();
        let pull = p1.pull.as_ref().unwrap();
        assert_eq!(pull.url, "http://images.example/attache");
        assert_eq!(pull.interval, "15min");
        assert!(h.iter().find(|h| h.name == "h1").unwrap().pull.is_none());
        let bad = |pull: serde_json::Value| {
            parse(
                ".",
                json!({"p": {"host": "p", "user": null, "port": null, "services": ["demo"], "pull": pull}}),
            )
            .unwrap_err()
            .to_string()
        };
        let e = bad(json!({"url": "http://x/", "interval": "15min", "publicKey": null}));
        assert!(e.contains("no publicKey"), "{e}");
        let e = bad(json!({"url": "ftp://x/", "interval": "15min", "insecureUnsigned": true}));
        assert!(e.contains("http://"), "{e}");
        let e = bad(json!({"url": "http://x/", "interval": "15min; rm", "insecureUnsigned": true}));
        assert!(e.contains("time span"), "{e}");
        let e = bad(json!({"url": "http://x/", "interval": "1h", "publicKey": "AAAA"}));
        assert!(e.contains("OpenSSH public key"), "{e}");
    }

    #[test]
    fn selection() {
        assert_eq!(
            names(&select(sample(), &[], None).unwrap()),
            ["db1", "h1", "h2", "p1"]
        );
        assert_eq!(
            names(&select(sample(), &["@web".into()], None).unwrap()),
            ["h1", "h2"]
        );
        assert_eq!(
            names(&select(sample(), &["db1".into()], None).unwrap()),
            ["db1"]
        );
        assert_eq!(
            names(&select(sample(), &[], Some("h*")).unwrap()),
            ["h1", "h2"]
        );
        let e = select(sample(), &["nope".into()], None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "no host or tag matches 'nope'. Known hosts: db1, h1, h2, p1; tags: @canary, @pull, @web"
        );
        assert!(select(vec![], &[], None).is_err());
    }

    #[test]
    fn hosts_running_one_derivation_share_its_build() {
        let mut hosts = sample();
        let drvs: BTreeMap<String, BTreeMap<String, Option<String>>> =
            serde_json::from_value(json!({
                "h1": {"demo": "/nix/store/aaa-demo.drv"},
                "h2": {"demo": "/nix/store/aaa-demo.drv", "echo": null},
            }))
            .unwrap();
        unify(&mut hosts, &drvs);
        let h1 = hosts.iter().find(|h| h.name == "h1").unwrap();
        let h2 = hosts.iter().find(|h| h.name == "h2").unwrap();
        assert_eq!(h2.services[0].installable, h1.services[0].installable);
        assert_eq!(
            h2.services[1].installable,
            Installable::Flake(".#attache.hosts.\"h2\".services.\"echo\"".into())
        );
    }

    fn with_checks(services: serde_json::Value, checks: serde_json::Value) -> InventoryError {
        parse(
            ".",
            json!({"h1": {"host": "h1", "user": null, "port": null, "tags": [], "services": services,
                          "profile": "default", "sudo": false, "checks": checks}}),
        )
        .unwrap_err()
    }

    #[test]
    fn a_check_for_an_unknown_service_is_refused() {
        let e = with_checks(
            json!(["demo"]),
            json!({"dmeo": [{"type": "command", "command": "true", "timeout": null, "retries": null}]}),
        );
        assert_eq!(
            e.to_string(),
            "host h1 has checks for 'dmeo', which is not one of its services (demo): fix the name in checks, or add the service"
        );
    }

    #[test]
    fn checks_that_cannot_run_are_refused() {
        let http = |url: &str, timeout: Option<u64>| {
            with_checks(
                json!(["demo"]),
                json!({"demo": [{"type": "http", "url": url, "timeout": timeout, "retries": null}]}),
            )
            .to_string()
        };
        assert_eq!(
            http("http://127.0.0.1:8080/", Some(0)),
            "host h1: the HTTP check http://127.0.0.1:8080/ of demo has timeout = 0, which would fail at once: give it a timeout of 1 s or more, or leave timeout out (10 s)"
        );
        assert!(http("ftp://x/", None).contains("does not start with http:// or https://"));
        assert!(http("http://x:80a/", None).contains("port that is not a number"));
        assert!(http("http://x:0/", None).contains("port that is not a number"));
        assert!(http("http://x/a b", None).contains("percent-encode"));
        assert!(http("http:///a", None).contains("names no host"));
        assert!(http("http://[::1]x/", None).contains("other than :PORT"));
        assert!(http("http://u:p@h/", None).contains("credentials"));
    }

    #[test]
    fn http_urls_taken_apart() {
        let u = HttpUrl::parse("http://127.0.0.1:8080/a%20b'c?x=%41#frag").unwrap();
        assert_eq!(
            (
                u.https,
                u.host.as_str(),
                u.port,
                u.authority.as_str(),
                u.path.as_str()
            ),
            (false, "127.0.0.1", 8080, "127.0.0.1:8080", "/a%20b'c?x=%41")
        );
        let u = HttpUrl::parse("https://example.org").unwrap();
        assert_eq!((u.https, u.port, u.path.as_str()), (true, 443, "/"));
        let u = HttpUrl::parse("http://[::1]:81?q").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("::1", 81, "/?q")
        );
    }

    #[test]
    fn nix_strings_are_escaped() {
        assert_eq!(nix_string("web-1"), "\"web-1\"");
        assert_eq!(nix_string("a\"b${c}\\"), r#""a\"b\${c}\\""#);
    }

    #[test]
    fn globs() {
        assert!(glob_match("h*", "h1"));
        assert!(glob_match("*-web-?", "eu-web-1"));
        assert!(!glob_match("h?", "h10"));
    }
}
