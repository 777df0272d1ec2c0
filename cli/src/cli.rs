//! The command line, defined once: help, completions and the man page are all
//! generated from these types. What clap cannot check is checked here, where
//! the arguments become what the stages take ([`SourceArgs::source`],
//! [`PackArgs::choice`]).

use std::path::PathBuf;

use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};

use crate::build::{PackChoice, Source};
use crate::error::Error;
use crate::image::Compression;
use crate::nix::Installable;
use crate::spec::from_nix::{parse_block_size, Naming};

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  bad input: a wrong installable, a unit portabled would refuse, an unknown host
  2  environment: nix missing, I/O error, a host that cannot be reached;
     deploy --now: a pull host's publish server that cannot be reached
  3  deploy failed on at least one host (rolled back where possible; a pull
     host's --now run rolled back or refused), or a deploy, build or publish
     was interrupted (Ctrl-C, SIGTERM)";

/// Turn Nix into running systemd portable services.
///
/// attache builds a Nix flake output (or file, or expression) into a
/// reproducible squashfs portable image, and deploys it to systemd hosts over
/// SSH with portablectl, health checks and rollback.
#[derive(Debug, Parser)]
#[command(name = "attache", version, after_long_help = EXIT_CODES)]
#[command(after_help = "Start with: attache build ./examples/demo#demo")]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct Global {
    /// Print a machine-readable JSON result on stdout; logs stay on stderr.
    #[arg(long, global = true)]
    pub json: bool,
    /// More detail (repeat for even more).
    #[arg(short, long, action = clap::ArgAction::Count, global = true, conflicts_with = "quiet")]
    pub verbose: u8,
    /// Only errors.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// When to use colours.
    #[arg(long, value_enum, default_value_t = ColorChoice::Auto, global = true, value_name = "WHEN")]
    pub color: ColorChoice,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ColorChoice {
    Auto,
    Always,
    Never,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    Build(BuildArgs),
    Deploy(DeployArgs),
    Publish(PublishArgs),
    Status(StatusArgs),
    /// Reattach the image that was attached before the last deploy (with
    /// its settings), or put back the settings a settings-only deploy
    /// replaced.
    ///
    /// Example: attache rollback h1 demo
    Rollback(HostServiceArgs),
    /// Stop and detach a service.
    ///
    /// Example: attache detach root@10.0.0.5 demo
    Detach(HostServiceArgs),
    Unlock(UnlockArgs),
    Inspect(InspectArgs),
    Diff(DiffArgs),
    Logs(LogsArgs),
    Completions(CompletionsArgs),
    Man(ManArgs),
    #[command(hide = true)]
    PackSpec(PackSpecArgs),
    #[command(hide = true)]
    Agent(AgentArgs),
}

/// Build a portable image (NAME_VERSION.raw) from a Nix installable.
///
/// The installable is the result of attache's `portableService` (same
/// arguments as nixpkgs' `pkgs.portableService`; attache builds only its
/// spec, never the image `nix build` would pack), any derivation that ships
/// unit files in lib/systemd/system or etc/systemd/system, or one whose
/// output is an image already (checked as `inspect` does, copied as it is).
///
/// Examples:
///
///   attache build ./examples/demo#demo
///
///   attache build -f default.nix demo --out-dir images/
///
///   attache build --impure --expr '(import ./. {}).demo'
///
///   attache build .#demo --override-input nixpkgs path:./stub
///
/// The image is checked against portabled's rules before packing; the same
/// closure always gives the same bytes, and an unchanged closure returns the
/// existing image at once.
#[derive(Debug, Args)]
#[command(after_long_help = EXIT_CODES)]
pub struct BuildArgs {
    #[command(flatten)]
    pub pack: PackArgs,
    /// Directory for the image.
    #[arg(long, short = 'o', default_value = ".", value_name = "DIR")]
    pub out_dir: PathBuf,
    /// Show what would be packed, write nothing.
    #[arg(long)]
    pub dry_run: bool,
    // Last: its Nix options heading holds for every field after it.
    #[command(flatten)]
    pub source: SourceArgs,
}

/// Where the image comes from: the Nix side of `build`.
#[derive(Debug, Args)]
pub struct SourceArgs {
    /// A flake output (`.#demo`, `path:/dir#demo`, `github:owner/repo#x`), or with
    /// -f an attribute path in FILE.
    #[arg(value_name = "INSTALLABLE")]
    pub installable: Option<String>,
    #[command(flatten)]
    pub form: InstallableForm,
    #[command(flatten)]
    pub nix: NixArgs,
}

/// How the installables on the command line are read, and how the image is
/// named: shared by `build` and `deploy --to`, so both take every form.
#[derive(Debug, Args)]
pub struct InstallableForm {
    /// Evaluate a Nix file instead of a flake (like `nix build -f`); the
    /// installables are attribute paths in it.
    #[arg(short = 'f', long, value_name = "FILE", conflicts_with = "expr")]
    pub file: Option<PathBuf>,
    /// Evaluate an expression (needs --impure, like Nix).
    #[arg(long, value_name = "EXPR")]
    pub expr: Option<String>,
    /// Image name instead of the derivation's `pname`.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Image version instead of the derivation's `version`.
    #[arg(long = "version", value_name = "VERSION")]
    pub image_version: Option<String>,
}

/// The user's nix binary: every command that evaluates Nix takes it.
#[derive(Debug, Args)]
pub struct NixBin {
    /// The nix binary to use.
    #[arg(
        id = "nix",
        long = "nix",
        default_value = "nix",
        env = "ATTACHE_NIX",
        value_name = "PATH"
    )]
    pub path: PathBuf,
}

/// The nix binary and what to pass it: the commands that build take both.
/// The flags people type to `nix build` by habit are accepted as they are
/// (as nixos-rebuild, nh and colmena do); anything else goes after `--`.
#[derive(Debug, Args)]
#[command(next_help_heading = "Nix options (passed to every nix call)")]
pub struct NixArgs {
    #[command(flatten)]
    pub bin: NixBin,
    /// Allow impure evaluation (--expr needs it, as in Nix).
    #[arg(long)]
    pub impure: bool,
    /// Use FLAKE as the flake input INPUT (e.g. nixpkgs path:./stub).
    #[arg(long, num_args = 2, value_names = ["INPUT", "FLAKE"], action = ArgAction::Append)]
    pub override_input: Vec<String>,
    /// Do not write the flake's lock file.
    #[arg(long)]
    pub no_write_lock_file: bool,
    /// Recreate the flake's lock file from scratch.
    #[arg(long)]
    pub recreate_lock_file: bool,
    /// Set the Nix setting NAME to VALUE.
    #[arg(long, num_args = 2, value_names = ["NAME", "VALUE"], action = ArgAction::Append)]
    pub option: Vec<String>,
    /// Pass NAME = EXPR to the function a -f FILE or --expr evaluates to.
    #[arg(long, num_args = 2, value_names = ["NAME", "EXPR"], action = ArgAction::Append)]
    pub arg: Vec<String>,
    /// Pass NAME = "STRING" to the function a -f FILE or --expr evaluates to.
    #[arg(long, num_args = 2, value_names = ["NAME", "STRING"], action = ArgAction::Append)]
    pub argstr: Vec<String>,
    /// Add PATH (or NAME=PATH) to the lookup path of <...>.
    #[arg(short = 'I', long = "include", value_name = "PATH", action = ArgAction::Append)]
    pub include: Vec<String>,
    /// Use no substituters; take downloaded files as up to date.
    #[arg(long)]
    pub offline: bool,
    /// Take downloaded files (flake inputs, fetchers) as out of date.
    #[arg(long)]
    pub refresh: bool,
    /// Show where an evaluation error comes from.
    #[arg(long)]
    pub show_trace: bool,
    /// Any other arguments for every nix call, after `--`
    /// (e.g. `-- --max-jobs 4`).
    #[arg(id = "nix_args", last = true, value_name = "NIX_ARGS")]
    pub args: Vec<String>,
}

impl NixArgs {
    /// The user's nix with these arguments.
    pub fn nix(&self) -> crate::nix::Nix {
        crate::nix::Nix::new(self.bin.path.clone(), self.to_nix())
    }

    /// `installable`, evaluated with these arguments.
    pub fn source(&self, installable: crate::nix::Installable) -> Source {
        Source::new(installable, self.bin.path.clone(), self.to_nix())
    }

    /// The arguments every nix call gets, as Nix spells them.
    pub fn to_nix(&self) -> Vec<String> {
        let flags = [
            (self.impure, "--impure"),
            (self.no_write_lock_file, "--no-write-lock-file"),
            (self.recreate_lock_file, "--recreate-lock-file"),
            (self.offline, "--offline"),
            (self.refresh, "--refresh"),
            (self.show_trace, "--show-trace"),
        ];
        let with_values: [(&str, &[String], usize); 5] = [
            ("--override-input", &self.override_input, 2),
            ("--option", &self.option, 2),
            ("--arg", &self.arg, 2),
            ("--argstr", &self.argstr, 2),
            ("-I", &self.include, 1),
        ];
        let mut out: Vec<String> = flags
            .into_iter()
            .filter(|(given, _)| *given)
            .map(|(_, flag)| flag.to_owned())
            .collect();
        for (flag, values, per) in with_values {
            for chunk in values.chunks(per) {
                out.push(flag.to_owned());
                out.extend(chunk.iter().cloned());
            }
        }
        out.extend(self.args.iter().cloned());
        out
    }
}

#[derive(Debug, Args)]
pub struct PackArgs {
    /// Compressor [default: from the spec's squash-compression, else zstd].
    #[arg(long, value_enum, value_name = "ALGO")]
    pub compression: Option<CompressionArg>,
    /// Compression level [default: zstd 3, xz 6, gzip 9] (zstd 1-22, xz 0-9, gzip 1-9).
    #[arg(long, value_name = "N")]
    pub level: Option<u32>,
    /// Data block size, e.g. 128K or 1M [default: from the spec, else 1M].
    #[arg(long, value_name = "SIZE", value_parser = parse_block_size)]
    pub block_size: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompressionArg {
    Zstd,
    Xz,
    Gzip,
}

impl From<CompressionArg> for Compression {
    fn from(c: CompressionArg) -> Self {
        match c {
            CompressionArg::Zstd => Compression::Zstd,
            CompressionArg::Xz => Compression::Xz,
            CompressionArg::Gzip => Compression::Gzip,
        }
    }
}

impl PackArgs {
    pub fn choice(&self) -> PackChoice {
        PackChoice {
            compression: self.compression.map(Compression::from),
            level: self.level,
            block_size: self.block_size,
        }
    }
}

impl SourceArgs {
    /// What to build, as the stages take it.
    pub fn source(&self) -> Result<Source, Error> {
        let installables: Vec<String> = self.installable.iter().cloned().collect();
        let mut sources = self.form.sources(&installables, &self.nix)?;
        Ok(sources.remove(0))
    }
}

impl InstallableForm {
    /// The flags that name what to build, which the inventory form of
    /// `deploy` takes from the inventory instead.
    pub fn installable_flags(&self) -> Vec<&'static str> {
        [
            (self.file.is_some(), "-f"),
            (self.expr.is_some(), "--expr"),
            (self.name.is_some(), "--name"),
            (self.image_version.is_some(), "--version"),
        ]
        .into_iter()
        .filter_map(|(given, flag)| given.then_some(flag))
        .collect()
    }

    /// One [`Source`] per installable (at least one: none means the flake
    /// `.`, the whole FILE, or the expression). Clap cannot express that
    /// `--expr` takes no INSTALLABLE, nor that a name fits one image only,
    /// so those are refused here.
    pub fn sources(&self, installables: &[String], nix: &NixArgs) -> Result<Vec<Source>, Error> {
        let forms: Vec<Installable> = match (&self.file, &self.expr) {
            (Some(file), None) if installables.is_empty() => vec![Installable::File {
                file: file.clone(),
                attr: String::new(),
            }],
            (Some(file), None) => installables
                .iter()
                .map(|attr| Installable::File {
                    file: file.clone(),
                    attr: attr.clone(),
                })
                .collect(),
            (None, Some(expr)) => {
                if !installables.is_empty() {
                    return Err(Error::Usage(
                        "--expr takes no INSTALLABLE: put the attribute inside the expression"
                            .into(),
                    ));
                }
                vec![Installable::Expr(expr.clone())]
            }
            (None, None) if installables.is_empty() => vec![Installable::Flake(".".into())],
            (None, None) => installables
                .iter()
                .map(|i| Installable::Flake(i.clone()))
                .collect(),
            (Some(_), Some(_)) => {
                return Err(Error::Usage(
                    "use either -f FILE or --expr, not both".into(),
                ))
            }
        };
        if forms.len() > 1 && (self.name.is_some() || self.image_version.is_some()) {
            return Err(Error::Usage(
                "--name and --version name one image: give one installable with them".into(),
            ));
        }
        Ok(forms
            .into_iter()
            .map(|installable| Source {
                naming: Naming {
                    name: self.name.clone(),
                    version: self.image_version.clone(),
                },
                ..nix.source(installable)
            })
            .collect())
    }
}

/// Build, push, attach and health-check portable services on hosts.
///
/// Hosts come from the flake's `attache.hosts` (made with attache.lib.hosts):
/// select them by name, by @tag, or with --on GLOB; none selects all. Or
/// deploy installables ad hoc with --to, in any form `attache build` takes:
/// flake outputs, -f FILE ATTR..., or --expr.
///
/// Per host: connect (your ssh config, agent, keys, ProxyJump; strict host
/// keys), take the host's deploy lock, check systemd and free space, upload
/// the image unless the host has it (sha256), verify it and move it into
/// /var/lib/portables, `portablectl attach` (first time) or `reattach`,
/// check the units stay up and run the inventory's checks, and roll back to
/// the previous image if anything fails. Old images are pruned to --keep.
///
/// Pull hosts (a `pull` section in the inventory) get no image: deploy sets
/// them up over SSH (the attache agent, its config and key, a timer) and
/// stages their settings and secrets; from then on they fetch what `attache
/// publish` wrote and switch by themselves. --now makes them check at once
/// and waits for the outcome.
///
/// Ctrl-C (or SIGTERM) stops uploads and skips hosts not started; a host
/// already activating finishes its checks and confirms or rolls back. A
/// second Ctrl-C leaves at once: the host's own timer reverts it, at the
/// time printed.
///
/// Examples:
///
///   attache deploy                      every host of ./flake.nix
///
///   attache deploy @web --canary 1      one web host first, then the rest
///
///   attache deploy --to root@10.0.0.5 ./examples/demo#demo
///
///   attache deploy --to root@10.0.0.5 -f default.nix demo
///
///   attache deploy --to root@10.0.0.5 --impure --expr '(import ./. {}).demo'
///
///   attache deploy h1 --dry-run --json  the plan, nothing changed
#[derive(Debug, Args)]
#[command(after_long_help = EXIT_CODES)]
pub struct DeployArgs {
    /// Hosts (names or @tags); with --to, installables to deploy (with -f,
    /// attribute paths in FILE).
    #[arg(value_name = "HOST|@TAG|INSTALLABLE")]
    pub targets: Vec<String>,
    /// Deploy ad hoc to this SSH destination (HOST, USER@HOST[:PORT]), without an inventory.
    #[arg(long, value_name = "DEST")]
    pub to: Option<String>,
    /// Only hosts whose name matches this glob.
    #[arg(long, value_name = "GLOB")]
    pub on: Option<String>,
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// portabled profile (default, nonetwork, strict, trusted) [default: the inventory's, else default].
    #[arg(long, value_name = "PROFILE")]
    pub profile: Option<String>,
    /// Hosts deployed at once.
    #[arg(long, short = 'j', default_value_t = 8, value_name = "N")]
    pub jobs: usize,
    /// Go on with the other hosts when one fails (default: stop starting new ones).
    #[arg(long)]
    pub keep_going: bool,
    /// Deploy to N hosts first, and to the rest only if they all end healthy.
    #[arg(long, value_name = "N")]
    pub canary: Option<usize>,
    /// Leave a failed new version in place instead of going back.
    #[arg(long)]
    pub no_rollback: bool,
    /// If attache loses a host during activation, the host itself goes back
    /// to the previous image after this many seconds.
    #[arg(long, default_value_t = 300, value_name = "SECS")]
    pub rollback_after: u64,
    /// Show the plan per host (upload or skip, attach or reattach); change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Pull hosts check for a newer published version at once (after their
    /// setup), and the deploy waits for their outcome; push hosts are
    /// deployed as without it.
    #[arg(long)]
    pub now: bool,
    /// Images kept per service on each host, newest first; the attached one
    /// and the one `attache rollback` would go back to are kept on top.
    #[arg(long, default_value_t = 2, value_name = "N")]
    pub keep: usize,
    /// Seconds a unit must stay up after activation to count as healthy.
    #[arg(long, default_value_t = 3, value_name = "SECS")]
    pub settle: u64,
    #[command(flatten)]
    pub pack: PackArgs,
    #[command(flatten)]
    pub nix: NixArgs,
    // Last: a help heading holds for every field after it.
    #[command(
        flatten,
        next_help_heading = "Installables of --to (read as build reads them)"
    )]
    pub form: InstallableForm,
}

/// Build images and publish them into a directory that pull hosts fetch
/// from, served by any static HTTP server.
///
/// Builds the services of pull hosts (hosts with a `pull` section in the
/// flake's `attache.hosts`; select them by name, by @tag, or with --on
/// GLOB; none selects every pull host), or installables ad hoc: arguments
/// with a `#` (`.#demo`), or any with -f FILE or --expr, are installables,
/// read as `attache build` reads them; the others are hosts.
///
/// Writes into DIR each image (NAME_VERSION.raw) with its manifest
/// (FILE.raw.json), then SHA256SUMS, one line per image, signed by
/// `ssh-keygen -Y sign` with --key (SHA256SUMS.sig); pull hosts accept only
/// an index signed by the key their `pull.publicKey` names, so --key's
/// public half must be it. Every file is written under a temporary name
/// and renamed, the index last, so that a reader never sees a half-written
/// file or an index naming a missing one (not after Ctrl-C, nor on a full
/// disk). Images DIR has already are not copied again; a version published
/// before with other content is published as NAME_VERSION-SHA8.raw. Then
/// each published service keeps its --keep newest versions (as systemd
/// orders versions); the one just published always stays.
///
/// Examples:
///
///   attache publish --to /srv/attache --key ~/.ssh/attache-publish
///
///   attache publish @edge --to /srv/attache --key ~/.ssh/attache-publish --keep 5
///
///   attache publish ./examples/demo#demo --to /srv/attache --insecure-unsigned
///
///   attache publish --to /srv/attache --key K --dry-run --json
#[derive(Debug, Args)]
#[command(after_long_help = EXIT_CODES)]
#[command(
    mut_arg("ssh_config", |a| a.hide(true)),
    mut_arg("accept_new_host_keys", |a| a.hide(true)),
    mut_arg("sudo", |a| a.hide(true))
)]
pub struct PublishArgs {
    /// Pull hosts (names or @tags) whose services to publish; or
    /// installables (with `#`, or with -f/--expr) to publish ad hoc.
    #[arg(value_name = "HOST|@TAG|INSTALLABLE")]
    pub targets: Vec<String>,
    /// The publish directory (created if missing).
    #[arg(long, value_name = "DIR")]
    pub to: PathBuf,
    /// OpenSSH private key that signs SHA256SUMS (ssh-keygen may ask for its
    /// passphrase); a public key signs through your ssh-agent.
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Publish without a signature: only hosts with `insecureUnsigned = true`
    /// accept it.
    #[arg(long, conflicts_with = "key")]
    pub insecure_unsigned: bool,
    /// Only hosts whose name matches this glob.
    #[arg(long, value_name = "GLOB")]
    pub on: Option<String>,
    /// Versions kept in DIR per published service, newest first.
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub keep: usize,
    /// Build, and show what would be written and pruned; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub fleet: FleetArgs,
    #[command(flatten)]
    pub pack: PackArgs,
    #[command(flatten)]
    pub nix: NixArgs,
    // Last: a help heading holds for every field after it.
    #[command(
        flatten,
        next_help_heading = "Installables (publishing ad hoc, read as build reads them)"
    )]
    pub form: InstallableForm,
}

/// Where hosts come from and how to reach them: shared by every command
/// that acts on hosts.
#[derive(Debug, Args, Clone)]
pub struct FleetArgs {
    /// The flake with `attache.hosts`.
    #[arg(long, default_value = ".", value_name = "FLAKE")]
    pub flake: String,
    #[command(flatten)]
    pub ssh: SshArgs,
}

#[derive(Debug, Args, Clone)]
pub struct SshArgs {
    /// ssh config file to use instead of ~/.ssh/config (ssh -F).
    #[arg(long, value_name = "FILE", global = false)]
    pub ssh_config: Option<PathBuf>,
    /// Trust hosts whose key is not yet known (never a changed key).
    #[arg(long)]
    pub accept_new_host_keys: bool,
    /// Use `sudo -n` on hosts where the login user is not root.
    #[arg(long)]
    pub sudo: bool,
}

/// Show what is attached on hosts: image, version, sha256, unit states.
///
/// Read from the units' portable drop-ins, not `portablectl list`.
///
/// Example: attache status h1 --ssh-config lab/ssh_config --json
#[derive(Debug, Args)]
#[command(after_long_help = EXIT_CODES)]
pub struct StatusArgs {
    /// Hosts (names, @tags, or SSH destinations); none means all inventory hosts.
    #[arg(value_name = "HOST")]
    pub hosts: Vec<String>,
    /// Every unit of every host, one host at a time, instead of one line
    /// per service with hosts that agree grouped.
    #[arg(long)]
    pub wide: bool,
    /// Hosts read at once.
    #[arg(long, short = 'j', default_value_t = 8, value_name = "N")]
    pub jobs: usize,
    #[command(flatten)]
    pub fleet: FleetArgs,
    #[command(flatten)]
    pub nix: NixArgs,
}

/// The host and service `rollback` and `detach` act on.
#[derive(Debug, Args)]
#[command(after_long_help = EXIT_CODES)]
pub struct HostServiceArgs {
    /// Inventory host name, or an SSH destination.
    pub host: String,
    /// Service (image) name, e.g. demo.
    pub service: String,
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// portabled profile for the reattach [default: the inventory's, else default].
    #[arg(long, value_name = "PROFILE")]
    pub profile: Option<String>,
    #[command(flatten)]
    pub nix: NixArgs,
}

/// Free a host whose deploy lock is held by an attache that is gone.
///
/// A deploy holds the host's lock (/run/attache/lock) for as long as its SSH
/// session lives; a client that vanished behind a broken network can hold it
/// until the host's TCP keepalive gives up, hours later. `unlock` shows who
/// holds it (user, machine, host-side process and age), then ends that one
/// process on the host, found by the flock it holds, and nothing else. A
/// deploy that is still running loses its lock: use it only when the attache
/// named is gone. It asks first on a terminal; otherwise pass --yes.
///
/// Example: attache unlock h1
#[derive(Debug, Args)]
#[command(after_long_help = EXIT_CODES)]
pub struct UnlockArgs {
    /// Inventory host name, or an SSH destination.
    pub host: String,
    /// Do not ask: end the lock's holder.
    #[arg(long, short = 'y')]
    pub yes: bool,
    #[command(flatten)]
    pub fleet: FleetArgs,
    #[command(flatten)]
    pub nix: NixArgs,
}

/// Show what is inside a portable image, offline, and whether portabled would
/// accept it.
///
/// Example: attache inspect demo_1.0.raw --json
#[derive(Debug, Args)]
#[command(after_long_help = EXIT_CODES)]
pub struct InspectArgs {
    /// The image file.
    pub image: PathBuf,
}

/// Show what changes between two images, or between what a deploy would
/// push and what hosts run: packages added, removed, upgraded or rebuilt,
/// with NAR size deltas (like `nix store diff-closures`), units, the total.
///
/// Examples:
///
///   attache diff shop_1.0.raw shop_2.0.raw
///
///   attache diff .#shop .#shop-v2
///
///   attache diff @web shop
///
/// Two `.raw` files or two installables are compared offline; otherwise
/// the first argument names inventory hosts (or @tags), the second one
/// service, and each host's attached image is compared with what
/// `attache deploy` would put there (hosts that agree are grouped).
#[derive(Debug, Args)]
#[command(after_long_help = EXIT_CODES)]
pub struct DiffArgs {
    /// OLD.raw NEW.raw, OLD-INSTALLABLE NEW-INSTALLABLE, or HOST|@TAG [SERVICE].
    #[arg(value_name = "OLD|HOST|@TAG", required = true, num_args = 1..=2)]
    pub args: Vec<String>,
    #[command(flatten)]
    pub fleet: FleetArgs,
    #[command(flatten)]
    pub nix: NixArgs,
}

/// Show the journal of a service's units on hosts, merged by time.
///
/// Examples:
///
///   attache logs web1 shop -n 50
///
///   attache logs @web shop --since '1 hour ago'
///
///   attache logs @web -f
///
/// Template instances are included (`echo@*.service` for `echo@.service`);
/// each line starts with its host. `-f` follows every host at once until
/// Ctrl-C; nothing keeps running on a host once attache stops. `--json`
/// prints each journal entry's fields (as `journalctl -o json`) plus `host`.
#[derive(Debug, Args)]
#[command(after_long_help = EXIT_CODES)]
pub struct LogsArgs {
    /// Host (name, @tag, or SSH destination).
    #[arg(value_name = "HOST|@TAG")]
    pub host: String,
    /// Service (image) name; every attached service when left out.
    pub service: Option<String>,
    /// Keep printing new entries until Ctrl-C.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Entries from this time on, in journalctl's words (`1 hour ago`, `2026-12-01 10:00`).
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// The last N entries of each host [default: 100, or all since --since].
    #[arg(short = 'n', long = "lines", value_name = "N")]
    pub lines: Option<u32>,
    #[command(flatten)]
    pub fleet: FleetArgs,
    #[command(flatten)]
    pub nix: NixArgs,
}

/// The builder of portableService's `nix build`, inside the Nix sandbox:
/// packs a spec file as `attache build` would.
#[derive(Debug, Args)]
pub struct PackSpecArgs {
    /// The spec file portableService wrote.
    pub spec: PathBuf,
    /// Its runtime closure, as Nix's exportReferencesGraph writes it.
    #[arg(long, value_name = "FILE")]
    pub closure: PathBuf,
    /// Directory for the image ($out).
    #[arg(long, value_name = "DIR")]
    pub out_dir: PathBuf,
}

/// A pull host's agent, run by attache-pull.service: fetch and verify the
/// published index, place newer images, switch through the deploy
/// transaction, record the outcome in the state file.
#[derive(Debug, Args)]
pub struct AgentArgs {
    #[arg(
        long,
        value_name = "FILE",
        default_value = "/var/lib/attache/pull/config.json"
    )]
    pub config: PathBuf,
}

/// Print shell completions to stdout.
///
/// Example: attache completions bash > /etc/bash_completion.d/attache
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    pub shell: clap_complete::Shell,
}

/// Print the man page (roff) to stdout.
///
/// Example: attache man | man -l -
#[derive(Debug, Args)]
pub struct ManArgs {}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn build_args_parse() {
        let c = Cli::try_parse_from([
            "attache",
            "build",
            ".#demo",
            "--json",
            "--version",
            "2.0",
            "--block-size",
            "128K",
            "--",
            "--override-input",
            "nixpkgs",
            "path:./stub",
        ])
        .unwrap();
        assert!(c.global.json);
        let Command::Build(b) = c.command else {
            panic!("not build")
        };
        assert_eq!(b.source.installable.as_deref(), Some(".#demo"));
        assert_eq!(b.source.form.image_version.as_deref(), Some("2.0"));
        assert_eq!(b.pack.block_size, Some(128 * 1024));
        assert_eq!(
            b.source.nix.args,
            ["--override-input", "nixpkgs", "path:./stub"]
        );
    }

    /// The Nix flags people type by habit work without `--`, with their
    /// values, on build and deploy alike; `--` still passes anything else.
    /// The commands that read the inventory evaluate the same flake, so
    /// they take the same Nix flags (the nixpkgs-style example needs them
    /// offline).
    #[test]
    fn commands_that_read_the_inventory_take_nix_flags() {
        for cmd in ["status", "rollback", "detach", "unlock", "logs"] {
            let mut argv = vec!["attache", cmd, "h1"];
            if matches!(cmd, "rollback" | "detach") {
                argv.push("svc");
            }
            argv.extend(["--override-input", "nixpkgs", "path:./stub", "--impure"]);
            let c = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{cmd}: {e}"));
            let nix = match &c.command {
                Command::Status(a) => &a.nix,
                Command::Rollback(a) | Command::Detach(a) => &a.nix,
                Command::Unlock(a) => &a.nix,
                Command::Logs(a) => &a.nix,
                _ => panic!("{cmd}"),
            };
            assert_eq!(
                nix.to_nix(),
                ["--impure", "--override-input", "nixpkgs", "path:./stub"],
                "{cmd}"
            );
        }
    }

    #[test]
    fn nix_flags_are_taken_as_nix_spells_them() {
        let c = Cli::try_parse_from([
            "attache",
            "build",
            "./examples/nixpkgs-style#default",
            "--override-input",
            "nixpkgs",
            "path:./stub",
            "--override-input",
            "attache",
            "git+file:///src",
            "--impure",
            "--option",
            "cores",
            "1",
            "--show-trace",
            "--offline",
            "--refresh",
            "--no-write-lock-file",
            "--recreate-lock-file",
            "-I",
            "nixpkgs=/p",
            "--arg",
            "x",
            "1",
            "--argstr",
            "y",
            "two",
            "--",
            "--max-jobs",
            "4",
        ])
        .unwrap();
        let Command::Build(b) = c.command else {
            panic!("not build")
        };
        assert_eq!(
            b.source.installable.as_deref(),
            Some("./examples/nixpkgs-style#default")
        );
        assert_eq!(
            b.source.nix.to_nix(),
            [
                "--impure",
                "--no-write-lock-file",
                "--recreate-lock-file",
                "--offline",
                "--refresh",
                "--show-trace",
                "--override-input",
                "nixpkgs",
                "path:./stub",
                "--override-input",
                "attache",
                "git+file:///src",
                "--option",
                "cores",
                "1",
                "--arg",
                "x",
                "1",
                "--argstr",
                "y",
                "two",
                "-I",
                "nixpkgs=/p",
                "--max-jobs",
                "4",
            ]
        );
        let d = deploy(&["h1", "--override-input", "nixpkgs", "path:./stub", "@web"]);
        assert_eq!(d.targets, ["h1", "@web"]);
        assert_eq!(
            d.nix.to_nix(),
            ["--override-input", "nixpkgs", "path:./stub"]
        );
        // A pair flag given one value is a usage error, not a silent shift.
        assert!(Cli::try_parse_from(["attache", "build", "--option", "cores"]).is_err());
    }

    /// The commands that build list the Nix flags under their own heading.
    #[test]
    fn help_shows_nix_options_in_their_own_heading() {
        let mut cmd = Cli::command();
        for sub in ["build", "deploy", "publish"] {
            let help = cmd
                .find_subcommand_mut(sub)
                .unwrap()
                .render_long_help()
                .to_string();
            let heading = help
                .find("\nNix options (passed to every nix call):")
                .unwrap_or_else(|| panic!("no Nix heading in {sub} --help:\n{help}"));
            // Where an option is listed (indented), not where an example uses it.
            let (before, after) = help.split_at(heading);
            let lists = |part: &str, flag: &str| {
                part.lines()
                    .any(|l| l.starts_with("  ") && l.trim_start().starts_with(flag))
            };
            for flag in [
                "--override-input <INPUT> <FLAKE>",
                "--option <NAME> <VALUE>",
                "--impure",
                "--show-trace",
                "--nix <PATH>",
            ] {
                assert!(
                    lists(after, flag) && !lists(before, flag),
                    "{flag} is not under the Nix heading of {sub}:\n{help}"
                );
            }
            assert!(
                lists(before, "--compression"),
                "packing options belong before the Nix heading of {sub}:\n{help}"
            );
        }
    }

    fn deploy(args: &[&str]) -> DeployArgs {
        let c = Cli::try_parse_from([&["attache", "deploy"], args].concat()).unwrap();
        let Command::Deploy(d) = c.command else {
            panic!("not deploy")
        };
        d
    }

    fn installables(d: &DeployArgs) -> Result<Vec<String>, String> {
        d.form
            .sources(&d.targets, &d.nix)
            .map(|v| v.iter().map(|s| s.installable.to_string()).collect())
            .map_err(|e| e.to_string())
    }

    /// `deploy --to` reads installables exactly as `build` does.
    #[test]
    fn deploy_to_takes_every_installable_form() {
        let d = deploy(&["--to", "root@h", "-f", "default.nix", "demo", "tick"]);
        let srcs = d.form.sources(&d.targets, &d.nix).unwrap();
        assert_eq!(
            srcs.iter().map(|s| &s.installable).collect::<Vec<_>>(),
            [
                &Installable::File {
                    file: "default.nix".into(),
                    attr: "demo".into()
                },
                &Installable::File {
                    file: "default.nix".into(),
                    attr: "tick".into()
                },
            ]
        );
        let d = deploy(&["--to", "h", "--impure", "--expr", "(import ./. {}).demo"]);
        let srcs = d.form.sources(&d.targets, &d.nix).unwrap();
        assert_eq!(
            srcs[0].installable,
            Installable::Expr("(import ./. {}).demo".into())
        );
        assert!(srcs[0].nix_args.contains(&"--impure".to_owned()));
        let d = deploy(&["--to", "h", "--name", "web", "--version", "2", ".#demo"]);
        let srcs = d.form.sources(&d.targets, &d.nix).unwrap();
        assert_eq!(srcs[0].naming.name.as_deref(), Some("web"));
        assert_eq!(srcs[0].naming.version.as_deref(), Some("2"));
        // The flake form is unchanged, `.` when nothing is named.
        assert_eq!(
            installables(&deploy(&["--to", "h", ".#a", ".#b"])),
            Ok(vec![".#a".to_owned(), ".#b".to_owned()])
        );
        assert_eq!(
            installables(&deploy(&["--to", "h"])),
            Ok(vec![".".to_owned()])
        );

        let e = installables(&deploy(&["--to", "h", "--expr", "x", ".#demo"])).unwrap_err();
        assert!(e.starts_with("--expr takes no INSTALLABLE"), "{e}");
        let e = installables(&deploy(&["--to", "h", "--name", "x", ".#a", ".#b"])).unwrap_err();
        assert!(e.starts_with("--name and --version name one image"), "{e}");
        assert!(Cli::try_parse_from(["attache", "deploy", "-f", "a.nix", "--expr", "x"]).is_err());
        assert_eq!(
            deploy(&["web1", "-f", "a.nix", "--name", "x"])
                .form
                .installable_flags(),
            ["-f", "--name"]
        );
    }

    /// `deploy --help` teaches the forms with examples.
    #[test]
    fn deploy_help_shows_every_form() {
        let mut cmd = Cli::command();
        let help = cmd
            .find_subcommand_mut("deploy")
            .unwrap()
            .render_long_help()
            .to_string();
        for example in [
            "attache deploy --to root@10.0.0.5 ./examples/demo#demo",
            "attache deploy --to root@10.0.0.5 -f default.nix demo",
            "attache deploy --to root@10.0.0.5 --impure --expr '(import ./. {}).demo'",
            "--file <FILE>",
            "--expr <EXPR>",
        ] {
            assert!(help.contains(example), "{example} missing from:\n{help}");
        }
    }
}
