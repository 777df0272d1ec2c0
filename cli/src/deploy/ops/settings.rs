//! Per-host settings on the host: each service's drop-ins and credentials
//! as one directory, switched with the image. Part of the remote protocol
//! (`ops`).
//!
//! `/var/lib/attache/settings/` (0700) holds, per service:
//! - `live/SVC/`: what the host runs: `units/UNIT.conf` (copied to
//!   `/etc/systemd/system/UNIT.d/attache.conf`) and `credentials/NAME.cred`
//!   (0600, encrypted with `systemd-creds` unless the inventory asked
//!   otherwise) with `NAME.sum` (a salted hash, the size and the mode);
//! - `next/SVC/`: staged by a deploy before anything switches;
//! - `before/SVC/`: what a deploy replaced, until it is confirmed or put back;
//! - `previous/SVC/`: what `attache rollback` goes back to, like
//!   `SVC.previous` for the image.

use std::collections::BTreeMap;

use super::{quote, words, Script};

pub const SETTINGS_DIR: &str = "/var/lib/attache/settings";

/// Where the host keeps `service`'s credential `name`.
pub fn credential_path(service: &str, name: &str) -> String {
    format!("{SETTINGS_DIR}/live/{service}/credentials/{name}.cred")
}

/// The shell functions every settings script shares. `plug`/`unplug`
/// install or remove the drop-ins of a service's live directory; `restore`
/// puts back what a deploy replaced and fails when there is nothing to.
pub const SETTINGS_FNS: &str = r#"S=/var/lib/attache/settings
unplug() { for f in "$S/live/$1/units/"*.conf; do [ -f "$f" ] || continue; u=${f##*/}; u=${u%.conf}; rm -f "/etc/systemd/system/$u.d/attache.conf"; rmdir "/etc/systemd/system/$u.d" 2>/dev/null || true; done; true; }
plug() { for f in "$S/live/$1/units/"*.conf; do [ -f "$f" ] || continue; u=${f##*/}; u=${u%.conf}; d="/etc/systemd/system/$u.d"; mkdir -p "$d" && cp "$f" "$d/attache.conf.tmp" && mv -f "$d/attache.conf.tmp" "$d/attache.conf" || return 1; done; true; }
restore() { [ -d "$S/before/$1" ] || return 1; unplug "$1"; rm -rf "$S/live/$1"; mv "$S/before/$1" "$S/live/$1" && plug "$1"; }
"#;

/// What a host has of one service's settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SettingsState {
    /// Unit -> sha256 of its drop-in in /etc (empty when it is missing).
    pub units: BTreeMap<String, String>,
    pub secrets: BTreeMap<String, SecretState>,
    /// Settings for `attache rollback` are recorded.
    pub previous: bool,
}

/// A credential on the host, as its `.sum` file tells (never its value).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecretState {
    pub salt: String,
    pub hash: String,
    pub size: u64,
    pub encrypted: bool,
    /// The credential file's mtime.
    pub since: u64,
}

/// The part of the facts script that reads the settings: nothing but
/// builtins when the host has none (each process costs 30-150 ms on a slow
/// host).
pub fn facts_part() -> String {
    format!(
        r#"printf 'creds\t'; command -v systemd-creds || echo
for f in {SETTINGS_DIR}/live/*/units/*.conf; do
  [ -f "$f" ] || continue
  s=${{f%/units/*}}; s=${{s##*/}}; u=${{f##*/}}; u=${{u%.conf}}
  h=$(sha256sum "/etc/systemd/system/$u.d/attache.conf" 2>/dev/null); h=${{h%% *}}
  printf 'setting\t%s\t%s %s\n' "$s" "$u" "$h"
done
for d in {SETTINGS_DIR}/previous/*/; do [ -d "$d" ] || continue; d=${{d%/}}; printf 'settings-previous\t%s\n' "${{d##*/}}"; done
for f in {SETTINGS_DIR}/live/*/credentials/*.sum; do
  [ -f "$f" ] || continue
  s=${{f%/credentials/*}}; s=${{s##*/}}; n=${{f##*/}}; n=${{n%.sum}}; l=; IFS= read -r l <"$f"
  printf 'secret\t%s\t%s %s %s\n' "$s" "$n" "$l" "$(stat -c %Y "${{f%.sum}}.cred" 2>/dev/null || echo 0)"
done
"#
    )
}

/// Reads one `setting` or `secret` line of the facts into `state`.
pub fn parse_facts_line(
    state: &mut BTreeMap<String, SettingsState>,
    key: &str,
    service: &str,
    rest: &str,
) {
    let st = state.entry(service.to_owned()).or_default();
    let w: Vec<&str> = rest.split_whitespace().collect();
    match (key, w.as_slice()) {
        ("settings-previous", _) => st.previous = true,
        ("setting", [unit, hash @ ..]) => {
            st.units
                .insert((*unit).to_owned(), hash.first().unwrap_or(&"").to_string());
        }
        ("secret", [name, salt, hash, size, mode, since]) => {
            st.secrets.insert(
                (*name).to_owned(),
                SecretState {
                    salt: (*salt).to_owned(),
                    hash: (*hash).to_owned(),
                    size: size.parse().unwrap_or(0),
                    encrypted: *mode == "encrypted",
                    since: since.parse().unwrap_or(0),
                },
            );
        }
        ("secret", [name, ..]) => {
            // A `.sum` attache cannot read: treat it as changed.
            st.secrets
                .insert((*name).to_owned(), SecretState::default());
        }
        _ => {}
    }
}

/// Starts `service`'s next settings: its drop-ins, and the credentials
/// that stay as they are (`keep`), copied from the live ones.
pub fn stage(service: &str, dropins: &BTreeMap<String, String>, keep: &[String]) -> Script {
    let next = format!("{SETTINGS_DIR}/next/{service}");
    let live = format!("{SETTINGS_DIR}/live/{service}");
    let mut s = format!(
        "set -e\numask 077\nmkdir -p {SETTINGS_DIR}\nchmod 0700 {SETTINGS_DIR}\nrm -rf {n} {b}\nmkdir -p {n}/units {n}/credentials\n",
        n = quote(&next),
        // A `before` left by an earlier deploy that ended badly is not
        // this deploy's to restore.
        b = quote(&format!("{SETTINGS_DIR}/before/{service}"))
    );
    for (unit, text) in dropins {
        s += &format!(
            "cat > {} <<'ATTACHE_EOF'\n{text}ATTACHE_EOF\nchmod 0644 {0}\n",
            quote(&format!("{next}/units/{unit}.conf"))
        );
    }
    for name in keep {
        s += &format!(
            "cp -p {} {} {}\n",
            quote(&format!("{live}/credentials/{name}.cred")),
            quote(&format!("{live}/credentials/{name}.sum")),
            quote(&format!("{next}/credentials/"))
        );
    }
    Script::new("staging the settings", s)
}

/// Stores one credential of the next settings from stdin: first a line
/// with its `.sum` record, then the value. The value is never an argument
/// nor a plaintext file when `encrypted` (`systemd-creds` reads it from the
/// pipe); otherwise it is written to a root-only file.
pub fn stage_secret(service: &str, name: &str, encrypted: bool) -> Script {
    let dir = format!("{SETTINGS_DIR}/next/{service}/credentials");
    let cred = format!("{dir}/{name}.cred");
    let store = if encrypted {
        format!(
            "systemd-creds encrypt --name={} - {}",
            quote(name),
            quote(&format!("{cred}.tmp"))
        )
    } else {
        format!("cat > {}", quote(&format!("{cred}.tmp")))
    };
    Script::new(
        "storing a secret",
        format!(
            "set -e\numask 077\ncd {dir}\nIFS= read -r sum\n{store}\nchmod 0600 {tmp}\nmv -f {tmp} {cred}\nprintf '%s\\n' \"$sum\" > {sum}\n",
            dir = quote(&dir),
            tmp = quote(&format!("{cred}.tmp")),
            cred = quote(&cred),
            sum = quote(&format!("{dir}/{name}.sum")),
        ),
    )
}

/// The first line [`stage_secret`] reads: salt, salted hash, size, mode.
pub fn secret_sum(salt: &str, hash: &str, size: usize, encrypted: bool) -> String {
    format!(
        "{salt} {hash} {size} {}\n",
        if encrypted { "encrypted" } else { "plain" }
    )
}

/// Switches `service` to its staged settings; what they replace is kept
/// for a rollback. With `restart`, the units start again on them (a
/// settings-only change; an attach or reattach restarts them itself).
pub fn apply(service: &str, restart: &[String]) -> Script {
    let svc = quote(service);
    let mut s = format!(
        "set -e\n{SETTINGS_FNS}mkdir -p \"$S/live/\"{svc} \"$S/before\"\nunplug {svc}\nrm -rf \"$S/before/\"{svc}\nmv \"$S/live/\"{svc} \"$S/before/\"{svc}\nmv \"$S/next/\"{svc} \"$S/live/\"{svc}\nplug {svc}\nsync -f \"$S\" 2>/dev/null || true\nsystemctl daemon-reload\n"
    );
    if !restart.is_empty() {
        s += &format!("systemctl restart {}\n", words(restart));
    }
    Script::new("applying the settings", s)
}

/// Puts back the settings a deploy replaced (nothing when it replaced
/// none, or they are back already), restarting `restart` if it did.
pub fn restore_settings(service: &str, restart: &[String]) -> String {
    let mut s = format!(
        "if restore {}; then systemctl daemon-reload || rc=1",
        quote(service)
    );
    if !restart.is_empty() {
        s += &format!("; systemctl restart {} || rc=1", words(restart));
    }
    s + "; fi\n"
}

pub fn restore(service: &str, restart: &[String]) -> Script {
    Script::new(
        "putting the settings back",
        format!(
            "{SETTINGS_FNS}rc=0\n{}exit $rc\n",
            restore_settings(service, restart)
        ),
    )
}

/// After a confirmed deploy: the settings `attache rollback` goes back to.
/// `applied`: this deploy switched them (what it replaced); else they did
/// not change with the image (a copy of the live ones). A service without
/// settings starts no process: the tests are builtins.
pub fn record_settings(service: &str, applied: bool) -> Script {
    let svc = quote(service);
    let (from, take) = if applied {
        ("before", "mv")
    } else {
        ("live", "cp -a")
    };
    Script::new(
        "recording the previous settings",
        format!(
            "S={SETTINGS_DIR}; p=\"$S/previous/\"{svc}\n\
             if [ -e \"$p\" ] || [ -L \"$p\" ]; then rm -rf \"$p\" || exit 1; fi\n\
             if [ -d \"$S/{from}/\"{svc} ]; then {{ [ -d \"$S/previous\" ] || mkdir -p \"$S/previous\"; }} || exit 1; {take} \"$S/{from}/\"{svc} \"$p\" || true; fi"
        ),
    )
}

/// `attache rollback`: the live and previous settings trade places, when
/// previous ones are recorded; `restart` starts units again on them.
pub fn swap_settings(service: &str, restart: &[String]) -> Script {
    let svc = quote(service);
    let mut s = format!(
        "set -e\n{SETTINGS_FNS}[ -d \"$S/previous/\"{svc} ] || exit 0\nmkdir -p \"$S/live/\"{svc}\nunplug {svc}\nrm -rf \"$S/swap\"\nmv \"$S/live/\"{svc} \"$S/swap\"\nmv \"$S/previous/\"{svc} \"$S/live/\"{svc}\nmv \"$S/swap\" \"$S/previous/\"{svc}\nplug {svc}\nsystemctl daemon-reload\n"
    );
    if !restart.is_empty() {
        s += &format!("systemctl restart {}\n", words(restart));
    }
    Script::new("putting the previous settings back", s)
}

/// Detach: the service's drop-ins and credentials go with its image.
pub fn forget_settings(service: &str) -> Script {
    let svc = quote(service);
    Script::new(
        "removing the settings",
        format!(
            "{SETTINGS_FNS}unplug {svc}\nfor d in live next before previous; do rm -rf \"$S/$d/\"{svc}; done\nsystemctl daemon-reload\n"
        ),
    )
}
