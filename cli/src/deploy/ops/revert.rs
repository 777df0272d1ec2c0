//! The dead-man revert: the script that puts a host's changed services back
//! if attache never confirms a deploy, armed on a timer and at boot, and
//! its disarm. Part of the remote protocol (`ops`).

use std::time::Duration;

use super::{
    install_file, quote, restore_settings, words, PortableCall, Script, SETTINGS_FNS, STATE_DIR,
};

/// How one service goes back to what it ran before a deploy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revert {
    pub service: String,
    /// The image to end attached, or `None` to end with nothing attached.
    pub previous: Option<String>,
    /// The image the deploy attached.
    pub new: String,
    /// The calls, in order, that get there from `new`.
    pub calls: Vec<PortableCall>,
    /// The deploy switched the service's settings: put them back first.
    pub settings: bool,
    /// Units to restart once the settings are back (a settings-only change,
    /// where no portablectl call restarts them).
    pub restart: Vec<String>,
}

impl Revert {
    /// The call that attaches the previous image when nothing is attached:
    /// the last of the calls back, as an attach.
    pub fn attach_previous(&self) -> Option<PortableCall> {
        self.previous.as_ref()?;
        self.calls.last().map(|c| PortableCall {
            verb: super::Verb::Attach,
            ..c.clone()
        })
    }
}

const ATTACHED_FN: &str = r#"attached() { grep -qsF "image '$1'" /etc/systemd/system.attached/*.d/20-portable.conf /run/systemd/system.attached/*.d/20-portable.conf; }"#;

/// The shell that puts each service back, last changed first. Each step
/// looks first, so running it twice, or after attache's own rollback, does
/// nothing more.
pub fn revert_body(reverts: &[Revert]) -> String {
    let mut s = format!("{ATTACHED_FN}\n{SETTINGS_FNS}rc=0\n");
    for r in reverts.iter().rev() {
        if r.settings {
            s += &format!("# {}: settings back\n", r.service);
            s += &restore_settings(&r.service, &r.restart);
        }
        if r.calls.is_empty() {
            continue;
        }
        let calls = r
            .calls
            .iter()
            .map(|c| {
                let cmd = words(&c.argv());
                if c.verb.detaches() {
                    format!(
                        "  if attached {}; then {cmd} || rc=1; fi\n",
                        quote(&c.image)
                    )
                } else {
                    format!("  {cmd} || rc=1\n")
                }
            })
            .collect::<String>();
        match (&r.previous, r.attach_previous()) {
            (Some(p), Some(attach)) => {
                // Neither image attached: the switch stopped half-way (a
                // reboot between detach and attach). Attach the old one.
                s += &format!(
                    "# {}: back to {p}\nif ! attached {}; then\n  if attached {}; then\n  :\n{calls}  else\n    {} || rc=1\n  fi\nfi\n",
                    r.service,
                    quote(p),
                    quote(&r.new),
                    words(&attach.argv()),
                );
            }
            _ => s += &format!("# {}: remove {}\n{calls}", r.service, r.new),
        }
    }
    s += "exit $rc\n";
    s
}

pub(super) const REVERT_UNIT: &str = "[Unit]
Description=attache: put back the services of a deploy that was never confirmed
ConditionPathExists=/var/lib/attache/revert.sh
After=dbus.service network.target

[Service]
Type=oneshot
ExecStart=/bin/sh /var/lib/attache/run-revert

[Install]
WantedBy=multi-user.target
";

/// Claims `revert.sh` by renaming it, so the timer, the boot unit and
/// attache's disarm can race and exactly one wins.
pub(super) const RUN_REVERT: &str = "d=/var/lib/attache
mv -f $d/revert.sh $d/revert.running 2>/dev/null || exit 0
/bin/sh $d/revert.running >$d/revert.log 2>&1
rc=$?
mv -f $d/revert.running $d/revert.done
exit $rc
";

/// Arms the dead-man revert: it runs after `after` unless [`disarm`] comes
/// first, and at the next boot if the host restarts before either. Written
/// and synced before any image changes.
///
/// The files that stay the same from deploy to deploy (the unlink script,
/// `run-revert`, the boot unit and its link) are written only when missing
/// or different, with builtins only: an arm that finds them costs a `mv`
/// and a `sync` (and an `rm` of what the last one left). The `sync` names
/// what the revert needs at boot, files and directories, so it fsyncs
/// them only, not the whole host (`/var/lib` too: a first deploy made
/// directories in it). It comes after the renames: a power cut before it
/// returns finds no image changed yet, and each step of the revert looks
/// before it acts (see [`revert_body`]). A timer an earlier deploy left
/// loaded is stopped before `revert.sh` appears, so it cannot claim it.
pub fn arm(reverts: &[Revert], after: Duration) -> Script {
    Script::new(
        "arming the automatic rollback",
        format!(
            r#"set -e
d={STATE_DIR}; e=/etc/systemd/system; w=/etc/systemd/system/multi-user.target.wants
[ -d $d ] && [ -d $w ] || mkdir -p $d $w
set --
for f in $d/revert.done $d/revert.disarmed $d/revert.log; do if [ -e "$f" ]; then set -- "$@" "$f"; fi; done
if [ $# -gt 0 ]; then rm -f "$@"; fi
{install}{run_revert}{unit}[ -L $w/attache-revert.service ] || ln -sf $e/attache-revert.service $w/attache-revert.service
printf '%s' {body} > $d/revert.sh.tmp
{clear}
mv -f $d/revert.sh.tmp $d/revert.sh
sync $d/revert.sh $d/run-revert {UNLINK} $e/attache-revert.service $d $e $w /var/lib 2>/dev/null || sync
{run}"#,
            body = quote(&revert_body(reverts)),
            clear = clear_timer(),
            run = run_timer(after),
            install = install_file(super::UNLINK_PATH, super::UNLINK),
            run_revert = install_file(&format!("{STATE_DIR}/run-revert"), RUN_REVERT),
            unit = install_file("/etc/systemd/system/attache-revert.service", REVERT_UNIT),
            UNLINK = super::UNLINK_PATH,
        ),
    )
}

/// What [`disarm`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disarmed {
    /// attache got there first: the revert will never run.
    InTime,
    /// The host's revert ran (or was running and has ended); its log.
    AlreadyReverted(String),
}

/// The exit code of [`disarm`] when the host's revert went first.
pub const REVERTED_CODE: i32 = 3;

/// Stops the revert, or, if it has started, waits for it to end: exits 0
/// only when attache got there first ([`REVERTED_CODE`] when not), so that
/// a [`super::batch`]'s later parts can need it. Stopping the timer only
/// tidies (`run-revert` does nothing once `revert.sh` is gone), so it goes
/// to systemd without waiting for the job, and only when the timer is
/// loaded. Not in the background: a stop that ran late could end the timer
/// of the next deploy's arm.
pub fn disarm() -> Script {
    Script::new(
        "disarming the automatic rollback",
        format!(
            r#"d={STATE_DIR}
if mv -f $d/revert.sh $d/revert.disarmed 2>/dev/null; then
  if [ -e {TIMER_FILE} ]; then
    systemctl --no-block stop attache-revert-now.timer </dev/null >/dev/null 2>&1 || true
  fi
  echo DISARMED
else
  {WAIT_RUNNING}
  echo REVERTED
  cat $d/revert.log 2>/dev/null
  exit {REVERTED_CODE}
fi"#
        ),
    )
}

/// Where systemd keeps the revert's transient timer while it is loaded.
const TIMER_FILE: &str = "/run/systemd/transient/attache-revert-now.timer";

pub fn parse_disarm(out: &str) -> Disarmed {
    let mut lines = out.lines();
    if lines.next().map(str::trim) == Some("DISARMED") {
        Disarmed::InTime
    } else {
        Disarmed::AlreadyReverted(lines.collect::<Vec<_>>().join("\n"))
    }
}

/// What a [`disarm`] run as a batch's part found; `None` when it failed.
pub fn disarm_outcome(out: &super::PartOutput) -> Option<Disarmed> {
    let first = out.output.lines().next().map(str::trim);
    match (out.code, first) {
        (Some(0), Some("DISARMED")) => Some(Disarmed::InTime),
        (Some(REVERTED_CODE), Some("REVERTED")) => Some(parse_disarm(&out.output)),
        _ => None,
    }
}

/// Runs an armed revert now (an earlier deploy never confirmed it), and
/// waits for it.
pub fn run_pending_revert() -> Script {
    Script::new(
        "finishing an earlier unconfirmed deploy",
        format!(
            "systemctl stop attache-revert-now.timer 2>/dev/null || true; \
             systemd-run --quiet --collect --wait --unit=attache-revert-pending /bin/sh {STATE_DIR}/run-revert >/dev/null 2>&1; \
             {WAIT_RUNNING}; cat {STATE_DIR}/revert.log 2>/dev/null || true"
        ),
    )
}

/// Waits (ten minutes at most) for a revert that has started to end.
const WAIT_RUNNING: &str = "i=0; while [ -e /var/lib/attache/revert.running ] && [ $i -lt 600 ]; do sleep 1; i=$((i+1)); done";

/// Before attache's own rollback: the timer starts again from now, so it
/// cannot fire while attache puts the services back, yet still covers a
/// connection lost during it. A revert that already started is waited for.
pub fn postpone(after: Duration) -> Script {
    Script::new(
        "postponing the automatic rollback",
        format!(
            "d={STATE_DIR}; systemctl stop attache-revert-now.timer 2>/dev/null || true; {WAIT_RUNNING}; \
             if [ -e $d/revert.sh ]; then {timer}; fi",
            timer = start_timer(after),
        ),
    )
}

/// The transient timer that runs the revert after `after`, in place of one
/// an earlier deploy left loaded (stopped, its failure forgotten, so the
/// name is free). systemd keeps a loaded transient unit's file under
/// /run/systemd/transient; when neither file is there, the two `systemctl`
/// calls (0.3–0.4 s on a slow host) are skipped. Were a unit loaded all
/// the same, `systemd-run` would refuse the name and the arming would fail
/// before any image changes.
fn start_timer(after: Duration) -> String {
    format!("{}; {}", clear_timer(), run_timer(after))
}

/// Starts the transient timer that runs the revert after `after`.
fn run_timer(after: Duration) -> String {
    format!(
        "systemd-run --quiet --unit=attache-revert-now --on-active={} --timer-property=AccuracySec=1s /bin/sh {STATE_DIR}/run-revert",
        after.as_secs().max(1)
    )
}

/// Stops and forgets a revert timer an earlier deploy left loaded (only
/// when one is), so that its name is free and it cannot fire on what comes
/// next.
fn clear_timer() -> String {
    format!(
        "if [ -e {TIMER_FILE} ] || [ -e /run/systemd/transient/attache-revert-now.service ]; then \
         systemctl stop attache-revert-now.timer 2>/dev/null || true; \
         systemctl reset-failed attache-revert-now.timer attache-revert-now.service 2>/dev/null || true; fi"
    )
}
