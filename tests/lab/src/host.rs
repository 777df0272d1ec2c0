//! A running guest and the ways to reach it: SSH configs, commands, copies,
//! diagnostics, and the faults tests inject (host key change, full disk,
//! dropped connections).

use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::image::{remove_tree, Template};
use crate::vm::{self, Vm};
use crate::{Context, Error, Guest, Lab, Result};

/// The users on every guest, all logging in with the lab key:
/// `root`; `deploy` (passwordless sudo); `sudopw` (sudo asks for
/// [`SUDO_PASSWORD`](crate::SUDO_PASSWORD)); `nosudo` (no sudo rights).
pub const USERS: [&str; 4] = ["root", "deploy", "sudopw", "nosudo"];

/// A running guest. Dropping it stops the VM and removes its files (unless
/// the lab keeps hosts, `ATTACHE_LAB_KEEP=1`).
pub struct Host {
    name: String,
    guest: Guest,
    run_dir: PathBuf,
    key: PathBuf,
    /// The console of the cold boot this host was restored from.
    boot_log: PathBuf,
    vm: Option<Vm>,
    port: u16,
    http_port: u16,
    keep: bool,
    /// Reuse one SSH connection per user for the helpers (a new one costs
    /// about 1 s under TCG). Off for the template, which is saved.
    mux: bool,
}

pub(crate) fn check_name(name: &str) -> Result<()> {
    let ok = (1..=32).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(Error::new(format!(
            "host name {name:?}: use 1-32 of [a-z0-9-], starting with a letter"
        )))
    }
}

impl Host {
    fn new(
        lab: &Lab,
        template: &Template,
        name: &str,
        run_dir: PathBuf,
        vm: Vm,
        keep: bool,
        mux: bool,
    ) -> Result<Host> {
        // ssh binds the control socket at this path plus 17 characters; a
        // Unix socket path has at most 107.
        let mux = mux && run_dir.as_os_str().len() + "/mux-nosudo".len() + 17 < 108;
        let host = Host {
            name: name.to_string(),
            guest: template.guest,
            key: lab.key_path(),
            boot_log: template.snap_dir.join("boot.log"),
            port: vm.port,
            http_port: vm.http_port,
            vm: Some(vm),
            run_dir,
            keep,
            mux,
        };
        host.write_known_hosts(&template.host_key)?;
        fs::write(host.ssh_config_path(), host.ssh_config())?;
        Ok(host)
    }

    /// A host from the template's saved state, on a fresh overlay disk.
    pub(crate) fn start_clone(
        lab: &Lab,
        template: &Template,
        name: &str,
        run_dir: PathBuf,
    ) -> Result<Host> {
        fs::create_dir_all(&run_dir)?;
        let disk = run_dir.join("disk.qcow2");
        let started = (|| {
            vm::qemu_img_overlay(&template.snap_dir.join("template.qcow2"), &disk)?;
            Vm::launch(
                lab,
                template,
                &run_dir,
                &disk,
                Some(&template.snap_dir.join("state")),
                lab.keep,
            )
        })();
        let vm = match started {
            Ok(vm) => vm,
            Err(e) => {
                let _ = remove_tree(&run_dir);
                return Err(e);
            }
        };
        let mut host = Host::new(lab, template, name, run_dir, vm, lab.keep, true)?;
        let ready = host
            .vm_mut()
            .wait_running(Duration::from_secs(60))
            .and_then(|()| host.wait_ssh(Duration::from_secs(60)))
            .and_then(|()| host.fix_after_restore());
        if let Err(e) = ready {
            let diag = host.diagnostics(None);
            host.keep = false;
            if let Some(vm) = &mut host.vm {
                vm.keep = false;
            }
            return Err(Error::new(format!("starting {name}: {e}\n{diag}")));
        }
        if host.keep {
            fs::write(host.run_dir.join("keep"), "")?;
        }
        Ok(host)
    }

    /// The cold boot the template is saved from.
    pub(crate) fn boot_template(
        lab: &Lab,
        template: &Template,
        run_dir: PathBuf,
        disk: &Path,
    ) -> Result<Host> {
        fs::create_dir_all(&run_dir)?;
        let vm = match Vm::launch(lab, template, &run_dir, disk, None, false) {
            Ok(vm) => vm,
            Err(e) => {
                let _ = remove_tree(&run_dir);
                return Err(e);
            }
        };
        let mut host = Host::new(lab, template, "lab", run_dir, vm, false, false)?;
        host.wait_ssh(Duration::from_secs(300))
            .and_then(|()| {
                // Let the boot finish, so clones start settled.
                let out = host.ssh("timeout 120 systemctl is-system-running --wait");
                let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
                match state.as_str() {
                    "running" => Ok(()),
                    "degraded" => {
                        let failed = host.ssh("systemctl --failed --no-legend");
                        eprintln!(
                            "lab: {} template boot is degraded:\n{}",
                            template.guest,
                            String::from_utf8_lossy(&failed.stdout)
                        );
                        Ok(())
                    }
                    _ => Err(Error::new(format!("system state {state:?} after boot"))),
                }
            })
            .map_err(|e| {
                Error::new(format!(
                    "first boot of {}: {e}\n{}",
                    template.guest,
                    host.diagnostics(None)
                ))
            })?;
        Ok(host)
    }

    /// Saves the running guest to `state` and stops it.
    pub(crate) fn save_and_stop(&mut self, state: &Path) -> Result<()> {
        let res = self.vm_mut().save(state);
        self.vm_mut().stop();
        res
    }

    fn vm_mut(&mut self) -> &mut Vm {
        self.vm.as_mut().expect("host has a VM until dropped")
    }

    /// The alias in the SSH config, also the guest's hostname.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn guest(&self) -> Guest {
        self.guest
    }

    /// The loopback port on this machine the guest's `http://10.0.2.100/`
    /// leads to (see [`crate::Server`]).
    pub fn http_port(&self) -> u16 {
        self.http_port
    }

    /// The loopback port forwarded to the guest's sshd.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A directory of this host's own (VM files, configs), removed when the
    /// host is dropped: a place for test files too.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// The known_hosts file with the guest's host key, as the lab saw it
    /// when the host started (or at the last [`Host::trust_host_key`]).
    pub fn known_hosts_path(&self) -> PathBuf {
        self.run_dir.join("known_hosts")
    }

    /// An SSH config file (written when the host started) with the root
    /// entry: `ssh -F FILE NAME`, or `ssh -F FILE deploy@NAME` for another user.
    pub fn ssh_config_path(&self) -> PathBuf {
        self.run_dir.join("ssh_config")
    }

    /// The `Host NAME` block for root.
    pub fn ssh_config(&self) -> String {
        self.ssh_config_as("root")
    }

    /// The `Host NAME` block logging in as `user`.
    pub fn ssh_config_as(&self, user: &str) -> String {
        format!(
            "Host {name}\n  HostName 127.0.0.1\n  Port {port}\n  User {user}\n  IdentityFile {key}\n  \
             IdentitiesOnly yes\n  UserKnownHostsFile {kh}\n  GlobalKnownHostsFile /dev/null\n  \
             StrictHostKeyChecking yes\n  CheckHostIP no\n  BatchMode yes\n  ConnectTimeout 10\n  \
             ServerAliveInterval 5\n  ServerAliveCountMax 6\n  \
             KexAlgorithms curve25519-sha256,curve25519-sha256@libssh.org\n\n",
            name = self.name,
            port = self.port,
            key = self.key.display(),
            kh = self.known_hosts_path().display(),
        )
    }

    fn write_known_hosts(&self, host_key: &str) -> Result<()> {
        let key: Vec<&str> = host_key.split_whitespace().take(2).collect();
        fs::write(
            self.known_hosts_path(),
            format!("[127.0.0.1]:{} {}\n", self.port, key.join(" ")),
        )?;
        Ok(())
    }

    /// An `ssh` command for `user` on this host, through the host's config
    /// (batch mode, strict host key), ending with the destination: append the
    /// remote command (one shell string) with `.arg(…)`.
    pub fn ssh_command(&self, user: &str) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.arg("-F").arg(self.ssh_config_path());
        if self.mux {
            cmd.args(["-o", "ControlMaster=auto", "-o", "ControlPersist=300", "-o"])
                .arg(format!("ControlPath={}/mux-%r", self.run_dir.display()));
        }
        cmd.arg(format!("{user}@{}", self.name)).arg("--");
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Runs a shell command as root.
    pub fn ssh(&self, cmd: &str) -> Output {
        self.ssh_as("root", cmd)
    }

    /// Runs a shell command as `user`.
    pub fn ssh_as(&self, user: &str, cmd: &str) -> Output {
        self.ssh_command(user)
            .arg(cmd)
            .output()
            .unwrap_or_else(|e| panic!("cannot run ssh: {e}"))
    }

    /// Runs a shell command as root and returns its stdout; panics with the
    /// output and the host's diagnostics when it fails.
    pub fn ssh_ok(&self, cmd: &str) -> String {
        self.ssh_ok_as("root", cmd)
    }

    /// [`Host::ssh_ok`] as `user`.
    pub fn ssh_ok_as(&self, user: &str, cmd: &str) -> String {
        let out = self.ssh_as(user, cmd);
        if !out.status.success() {
            panic!(
                "on {} as {user}: `{cmd}` failed ({})\n--- stdout\n{}\n--- stderr\n{}\n{}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.diagnostics(None)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Copies a local file to `remote` (as root; the directory must exist).
    pub fn copy_to(&self, local: &Path, remote: &str) -> Result<()> {
        let file = fs::File::open(local).context(|| format!("opening {}", local.display()))?;
        let out = self
            .ssh_command("root")
            .arg(format!("cat > {}", shell_quote(remote)))
            .stdin(file)
            .output()?;
        if !out.status.success() {
            return Err(Error::new(format!(
                "copying {} to {}:{remote}: {}",
                local.display(),
                self.name,
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(())
    }

    /// Copies `remote` (read as root) to a local file.
    pub fn copy_from(&self, remote: &str, local: &Path) -> Result<()> {
        let file = fs::File::create(local).context(|| format!("creating {}", local.display()))?;
        let out = self
            .ssh_command("root")
            .arg(format!("cat {}", shell_quote(remote)))
            .stdout(file)
            .output()?;
        if !out.status.success() {
            return Err(Error::new(format!(
                "copying {}:{remote}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(())
    }

    /// What a failed test should print: where the host is, QEMU's messages,
    /// the serial console's tail, failed units and the journal (of `unit`,
    /// or of the whole system).
    pub fn diagnostics(&self, unit: Option<&str>) -> String {
        let mut d = String::new();
        let _ = writeln!(
            d,
            "=== lab host {} ({}), port {}, files in {}",
            self.name,
            self.guest,
            self.port,
            self.run_dir.display()
        );
        if let Some(vm) = &self.vm {
            let _ = writeln!(d, "qemu pid {}", vm.pid());
            let log = vm.log_tail();
            if !log.is_empty() {
                let _ = writeln!(d, "--- qemu\n{log}");
            }
        }
        let _ = writeln!(
            d,
            "--- serial console since the restore (last 40 lines; the saved boot's: {})\n{}",
            self.boot_log.display(),
            vm::tail(&self.run_dir.join("serial.log"), 40)
        );
        let journal = match unit {
            Some(u) => format!(
                "systemctl status --no-pager -n 0 {u}; journalctl --no-pager -n 50 -u {u}",
                u = shell_quote(u)
            ),
            None => "journalctl --no-pager -n 50".to_string(),
        };
        let out = self
            .ssh_command("root")
            .arg(format!(
                "echo '--- failed units'; systemctl --failed --no-legend --no-pager; echo '--- journal'; timeout 20 sh -c {}",
                shell_quote(&journal)
            ))
            .output();
        match out {
            Ok(out) => {
                d.push_str(&String::from_utf8_lossy(&out.stdout));
                if !out.status.success() {
                    let _ = writeln!(
                        d,
                        "(ssh: {}; {})",
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
            }
            Err(e) => {
                let _ = writeln!(d, "(cannot run ssh: {e})");
            }
        }
        d
    }

    /// Replaces the guest's SSH host keys and restarts sshd; returns the new
    /// ed25519 public key. The lab's known_hosts keeps the old key, so new
    /// connections are refused until [`Host::trust_host_key`]. The helpers'
    /// shared connections keep working.
    pub fn change_host_key(&self) -> Result<String> {
        let out = self.fault(
            "changing the host key",
            "rm -f /etc/ssh/ssh_host_ed25519_key* && ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key && systemctl restart ssh && \
             cat /etc/ssh/ssh_host_ed25519_key.pub",
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Writes the guest's current host key into the lab's known_hosts.
    pub fn trust_host_key(&self) -> Result<()> {
        let key = self.ssh_ok("cat /etc/ssh/ssh_host_ed25519_key.pub");
        self.write_known_hosts(key.trim())
    }

    /// Fills the root file system (root's reserved blocks included), so
    /// writes fail with ENOSPC. [`Host::free_disk`] undoes it.
    pub fn fill_disk(&self) -> Result<()> {
        self.fault(
            "filling the disk",
            "set -e; f=$(stat -f -c '%f %S' /); free=$(( ${f% *} * ${f#* } )); \
             m=67108864; if [ $free -gt $m ]; then fallocate -l $(( free - m )) /var/lab-fill; fi; \
             dd if=/dev/zero of=/var/lab-fill2 bs=1M 2>/dev/null || true; \
             dd if=/dev/zero of=/var/lab-fill3 bs=4k 2>/dev/null || true; sync",
        )
        .map(drop)
    }

    /// Removes what [`Host::fill_disk`] wrote.
    pub fn free_disk(&self) -> Result<()> {
        self.fault(
            "freeing the disk",
            "rm -f /var/lab-fill /var/lab-fill2 /var/lab-fill3",
        )
        .map(drop)
    }

    /// Kills every SSH connection to the guest (sshd's per-connection
    /// processes; the listener stays), as a network drop would.
    pub fn kill_connections(&self) -> Result<()> {
        // The pids are fixed now (every sshd but the listener, sessions
        // left by an sshd restart included) and killed a moment later, after
        // this command has returned; connections made later survive.
        let killed = self.fault(
            "killing connections",
            "main=$(systemctl show -p MainPID --value ssh); \
             pids=$(pgrep -x 'sshd|sshd-session' | grep -vx \"$main\" | tr '\\n' ' '); \
             setsid -f sh -c \"sleep 0.5; kill -KILL $pids\" >/dev/null 2>&1 </dev/null",
        );
        // Our own shared connection is among them: wait until it is gone.
        let mux_root = self.run_dir.join("mux-root");
        let deadline = Instant::now() + Duration::from_secs(10);
        std::thread::sleep(Duration::from_millis(500));
        while self.mux && mux_root.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if !self.mux {
            std::thread::sleep(Duration::from_millis(1500));
        }
        self.close_mux();
        killed.map(drop)
    }

    /// Reboots the guest (`systemctl reboot`: every connection drops, the
    /// disk is kept) and waits until SSH answers from the new boot. QEMU
    /// stays up across a guest reboot (the lab never passes `-no-reboot`).
    pub fn reboot(&mut self) -> Result<()> {
        let boot_id = |host: &Host| {
            let out = host.ssh("cat /proc/sys/kernel/random/boot_id");
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        };
        let before = boot_id(self).ok_or_else(|| {
            Error::new(format!("rebooting {}: cannot read the boot id", self.name))
        })?;
        // Detached and delayed, so this command returns before sshd goes.
        self.fault(
            "rebooting",
            "setsid -f sh -c 'sleep 0.5; systemctl reboot' >/dev/null 2>&1 </dev/null",
        )?;
        let started = Instant::now();
        let deadline = started + Duration::from_secs(300);
        loop {
            std::thread::sleep(Duration::from_millis(500));
            // A shared connection to the old boot would answer with its id.
            self.close_mux();
            if let Some(vm) = &mut self.vm {
                if let Some(status) = vm.exited() {
                    return Err(Error::new(format!(
                        "rebooting {}: QEMU exited ({status}): {}",
                        self.name,
                        vm.log_tail()
                    )));
                }
            }
            if boot_id(self).is_some_and(|id| id != before) {
                break;
            }
            if Instant::now() > deadline {
                return Err(Error::new(format!(
                    "rebooting {}: no SSH from a new boot after 300 s\n{}",
                    self.name,
                    vm::tail(&self.run_dir.join("serial.log"), 40)
                )));
            }
        }
        eprintln!(
            "lab: {} rebooted in {:.1} s",
            self.name,
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// Runs `cmd` as root for a fault helper; a failure says what was being
    /// done, on which host, and sshd's or the command's error output.
    fn fault(&self, doing: &str, cmd: &str) -> Result<Output> {
        let out = self.ssh(cmd);
        if !out.status.success() {
            return Err(Error::new(format!(
                "{doing} on {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(out)
    }

    fn wait_ssh(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self
                .ssh_command("root")
                .args(["true"])
                .stdout(Stdio::null())
                .output()?;
            if out.status.success() {
                return Ok(());
            }
            if let Some(vm) = &mut self.vm {
                if let Some(status) = vm.exited() {
                    return Err(Error::new(format!(
                        "QEMU exited ({status}): {}",
                        vm.log_tail()
                    )));
                }
            }
            if Instant::now() > deadline {
                return Err(Error::new(format!(
                    "no SSH on port {} after {timeout:?}: {}",
                    self.port,
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// A restored guest has the template's clock and hostname.
    fn fix_after_restore(&self) -> Result<()> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let cmd = format!(
            "date -s @{}.{:09} >/dev/null && hostname {n} && echo {n} >/etc/hostname && \
             sed -i 's/^127\\.0\\.1\\.1.*/127.0.1.1\\t{n}/' /etc/hosts",
            now.as_secs(),
            now.subsec_nanos(),
            n = self.name
        );
        let out = self.ssh(&cmd);
        if !out.status.success() {
            return Err(Error::new(format!(
                "setting clock and hostname: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(())
    }

    fn close_mux(&self) {
        if !self.mux {
            return;
        }
        for user in USERS {
            if self.run_dir.join(format!("mux-{user}")).exists() {
                let _ = self
                    .ssh_command(user)
                    .args(["-O", "exit"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if self.keep {
            // Straight to stderr: the test harness captures eprintln!.
            let _ = writeln!(
                std::io::stderr(),
                "lab: keeping {} running: ssh -F {} {}  (stop: cargo run -p attache-lab -- down)",
                self.name,
                self.ssh_config_path().display(),
                self.name
            );
            return;
        }
        self.close_mux();
        drop(self.vm.take());
        let _ = remove_tree(&self.run_dir);
    }
}

/// Quotes a string for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-=:@,+".contains(c))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_for_the_shell() {
        assert_eq!(shell_quote("/var/lib/x.raw"), "/var/lib/x.raw");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn hosts_can_be_shared_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Host>();
        send_sync::<crate::Lab>();
    }

    #[test]
    fn host_names_are_plain() {
        assert!(check_name("h1").is_ok());
        assert!(check_name("web-2").is_ok());
        assert!(check_name("1h").is_err());
        assert!(check_name("a b").is_err());
        assert!(check_name("").is_err());
    }
}
