use std::path::PathBuf;
use std::time::Duration;

use super::*;
use crate::build::BuiltUnit;
use crate::inventory::Check;
use crate::remote::{Destination, Elevation, SshOptions};

const P: &str = "/var/lib/portables";

fn svc(name: &str, version: &str, sha: &str, units: &[&str]) -> ServicePlan {
    ServicePlan {
        name: name.into(),
        version: version.into(),
        local: PathBuf::from("/tmp/x.raw"),
        sha256: sha.repeat(64),
        size: 4096,
        units: units
            .iter()
            .map(|u| BuiltUnit {
                name: (*u).into(),
                install: true,
            })
            .collect(),
        prefixes: crate::names::unit_prefixes(units.iter().copied()),
        checks: Vec::new(),
        manifest: None,
        settings: Default::default(),
    }
}

fn host(services: Vec<ServicePlan>) -> HostPlan {
    HostPlan {
        name: "h1".into(),
        destination: Destination::parse("root@h1").unwrap(),
        elevation: Elevation::None,
        profile: "default".into(),
        services,
        local: false,
    }
}

fn settings() -> Settings {
    Settings {
        ssh: SshOptions::default(),
        rollback: true,
        dry_run: false,
        keep: 2,
        settle: Duration::from_secs(3),
        rollback_after: Duration::from_secs(300),
    }
}

fn facts(lines: &str) -> HostFacts {
    ops::parse_facts(&format!(
        "systemd\t252\nportablectl\t/usr/bin/portablectl\nfree_kb\t10000000\n{lines}"
    ))
}

fn on_257(f: &HostFacts) -> HostFacts {
    HostFacts {
        systemd: 257,
        ..f.clone()
    }
}

fn shop_and_admin(shop_prefixes: &str) -> HostFacts {
    facts(&format!(
        "attached\tshop-web.service\t{P}/shop_1.0.raw\n\
         attached\tshop-admin-web.service\t{P}/shop-admin_1.0.raw\n\
         image\t1\t{P}/shop_1.0.raw\nimage\t1\t{P}/shop-admin_1.0.raw\n\
         prefixes\tshop-admin_1.0.raw\tshop-admin-web\n{shop_prefixes}"
    ))
}

#[test]
fn first_deploy_attaches_and_reverts_by_detaching() {
    let h = host(vec![svc("demo", "1.0", "a", &["demo.service"])]);
    let p = plan(&facts(""), &h).unwrap();
    let s = &p.steps[0];
    assert_eq!((s.action, s.upload), (Action::Attach, true));
    assert_eq!(s.target, format!("{P}/demo_1.0.raw"));
    assert_eq!(s.activate[0].verb, Verb::Attach);
    assert_eq!(s.activate[0].prefixes, ["demo"]);
    let r = s.revert.as_ref().unwrap();
    assert_eq!(r.previous, None);
    assert_eq!(r.calls[0].verb, Verb::Detach);
}

#[test]
fn unchanged_when_the_same_bytes_are_attached() {
    let h = host(vec![svc("demo", "1.0", "a", &["demo.service"])]);
    let f = facts(&format!(
        "attached\tdemo.service\t{P}/demo_1.0.raw\nsha256\t{}  {P}/demo_1.0.raw\n",
        "a".repeat(64)
    ));
    let p = plan(&f, &h).unwrap();
    assert_eq!(
        (p.steps[0].action, p.steps[0].upload),
        (Action::Unchanged, false)
    );
    assert!(p.steps[0].revert.is_none());
    assert_eq!(p.changes().count(), 0);
}

#[test]
fn same_version_other_content_gets_its_own_name() {
    let h = host(vec![svc("demo", "1.0", "b", &["demo.service"])]);
    let f = facts(&format!(
        "attached\tdemo.service\t{P}/demo_1.0.raw\nsha256\t{}  {P}/demo_1.0.raw\n",
        "a".repeat(64)
    ));
    let s = &plan(&f, &h).unwrap().steps[0];
    assert_eq!(s.target, format!("{P}/demo_1.0-bbbbbbbb.raw"));
    assert_eq!(s.action, Action::Reattach);
    assert!(s.note.as_ref().unwrap().contains("bump the version"));
}

#[test]
fn shared_prefix_upgrade_touches_only_its_own_units() {
    let h = host(vec![svc("shop", "2.0", "b", &["shop-web.service"])]);
    // shop 1.0 is new-style: its record says shop-web.
    let f = shop_and_admin("prefixes\tshop_1.0.raw\tshop-web\n");
    let s = &plan(&f, &h).unwrap().steps[0];
    assert_eq!(s.previous.as_deref(), Some(&*format!("{P}/shop_1.0.raw")));
    // On 252 portabled would take shop-admin_1.0 along: detach by hand.
    let verbs: Vec<Verb> = s.activate.iter().map(|c| c.verb).collect();
    assert_eq!(verbs, [Verb::Unlink, Verb::Attach]);
    assert_eq!(s.activate[0].image, format!("{P}/shop_1.0.raw"));
    assert_eq!(s.activate[1].prefixes, ["shop-web"]);
    let r = s.revert.as_ref().unwrap();
    let verbs: Vec<Verb> = r.calls.iter().map(|c| c.verb).collect();
    assert_eq!(verbs, [Verb::Unlink, Verb::Attach]);
    assert_eq!(r.calls[1].image, format!("{P}/shop_1.0.raw"));
    assert_eq!(r.calls[1].prefixes, ["shop-web"]);
    // 257 detaches by path correctly, but its reattach does not.
    let f = on_257(&f);
    let s = &plan(&f, &h).unwrap().steps[0];
    let verbs: Vec<Verb> = s.activate.iter().map(|c| c.verb).collect();
    assert_eq!(verbs, [Verb::Detach, Verb::Attach]);
}

#[test]
fn unlink_touches_only_units_whose_dropin_names_the_image() {
    let c = ops::PortableCall {
        verb: Verb::Unlink,
        image: format!("{P}/shop_1.0.raw"),
        prefixes: vec!["shop-web".into()],
        profile: None,
    };
    let argv = c.argv();
    assert_eq!(
        argv,
        [
            "/bin/sh",
            "/var/lib/attache/unlink",
            &format!("{P}/shop_1.0.raw")
        ]
    );
    let script = ops::portablectl("shop-1", &c).text;
    // Written by a single-quoted printf: the quotes inside are escaped.
    assert!(
        script.contains(r#"grep -qF "image '\''$img'\''""#),
        "{script}"
    );
    let install = script.find("mv -f '/var/lib/attache/unlink'.tmp").unwrap();
    assert!(install < script.find("systemd-run").unwrap());
}

#[test]
fn without_a_sibling_an_upgrade_is_a_reattach() {
    let h = host(vec![svc(
        "shop-admin",
        "2.0",
        "b",
        &["shop-admin-web.service"],
    )]);
    let f = shop_and_admin("prefixes\tshop_1.0.raw\tshop-web\n");
    let s = &plan(&f, &h).unwrap().steps[0];
    assert_eq!(s.activate.len(), 1);
    assert_eq!(s.activate[0].verb, Verb::Reattach);
    assert_eq!(s.activate[0].prefixes, ["shop-admin-web"]);
    let r = s.revert.as_ref().unwrap();
    assert_eq!(r.calls[0].verb, Verb::Reattach);
}

#[test]
fn old_style_previous_with_a_sibling() {
    // shop 1.0 declares 'shop' (no record): portabled's detach would take
    // shop-admin-web.service along. Before 257 attache detaches it by hand;
    // on 257 it refuses.
    let h = host(vec![svc("shop", "2.0", "b", &["shop-web.service"])]);
    let s = &plan(&shop_and_admin(""), &h).unwrap().steps[0];
    assert_eq!(s.activate[0].verb, Verb::Unlink);
    let e = plan(&on_257(&shop_and_admin("")), &h).unwrap_err();
    assert!(matches!(e, PlanError::Collision(_)), "{e}");
    assert!(
        e.to_string()
            .contains("prefix 'shop' also matches shop-admin-web.service"),
        "{e}"
    );
}

#[test]
fn a_prefix_that_reaches_another_service_is_refused() {
    // shop's own unit is shop.service: its stem 'shop' matches shop-admin's.
    let h = host(vec![svc("shop", "2.0", "b", &["shop.service"])]);
    let e = plan(&shop_and_admin(""), &h).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, PlanError::Collision(_)), "{msg}");
    assert!(
        msg.contains("shop-admin-web.service of shop-admin_1.0.raw"),
        "{msg}"
    );
    assert!(msg.contains("nothing was changed"), "{msg}");
}

#[test]
fn old_units_the_new_prefixes_miss_are_detached_first() {
    let h = host(vec![svc("demo", "2.0", "b", &["demo-web.service"])]);
    let f = facts(&format!(
        "attached\tdemo-web.service\t{P}/demo_1.0.raw\nattached\tdemo-cron.timer\t{P}/demo_1.0.raw\n"
    ));
    let s = &plan(&f, &h).unwrap().steps[0];
    let verbs: Vec<Verb> = s.activate.iter().map(|c| c.verb).collect();
    assert_eq!(verbs, [Verb::Detach, Verb::Attach]);
    assert_eq!(s.activate[0].prefixes, ["demo"]);
}

#[test]
fn a_timer_shorter_than_the_checks_is_refused() {
    let mut s = svc("demo", "1.0", "a", &["demo.service"]);
    s.checks.push(Check::Http {
        url: "http://127.0.0.1/".into(),
        timeout: Some(10),
        retries: Some(5),
    });
    let h = host(vec![s]);
    let mut st = settings();
    st.rollback_after = Duration::from_secs(5);
    let e = check_timer(&h, &st).unwrap_err();
    assert!(
        e.to_string().starts_with("--rollback-after 5 is too short"),
        "{e}"
    );
    // 30 s activation + 2 x 3 s settle + 5 x 12 s checks.
    assert!(
        matches!(e, PlanError::TimerTooShort { need: 96, .. }),
        "{e}"
    );
    st.rollback_after = Duration::from_secs(96);
    assert!(check_timer(&h, &st).is_ok());
    st.rollback_after = Duration::from_secs(5);
    st.rollback = false;
    assert!(check_timer(&h, &st).is_ok());
}

#[test]
fn refusals_before_anything_changes() {
    let h = host(vec![svc("demo", "1.0", "a", &["demo.service"])]);
    let old = ops::parse_facts("systemd\t247\nportablectl\t/x\n");
    assert_eq!(
        plan(&old, &h).unwrap_err(),
        PlanError::OldSystemd { version: 247 }
    );
    let none = ops::parse_facts("systemd\t252\nportablectl\t\n");
    assert_eq!(plan(&none, &h).unwrap_err(), PlanError::NoPortablectl);
    let full = ops::parse_facts("systemd\t252\nportablectl\t/x\nfree_kb\t100\n");
    assert!(matches!(
        plan(&full, &h).unwrap_err(),
        PlanError::NoSpace { .. }
    ));
}

#[test]
fn rollback_calls_follow_what_the_host_has_now() {
    let h = host(vec![svc("shop", "2.0", "b", &["shop-web.service"])]);
    let f = shop_and_admin("prefixes\tshop_1.0.raw\tshop-web\n");
    let p = plan(&f, &h).unwrap();
    let reverts: Vec<&Revert> = p.steps.iter().filter_map(|s| s.revert.as_ref()).collect();
    // Still on the old image (the switch failed): nothing to do.
    assert!(rollback_calls(&f, &reverts)[0].1.is_empty());
    // On the new one: detach it, attach the old (shop-admin is a sibling).
    let now = facts(&format!("attached\tshop-web.service\t{P}/shop_2.0.raw\n"));
    let verbs: Vec<Verb> = rollback_calls(&now, &reverts)[0]
        .1
        .iter()
        .map(|c| c.verb)
        .collect();
    assert_eq!(verbs, [Verb::Unlink, Verb::Attach]);
    // Nothing attached: attach the old.
    assert_eq!(
        rollback_calls(&facts(""), &reverts)[0].1[0].verb,
        Verb::Attach
    );
}

#[test]
fn an_unknown_profile_is_refused_with_the_known_ones() {
    let h = host(vec![svc("demo", "1.0", "a", &["demo.service"])]);
    let mut f = facts("profile\tdefault\nprofile\tstrict\nprofile\ttrusted\n");
    assert_eq!(f.profiles, ["default", "strict", "trusted"]);
    assert!(plan(&f, &h).is_ok());
    let mut bogus = h.clone();
    bogus.profile = "defualt".into();
    let e = plan(&f, &bogus).unwrap_err();
    assert_eq!(
        e.to_string(),
        "portabled has no profile 'defualt' on this host; nothing was changed. Pass --profile (or set `profile` in the inventory) to one of: default, strict, trusted"
    );
    f.profiles.clear();
    assert!(plan(&f, &bogus).is_ok());
}

#[test]
fn https_checks_without_curl_are_refused_before_anything_changes() {
    let mut s = svc("demo", "1.0", "a", &["demo.service"]);
    s.checks.push(Check::Http {
        url: "http://127.0.0.1:8080/".into(),
        timeout: None,
        retries: None,
    });
    // Plain HTTP needs no curl.
    plan(&facts(""), &host(vec![s.clone()])).unwrap();
    s.checks.push(Check::Http {
        url: "https://127.0.0.1:8443/".into(),
        timeout: None,
        retries: None,
    });
    let e = plan(&facts(""), &host(vec![s.clone()])).unwrap_err();
    assert_eq!(
        e.to_string(),
        "demo's check https://127.0.0.1:8443/ needs curl on the host, which has none (attache checks plain HTTP without it, never HTTPS); nothing was changed. Install curl on the host, or check an http:// URL"
    );
    plan(&facts("curl\t/usr/bin/curl\n"), &host(vec![s])).unwrap();
}

fn with_settings(mut s: ServicePlan, env: &str, secret: Option<&[u8]>) -> ServicePlan {
    let settings: crate::inventory::UnitSettings = serde_json::from_value(serde_json::json!(
        {"demo.service": {"Service": {"Environment": [env]}}}
    ))
    .unwrap();
    let secrets = secret.map(|v| {
        std::collections::BTreeMap::from([(
            "db".to_owned(),
            crate::inventory::SecretSource::Command(vec![
                "printf".into(),
                String::from_utf8(v.to_vec()).unwrap(),
            ]),
        )])
    });
    s.settings = crate::deploy::ServiceSettings::load(
        "demo",
        &["demo.service".into()],
        Some(&settings),
        secrets.as_ref(),
        false,
    )
    .unwrap();
    s
}

/// The host as a deploy of `svc` left it: its image attached, its drop-in
/// and its secret (salted with "s") recorded.
fn deployed(svc: &ServicePlan, creds: bool) -> HostFacts {
    let units = ["demo.service".to_owned()];
    let mut lines = format!(
        "attached\tdemo.service\t{P}/demo_1.0.raw\nsha256\t{}  {P}/demo_1.0.raw\ncreds\t{}\n",
        svc.sha256,
        if creds { "/usr/bin/systemd-creds" } else { "" }
    );
    for (u, text) in svc.settings.dropins("demo", &units, creds) {
        lines += &format!(
            "setting\tdemo\t{u} {}\n",
            hex::encode(Sha256::digest(text.as_bytes()))
        );
    }
    for s in &svc.settings.secrets {
        lines += &format!(
            "secret\tdemo\t{} s {} 6 encrypted 100\n",
            s.name,
            s.value.salted_hash("s")
        );
    }
    facts(&lines)
}

#[test]
fn settings_alone_restart_and_unchanged_settings_touch_nothing() {
    let old = with_settings(
        svc("demo", "1.0", "a", &["demo.service"]),
        "PORT=1",
        Some(b"one"),
    );
    let f = deployed(&old, true);
    let p = plan(&f, &host(vec![old.clone()])).unwrap();
    assert_eq!(p.steps[0].action, Action::Unchanged);
    assert_eq!(p.changes().count(), 0);

    let new = with_settings(
        svc("demo", "1.0", "a", &["demo.service"]),
        "PORT=2",
        Some(b"one"),
    );
    let p = plan(&f, &host(vec![new])).unwrap();
    let s = &p.steps[0];
    assert_eq!((s.action, s.upload), (Action::Restart, false));
    assert!(s.activate.is_empty());
    let c = s.settings.as_ref().unwrap();
    assert_eq!(c.what, ["demo.service: settings changed"]);
    assert_eq!(
        (c.send.len(), c.keep.as_slice()),
        (0, ["db".to_owned()].as_slice())
    );
    let r = s.revert.as_ref().unwrap();
    assert!(r.settings && r.calls.is_empty());
    assert_eq!(r.restart, ["demo.service"]);

    let rotated = with_settings(
        svc("demo", "1.0", "a", &["demo.service"]),
        "PORT=1",
        Some(b"two"),
    );
    let p = plan(&f, &host(vec![rotated])).unwrap();
    let c = p.steps[0].settings.as_ref().unwrap();
    assert_eq!(c.what, ["secret db: rotated"]);
    assert_eq!(c.send, [0]);
}

#[test]
fn secrets_need_a_host_that_encrypts_unless_asked() {
    let s = with_settings(
        svc("demo", "1.0", "a", &["demo.service"]),
        "PORT=1",
        Some(b"one"),
    );
    let e = plan(&facts(""), &host(vec![s.clone()])).unwrap_err();
    assert_eq!(e.to_string(), "this host cannot encrypt credentials (systemd-creds is missing), and demo would get secrets; nothing was changed. Install systemd 250 or newer with systemd-creds, or set `unencryptedSecrets = true;` for this host in the inventory to hand them over as plain files only root can read");
    let mut plain = s;
    plain.settings.unencrypted = true;
    let p = plan(&facts(""), &host(vec![plain])).unwrap();
    let c = p.steps[0].settings.as_ref().unwrap();
    assert!(!c.encrypted);
    assert!(c.dropins["demo.service"].contains("\nLoadCredential=db:"));
}

#[test]
fn a_pull_hosts_settings_never_switch_its_image() {
    let mut demo = svc("demo", "1.0", "a", &["demo.service"]);
    demo.settings.image_as_is = true;
    let f = facts(&format!(
        "attached\tdemo.service\t{P}/demo_2.0.raw\nsha256\t{}  {P}/demo_1.0.raw\n",
        "a".repeat(64)
    ));
    assert_eq!(
        plan(&f, &host(vec![demo.clone()])).unwrap_err(),
        PlanError::PullSwitched("demo".into())
    );
    let same = facts(&format!(
        "attached\tdemo.service\t{P}/demo_1.0.raw\nsha256\t{}  {P}/demo_1.0.raw\n",
        "a".repeat(64)
    ));
    assert_eq!(
        plan(&same, &host(vec![demo])).unwrap().steps[0].action,
        Action::Unchanged
    );
}

/// Pruning after a confirm counts the image this deploy placed as the
/// newest, from the read under the lock, and keeps the previous one.
#[test]
fn prune_after_counts_the_placed_image_as_the_newest() {
    let h = host(vec![svc("demo", "3.0", "c", &["demo.service"])]);
    let f = facts(&format!(
        "attached\tdemo.service\t{P}/demo_2.0.raw\n\
         image\t300\t{P}/demo_2.0.raw\nimage\t200\t{P}/demo_1.0.raw\nimage\t100\t{P}/demo_0.9.raw\n\
         image\t400\t{P}/other_1.0.raw\n"
    ));
    let p = plan(&f, &h).unwrap();
    let s = &p.steps[0];
    assert_eq!((s.action, s.upload), (Action::Reattach, true));
    assert_eq!(s.previous.as_deref(), Some(&*format!("{P}/demo_2.0.raw")));
    // keep 2: the new one and the previous one.
    assert_eq!(
        prune_after(&f, s, "demo", 2),
        [format!("{P}/demo_1.0.raw"), format!("{P}/demo_0.9.raw")]
    );
    // keep 1 still keeps the previous one.
    assert_eq!(
        prune_after(&f, s, "demo", 1),
        [format!("{P}/demo_1.0.raw"), format!("{P}/demo_0.9.raw")]
    );
    assert_eq!(prune_after(&f, s, "demo", 3), [format!("{P}/demo_0.9.raw")]);
    // A target that was there already keeps its place by its mtime.
    let mut there = s.clone();
    there.upload = false;
    there.target = format!("{P}/demo_0.9.raw");
    assert_eq!(
        prune_after(&f, &there, "demo", 1),
        [format!("{P}/demo_1.0.raw")]
    );
}
