//! The remote protocol: every thing attache does on a host, as a [`Script`]
//! rendered here (quoting too, in [`words`] and [`quote`]) next to the
//! parser of what it prints. Pure functions of their arguments, so they are
//! unit-tested here and checked by shellcheck; the e2e suite runs them on
//! real hosts.
//!
//! Host-side state, all of it attache's own:
//! - `/var/lib/portables/NAME_VERSION.raw`: the images;
//! - `/var/lib/attache/prefixes/FILE.raw`: the unit prefixes an image
//!   declares (images from before these files declare their name);
//! - `/var/lib/attache/manifests/FILE.raw.json`: the image's manifest (what
//!   it holds, as packed into it), for `attache diff`;
//! - `/var/lib/attache/signatures/FILE.raw.sig`: the image's block
//!   signature, the basis of a delta upgrade (see [`delta`]);
//! - `/var/lib/attache/NAME.previous`: what `attache rollback` goes back to;
//! - `/var/lib/attache/unlink`: detaches one image's units by hand, where
//!   portabled before 257 would take other images along;
//! - `/var/lib/attache/revert.sh` (+ `run-revert`, the boot unit
//!   `attache-revert.service` and the timer `attache-revert-now.timer`): the
//!   dead-man revert of a deploy that was never confirmed;
//! - `/var/lib/attache/settings/`: per-host settings and credentials (see
//!   [`settings`]);
//! - `/run/attache/lock`: the per-host lock, held while our SSH session is.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::inventory::{Check, HttpUrl};
use crate::names::{ImageFile, PORTABLES};

pub const STATE_DIR: &str = "/var/lib/attache";

/// A script to run as root on a host, and what it is for (the error says
/// "the connection was lost while {doing}").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Script {
    pub text: String,
    pub doing: &'static str,
}

impl Script {
    fn new(doing: &'static str, text: impl Into<String>) -> Self {
        Script {
            text: text.into(),
            doing,
        }
    }
}

/// Single-quotes `s` for sh.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Quotes each word and joins them: a command line for sh.
pub fn words<S: AsRef<str>>(args: &[S]) -> String {
    args.iter()
        .map(|a| quote(a.as_ref()))
        .collect::<Vec<_>>()
        .join(" ")
}

// ---- the lock -------------------------------------------------------------

/// Prints what is known of the lock's holder: the record it wrote, the
/// host's clock, and the processes that hold the flock now. Those come from
/// /proc/PID/fdinfo, which lists a flock only on the open file that took it,
/// so a process that merely has the file open is not counted.
const LOCK_HOLDERS: &str = r#"cat /run/attache/lock.holder 2>/dev/null
printf 'now\t%s\n' "$(date +%s)"
for fd in /proc/[0-9]*/fd/*; do
  [ "$(readlink "$fd" 2>/dev/null)" = /run/attache/lock ] || continue
  p=${fd#/proc/}; p=${p%%/*}
  grep -qs '^lock:.*FLOCK' "/proc/$p/fdinfo/${fd##*/}" && printf 'holder_pid\t%s\n' "$p"
done
true"#;

/// Ends the output of the script a lock runs once taken (see [`lock_then`]),
/// with its exit code.
pub const READ_END: &str = "@read-end";

/// Takes the per-host lock and holds it while our stdin stays open: the lock
/// ends with the connection, so a killed attache never leaves it behind.
/// The holder's record names the host-side process that holds it (`$$`,
/// which becomes the `cat`), for `attache unlock`. flock is looked for
/// before anything is written. Once taken, runs `then` (its output, then
/// [`READ_END`] and its exit code): taking the lock and reading the host
/// in one round-trip.
pub fn lock_then(holder: &str, then: Option<&Script>) -> Script {
    let then = then
        .map(|t| format!("( {} ) </dev/null 2>&1; echo \"{READ_END} $?\"\n", t.text))
        .unwrap_or_default();
    Script::new(
        "taking the deploy lock",
        format!(
            r#"command -v flock >/dev/null || {{ echo NOFLOCK; exit 69; }}
mkdir -p /run/attache
exec 9>>/run/attache/lock
if ! flock -n 9; then echo BUSY; exec 9>&-; {LOCK_HOLDERS}; exit 75; fi
printf 'holder\t%s\nfrom\t%s\npid\t%s\nsince\t%s\n' {holder} "${{SSH_CLIENT%% *}}" $$ "$(date +%s)" > /run/attache/lock.holder
echo LOCKED
{then}exec cat >/dev/null"#,
            holder = quote(holder)
        ),
    )
}

/// Who holds the lock, without taking it.
pub fn lock_holder() -> Script {
    Script::new(
        "reading who holds the deploy lock",
        format!("[ -e /run/attache/lock ] || exit 0\n{LOCK_HOLDERS}"),
    )
}

/// Ends the process `pid` if, and only if, it holds the lock now; prints
/// `UNLOCKED`, or `GONE` when it no longer does.
pub fn unlock(pid: u32) -> Script {
    Script::new(
        "ending the lock's holder",
        format!(
            r#"pid={pid}
if ! {{ {LOCK_HOLDERS}; }} | grep -qx "$(printf 'holder_pid\t%s' "$pid")"; then echo GONE; exit 0; fi
kill -TERM "$pid"
i=0; while [ -d "/proc/$pid" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
if [ -d "/proc/$pid" ]; then kill -KILL "$pid"; fi
echo UNLOCKED"#
        ),
    )
}

/// What is known of the lock's holder (see [`lock_holder`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LockHolder {
    /// Who: `user@machine pid N` of the attache that took it.
    pub who: String,
    /// The SSH client address it came from, when the host knew it.
    pub from: String,
    /// When it took the lock, and the host's clock now (seconds).
    pub since: Option<u64>,
    pub now: Option<u64>,
    /// The host-side processes holding the lock now.
    pub pids: Vec<u32>,
}

impl LockHolder {
    pub fn age(&self) -> Option<Duration> {
        Some(Duration::from_secs(self.now?.checked_sub(self.since?)?))
    }
}

impl std::fmt::Display for LockHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.who.is_empty() {
            "holder unknown"
        } else {
            &self.who
        })?;
        if !self.from.is_empty() {
            write!(f, " from {}", self.from)?;
        }
        let pids: Vec<String> = self.pids.iter().map(u32::to_string).collect();
        match pids.len() {
            0 => {}
            1 => write!(f, "; host process {}", pids[0])?,
            _ => write!(f, "; host processes {}", pids.join(", "))?,
        }
        if let Some(age) = self.age() {
            write!(f, ", held for {}", human_age(age))?;
        }
        Ok(())
    }
}

fn human_age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min", s / 60),
        _ => format!("{} h {} min", s / 3600, s % 3600 / 60),
    }
}

/// Reads [`lock_holder`]'s output (also what [`lock`] prints after `BUSY`).
/// A record from before the fields existed is one line: who.
pub fn parse_lock_holder(out: &str) -> LockHolder {
    let mut h = LockHolder::default();
    for line in out.lines() {
        match line.split_once('\t') {
            Some(("holder", v)) => h.who = v.trim().to_owned(),
            Some(("from", v)) => h.from = v.trim().to_owned(),
            Some(("since", v)) => h.since = v.trim().parse().ok(),
            Some(("now", v)) => h.now = v.trim().parse().ok(),
            Some(("holder_pid", v)) => h.pids.extend(v.trim().parse::<u32>().ok()),
            Some(("pid", _)) => {}
            _ if h.who.is_empty() && !line.trim().is_empty() && line.trim() != "BUSY" => {
                h.who = line.trim().to_owned()
            }
            _ => {}
        }
    }
    h.pids.sort_unstable();
    h.pids.dedup();
    h
}

// ---- what the host has ----------------------------------------------------

/// One attached unit and the image its portable drop-in names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedUnit {
    pub unit: String,
    pub image: String,
}

/// Everything planning needs to know about a host, read in one round trip.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostFacts {
    pub systemd: u32,
    pub portablectl: bool,
    /// curl is installed: HTTPS checks need it.
    pub curl: bool,
    pub free_kb: u64,
    pub attached: Vec<AttachedUnit>,
    /// Images in /var/lib/portables: path -> mtime.
    pub images: BTreeMap<String, u64>,
    /// sha256 of the files asked for that exist.
    pub sha256: BTreeMap<String, String>,
    /// Image file name -> prefixes it declares (attache's record).
    pub prefixes: BTreeMap<String, Vec<String>>,
    /// Service -> image `attache rollback` goes back to.
    pub previous: BTreeMap<String, String>,
    /// A dead-man revert of an earlier deploy is still armed, or running.
    pub revert_pending: bool,
    /// portabled's profiles on the host (sorted).
    pub profiles: Vec<String>,
    /// Image file names whose manifest the host keeps.
    pub manifests: std::collections::BTreeSet<String>,
    /// `systemd-creds` is there (with systemd >= 250: credentials can be
    /// encrypted with the host's key).
    pub creds: bool,
    /// Service -> the settings attache wrote for it.
    pub settings: BTreeMap<String, SettingsState>,
}

impl HostFacts {
    /// Credentials can be encrypted for this host.
    pub fn can_encrypt(&self) -> bool {
        self.creds && self.systemd >= 250
    }

    /// The image `service` has attached: the one its units' drop-ins name,
    /// told apart by file name, never by unit prefix.
    pub fn attached_image(&self, service: &str) -> Option<&str> {
        self.attached
            .iter()
            .find(|a| ImageFile::parse(&a.image).is_some_and(|f| f.name() == service))
            .map(|a| a.image.as_str())
    }

    /// The host keeps the manifest of `image`.
    pub fn has_manifest(&self, image: &str) -> bool {
        self.manifests.contains(crate::names::basename(image))
    }

    /// Units attached from `image`.
    pub fn units_of(&self, image: &str) -> Vec<&str> {
        let mut u: Vec<&str> = self
            .attached
            .iter()
            .filter(|a| a.image == image)
            .map(|a| a.unit.as_str())
            .collect();
        u.sort();
        u.dedup();
        u
    }

    /// The prefixes `image` declares: attache's record, else its name, which
    /// is what every image attache built before the record existed declares.
    pub fn declared_prefixes(&self, image: &str) -> Vec<String> {
        let declared = self
            .prefixes
            .get(crate::names::basename(image))
            .map(|p| p.join(" "));
        let name = ImageFile::parse(image)
            .map(|f| f.name().to_owned())
            .unwrap_or_default();
        crate::names::portable_prefixes(declared.as_deref(), &name)
    }

    /// How to detach `service`'s image: portabled before 257 takes along
    /// every image whose name starts with the service's, so there by hand.
    pub fn detach_verb(&self, service: &str) -> Verb {
        if self.systemd < 257 && self.others_named_like(service) {
            Verb::Unlink
        } else {
            Verb::Detach
        }
    }

    /// Units of other services that `prefixes` would match: portabled would
    /// stop or detach them along with `service`.
    pub fn others_matching(&self, service: &str, prefixes: &[String]) -> Vec<&AttachedUnit> {
        self.attached
            .iter()
            .filter(|a| ImageFile::parse(&a.image).is_none_or(|f| f.name() != service))
            .filter(|a| {
                prefixes
                    .iter()
                    .any(|p| crate::names::unit_matches_prefix(&a.unit, p))
            })
            .collect()
    }

    /// Another service's attached image whose file name starts with this
    /// service's name (`shop-admin_1.0.raw` for `shop`).
    pub fn others_named_like(&self, service: &str) -> bool {
        self.attached.iter().any(|a| {
            ImageFile::parse(&a.image).is_some_and(|f| f.name() != service)
                && crate::names::basename(&a.image).starts_with(service)
        })
    }

    /// Image files of `service` on the host, newest first.
    pub fn images_of(&self, service: &str) -> Vec<&str> {
        let mut v: Vec<(&u64, &String)> = self
            .images
            .iter()
            .filter(|(p, _)| ImageFile::parse(p).is_some_and(|f| f.name() == service))
            .map(|(p, t)| (t, p))
            .collect();
        v.sort_by(|a, b| b.0.cmp(a.0).then_with(|| b.1.cmp(a.1)));
        v.into_iter().map(|(_, p)| p.as_str()).collect()
    }
}

/// Reads the host's facts; hashes `hash` (paths) where they exist, and every
/// attached image too when `hash_attached`. Shell builtins wherever they
/// do, and one call per tool for all files: it runs under the lock while
/// the image builds, and each process costs 30-150 ms on a slow host.
pub fn facts(hash: &[String], hash_attached: bool) -> Script {
    let hash_list = words(hash);
    let attached_hash = if hash_attached {
        r#"set -- "$@" "$img""#
    } else {
        ":"
    };
    Script::new(
        "reading the host's state",
        format!(
            r##"set -u
nl='
'
v=$(systemctl --version 2>/dev/null); v=${{v#systemd }}
printf 'systemd\t%s\n' "${{v%%[!0-9]*}}"
printf 'portablectl\t'; command -v portablectl || {{ [ -x /usr/lib/systemd/portablectl ] && echo /usr/lib/systemd/portablectl; }} || echo
printf 'curl\t'; command -v curl || echo
d={PORTABLES}; [ -d $d ] || d=/var/lib
v=$(df -Pk $d); v=${{v#*"$nl"}}
set -f; set -- $v; set +f
printf 'free_kb\t%s\n' "${{4-}}"
set --
for f in {PORTABLES}/*.raw; do [ -f "$f" ] && set -- "$@" "$f"; done
[ $# = 0 ] || stat --printf 'image\t%Y\t%n\n' -- "$@"
for f in {STATE_DIR}/prefixes/*.raw; do [ -f "$f" ] || continue; l=; IFS= read -r l <"$f"; printf 'prefixes\t%s\t%s\n' "${{f##*/}}" "$l"; done
for f in {STATE_DIR}/manifests/*.raw.json; do [ -f "$f" ] && f=${{f##*/}} && printf 'manifest\t%s\n' "${{f%.json}}"; done
for f in {STATE_DIR}/*.previous; do [ -f "$f" ] || continue; n=${{f##*/}}; l=; IFS= read -r l <"$f"; printf 'previous\t%s\t%s\n' "${{n%.previous}}" "$l"; done
{{ [ -e {STATE_DIR}/revert.sh ] || [ -e {STATE_DIR}/revert.running ]; }} && printf 'revert\tpending\n'
for p in /usr/lib/systemd/portable/profile/* /usr/local/lib/systemd/portable/profile/* /etc/systemd/portable/profile/* /run/systemd/portable/profile/*; do [ -d "$p" ] && printf 'profile\t%s\n' "${{p##*/}}"; done
{settings}set --
for f in /etc/systemd/system.attached/*.d/20-portable.conf /run/systemd/system.attached/*.d/20-portable.conf; do
  [ -f "$f" ] || continue
  d=${{f%/20-portable.conf}}; u=${{d##*/}}; u=${{u%.d}}
  l=; IFS= read -r l <"$f"
  case $l in "# Drop-in created for image '"*"', do not edit.") ;; *) continue ;; esac
  img=${{l#"# Drop-in created for image '"}}; img=${{img%"', do not edit."}}
  [ -n "$img" ] || continue
  printf 'attached\t%s\t%s\n' "$u" "$img"
  {attached_hash}
done
set -- {hash_list} "$@"; n=$#; seen=$nl
for f in "$@"; do
  [ -f "$f" ] || continue
  case $seen in *"$nl$f$nl"*) continue ;; esac
  seen=$seen$f$nl; set -- "$@" "$f"
done
shift $n
if [ $# -gt 0 ]; then o=$(sha256sum -- "$@"); IFS=$nl; set -f; printf 'sha256\t%s\n' $o; unset IFS; set +f; fi
true"##,
            settings = settings::facts_part(),
        ),
    )
}

pub fn parse_facts(out: &str) -> HostFacts {
    let mut f = HostFacts::default();
    for line in out.lines() {
        let mut parts = line.splitn(3, '\t');
        let (Some(key), Some(a)) = (parts.next(), parts.next()) else {
            continue;
        };
        let b = parts.next().unwrap_or("");
        match key {
            "systemd" => f.systemd = a.trim().parse().unwrap_or(0),
            "portablectl" => f.portablectl = !a.trim().is_empty(),
            "curl" => f.curl = !a.trim().is_empty(),
            "free_kb" => f.free_kb = a.trim().parse().unwrap_or(u64::MAX),
            "attached" => f.attached.push(AttachedUnit {
                unit: a.to_owned(),
                image: b.to_owned(),
            }),
            "image" => {
                f.images.insert(b.to_owned(), a.parse().unwrap_or(0));
            }
            "prefixes" => {
                f.prefixes.insert(
                    a.to_owned(),
                    b.split_whitespace().map(str::to_owned).collect(),
                );
            }
            "previous" if !b.trim().is_empty() => {
                f.previous.insert(a.to_owned(), b.trim().to_owned());
            }
            "revert" => f.revert_pending = true,
            "profile" => f.profiles.push(a.to_owned()),
            "manifest" => {
                f.manifests.insert(a.to_owned());
            }
            "creds" => f.creds = !a.trim().is_empty(),
            "setting" | "secret" | "settings-previous" => {
                settings::parse_facts_line(&mut f.settings, key, a, b)
            }
            "sha256" => {
                if let Some((hash, path)) = a.split_once("  ") {
                    if hash.len() == 64 {
                        f.sha256.insert(path.to_owned(), hash.to_owned());
                    }
                }
            }
            _ => {}
        }
    }
    f.profiles.sort();
    f.profiles.dedup();
    f
}

// ---- images ---------------------------------------------------------------

/// Where an upload goes before it is checked: a name portabled never looks
/// at (not `.raw`).
pub fn partial_path(target: &str) -> String {
    format!(
        "{PORTABLES}/.{}.attache-partial",
        crate::names::basename(target)
    )
}

/// Leftovers of an interrupted deploy (we hold the host's lock): partial
/// uploads, half-written signatures, settings staged but never switched.
/// Makes the image directory on a host that never had one, since reading
/// the host (as `--dry-run` and `status` do) creates nothing.
pub fn clear_partials() -> Script {
    Script::new(
        "removing partial uploads",
        format!(
            "mkdir -p {PORTABLES} && rm -f {PORTABLES}/.*.attache-partial {sigs}/*.sig.tmp && rm -rf {settings}/next/*",
            sigs = delta::SIGNATURES,
            settings = settings::SETTINGS_DIR,
        ),
    )
}

/// `then`, after removing partial uploads (which must succeed).
pub fn clear_then(then: &Script) -> Script {
    Script::new(
        then.doing,
        format!("{{ {}; }} || exit 1\n{}", clear_partials().text, then.text),
    )
}

/// Streams stdin into `tmp`.
pub fn receive(tmp: &str) -> Script {
    Script::new("uploading", format!("umask 077; exec cat > {}", quote(tmp)))
}

pub fn remove(paths: &[String]) -> Script {
    Script::new("cleaning up", format!("rm -f {}", words(paths)))
}

/// Where the host keeps the manifest of `image`.
pub fn manifest_path(image: &str) -> String {
    format!(
        "{STATE_DIR}/manifests/{}.json",
        crate::names::basename(image)
    )
}

/// Moves an uploaded manifest (`tmp`) to where the host keeps `image`'s.
pub fn place_manifest(tmp: &str, image: &str) -> Script {
    Script::new(
        "recording the image's manifest",
        format!(
            "mkdir -p {STATE_DIR}/manifests && chmod 0644 {m} && mv -f {m} {r}",
            m = quote(tmp),
            r = quote(&manifest_path(image))
        ),
    )
}

/// How [`push`] moves a checked upload into place.
struct Placing {
    /// An `&&` chain: records the prefixes the image declares (later runs
    /// pass them to portablectl), makes the files 0644 and fsyncs them
    /// (and more files, `also`), renames the manifest (for `attache diff`)
    /// and the image, the image last.
    chain: String,
    /// The directories renamed into, the image's first: fsynced after.
    dirs: Vec<String>,
}

/// `tmp`, `manifest` and `also` are shell words. Each file's data is on
/// disk before its rename, and its directory after (see [`sync_dirs`]): a
/// power cut never leaves a name on a file that is not whole. Only these
/// are synced, not the whole filesystem (`sync -f`), which on a busy host
/// would flush other services' writes too.
fn placing(
    tmp: &str,
    target: &str,
    prefixes: &[String],
    manifest: Option<&str>,
    also: &[&str],
) -> Placing {
    let base = crate::names::basename(target);
    let record = quote(&format!("{STATE_DIR}/prefixes/{base}"));
    let staged = quote(&format!("{STATE_DIR}/prefixes/{base}.tmp"));
    let mut dirs = vec![PORTABLES.to_owned(), format!("{STATE_DIR}/prefixes")];
    let mut files = vec![staged.clone(), tmp.to_owned()];
    let mut renames = format!("mv -f {staged} {record} && ");
    if let Some(m) = manifest {
        dirs.push(format!("{STATE_DIR}/manifests"));
        files.push(m.to_owned());
        renames += &format!("mv -f {m} {} && ", quote(&manifest_path(target)));
    }
    let files = files.join(" ");
    Placing {
        chain: format!(
            "printf '%s\\n' {p} > {staged} && chmod 0644 {files} && \
             {{ sync {files}{also} 2>/dev/null || true; }} && {renames}mv -f {tmp} {f}",
            p = quote(&prefixes.join(" ")),
            also = also.iter().map(|a| format!(" {a}")).collect::<String>(),
            f = quote(target),
        ),
        dirs,
    }
}

/// Makes `dirs` unless they all are there (`test` is a builtin: no process).
fn mkdirs(dirs: &[String]) -> String {
    let test: Vec<String> = dirs
        .iter()
        .map(|d| format!("[ -d {} ]", quote(d)))
        .collect();
    format!("{} || mkdir -p {}", test.join(" && "), words(dirs))
}

/// fsyncs `dirs` (coreutils >= 8.24 fsyncs each file named; older ones sync
/// everything, which is slower, not wrong).
fn sync_dirs(dirs: &[String]) -> String {
    format!("{{ sync {} 2>/dev/null || true; }}", words(dirs))
}

/// How a push's command receives its image.
pub enum Body<'a> {
    /// The image itself.
    Whole { size: u64 },
    /// A delta (its script, then its pieces: [`delta::apply_script`])
    /// uploaded to `file`, which rebuilds the image from `basis`; `check`:
    /// the sha256 `basis` must have first, when the host did not vouch for it.
    Delta {
        file: &'a str,
        size: u64,
        basis: &'a str,
        check: Option<&'a str>,
    },
}

/// What [`push`] says on stderr when it refused, each followed by the
/// reason: the image (whole or rebuilt) did not have its sha256; the delta
/// could not be used; the image was placed but its signature not stored.
pub const PUSH_CORRUPT: &str = "attache-push: sha256 ";
pub const PUSH_NO_DELTA: &str = "attache-push: no delta: ";
pub const PUSH_NO_SIGNATURE: &str = "attache-push: no signature: ";

/// The e2e suite's faults in a push (see `deploy::test_fault`).
#[derive(Debug, Default, Clone, Copy)]
pub struct PushFaults {
    /// One byte of the image changes before it is hashed.
    pub corrupt: bool,
    /// The host stops reading after the first MiB for a minute.
    pub stall: bool,
    /// The host waits this long after receiving a delta, before using it.
    pub pause: Option<u64>,
}

/// A whole push in one command. Its stdin carries the body, then the
/// image's manifest (`manifest` bytes), then its signature (`signature`
/// bytes). The image arrives (or is rebuilt from the delta) under `tmp`;
/// only when its sha256 is `sha256` are it and its manifest moved into
/// place and then its signature stored, so that a signature always
/// describes the bytes at its name. Anything failing before the rename
/// removes the partial files and places nothing.
#[allow(clippy::too_many_arguments)]
pub fn push(
    body: &Body,
    tmp: &str,
    target: &str,
    sha256: &str,
    prefixes: &[String],
    manifest: u64,
    signature: u64,
    faults: PushFaults,
) -> Script {
    let mtmp = partial_path(&format!("{target}.json"));
    let sig = delta::signature_path(target);
    let p = placing(
        "\"$t\"",
        target,
        prefixes,
        (manifest > 0).then_some("\"$m\""),
        if signature > 0 { &["\"$s\""] } else { &[] },
    );
    let mut dirs = p.dirs.clone();
    if signature > 0 {
        dirs.push(delta::SIGNATURES.to_owned());
    }
    // Made first, with the host's umask; the files get 077 until checked.
    let mut s = format!(
        "set -u\nt={t}; m={m}; s={st}; d=\n\
         drop() {{ rm -f \"$t\" \"$m\" \"$s\" ${{d:+\"$d\"}}; cat >/dev/null; }}\n\
         {mkdirs}\numask 077\n",
        t = quote(tmp),
        m = quote(&mtmp),
        st = quote(&format!("{sig}.tmp")),
        mkdirs = mkdirs(&dirs[1..]),
    );
    let ended = |what: &str| {
        format!(
            "{{ drop; echo 'the connection ended before the {what} had arrived' >&2; exit 1; }}"
        )
    };
    // A whole image is sized only when its sha256 is wrong, to tell a cut
    // connection from a damaged upload; a delta before it is run.
    let mut short = String::new();
    match body {
        Body::Whole { size } => {
            if faults.stall {
                let first = (*size).min(1 << 20);
                s += &format!(
                    "{{ head -c {first}; sleep 60; head -c {rest}; }} > \"$t\"\n",
                    rest = size - first,
                );
            } else {
                s += &format!("head -c {size} > \"$t\"\n");
            }
            short = format!(
                "  [ \"$(stat -c %s \"$t\" 2>/dev/null)\" = {size} ] || {}\n",
                ended("image")
            );
        }
        Body::Delta {
            file,
            size,
            basis,
            check,
        } => {
            s += &format!(
                "d={f}\nhead -c {size} > \"$d\" && [ \"$(stat -c %s \"$d\")\" = {size} ] || {}\n",
                ended("delta"),
                f = quote(file),
            );
            if let Some(secs) = faults.pause {
                s += &format!("sleep {secs}\n");
            }
            if let Some(want) = check {
                s += &format!(
                    "h=$(sha256sum {b}); [ \"${{h%% *}}\" = {want} ] || {{ drop; echo '{PUSH_NO_DELTA}'{n}' is not the image its signature describes (changed or damaged)' >&2; exit 67; }}\n",
                    b = quote(basis),
                    want = quote(want),
                    n = quote(crate::names::basename(basis)),
                );
            }
            s += &format!(
                "out=$(sh \"$d\" 2>&1); rc=$?; rm -f \"$d\"; d=\n\
                 [ $rc = 0 ] || {{ drop; printf '{PUSH_NO_DELTA}rebuilding the image from the delta failed: %s\\n' \"$out\" >&2; exit 67; }}\n"
            );
        }
    }
    if faults.corrupt {
        s += "printf x | dd of=\"$t\" bs=1 seek=4096 conv=notrunc 2>/dev/null\n";
    }
    s += &format!(
        "got=$(sha256sum \"$t\"); got=${{got%% *}}\n\
         if [ \"$got\" != {want} ]; then\n{short}  drop; echo \"{PUSH_CORRUPT}$got\" >&2; exit 65\nfi\n",
        want = quote(sha256)
    );
    // The manifest and signature follow the image on stdin: read once the
    // image is known good, sized by one `stat`.
    let mut sized = Vec::new();
    if manifest > 0 {
        s += &format!("head -c {manifest} > \"$m\"\n");
        sized.push("\"$m\"");
    }
    if signature > 0 {
        s += &format!("umask 022; head -c {signature} > \"$s\"\n");
        sized.push("\"$s\"");
    }
    if !sized.is_empty() {
        s += &format!(
            "o=$(stat -c %s {} 2>/dev/null); set -- $o\n",
            sized.join(" ")
        );
    }
    if manifest > 0 {
        s += &format!("[ \"${{1-}}\" = {manifest} ] || {}\n", ended("manifest"));
    }
    s += &format!("{{ {}; }} || {{ drop; exit 1; }}\n", p.chain);
    if signature > 0 {
        s += &format!(
            "k=; {{ [ \"${{{n}-}}\" = {signature} ] && mv -f \"$s\" {f}; }} || {{ rm -f \"$s\"; k=1; }}\n",
            n = sized.len(),
            f = quote(&sig),
        );
    }
    s += &sync_dirs(&dirs);
    s += "\n";
    if signature > 0 {
        s += &format!(
            "[ -z \"$k\" ] || {{ echo '{PUSH_NO_SIGNATURE}it could not be written' >&2; exit 66; }}\n"
        );
    }
    s += "exit 0";
    Script::new("uploading", s)
}

/// Deletes images with their prefix records, manifests and signatures.
pub fn prune(images: &[String]) -> Script {
    let mut paths = images.to_vec();
    paths.extend(
        images
            .iter()
            .map(|i| format!("{STATE_DIR}/prefixes/{}", crate::names::basename(i))),
    );
    paths.extend(images.iter().map(|i| manifest_path(i)));
    paths.extend(images.iter().map(|i| delta::signature_path(i)));
    Script::new("removing old images", format!("rm -f {}", words(&paths)))
}

/// The manifests the host keeps for `images`.
pub fn read_manifests(images: &[String]) -> Script {
    Script::new(
        "reading image manifests",
        format!(
            r#"for f in {list}; do m={STATE_DIR}/manifests/${{f##*/}}.json
if [ -f "$m" ]; then printf '@manifest\t%s\n' "$f"; cat "$m"; echo; else printf '@missing\t%s\n' "$f"; fi
done"#,
            list = words(images)
        ),
    )
}

/// Image path -> its manifest's text, `None` when the host has none.
pub fn parse_manifests(out: &str) -> BTreeMap<String, Option<String>> {
    let mut m = BTreeMap::new();
    let mut cur: Option<(String, String)> = None;
    for line in out.lines() {
        if let Some(img) = line.strip_prefix("@manifest\t") {
            if let Some((i, t)) = cur.take() {
                m.insert(i, Some(t));
            }
            cur = Some((img.to_owned(), String::new()));
        } else if let Some(img) = line.strip_prefix("@missing\t") {
            if let Some((i, t)) = cur.take() {
                m.insert(i, Some(t));
            }
            m.insert(img.to_owned(), None);
        } else if let Some((_, t)) = cur.as_mut() {
            t.push_str(line);
            t.push('\n');
        }
    }
    if let Some((i, t)) = cur {
        m.insert(i, Some(t));
    }
    m
}

/// Which images of a service to delete: all but the `keep` newest, and never
/// the attached one nor the one `.previous` names. `images` is newest first.
pub fn prune_candidates(
    images: &[&str],
    keep: usize,
    attached: Option<&str>,
    previous: Option<&str>,
) -> Vec<String> {
    images
        .iter()
        .enumerate()
        .filter(|(i, p)| *i >= keep.max(1) && Some(**p) != attached && Some(**p) != previous)
        .map(|(_, p)| (*p).to_owned())
        .collect()
}

// ---- portablectl ----------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Attach,
    Reattach,
    Detach,
    /// Detach by hand: only the units whose drop-in names the image. For
    /// portabled before 257, whose detach and reattach also take along
    /// every image whose file name starts with this one's name (measured
    /// on 252: `shop` took `shop-admin` along, explicit prefixes or not).
    Unlink,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Attach => "attach",
            Verb::Reattach => "reattach",
            Verb::Detach | Verb::Unlink => "detach",
        }
    }

    /// Takes an image off the host (nothing of it stays attached).
    pub fn detaches(self) -> bool {
        matches!(self, Verb::Detach | Verb::Unlink)
    }
}

/// Where the host keeps [`UNLINK`]: a file, because systemd-run would read
/// its newlines and `$`s as unit-file syntax.
const UNLINK_PATH: &str = "/var/lib/attache/unlink";

/// Writes [`UNLINK`] where [`Verb::Unlink`] calls it.
fn install_unlink() -> String {
    format!(
        "[ -d {STATE_DIR} ] || mkdir -p {STATE_DIR}\n{}",
        install_file(UNLINK_PATH, UNLINK)
    )
}

/// Writes `text` to `path` (through a temporary file and a rename) unless
/// it is there already: the file's first line is a mark of the text, read
/// with the `read` builtin, so a file that is up to date costs no process
/// (each costs 30-150 ms on a slow host). Syncing is the caller's.
fn install_file(path: &str, text: &str) -> String {
    // FNV-1a: the same mark from every build of the same text.
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let mark = format!("# attache {hash:016x}");
    format!(
        "l=; IFS= read -r l 2>/dev/null <{p} || :\n\
         [ \"$l\" = '{mark}' ] || {{ printf '%s\\n' {body} > {p}.tmp && mv -f {p}.tmp {p}; }}\n",
        p = quote(path),
        body = quote(&format!("{mark}\n{}", text.trim_end_matches('\n'))),
    )
}

/// What `portablectl detach --enable --now` does, for one image's units
/// only: stop them, remove their unit files, drop-ins and enablement links
/// from `system.attached`, reload. `$1` is the image's path.
const UNLINK: &str = r#"img=$1; d=/etc/systemd/system.attached; units=
for f in "$d"/*.d/20-portable.conf; do
  [ -f "$f" ] || continue
  head -n1 "$f" | grep -qF "image '$img'" || continue
  u=${f%/20-portable.conf}; u=${u##*/}; units="$units ${u%.d}"
done
[ -n "$units" ] || { echo "No unit files of $img are attached."; exit 0; }
for u in $units; do case $u in *@.*) ;; *) systemctl stop "$u" || true ;; esac; done
for u in $units; do
  echo "Removed $d/$u."
  rm -f "$d/$u" "$d/$u.d/10-profile.conf" "$d/$u.d/20-portable.conf" "$d"/*.wants/"$u" "$d"/*.requires/"$u"
  rmdir "$d/$u.d" 2>/dev/null || true
done
systemctl daemon-reload"#;

/// One portablectl call, always by full path and with the image's own unit
/// prefixes spelled out: without them portabled matches every unit that
/// starts with the image's name, another service's too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortableCall {
    pub verb: Verb,
    pub image: String,
    pub prefixes: Vec<String>,
    /// Attach and reattach only.
    pub profile: Option<String>,
}

impl PortableCall {
    /// `profile` is used by attach and reattach only.
    pub fn new(verb: Verb, image: &str, prefixes: &[String], profile: &str) -> Self {
        PortableCall {
            verb,
            image: image.to_owned(),
            prefixes: prefixes.to_vec(),
            profile: (!verb.detaches()).then(|| profile.to_owned()),
        }
    }

    pub fn argv(&self) -> Vec<String> {
        if self.verb == Verb::Unlink {
            return ["/bin/sh", UNLINK_PATH, &self.image]
                .map(str::to_owned)
                .to_vec();
        }
        let mut v: Vec<String> = vec![
            "portablectl".into(),
            self.verb.as_str().into(),
            "--enable".into(),
            "--now".into(),
        ];
        if let (Some(p), false) = (&self.profile, self.verb.detaches()) {
            v.push("--profile".into());
            v.push(p.clone());
        }
        v.push(self.image.clone());
        v.extend(self.prefixes.iter().cloned());
        v
    }
}

/// Runs portablectl in a transient scope of its own, so that a dropped SSH
/// connection cannot cut an attach or reattach in half: the scope is not
/// the login session's (which logind may end with the connection), and its
/// output goes to a file, not to the connection. Then prints that output
/// and its exit code. A scope, not a service with `--wait`: the command
/// runs in this process tree (systemd-run execs it once the scope exists),
/// which costs a third as much on a slow host (measured 0.3 s against
/// 0.6-1.4 s on the lab guest under load). The output is read back only
/// when portablectl failed (nothing reads it otherwise), and the exit code
/// with `read`: each process costs 30-150 ms there.
pub fn portablectl(id: &str, call: &PortableCall) -> Script {
    let log = format!("/run/attache/{id}.log");
    let rc = format!("/run/attache/{id}.rc");
    let inner = format!(
        "{cmd} >{log} 2>&1; echo $? >{rc}",
        cmd = words(&call.argv()),
        log = quote(&log),
        rc = quote(&rc)
    );
    Script::new(
        if call.verb.detaches() {
            "detaching"
        } else {
            "activating"
        },
        format!(
            r#"{install}[ -d /run/attache ] || mkdir -p /run/attache
[ ! -e {rc} ] || rm -f {rc}
: >{log}
systemd-run --quiet --collect --scope --unit={unit} /bin/sh -c {inner} </dev/null >/dev/null 2>&1
rc=1; {{ read -r rc <{rc}; }} 2>/dev/null
[ "$rc" = 0 ] || cat {log} 2>/dev/null
exit "${{rc:-1}}""#,
            log = quote(&log),
            rc = quote(&rc),
            unit = quote(&format!("attache-{id}")),
            inner = quote(&inner),
            install = if call.verb == Verb::Unlink {
                install_unlink()
            } else {
                String::new()
            },
        ),
    )
}

/// portablectl reports that it cannot start template units directly; that
/// is expected and not worth showing as a failure.
pub fn strip_harmless(s: &str) -> String {
    s.lines()
        .filter(|l| !l.contains("is missing the instance name"))
        .collect::<Vec<_>>()
        .join("\n")
}

// ---- what rollback goes back to -------------------------------------------

fn previous_file(service: &str) -> String {
    format!("{STATE_DIR}/{service}.previous")
}

/// Records (atomically) the image `attache rollback` goes back to. The
/// tests are builtins: a fork costs 30-150 ms on a slow host. The file and
/// its directory are synced, not the whole file system (`sync -f`), which
/// right after a push writes out the image's pages too: 0.3-0.5 s on the
/// lab guest.
pub fn record_previous(service: &str, previous: Option<&str>) -> Script {
    let file = previous_file(service);
    let text = match previous {
        Some(p) => format!(
            "{{ [ -d {STATE_DIR} ] || mkdir -p {STATE_DIR}; }} && printf '%s\\n' {p} > {f}.tmp && mv -f {f}.tmp {f} && {{ sync {f} {STATE_DIR} 2>/dev/null || true; }}",
            p = quote(p),
            f = quote(&file)
        ),
        None => format!(
            "if [ -e {f} ] || [ -L {f} ]; then rm -f {f}; fi",
            f = quote(&file)
        ),
    };
    Script::new("recording the previous image", text)
}

/// What [`still_switched`] prints before failing: the service, then the
/// image its drop-ins name instead (empty: none).
pub const MOVED: &str = "@moved";

/// After the disarm, before anything is recorded: the drop-ins of each
/// `(service, image, units)` still name `image`, and one at least does.
/// Only shell builtins, so it starts no process on the host. Prints
/// [`MOVED`] and fails at the first service that moved. `RootImage` is not
/// read again: the health check has just judged it, and only the host's
/// own revert could have moved anything since, which the disarm tells.
pub fn still_switched(services: &[(&str, &str, Vec<String>)]) -> Script {
    let mut s = String::from("h=\"# Drop-in created for image '\"; t=\"', do not edit.\"\n");
    for (service, image, units) in services {
        if units.is_empty() {
            continue;
        }
        s += &format!(
            r#"n=
for u in {units}; do
  f=/etc/systemd/system.attached/$u.d/20-portable.conf
  [ -f "$f" ] || f=/run/systemd/system.attached/$u.d/20-portable.conf
  [ -f "$f" ] || continue
  l=
  IFS= read -r l <"$f"
  case $l in "$h"*"$t") ;; *) continue ;; esac
  i=${{l#"$h"}}; i=${{i%"$t"}}
  [ "$i" = {image} ] || {{ printf '{MOVED}\t%s\t%s\n' {service} "$i"; exit 1; }}
  n=1
done
[ -n "$n" ] || {{ printf '{MOVED}\t%s\t\n' {service}; exit 1; }}
"#,
            units = words(units),
            image = quote(image),
            service = quote(service),
        );
    }
    Script::new("checking that nothing moved", s)
}

/// The service that moved and the image its drop-ins name (empty: none),
/// from [`still_switched`]'s output.
pub fn parse_moved(out: &str) -> Option<(String, String)> {
    out.lines().find_map(|l| {
        let rest = l.strip_prefix(MOVED)?.strip_prefix('\t')?;
        let (service, image) = rest.split_once('\t').unwrap_or((rest, ""));
        Some((service.to_owned(), image.to_owned()))
    })
}

// ---- the journal -----------------------------------------------------------

/// What `attache logs` asks the journal for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JournalQuery {
    /// Units, template instances as globs (`echo@*.service`).
    pub units: Vec<String>,
    pub since: Option<String>,
    pub lines: Option<u32>,
    pub follow: bool,
}

/// `journalctl -o json` for the units. Following, journalctl runs while our
/// stdin stays open: when the channel closes, `cat` ends and takes it
/// along, so nothing keeps running on the host; and if journalctl ends by
/// itself (a bad `--since`), the script ends too.
pub fn journal(q: &JournalQuery) -> Script {
    let mut args: Vec<String> = vec![
        "journalctl".into(),
        "--no-pager".into(),
        "-o".into(),
        "json".into(),
    ];
    if let Some(s) = &q.since {
        args.push(format!("--since={s}"));
    }
    match (q.lines, &q.since) {
        (Some(n), _) => args.push(format!("--lines={n}")),
        (None, None) if !q.follow => args.push("--lines=100".into()),
        _ => {}
    }
    for u in &q.units {
        args.push(format!("--unit={u}"));
    }
    let cmd = words(&args);
    if !q.follow {
        return Script::new("reading the journal", cmd);
    }
    Script::new(
        "following the journal",
        format!(
            r#"{cmd} --follow & j=$!
(while kill -0 $j 2>/dev/null; do sleep 1; done; kill $$ 2>/dev/null) >/dev/null 2>&1 &
cat >/dev/null 2>&1
kill $j 2>/dev/null
exit 0"#
        ),
    )
}

/// The units a journal query for `service` (every attached service when
/// `None`) reads: all its attached units, templates as globs.
pub fn journal_units(facts: &HostFacts, service: Option<&str>) -> Vec<String> {
    let mut units: Vec<String> = facts
        .attached
        .iter()
        .filter(|a| {
            service.is_none_or(|s| ImageFile::parse(&a.image).is_some_and(|f| f.name() == s))
        })
        .map(|a| a.unit.replace("@.", "@*."))
        .collect();
    units.sort();
    units.dedup();
    units
}

// ---- health ---------------------------------------------------------------

/// The host's clocks and then the units' states: the first sample of a
/// settle time, taken on the host as soon as the units started. The clocks
/// are `/proc/uptime` (hundredths of a second), which [`settle_until`]
/// waits on, and the monotonic clock systemd's `…TimestampMonotonic`
/// properties use (`/proc/timer_list`, root only; read with builtins, as
/// every process costs on a slow host), which tells how long ago the units
/// became active.
pub fn sample(units: &[String]) -> Script {
    Script::new(
        "reading unit states",
        format!(
            "read up _ </proc/uptime; mono=; {{ read -r _; read -r _; read -r _ _ mono _; }} 2>/dev/null </proc/timer_list; \
             echo \"@uptime=$up\"; echo \"@mono=$mono\"; {}",
            show(units).text
        ),
    )
}

/// The host's clock in a [`sample`], in hundredths of a second.
pub fn parse_uptime(out: &str) -> Option<u64> {
    let up = out.lines().find_map(|l| l.strip_prefix("@uptime="))?;
    let (s, cs) = up.trim().split_once('.')?;
    Some(s.parse::<u64>().ok()? * 100 + cs.parse::<u64>().ok()?)
}

/// The host's monotonic clock in a [`sample`], in microseconds.
pub fn parse_monotonic(out: &str) -> Option<u64> {
    let ns = out.lines().find_map(|l| l.strip_prefix("@mono="))?;
    Some(ns.trim().parse::<u64>().ok()? / 1000)
}

/// Waits on the host until `settle` has passed since its uptime clock read
/// `at` (see [`sample`] and `health::Started::settle_from`): a settle time
/// measured from when the units started, not from when attache heard of it.
pub fn settle_until(at: u64, settle: Duration) -> Script {
    let end = at + settle.as_millis() as u64 / 10;
    Script::new(
        "waiting for the settle time",
        format!(
            "read up _ </proc/uptime; now=${{up%.*}}${{up#*.}}; left=$(({end} - now)); \
             [ \"$left\" -le 0 ] || sleep \"$((left / 100)).$(printf %02d $((left % 100)))\""
        ),
    )
}

/// One `systemctl show` for all the units (each `systemctl` costs 0.1-0.6 s
/// on a slow host): it prints one block per unit, in the order named, a
/// blank line between two, so each block gets its unit's name from that
/// order. A failing `systemctl` fails the script, as it did per unit. The
/// blocks are split with parameter expansions, not a pipe into `while
/// read`, which forks twice; it runs in the caller's shell (each batch part
/// is a subshell of its own), so it may set `$@`, `o`, `n`, `l` and `x`.
///
/// A unit whose main process is still systemd's own (`/proc/PID/exe` is
/// PID 1's, or systemd-executor's from 255 on) gets a line
/// [`PENDING`]: systemd calls a simple service active once it has forked,
/// but the fork mounts the `RootImage` before it runs the program, which
/// took a second on the lab guest and may take longer on a loaded host; a
/// program that fails at once has not failed yet. A builtin `test -ef`,
/// no process.
pub fn show(units: &[String]) -> Script {
    let text = if units.is_empty() {
        "true".to_owned()
    } else {
        format!(
            "set -- {}; o=$(systemctl show -p ActiveState -p SubState -p NRestarts -p Result -p Type -p RootImage -p ActiveEnterTimestampMonotonic -p ActiveEnterTimestamp -p MainPID \"$@\") || exit; \
             n='\n'; echo \"@unit=$1\"\n\
             # shellcheck disable=SC3013 # -ef: dash, bash and busybox sh have it; where not, the unit counts as started\n\
             while [ -n \"$o\" ]; do l=${{o%%\"$n\"*}}; \
             case $o in *\"$n\"*) o=${{o#*\"$n\"}} ;; *) o= ;; esac; \
             case $l in MainPID=0) ;; MainPID=*) x=/proc/${{l#MainPID=}}/exe; \
             if [ \"$x\" -ef /proc/1/exe ] || [ \"$x\" -ef /usr/lib/systemd/systemd-executor ] || [ \"$x\" -ef /lib/systemd/systemd-executor ]; then echo '{PENDING}'; fi ;; esac; \
             if [ -z \"$l\" ] && [ $# -gt 1 ]; then shift; echo \"@unit=$1\"; else printf '%s\\n' \"$l\"; fi; done",
            words(units)
        )
    };
    Script::new("reading unit states", text)
}

/// [`show`]'s line for a unit whose program has not started yet.
pub const PENDING: &str = "@exec=pending";

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnitState {
    pub active: String,
    pub sub: String,
    pub restarts: String,
    pub result: String,
    pub kind: String,
    pub root_image: String,
    pub since: String,
    /// When the unit last became active, as systemd prints it.
    pub since_wall: String,
    /// Its main process had not started its program yet (see [`show`]).
    pub pending: bool,
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
        if line == PENDING {
            s.pending = true;
            continue;
        }
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
            "ActiveEnterTimestamp" => s.since_wall = v,
            _ => {}
        }
    }
    if let Some((n, s)) = cur {
        m.insert(n, s);
    }
    m
}

/// A check from the inventory as a script that exits 0 when healthy, run
/// as root. The URL's parts are passed as arguments, so no `%` or quote in
/// it is ever read by the shell or by printf; HTTP goes through bash's
/// /dev/tcp when there is no curl. HTTPS needs curl: planning refuses a
/// host without it (see [`HostFacts::curl`]), so it is never tried as
/// plain HTTP.
pub fn check(c: &Check) -> Script {
    let text = match c {
        Check::Command {
            command, timeout, ..
        } => format!("timeout {} sh -c {}", timeout.unwrap_or(10), quote(command)),
        Check::Http { url, timeout, .. } => {
            let t = timeout.unwrap_or(10);
            // `-g`: brackets and braces in the URL are not curl globs.
            let curl = format!("curl -gfsS -o /dev/null --max-time {t} {}", quote(url));
            match HttpUrl::parse(url) {
                Ok(u) if !u.https => {
                    let tcp = r#"exec 3<>"/dev/tcp/$1/$2" && printf 'GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' "$3" "$4" >&3 && head -n1 <&3 | grep -q ' [23][0-9][0-9] '"#;
                    format!(
                        "if command -v curl >/dev/null; then {curl}; else timeout {t} bash -c {tcp} sh {args}; fi",
                        tcp = quote(tcp),
                        args = words(&[u.host, u.port.to_string(), u.path, u.authority]),
                    )
                }
                _ => format!(
                    "command -v curl >/dev/null || {{ echo 'curl is missing: HTTPS checks need it' >&2; exit 1; }}; {curl}"
                ),
            }
        }
    };
    Script::new("running a health check", text)
}

/// How long a check may take at most, counting its retries: the dead-man
/// timer must outlast it.
pub fn check_budget(c: &Check) -> Duration {
    let (timeout, retries) = match c {
        Check::Command {
            timeout, retries, ..
        }
        | Check::Http {
            timeout, retries, ..
        } => (timeout.unwrap_or(10), retries.unwrap_or(5).max(1)),
    };
    // One second between tries, and a second for the round trip.
    Duration::from_secs(u64::from(retries) * (timeout + 2))
}

pub fn check_retries(c: &Check) -> u32 {
    match c {
        Check::Command { retries, .. } | Check::Http { retries, .. } => retries.unwrap_or(5).max(1),
    }
}

pub mod delta;
mod revert;
pub use revert::*;
mod settings;
pub use settings::*;

// ---- several scripts in one round-trip -------------------------------------

/// One script of a [`batch`], run only when the part `needs` (an earlier
/// index) succeeded.
pub struct Part {
    pub script: Script,
    pub needs: Option<usize>,
}

impl From<Script> for Part {
    fn from(script: Script) -> Self {
        Part {
            script,
            needs: None,
        }
    }
}

/// How one part of a batch ended: its exit code (`None`: not run, as what
/// it needed failed) and what it printed, stdout and stderr together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartOutput {
    pub code: Option<i32>,
    pub output: String,
}

impl PartOutput {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

const PART: &str = "@@attache-part";
const PART_RC: &str = "@@attache-rc";

/// Runs `parts` one after the other in a single command on the host, each
/// in a subshell of its own (an `exit` ends only that part): every command
/// waits for the host once, and most of a deploy is that wait.
pub fn batch(parts: &[Part]) -> Script {
    let mut text = String::new();
    for (i, p) in parts.iter().enumerate() {
        let run = format!(
            "printf '{PART}\\t{i}\\n'; ( {} ) 2>&1; r{i}=$?",
            p.script.text
        );
        match p.needs {
            Some(j) => text += &format!("if [ \"$r{j}\" = 0 ]; then {run}; else r{i}=-; fi\n"),
            None => text += &format!("{run}\n"),
        }
        text += &format!("printf '\\n{PART_RC}\\t%s\\n' \"$r{i}\"\n");
    }
    Script::new(
        parts.first().map_or("running commands", |p| p.script.doing),
        text,
    )
}

/// What each part of a [`batch`] of `n` parts did; a part the output does
/// not reach (the connection ended) did not run.
pub fn parse_batch(out: &str, n: usize) -> Vec<PartOutput> {
    let mut parts = vec![
        PartOutput {
            code: None,
            output: String::new()
        };
        n
    ];
    let mut cur: Option<usize> = None;
    let mut text = String::new();
    for line in out.split_inclusive('\n') {
        let bare = line.trim_end_matches('\n');
        if let Some(i) = bare.strip_prefix(&format!("{PART}\t")) {
            cur = i.parse().ok().filter(|&i| i < n);
            text.clear();
        } else if let Some(rc) = bare.strip_prefix(&format!("{PART_RC}\t")) {
            if let Some(i) = cur.take() {
                // The newline before the marker is ours.
                text.pop();
                parts[i].output = std::mem::take(&mut text);
                parts[i].code = rc.parse().ok();
            }
        } else if cur.is_some() {
            text.push_str(line);
        }
    }
    parts
}

#[cfg(test)]
mod tests;
