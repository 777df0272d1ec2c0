//! QEMU processes: the command line, a spawner that ties them to this
//! process, a minimal QMP client, the saved template boot, and the sweep of
//! what a dead process left behind.

use std::ffi::OsString;
use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::image::{self, path_str, Template};
use crate::{Context, Error, Host, Lab, Result};

const QEMU: &str = "qemu-system-x86_64";
const KERNEL_CMDLINE: &str = "root=/dev/vda rw console=ttyS0 net.ifnames=0 systemd.firstboot=off \
     loglevel=4 panic=-1 mitigations=off";

/// How QEMU runs the guest: TCG (everywhere) or KVM (real hardware
/// virtualisation only: the `kvm_pvm` module some machines have runs
/// only PVM-enlightened kernels).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Accel {
    Tcg,
    Kvm,
}

impl Accel {
    pub fn detect() -> Accel {
        match std::env::var("ATTACHE_LAB_ACCEL").as_deref() {
            Ok("kvm") => return Accel::Kvm,
            Ok("tcg") => return Accel::Tcg,
            _ => {}
        }
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let hw = cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
        let kvm_usable = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        if hw && kvm_usable && !Path::new("/sys/module/kvm_pvm").exists() {
            Accel::Kvm
        } else {
            Accel::Tcg
        }
    }

    fn args(self) -> [&'static str; 4] {
        match self {
            Accel::Tcg => ["-accel", "tcg,tb-size=128", "-cpu", "max"],
            Accel::Kvm => ["-accel", "kvm", "-cpu", "host"],
        }
    }
}

/// The machine options every lab VM shares; a saved boot only restores into
/// the same machine, so they are part of the template's cache key.
fn machine_args(accel: Accel) -> Vec<&'static str> {
    let mut args = vec![
        "-machine",
        "q35",
        "-smp",
        "1",
        "-m",
        "1024",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-device",
        "virtio-rng-pci",
        "-append",
        KERNEL_CMDLINE,
    ];
    args.extend(accel.args());
    args
}

/// QEMU's version and the machine options: what a saved boot depends on.
pub(crate) fn signature(lab: &Lab) -> Result<String> {
    let out = Command::new(QEMU)
        .arg("--version")
        .output()
        .context(|| format!("running {QEMU}"))?;
    let version = String::from_utf8_lossy(&out.stdout);
    Ok(format!(
        "{}\n{}",
        version.lines().next().unwrap_or(""),
        machine_args(lab.accel).join(" ")
    ))
}

pub(crate) fn check_tools() -> Result<()> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for tool in [QEMU, "qemu-img", "ssh", "ssh-keygen", "zstd", "socat"] {
        if !std::env::split_paths(&path).any(|d| d.join(tool).is_file()) {
            return Err(Error::new(format!(
                "{tool} is not installed; run scripts/setup (as root) first"
            )));
        }
    }
    Ok(())
}

/// The address a guest fetches from: its port 80 leads to the host's
/// [`Vm::http_port`] on this machine's loopback.
pub(crate) const FETCH_ADDR: &str = "10.0.2.100";

/// The HTTP port of the VM whose SSH port is `ssh_port`. QEMU holds the SSH
/// port while the VM runs, so deriving one from the other keeps two running
/// VMs from sharing an HTTP port. The result lies below the kernel's
/// ephemeral range (32768-60999 by default), where no outgoing connection
/// takes it.
pub(crate) fn http_port_for(ssh_port: u16) -> u16 {
    match ssh_port {
        32768..=60999 => ssh_port - 31744,
        _ => 1024 + ssh_port % 28232,
    }
}

/// A running QEMU, owned by this process; stopped when dropped unless kept.
pub(crate) struct Vm {
    child: Child,
    pub port: u16,
    /// The loopback port the guest's `http://10.0.2.100/` reaches.
    pub http_port: u16,
    run_dir: PathBuf,
    pub keep: bool,
}

impl Drop for Vm {
    fn drop(&mut self) {
        if !self.keep {
            self.stop();
        }
    }
}

impl Vm {
    /// Starts QEMU on `disk` (booting cold, or restoring `incoming`) with SSH
    /// forwarded from a free loopback port.
    pub fn launch(
        lab: &Lab,
        template: &Template,
        run_dir: &Path,
        disk: &Path,
        incoming: Option<&Path>,
        keep: bool,
    ) -> Result<Vm> {
        fs::write(run_dir.join("owner"), owner_stamp())?;
        let img = &template.image_dir;
        let mut base: Vec<OsString> = machine_args(lab.accel)
            .into_iter()
            .map(Into::into)
            .collect();
        for (opt, val) in [
            ("-name", "attache-lab".to_string()),
            ("-kernel", path_str(&img.join("vmlinux"))?),
            ("-initrd", path_str(&img.join("initrd.img"))?),
            (
                "-drive",
                format!(
                    "file={},if=virtio,cache=unsafe,format=qcow2",
                    path_str(disk)?
                ),
            ),
            (
                "-serial",
                format!("file:{}", path_str(&run_dir.join("serial.log"))?),
            ),
            (
                "-qmp",
                format!(
                    "unix:{},server=on,wait=off",
                    path_str(&run_dir.join("qmp.sock"))?
                ),
            ),
            ("-device", "virtio-net-pci,netdev=n0".to_string()),
        ] {
            base.push(opt.into());
            base.push(val.into());
        }
        if let Some(state) = incoming {
            base.push("-incoming".into());
            base.push(format!("exec:cat {}", path_str(state)?).into());
        }

        // Ports: pick a free one under a lab-wide lock and hold the lock until
        // QEMU has bound it, so parallel launches never pick the same port.
        let _ports = image::lock(&lab.dir().join("locks/ports.lock"))?;
        let mut last_err = String::new();
        for _attempt in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let http_port = http_port_for(port);
            // socat connects anew for each guest connection, so the server
            // behind it may come and go while the guest runs (the chardev
            // form, `-tcp:…`, serves one connection only). The netdev is not
            // part of the saved state: a restored guest gets it too.
            let mut cmd = Command::new(QEMU);
            cmd.args(&base)
                .arg("-netdev")
                .arg(format!(
                    "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:22,\
                     guestfwd=tcp:{FETCH_ADDR}:80-cmd:socat - TCP:127.0.0.1:{http_port}"
                ))
                .stdin(Stdio::null())
                .stdout(fs::File::create(run_dir.join("qemu.log"))?)
                .stderr(
                    fs::File::options()
                        .append(true)
                        .open(run_dir.join("qemu.log"))?,
                );
            let child = spawn_tied(cmd, keep).context(|| format!("starting {QEMU}"))?;
            fs::write(run_dir.join("qemu.pid"), child.id().to_string())?;
            let mut vm = Vm {
                child,
                port,
                http_port,
                run_dir: run_dir.to_path_buf(),
                keep,
            };
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Some(status) = vm.child.try_wait()? {
                    last_err = format!("{QEMU} exited ({status}): {}", vm.log_tail());
                    break;
                }
                if TcpListener::bind(("127.0.0.1", port)).is_err() {
                    return Ok(vm);
                }
                if Instant::now() > deadline {
                    return Err(Error::new(format!(
                        "{QEMU} did not bind port {port} in 30 s: {}",
                        vm.log_tail()
                    )));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            if !last_err.contains("host forwarding") {
                break;
            }
        }
        Err(Error::new(last_err))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// QEMU's own messages (not the guest's console).
    pub fn log_tail(&self) -> String {
        tail(&self.run_dir.join("qemu.log"), 20)
    }

    pub fn qmp(&self) -> Result<Qmp> {
        Qmp::connect(&self.run_dir.join("qmp.sock"), Duration::from_secs(10))
    }

    /// Waits until the guest runs (an incoming migration has finished).
    pub fn wait_running(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut qmp = self.qmp()?;
        loop {
            let status = qmp.execute("query-status", None)?;
            if status.contains("\"status\": \"running\"") {
                return Ok(());
            }
            // A guest saved while stopped arrives paused: resume it.
            if status.contains("\"status\": \"paused\"") {
                qmp.execute("cont", None)?;
                continue;
            }
            if let Some(st) = self.exited() {
                return Err(Error::new(format!(
                    "{QEMU} exited ({st}): {}",
                    self.log_tail()
                )));
            }
            if Instant::now() > deadline {
                return Err(Error::new(format!(
                    "guest not running after {timeout:?}: {status}"
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Saves the stopped guest's whole state to `state` (QMP `migrate`).
    pub fn save(&mut self, state: &Path) -> Result<()> {
        let mut qmp = self.qmp()?;
        qmp.execute("stop", None)?;
        qmp.execute(
            "migrate-set-parameters",
            Some(r#"{"max-bandwidth": 10737418240}"#),
        )?;
        let tmp = state.with_extension("tmp");
        qmp.execute(
            "migrate",
            Some(&format!(r#"{{"uri": "exec:cat > {}"}}"#, path_str(&tmp)?)),
        )?;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let st = qmp.execute("query-migrate", None)?;
            if st.contains("\"completed\"") {
                break;
            }
            if st.contains("\"failed\"")
                || st.contains("\"cancelled\"")
                || Instant::now() > deadline
            {
                return Err(Error::new(format!("saving the guest failed: {st}")));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        fs::rename(&tmp, state)?;
        Ok(())
    }

    /// Stops QEMU: QMP `quit`, then SIGKILL to the pid we started.
    pub fn stop(&mut self) {
        if self.exited().is_none() {
            if let Ok(mut qmp) =
                Qmp::connect(&self.run_dir.join("qmp.sock"), Duration::from_secs(1))
            {
                let _ = qmp.execute("quit", None);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.exited().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts QEMU from one long-lived thread, with `PR_SET_PDEATHSIG`: the
/// signal fires when the *thread* that forked exits, and test threads come
/// and go, so a dedicated thread forks them all. It lives as long as the
/// process, so QEMU dies with the process however it ends (panic, Ctrl-C,
/// SIGKILL). With `keep`, QEMU gets its own session and no death signal.
fn spawn_tied(mut cmd: Command, keep: bool) -> io::Result<Child> {
    type Job = (Command, mpsc::Sender<io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closures only make async-signal-safe calls (prctl, getppid,
    // setsid, _exit) between fork and exec.
    unsafe {
        if keep {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        } else {
            cmd.pre_exec(move || {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died before prctl took effect.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
    }
    let sender = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("attache-lab-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("starting the lab's spawner thread");
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    sender
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send((cmd, reply_tx))
        .map_err(|_| io::Error::other("lab spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("lab spawner thread is gone"))?
}

/// A QMP connection: one JSON object per line; replies start with
/// `{"return"` or `{"error"`, events with `{"timestamp"`.
pub(crate) struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(path: &Path, timeout: Duration) -> Result<Qmp> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(Error::new(format!("QMP {}: {e}", path.display())))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        };
        let mut greeting = String::new();
        qmp.reader.read_line(&mut greeting)?;
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    pub fn execute(&mut self, command: &str, arguments: Option<&str>) -> Result<String> {
        let msg = match arguments {
            Some(a) => format!("{{\"execute\": \"{command}\", \"arguments\": {a}}}\n"),
            None => format!("{{\"execute\": \"{command}\"}}\n"),
        };
        self.writer.write_all(msg.as_bytes())?;
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                // `quit` closes the connection instead of answering, sometimes.
                return if command == "quit" {
                    Ok(String::new())
                } else {
                    Err(Error::new(format!("QMP closed during {command}")))
                };
            }
            if line.starts_with("{\"return\"") {
                return Ok(line);
            }
            if line.starts_with("{\"error\"") {
                return Err(Error::new(format!("QMP {command}: {}", line.trim())));
            }
        }
    }
}

/// Boots the guest cold once and saves it as the template every host
/// starts from.
pub(crate) fn save_template(lab: &Lab, template: &Template) -> Result<()> {
    let suite = template.guest.suite();
    let work = template.snap_dir.with_extension("work");
    image::remove_tree(&work)?;
    fs::create_dir_all(&work)?;
    let disk = work.join("template.qcow2");
    qemu_img_overlay(&template.image_dir.join("base.qcow2"), &disk)?;
    let run_dir = lab
        .dir()
        .join("runs")
        .join(format!("{}-template-{suite}", std::process::id()));
    eprintln!("lab: first boot of {suite} (once; about 20-60 s under TCG)");
    let t = Instant::now();
    let mut host = Host::boot_template(lab, template, run_dir, &disk)?;
    let booted = t.elapsed().as_secs_f64();
    let t = Instant::now();
    host.save_and_stop(&work.join("state"))?;
    let _ = fs::copy(host.run_dir().join("serial.log"), work.join("boot.log"));
    drop(host);
    fs::rename(&work, &template.snap_dir)?;
    eprintln!(
        "lab: {suite} first boot took {booted:.1} s, saving it {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

pub(crate) fn qemu_img_overlay(backing: &Path, overlay: &Path) -> Result<()> {
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(backing)
        .arg(overlay)
        .output()
        .context(|| "running qemu-img".into())?;
    if !out.status.success() {
        return Err(Error::new(format!(
            "qemu-img create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

/// `PID STARTTIME` of this process: a run directory's owner. The start time
/// tells a live owner from a new process that reuses its pid.
fn owner_stamp() -> String {
    let pid = std::process::id();
    format!("{pid} {}", start_time(pid).unwrap_or_default())
}

fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 2..];
    // Fields after the comm start at field 3 (state); starttime is field 22.
    after_comm.split(' ').nth(19)?.parse().ok()
}

fn is_running(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat.rfind(')').and_then(|i| stat[i + 2..].chars().next());
    !matches!(state, Some('Z') | Some('X') | None)
}

fn owner_alive(run_dir: &Path) -> bool {
    let name = run_dir.file_name().unwrap_or_default().to_string_lossy();
    let Some(pid) = name.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
        return false;
    };
    if !is_running(pid) {
        return false;
    }
    match fs::read_to_string(run_dir.join("owner")) {
        Ok(stamp) => stamp.split(' ').nth(1).and_then(|s| s.parse().ok()) == start_time(pid),
        // Being created right now.
        Err(_) => true,
    }
}

/// Stops the VMs of run directories whose owner process is gone (and, with
/// `kept`, those left running on purpose), and removes the directories. A
/// pid is killed only if its command line names that run directory.
pub(crate) fn sweep(runs: &Path, kept: bool) {
    let Ok(rd) = fs::read_dir(runs) else { return };
    for entry in rd.flatten() {
        let dir = entry.path();
        if owner_alive(&dir) || (!kept && dir.join("keep").exists()) {
            continue;
        }
        if let Some(pid) = fs::read_to_string(dir.join("qemu.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
        {
            kill_if_ours(pid, &dir);
        }
        if let Err(e) = image::remove_tree(&dir) {
            eprintln!("lab: cannot remove {}: {e}", dir.display());
        }
    }
}

pub(crate) fn kill_if_ours(pid: u32, run_dir: &Path) {
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return;
    };
    let needle = run_dir.to_string_lossy();
    let cmdline = String::from_utf8_lossy(&cmdline);
    if !cmdline.starts_with(QEMU) || !cmdline.contains(needle.as_ref()) {
        return;
    }
    eprintln!("lab: stopping leftover VM {pid} ({})", run_dir.display());
    // SAFETY: kill(2) on a pid whose command line we just checked.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while is_running(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The last `n` lines of a file.
pub(crate) fn tail(path: &Path, n: usize) -> String {
    let bytes = fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_ports_are_distinct_and_below_the_ephemeral_range() {
        assert_eq!(http_port_for(32768), 1024);
        assert_eq!(http_port_for(60999), 29255);
        assert_ne!(http_port_for(40000), http_port_for(40001));
        assert!((1024..32768).contains(&http_port_for(22)));
        assert!((1024..32768).contains(&http_port_for(65535)));
    }

    #[test]
    fn own_start_time_is_readable() {
        assert!(start_time(std::process::id()).is_some());
        assert!(is_running(std::process::id()));
    }

    #[test]
    fn qemu_dies_with_its_spawning_process_tie() {
        // The spawner works for any command; `sleep` stands in for QEMU.
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let mut child = spawn_tied(cmd, false).unwrap();
        assert!(child.try_wait().unwrap().is_none());
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
