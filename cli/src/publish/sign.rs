//! Signing the index with the user's OpenSSH key (`ssh-keygen -Y sign`), and
//! checking a signature as a pull host does (`ssh-keygen -Y verify`): OpenSSH
//! is on every machine that runs sshd, gpg is not.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The namespace (`-n`) and signer identity (`-I`) of every signature.
pub const NAMESPACE: &str = "attache-publish";

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// ssh-keygen could not be started (missing when NotFound).
    #[error("running ssh-keygen (OpenSSH's client: apt install openssh-client): {0}")]
    Run(std::io::Error),
    #[error("ssh-keygen cannot read the key {key}: {says}")]
    BadKey { key: String, says: String },
    #[error("ssh-keygen could not sign with {key}: {says}")]
    Sign { key: String, says: String },
    #[error("{0}: {1}")]
    Io(&'static str, std::io::Error),
}

/// An OpenSSH public key, compared by type and key data (not comment).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    kind: String,
    data: String,
}

impl PublicKey {
    /// One line as in `KEY.pub` or an inventory's `publicKey`.
    pub fn parse(line: &str) -> Option<PublicKey> {
        let mut words = line.split_whitespace();
        let (kind, data) = (words.next()?, words.next()?);
        let known =
            kind.starts_with("ssh-") || kind.starts_with("ecdsa-") || kind.starts_with("sk-");
        // Key data is base64: anything else is no key (and `short` cuts it
        // by bytes).
        let base64 = data
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='));
        (known && base64 && data.starts_with("AAAA")).then(|| PublicKey {
            kind: kind.to_owned(),
            data: data.to_owned(),
        })
    }

    /// `TYPE DATA`, as an allowed-signers line ends.
    pub fn line(&self) -> String {
        format!("{} {}", self.kind, self.data)
    }

    /// A short form for messages: the type and the key data's end.
    pub fn short(&self) -> String {
        let tail = &self.data[self.data.len().saturating_sub(12)..];
        format!("{} …{tail}", self.kind)
    }
}

/// `PATH` with `suffix` appended, as ssh-keygen names `KEY.pub` and
/// `FILE.sig`: byte for byte (`display()` would change a name that is not
/// UTF-8, and then the file would not be found).
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn ssh_keygen() -> Command {
    Command::new("ssh-keygen")
}

fn says(stderr: &[u8]) -> String {
    let s = String::from_utf8_lossy(stderr);
    let s = s.trim();
    if s.is_empty() {
        "it said nothing".to_owned()
    } else {
        s.lines().collect::<Vec<_>>().join("; ")
    }
}

/// What ssh-keygen said, and what to do when it wanted a passphrase that
/// nobody can type here (deriving the public half asks for it too).
fn says_with_hint(stderr: &[u8]) -> String {
    let mut says = says(stderr);
    if says.contains("passphrase") && !std::io::stdin().is_terminal() {
        says +=
            " (nobody can type a passphrase here: add the key to ssh-agent and pass --key KEY.pub)";
    }
    says
}

/// The public half of `key`: the key itself when it is a public key (then
/// ssh-keygen signs through the agent), else `KEY.pub` beside it, else what
/// `ssh-keygen -y` derives (which may ask for the passphrase). A `KEY.pub`
/// that is not KEY's half is caught when the signature is checked.
pub fn public_key(key: &Path) -> Result<PublicKey, SignError> {
    let bad = |says: String| SignError::BadKey {
        key: key.display().to_string(),
        says,
    };
    let text = std::fs::read_to_string(key).map_err(|e| bad(e.to_string()))?;
    if let Some(public) = PublicKey::parse(&text) {
        return Ok(public);
    }
    let pub_file = with_suffix(key, ".pub");
    if let Some(public) = std::fs::read_to_string(&pub_file)
        .ok()
        .and_then(|t| PublicKey::parse(&t))
    {
        return Ok(public);
    }
    let out = ssh_keygen()
        .arg("-y")
        .arg("-f")
        .arg(key)
        .stdin(Stdio::inherit())
        .stderr(Stdio::piped())
        .output()
        .map_err(SignError::Run)?;
    let line = String::from_utf8_lossy(&out.stdout);
    match PublicKey::parse(&line) {
        Some(p) if out.status.success() => Ok(p),
        _ => Err(bad(says_with_hint(&out.stderr))),
    }
}

/// Signs `file` with `key`; the signature is `FILE.sig` (armored), removed
/// again if ssh-keygen fails. Its stdin is the user's, for the passphrase.
pub fn sign(key: &Path, file: &Path) -> Result<PathBuf, SignError> {
    let sig = with_suffix(file, ".sig");
    // ssh-keygen asks before it writes over a signature.
    let _ = std::fs::remove_file(&sig);
    let out = ssh_keygen()
        .args(["-q", "-Y", "sign", "-n", NAMESPACE, "-f"])
        .arg(key)
        .arg(file)
        .stdin(Stdio::inherit())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(SignError::Run)?;
    if out.status.success() && sig.is_file() {
        return Ok(sig);
    }
    let _ = std::fs::remove_file(&sig);
    Err(SignError::Sign {
        key: key.display().to_string(),
        says: says_with_hint(&out.stderr),
    })
}

/// Whether `sig` is a good signature of `file` by `public`, checked as a
/// pull host checks it.
pub fn verify(public: &PublicKey, file: &Path, sig: &Path) -> Result<bool, SignError> {
    let mut allowed = tempfile::Builder::new()
        .prefix("attache-allowed-signers-")
        .tempfile()
        .map_err(|e| SignError::Io("writing the allowed signers", e))?;
    use std::io::Write;
    writeln!(allowed, "{}", allowed_signers(public))
        .map_err(|e| SignError::Io("writing the allowed signers", e))?;
    let input =
        std::fs::File::open(file).map_err(|e| SignError::Io("reading the signed file", e))?;
    let status = ssh_keygen()
        .args(["-Y", "verify", "-I", NAMESPACE, "-n", NAMESPACE, "-f"])
        .arg(allowed.path())
        .arg("-s")
        .arg(sig)
        .stdin(input)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(SignError::Run)?;
    Ok(status.success())
}

/// The one line of the allowed-signers file a pull host verifies with.
pub fn allowed_signers(public: &PublicKey) -> String {
    format!("{NAMESPACE} namespaces=\"{NAMESPACE}\" {}", public.line())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPq0uSD4i5bJSC3pPZ6GUFMRz0QkkS3H6rO8QdV2lZ4X";

    #[test]
    fn suffixes_keep_names_that_are_not_utf8() {
        use std::os::unix::ffi::OsStrExt;
        let dir = Path::new(std::ffi::OsStr::from_bytes(b"/srv/caf\xe9"));
        assert_eq!(
            with_suffix(&dir.join(".SHA256SUMS.tmp"), ".sig")
                .as_os_str()
                .as_bytes(),
            b"/srv/caf\xe9/.SHA256SUMS.tmp.sig"
        );
    }

    #[test]
    fn keys_compare_without_their_comment() {
        let a = PublicKey::parse(&format!("{ED} alice@laptop\n")).unwrap();
        let b = PublicKey::parse(ED).unwrap();
        assert_eq!(a, b);
        let other = PublicKey::parse(&ED.replace("Z4X", "Z4Y")).unwrap();
        assert_ne!(a, other);
        assert_eq!(a.short(), "ssh-ed25519 …6rO8QdV2lZ4X");
        assert_eq!(
            allowed_signers(&a),
            format!("attache-publish namespaces=\"attache-publish\" {ED}")
        );
        for bad in [
            "",
            "ssh-ed25519",
            "-----BEGIN OPENSSH PRIVATE KEY-----",
            "rsa AAAA",
            // Not base64; `short` once cut the euro sign in half (a panic).
            "ssh-ed25519 AAAA€xxxxxxxxxx",
        ] {
            assert_eq!(PublicKey::parse(bad), None, "{bad}");
        }
    }
}
