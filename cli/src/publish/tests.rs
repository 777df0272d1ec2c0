use std::collections::BTreeMap;

use super::*;
use crate::ui::capture::{self, settings};
use crate::ui::Verbosity;

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// An image of `content` at `src/NAME_VERSION.raw`, as a build leaves it.
fn image(src: &Path, name: &str, version: &str, content: &str) -> Image {
    let path = src.join(format!("{name}_{version}.raw"));
    std::fs::write(&path, content).unwrap();
    Image {
        name: name.into(),
        version: version.into(),
        path,
        sha256: sha(content.as_bytes()),
        size: content.len() as u64,
        manifest: Some(format!("{{\"of\":\"{name} {version}\"}}").into_bytes()),
    }
}

/// An image that is not on disk: enough for [`plan`].
fn fake(name: &str, version: &str, content: &str) -> Image {
    Image {
        name: name.into(),
        version: version.into(),
        path: PathBuf::new(),
        sha256: sha(content.as_bytes()),
        size: 0,
        manifest: None,
    }
}

fn entry(file: &str, content: &str) -> Entry {
    Entry::new(file, &sha(content.as_bytes())).unwrap()
}

/// The plan against a directory holding `files` (name, content), all listed.
fn plan_in(images: &[Image], files: &[(&str, &str)], keep: usize) -> Result<Plan, PublishError> {
    let listed: Vec<Entry> = files.iter().map(|(f, c)| entry(f, c)).collect();
    let on_disk: BTreeMap<String, String> = files
        .iter()
        .map(|(f, c)| ((*f).to_owned(), sha(c.as_bytes())))
        .collect();
    plan(
        images,
        &listed,
        &mut |f: &str| Ok(on_disk.get(f).cloned()),
        keep,
    )
}

fn files(p: &Plan) -> Vec<(&str, bool)> {
    p.places.iter().map(|p| (p.file.as_str(), p.copy)).collect()
}

fn indexed(p: &Plan) -> Vec<&str> {
    p.index.iter().map(|e| e.file.as_str()).collect()
}

#[test]
fn new_images_are_copied_and_known_ones_are_not() {
    let p = plan_in(
        &[fake("demo", "2.0", "two"), fake("demo", "1.0", "one")],
        &[("demo_1.0.raw", "one")],
        3,
    )
    .unwrap();
    assert_eq!(files(&p), [("demo_2.0.raw", true), ("demo_1.0.raw", false)]);
    assert_eq!(indexed(&p), ["demo_1.0.raw", "demo_2.0.raw"]);
    assert!(p.prune.is_empty(), "{p:?}");
    // The same image twice (two hosts run it) is published once.
    let p = plan_in(
        &[fake("demo", "1.0", "one"), fake("demo", "1.0", "one")],
        &[],
        3,
    )
    .unwrap();
    assert_eq!(files(&p), [("demo_1.0.raw", true)]);
}

/// A version published before with other content gets deploy's name for
/// a rebuild; a file that differs from what its name or the index says
/// was changed by hand, and is refused.
#[test]
fn a_rebuilt_version_gets_its_own_name_and_hand_edits_are_refused() {
    let rebuilt = fake("demo", "1.0", "rebuilt");
    let tag = &rebuilt.sha256[..8];
    let p = plan_in(
        std::slice::from_ref(&rebuilt),
        &[("demo_1.0.raw", "one")],
        3,
    )
    .unwrap();
    let tagged = format!("demo_1.0-{tag}.raw");
    assert_eq!(files(&p), [(tagged.as_str(), true)]);
    assert_eq!(indexed(&p), [tagged.as_str(), "demo_1.0.raw"]);
    assert!(
        p.notes[0].starts_with(
            "demo_1.0.raw is published with other content; publishing this one as demo_1.0-"
        ),
        "{:?}",
        p.notes
    );

    // Listed as one thing, holding another.
    let listed = [entry("demo_1.0.raw", "one")];
    let e = plan(
        std::slice::from_ref(&rebuilt),
        &listed,
        &mut |_: &str| Ok(Some(sha(b"edited"))),
        3,
    )
    .unwrap_err();
    assert!(matches!(e, PublishError::Changed { .. }), "{e:?}");
    assert!(
        e.to_string()
            .starts_with("demo_1.0.raw already exists with other content than SHA256SUMS lists"),
        "{e}"
    );
    // The rebuild's own name taken by other content.
    let e = plan_in(
        std::slice::from_ref(&rebuilt),
        &[("demo_1.0.raw", "one"), (&tagged, "edited")],
        3,
    )
    .unwrap_err();
    assert!(e.to_string().contains("than its name says"), "{e}");

    let e = plan_in(
        &[fake("demo", "1.0", "a"), fake("demo", "1.0", "b")],
        &[],
        3,
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "two images to publish are both named demo_1.0.raw but differ: give one of them another version"
    );
}

/// An image no index lists (a publish stopped after placing it and before
/// its index) is replaced by a rebuild of its version, not taken for a
/// hand edit.
#[test]
fn an_unlisted_image_is_replaced() {
    let p = plan(
        &[fake("demo", "2.0", "fixed")],
        &[entry("demo_1.0.raw", "one")],
        &mut |f: &str| Ok((f == "demo_2.0.raw").then(|| sha(b"first try"))),
        3,
    )
    .unwrap();
    assert_eq!(files(&p), [("demo_2.0.raw", true)]);
    assert_eq!(indexed(&p), ["demo_1.0.raw", "demo_2.0.raw"]);
    assert_eq!(
        p.notes,
        ["demo_2.0.raw was in the directory but not in SHA256SUMS (a publish stopped before its index leaves it so): replacing it"]
    );

    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    std::fs::write(out.path().join("demo_2.0.raw"), "first try").unwrap();
    let v2 = image(src.path(), "demo", "2.0", "fixed");
    let r = unsigned(out.path(), std::slice::from_ref(&v2), 3).unwrap();
    assert!(r.published[0].copied, "{r:?}");
    assert_eq!(
        std::fs::read_to_string(out.path().join("demo_2.0.raw")).unwrap(),
        "fixed"
    );
    assert_eq!(
        std::fs::read_to_string(out.path().join(INDEX)).unwrap(),
        format!("{}  demo_2.0.raw\n", v2.sha256)
    );
}

/// Keep counts versions as systemd orders them (10.0 after 9.0), per
/// published service; other services are left alone.
#[test]
fn pruning_keeps_the_newest_versions_of_published_services() {
    let dir = [
        ("demo_1.0.raw", "1"),
        ("demo_9.0.raw", "9"),
        ("demo_10.0.raw", "10"),
        ("shop_1.raw", "s1"),
        ("shop_2.raw", "s2"),
    ];
    let p = plan_in(&[fake("demo", "11.0", "11")], &dir, 2).unwrap();
    assert_eq!(p.prune, ["demo_9.0.raw", "demo_1.0.raw"]);
    assert_eq!(
        indexed(&p),
        ["demo_10.0.raw", "demo_11.0.raw", "shop_1.raw", "shop_2.raw"]
    );
    // keep 0 means 1: what was just published.
    let p = plan_in(&[fake("demo", "11.0", "11")], &dir, 0).unwrap();
    assert_eq!(p.prune, ["demo_10.0.raw", "demo_9.0.raw", "demo_1.0.raw"]);
}

/// An older version just published stays (and the user is told hosts take
/// the newest), whatever --keep says.
#[test]
fn what_was_just_published_is_never_pruned() {
    let p = plan_in(&[fake("demo", "0.9", "old")], &[("demo_2.0.raw", "2")], 1).unwrap();
    assert!(p.prune.is_empty(), "{p:?}");
    assert_eq!(indexed(&p), ["demo_0.9.raw", "demo_2.0.raw"]);
    assert_eq!(
        p.notes,
        ["demo: demo_2.0.raw is published and newer than what this publish wrote; pull hosts take the newest version"]
    );
    // Two pull hosts running two versions of one service, published together.
    let p = plan_in(
        &[fake("demo", "1.0", "1"), fake("demo", "2.0", "2")],
        &[],
        1,
    )
    .unwrap();
    assert!(p.prune.is_empty(), "{p:?}");
    assert_eq!(
        p.notes,
        ["demo: this publish wrote demo_2.0.raw, demo_1.0.raw, and every pull host reading this directory takes the newest, demo_2.0.raw: give hosts that must run another version a directory (pull.url) of their own"]
    );
}

fn quiet() -> Ui {
    capture::ui(settings(Verbosity::Quiet)).0
}

fn unsigned(dir: &Path, images: &[Image], keep: usize) -> Result<Report, PublishError> {
    let opts = Options {
        keep,
        dry_run: false,
    };
    publish(dir, images, &Signing::Unsigned, opts, &|| false, &quiet())
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn publishes_prunes_and_changes_nothing_the_second_time() {
    let src = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pub");
    let v1 = image(src.path(), "demo", "1.0", "one");
    let r = unsigned(&out, std::slice::from_ref(&v1), 1).unwrap();
    assert!(r.index_changed && r.published[0].copied && !r.signed);
    let v2 = image(src.path(), "demo", "2.0", "two");
    // A stale signature does not stay beside an unsigned index.
    std::fs::write(out.join(SIGNATURE), "old").unwrap();
    let r = unsigned(&out, std::slice::from_ref(&v2), 1).unwrap();
    assert_eq!(r.pruned, ["demo_1.0.raw"]);
    assert_eq!(
        listing(&out),
        [LOCK, INDEX, "demo_2.0.raw", "demo_2.0.raw.json"]
    );
    assert_eq!(
        std::fs::read_to_string(out.join(INDEX)).unwrap(),
        format!("{}  demo_2.0.raw\n", v2.sha256)
    );
    assert_eq!(
        std::fs::read(out.join("demo_2.0.raw.json")).unwrap(),
        v2.manifest.clone().unwrap()
    );
    let mtime = |f: &str| std::fs::metadata(out.join(f)).unwrap().modified().unwrap();
    let before = (
        mtime(INDEX),
        mtime("demo_2.0.raw"),
        mtime("demo_2.0.raw.json"),
    );
    let r = unsigned(&out, std::slice::from_ref(&v2), 1).unwrap();
    assert!(!r.index_changed && !r.published[0].copied, "{r:?}");
    assert_eq!(
        (
            mtime(INDEX),
            mtime("demo_2.0.raw"),
            mtime("demo_2.0.raw.json")
        ),
        before
    );
}

#[test]
fn a_dry_run_writes_nothing() {
    let src = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pub");
    let opts = Options {
        keep: 3,
        dry_run: true,
    };
    let v1 = image(src.path(), "demo", "1.0", "one");
    let dry = || {
        publish(
            &out,
            std::slice::from_ref(&v1),
            &Signing::Unsigned,
            opts,
            &|| false,
            &quiet(),
        )
        .unwrap()
    };
    let r = dry();
    assert!(r.dry_run && r.published[0].copied && r.index_changed);
    assert!(!out.exists());
    // Only the signature would change (a stale one is removed): a change too.
    unsigned(&out, std::slice::from_ref(&v1), 3).unwrap();
    std::fs::write(out.join(SIGNATURE), "stale").unwrap();
    let r = dry();
    assert!(r.index_changed && !r.published[0].copied, "{r:?}");
    assert!(out.join(SIGNATURE).exists());
}

/// A copy that fails (here: the built image changed under it) or is
/// interrupted leaves no temporary file and the index as it was.
#[test]
fn a_failed_or_interrupted_publish_leaves_the_directory_as_it_was() {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let v1 = image(src.path(), "demo", "1.0", "one");
    unsigned(out.path(), &[v1], 3).unwrap();
    let now = || {
        (
            listing(out.path()),
            std::fs::read(out.path().join(INDEX)).unwrap(),
        )
    };
    let before = now();

    let mut v2 = image(src.path(), "demo", "2.0", "two");
    v2.sha256 = sha(b"what was built");
    let e = unsigned(out.path(), std::slice::from_ref(&v2), 3).unwrap_err();
    assert!(e.to_string().contains("changed since it was built"), "{e}");
    // Not even the manifest, which goes in after its image.
    assert_eq!(now(), before);

    let v2 = image(src.path(), "demo", "2.0", "two");
    let opts = Options {
        keep: 3,
        dry_run: false,
    };
    let e = publish(
        out.path(),
        &[v2],
        &Signing::Unsigned,
        opts,
        &|| true,
        &quiet(),
    )
    .unwrap_err();
    assert!(matches!(e, PublishError::Interrupted(_)), "{e:?}");
    assert_eq!(now(), before);
}

/// What a publish killed outright leaves is cleared by the next one; only
/// files of that shape.
#[test]
fn leftovers_of_a_killed_publish_are_cleared() {
    for ours in [
        ".demo_1.0.raw.tmp",
        ".demo_1.0.raw.json.tmp",
        ".SHA256SUMS.tmp",
        ".SHA256SUMS.tmp.sig",
    ] {
        assert!(is_leftover(ours), "{ours}");
    }
    for not_ours in [
        ".attache-publish.lock",
        "demo_1.0.raw",
        ".bashrc.tmp",
        ".tmp",
    ] {
        assert!(!is_leftover(not_ours), "{not_ours}");
    }
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    std::fs::write(out.path().join(".demo_1.0.raw.tmp"), "half").unwrap();
    std::fs::write(out.path().join("notes.txt"), "mine").unwrap();
    unsigned(out.path(), &[image(src.path(), "demo", "1.0", "one")], 3).unwrap();
    assert_eq!(
        listing(out.path()),
        [
            LOCK,
            INDEX,
            "demo_1.0.raw",
            "demo_1.0.raw.json",
            "notes.txt"
        ]
    );
}

/// A second publish to the same directory waits for the first; Ctrl-C
/// ends the wait with nothing written.
#[test]
fn a_second_publish_waits_for_the_lock() {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let held = File::create(out.path().join(LOCK)).unwrap();
    held.lock().unwrap();
    let (ui, _, err) = capture::ui(settings(Verbosity::Normal));
    let asked = std::cell::Cell::new(0);
    let stop = || {
        asked.set(asked.get() + 1);
        asked.get() > 2
    };
    let opts = Options {
        keep: 3,
        dry_run: false,
    };
    let v1 = image(src.path(), "demo", "1.0", "one");
    let e = publish(out.path(), &[v1], &Signing::Unsigned, opts, &stop, &ui).unwrap_err();
    assert_eq!(
        e.to_string(),
        "interrupted while waiting for another publish; nothing was written"
    );
    assert!(
        err.text().contains("Waiting for another publish to"),
        "{}",
        err.text()
    );
    assert_eq!(listing(out.path()), [LOCK]);
}

#[test]
fn a_host_refuses_what_is_not_signed_by_its_key() {
    let key = |line: &str| Signing::Key {
        key: "/k/publish".into(),
        public: PublicKey::parse(line).unwrap(),
    };
    let ours = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOurs000000000000000000000000000000000000 me";
    let theirs = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAITheirs00000000000000000000000000000000000";
    let host = |h, k| Trust {
        host: h,
        public_key: k,
    };
    let hosts = [host("p1", Some(ours)), host("open", None)];
    assert_eq!(check_trust(&hosts, &key(ours)), Ok(()));
    // The comment is not part of the key.
    assert_eq!(
        check_trust(&hosts, &key(&ours.replace(" me", " other"))),
        Ok(())
    );
    let e = check_trust(&[host("open", None), host("p2", Some(theirs))], &key(ours)).unwrap_err();
    assert!(
        e.starts_with("p2 trusts another key (ssh-ed25519 …000000000000) than /k/publish (ssh-ed25519 …000000000000): sign with the key whose public half is p2's pull.publicKey, or put /k/publish.pub's line there and run `attache deploy p2`"),
        "{e}"
    );
    let e = check_trust(&hosts, &Signing::Unsigned).unwrap_err();
    assert!(
        e.starts_with(
            "p1 accepts only a SHA256SUMS signed by its pull.publicKey: publish with --key FILE"
        ),
        "{e}"
    );
    assert_eq!(
        check_trust(&[host("open", None)], &Signing::Unsigned),
        Ok(())
    );
    // A publicKey that is no key is shown as written, not cut (a panic).
    let e = check_trust(
        &[host("p3", Some("ssh-ed25519 AAAA€xxxxxxxxxx"))],
        &key(ours),
    )
    .unwrap_err();
    assert!(
        e.starts_with("p3 trusts another key (ssh-ed25519 AAAA€xxxxxxxxxx) than /k/publish"),
        "{e}"
    );
}

/// A directory or a FIFO under an image's name is refused in one sentence
/// (reading the FIFO used to wait forever), and nothing is written.
#[test]
fn what_is_in_an_images_way_is_refused() {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    std::fs::create_dir(out.path().join("demo_1.0.raw")).unwrap();
    let status = std::process::Command::new("mkfifo")
        .arg(out.path().join("demo_2.0.raw"))
        .status()
        .unwrap();
    assert!(status.success());
    for version in ["1.0", "2.0"] {
        let e = unsigned(out.path(), &[image(src.path(), "demo", version, "x")], 3).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{}/demo_{version}.raw is in the way: it is not a regular file (a directory?); move it away and publish again",
                out.path().display()
            )
        );
    }
    assert_eq!(listing(out.path()), [LOCK, "demo_1.0.raw", "demo_2.0.raw"]);
    // Its manifest's name too, before the image is copied.
    std::fs::create_dir(out.path().join("demo_3.0.raw.json")).unwrap();
    let e = unsigned(out.path(), &[image(src.path(), "demo", "3.0", "x")], 3).unwrap_err();
    assert!(matches!(e, PublishError::InTheWay { .. }), "{e}");
    assert_eq!(
        listing(out.path()),
        [LOCK, "demo_1.0.raw", "demo_2.0.raw", "demo_3.0.raw.json"]
    );
}

/// An index that is not text is bad input (exit 1, as README says), like
/// one with a bad line, and nothing is written.
#[test]
fn an_index_that_is_not_text_is_refused() {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    std::fs::write(out.path().join(INDEX), b"\xff\xfe binary").unwrap();
    let e = unsigned(out.path(), &[image(src.path(), "demo", "1.0", "one")], 3).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{}/SHA256SUMS cannot be read: it is not text (UTF-8); fix it, or move it away to start a new index",
            out.path().display()
        )
    );
    assert_eq!(listing(out.path()), [LOCK, INDEX]);
}
