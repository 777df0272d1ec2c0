//! Sending an image as a delta against one the host already has (the
//! algorithm is [`crate::delta`], the host's scripts `ops::delta`). Every
//! way this can fail ends in `Err(why)`, and the caller uploads the whole
//! image instead: a delta only ever saves bytes, the image the host ends
//! with is checked by its sha256 either way.

use std::io::Write;
use std::sync::Arc;

use super::ops::delta as host;
use super::report::Stage;
use super::session::HostSession;
use super::ServicePlan;
use crate::delta::{diff, Signature};
use crate::names::basename;

/// A delta is sent only when it is at most this share of the image:
/// beyond that the full upload costs about the same and is simpler.
const MOST: f64 = 0.5;

/// The new image in memory with its signature, made once per push.
pub struct Local {
    pub data: Arc<[u8]>,
    pub signature: Signature,
}

impl Local {
    pub async fn read(svc: &ServicePlan) -> Result<Local, String> {
        let path = svc.local.clone();
        let sha = svc.sha256.clone();
        tokio::task::spawn_blocking(move || {
            let data = crate::delta::read_image(&path)
                .map_err(|e| format!("could not read {}: {e}", path.display()))?;
            let block = crate::delta::block_size(data.len() as u64);
            let signature = Signature::of_image(&data, &sha, block);
            Ok(Local {
                data: data.into(),
                signature,
            })
        })
        .await
        .map_err(|e| e.to_string())?
    }
}

/// Why a push with nothing to start from sends the whole image.
pub const NO_BASIS: &str = "the host has no earlier image with a signature to start from";

/// A delta ready to go: its script and pieces in a local file, to be
/// uploaded to `ops::delta::delta_path` and run there (see `ops::push`).
pub struct Prepared {
    pub file: tempfile::NamedTempFile,
    pub bytes: u64,
    pub basis: String,
    /// The sha256 the basis must show first, when the host did not vouch
    /// for it.
    pub check: Option<String>,
}

/// Reads the signatures of the images on the host (one round-trip) and
/// makes the delta that rebuilds the new image at `tmp` from a basis
/// there. `previous`: the image the service has attached, the basis tried
/// first. `Err`: why the full image must go instead.
pub async fn prepare(
    s: &HostSession,
    local: &Local,
    target: &str,
    tmp: &str,
    previous: Option<&str>,
) -> Result<Prepared, String> {
    let out = s
        .run(&host::signatures(previous), Stage::Push)
        .await
        .map_err(|e| format!("the host's signatures could not be read: {e}"))?;
    let found = host::parse_signatures(&out.stdout);
    let (basis, sig, check) = choose(&found, local).ok_or_else(|| {
        match &found.mismatch {
            Some(p) => format!(
                "{} is not the image its signature describes (changed or damaged), and no other image can serve as a basis",
                basename(p)
            ),
            None => NO_BASIS.to_owned(),
        }
    })?;
    // Diffing reads the whole image: off the async workers.
    let data = Arc::clone(&local.data);
    let delta = tokio::task::spawn_blocking(move || diff(&sig, &data))
        .await
        .map_err(|e| e.to_string())?;
    let file = host::delta_path(target);
    let script = host::apply_script(&file, &basis, tmp, &delta.ops);
    let bytes = script.len() as u64 + delta.literal_bytes();
    let size = local.data.len() as u64;
    if bytes as f64 > size as f64 * MOST {
        return Err(format!(
            "a delta against {} would be {} of the image's {} bytes",
            basename(&basis),
            bytes,
            size
        ));
    }
    // Room for the delta and the rebuilt image side by side, with the
    // plan's reserve (5 % and 16 MiB).
    let need_kb = (bytes + size) / 1024 + 1;
    let need_kb = need_kb + need_kb / 20 + 16 * 1024;
    if found.free_kb.is_some_and(|free| free < need_kb) {
        return Err(format!(
            "the host has no room for the delta and the rebuilt image side by side ({} MB needed)",
            need_kb / 1024
        ));
    }
    let mut f = tempfile::NamedTempFile::new().map_err(|e| e.to_string())?;
    let written = f
        .write_all(script.as_bytes())
        .and_then(|()| delta.pieces(&local.data).try_for_each(|p| f.write_all(p)))
        .and_then(|()| f.flush());
    written.map_err(|e| format!("could not write the delta: {e}"))?;
    Ok(Prepared {
        file: f,
        bytes,
        basis,
        check,
    })
}

/// The basis: the attached image when the host vouched for it, else the
/// image whose signature shares the most blocks with the new one (a cheap
/// guess, from the signatures alone). With it, the sha256 the basis must
/// be shown to have before a delta against it is sent, if any.
fn choose(found: &host::Signatures, new: &Local) -> Option<(String, Signature, Option<String>)> {
    let parsed = found
        .found
        .iter()
        .filter_map(|(p, trusted, text)| Some((p, *trusted, Signature::parse(text).ok()?)));
    let mut mine = std::collections::HashMap::new();
    mine.insert(new.signature.block, new.signature.clone());
    let mut best: Option<(usize, String, Signature)> = None;
    for (path, trusted, sig) in parsed {
        if trusted {
            return Some((path.clone(), sig, None));
        }
        let own = mine
            .entry(sig.block)
            .or_insert_with(|| Signature::of_image(&new.data, "", sig.block));
        let score = own.shared_blocks(&sig);
        if score > 0 && best.as_ref().is_none_or(|b| score > b.0) {
            best = Some((score, path.clone(), sig));
        }
    }
    best.map(|(_, p, s)| {
        let check = Some(s.sha256.clone());
        (p, s, check)
    })
}
