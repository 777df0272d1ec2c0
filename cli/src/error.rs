//! The error a command ends with, and the exit code it maps to.

use crate::build::LevelError;
use crate::image::ImageError;
use crate::nix::NixError;
use crate::spec::from_nix::FromNixError;
use crate::spec::SpecError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Nix(#[from] NixError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    FromNix(#[from] FromNixError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Level(#[from] LevelError),
    /// Bad input that is not about Nix or the spec: arguments, files.
    #[error("{0}")]
    Usage(String),
    /// Some hosts did not end healthy on the new version.
    #[error("{summary}")]
    Deploy { summary: String },
    /// Ctrl-C or SIGTERM stopped a deploy before it ended.
    #[error("{0}")]
    Interrupted(String),
    /// A host could not be reached or a remote step failed (status,
    /// rollback, detach).
    #[error("{0}")]
    Remote(String),
    /// `inspect` found reasons portabled would refuse the image.
    #[error("portabled would refuse this image:\n  - {}", .0.join("\n  - "))]
    Refused(Vec<String>),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// Documented in `attache --help`; scripts rely on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCode {
    Ok = 0,
    BadInput = 1,
    Environment = 2,
    DeployFailed = 3,
}

impl Error {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }

    pub fn exit_code(&self) -> ExitCode {
        match self {
            Error::Nix(e) if e.is_user_error() => ExitCode::BadInput,
            Error::Nix(_) => ExitCode::Environment,
            Error::FromNix(FromNixError::Read { .. }) => ExitCode::Environment,
            Error::Spec(_)
            | Error::FromNix(_)
            | Error::Level(_)
            | Error::Usage(_)
            | Error::Refused(_) => ExitCode::BadInput,
            Error::Image(e) if image_error_is_user_error(e) => ExitCode::BadInput,
            Error::Image(_) | Error::Io { .. } | Error::Remote(_) => ExitCode::Environment,
            Error::Deploy { .. } | Error::Interrupted(_) => ExitCode::DeployFailed,
        }
    }
}

/// The packer's errors split the same way: the input's fault, or the
/// machine's (I/O, a writer bug).
fn image_error_is_user_error(e: &ImageError) -> bool {
    match e {
        ImageError::Read { source, .. } => source.kind() == std::io::ErrorKind::NotFound,
        ImageError::Write { .. } | ImageError::Changed { .. } | ImageError::Writer(_) => false,
        _ => true,
    }
}
