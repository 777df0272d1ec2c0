use super::*;

const DROPIN: &str = "# Drop-in created for image";

#[test]
fn facts_tell_services_apart_by_image_file() {
    let out = format!(
        "systemd\t252\nportablectl\t/usr/bin/portablectl\nfree_kb\t1000\n\
         attached\tshop-web.service\t/var/lib/portables/shop_1.0.raw\n\
         attached\tshop-admin-web.service\t/var/lib/portables/shop-admin_1.0.raw\n\
         image\t100\t/var/lib/portables/shop_1.0.raw\n\
         image\t50\t/var/lib/portables/shop_0.9.raw\n\
         image\t70\t/var/lib/portables/shop-admin_1.0.raw\n\
         prefixes\tshop-admin_1.0.raw\tshop-admin-web\n\
         previous\tshop\t/var/lib/portables/shop_0.9.raw\n\
         sha256\t{}  /var/lib/portables/shop_1.0.raw\n",
        "a".repeat(64)
    );
    let f = parse_facts(&out);
    assert_eq!((f.systemd, f.portablectl, f.free_kb), (252, true, 1000));
    assert_eq!(
        f.attached_image("shop"),
        Some("/var/lib/portables/shop_1.0.raw")
    );
    assert_eq!(
        f.attached_image("shop-admin"),
        Some("/var/lib/portables/shop-admin_1.0.raw")
    );
    assert_eq!(f.attached_image("sho"), None);
    assert_eq!(
        f.units_of("/var/lib/portables/shop_1.0.raw"),
        ["shop-web.service"]
    );
    // No record: an image from before records declares its name.
    assert_eq!(
        f.declared_prefixes("/var/lib/portables/shop_1.0.raw"),
        ["shop"]
    );
    assert_eq!(
        f.declared_prefixes("/var/lib/portables/shop-admin_1.0.raw"),
        ["shop-admin-web"]
    );
    let hit = f.others_matching("shop", &["shop".into()]);
    assert_eq!(hit.len(), 1);
    assert_eq!(hit[0].unit, "shop-admin-web.service");
    assert!(f.others_matching("shop", &["shop-web".into()]).is_empty());
    assert_eq!(
        f.images_of("shop"),
        [
            "/var/lib/portables/shop_1.0.raw",
            "/var/lib/portables/shop_0.9.raw"
        ]
    );
    assert_eq!(f.previous["shop"], "/var/lib/portables/shop_0.9.raw");
    assert_eq!(f.sha256["/var/lib/portables/shop_1.0.raw"], "a".repeat(64));
    assert!(!f.revert_pending);
    assert!(parse_facts("revert\tpending\n").revert_pending);
}

#[test]
fn facts_script_reads_the_dropin_marker() {
    let s = facts(&["/var/lib/portables/a b.raw".into()], false).text;
    assert!(s.contains("'/var/lib/portables/a b.raw'"));
    assert!(s.contains(&DROPIN[2..]));
}

#[test]
fn portablectl_calls_pass_path_and_prefixes() {
    let c = PortableCall {
        verb: Verb::Reattach,
        image: "/var/lib/portables/shop_2.0.raw".into(),
        prefixes: vec!["shop-web".into()],
        profile: Some("default".into()),
    };
    assert_eq!(
        c.argv().join(" "),
        "portablectl reattach --enable --now --profile default /var/lib/portables/shop_2.0.raw shop-web"
    );
    let d = PortableCall {
        verb: Verb::Detach,
        profile: Some("default".into()),
        ..c.clone()
    };
    assert_eq!(
        d.argv().join(" "),
        "portablectl detach --enable --now /var/lib/portables/shop_2.0.raw shop-web"
    );
    let s = portablectl("shop-1", &c).text;
    assert!(s.contains("systemd-run --quiet --collect --scope --unit='attache-shop-1'"));
    assert!(s.contains("shop-web"));
}

#[test]
fn revert_looks_before_it_acts_and_goes_last_first() {
    let back = Revert {
        settings: false,
        restart: Vec::new(),
        service: "shop".into(),
        previous: Some("/var/lib/portables/shop_1.0.raw".into()),
        new: "/var/lib/portables/shop_2.0.raw".into(),
        calls: vec![PortableCall {
            verb: Verb::Reattach,
            image: "/var/lib/portables/shop_1.0.raw".into(),
            prefixes: vec!["shop-web".into()],
            profile: Some("default".into()),
        }],
    };
    let gone = Revert {
        settings: false,
        restart: Vec::new(),
        service: "new".into(),
        previous: None,
        new: "/var/lib/portables/new_1.raw".into(),
        calls: vec![PortableCall {
            verb: Verb::Detach,
            image: "/var/lib/portables/new_1.raw".into(),
            prefixes: vec!["new".into()],
            profile: None,
        }],
    };
    let body = revert_body(&[back, gone]);
    let shop = body.find("# shop").unwrap();
    let new = body.find("# new").unwrap();
    assert!(new < shop, "{body}");
    assert!(body.contains("if ! attached '/var/lib/portables/shop_1.0.raw'; then"));
    assert!(
        body.contains("if attached '/var/lib/portables/new_1.raw'; then 'portablectl' 'detach'")
    );
    let armed = arm(&[], Duration::from_secs(90)).text;
    assert!(armed.contains("--on-active=90"));
    assert!(armed.contains("WantedBy=multi-user.target"));
    assert!(armed.find("mv -f $d/revert.sh.tmp").unwrap() < armed.find("systemd-run").unwrap());
}

#[test]
fn disarm_tells_whether_the_host_went_first() {
    assert_eq!(parse_disarm("DISARMED\n"), Disarmed::InTime);
    assert_eq!(
        parse_disarm("REVERTED\nlog line\n"),
        Disarmed::AlreadyReverted("log line".into())
    );
}

#[test]
fn disarm_in_a_batch_tells_in_time_from_reverted_from_failed() {
    let out = |code, output: &str| PartOutput {
        code,
        output: output.into(),
    };
    assert_eq!(
        disarm_outcome(&out(Some(0), "DISARMED")),
        Some(Disarmed::InTime)
    );
    assert_eq!(
        disarm_outcome(&out(Some(REVERTED_CODE), "REVERTED\nlog line")),
        Some(Disarmed::AlreadyReverted("log line".into()))
    );
    assert_eq!(
        disarm_outcome(&out(Some(1), "sh: 1: mv: Permission denied")),
        None
    );
    assert_eq!(disarm_outcome(&out(None, "")), None);
    // A REVERTED that exits 0 is not one this disarm printed.
    assert_eq!(disarm_outcome(&out(Some(0), "REVERTED")), None);
}

/// Runs `script` with `/var/lib/attache`, the transient timer's file and
/// the drop-in directories moved under `root`, and `path` as the only
/// place commands are found: its exit code, stdout and stderr.
fn run_under(root: &std::path::Path, path: &str, script: &str) -> (i32, String, String) {
    let r = root.display().to_string();
    let text = script
        .replace(STATE_DIR, &format!("{r}/state"))
        .replace("/run/systemd/transient", &format!("{r}/transient"))
        .replace("/etc/systemd/system.attached", &format!("{r}/etc"))
        .replace("/run/systemd/system.attached", &format!("{r}/run"));
    let out = std::process::Command::new("/bin/sh")
        .args(["-c", &text])
        .env_clear()
        .env("PATH", path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn disarm_claims_the_revert_and_stops_the_timer_without_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for d in ["state", "transient", "bin"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    // A systemctl that records how it was called.
    let called = root.join("called");
    std::fs::write(
        root.join("bin/systemctl"),
        format!("#!/bin/sh\necho \"$*\" > {}\n", called.display()),
    )
    .unwrap();
    std::fs::set_permissions(
        root.join("bin/systemctl"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let path = format!("{}:/usr/bin:/bin", root.join("bin").display());
    std::fs::write(root.join("state/revert.sh"), "exit 0\n").unwrap();

    // Armed, the timer not loaded (it fired and run-revert found nothing,
    // or it is gone): disarmed, no systemctl.
    let (code, out, _) = run_under(root, &path, &disarm().text);
    assert_eq!((code, out.trim()), (0, "DISARMED"));
    assert!(root.join("state/revert.disarmed").exists());
    assert!(!root.join("state/revert.sh").exists());
    assert!(!called.exists());

    // Armed, the timer loaded: stopped, without waiting for the job.
    std::fs::rename(
        root.join("state/revert.disarmed"),
        root.join("state/revert.sh"),
    )
    .unwrap();
    std::fs::write(root.join("transient/attache-revert-now.timer"), "").unwrap();
    let (code, out, _) = run_under(root, &path, &disarm().text);
    assert_eq!((code, out.trim()), (0, "DISARMED"));
    assert_eq!(
        std::fs::read_to_string(&called).unwrap().trim(),
        "--no-block stop attache-revert-now.timer"
    );

    // The host went first: its log, and a code later parts can need.
    std::fs::write(root.join("state/revert.log"), "put back shop\n").unwrap();
    let (code, out, _) = run_under(root, &path, &disarm().text);
    assert_eq!(code, REVERTED_CODE);
    assert_eq!(
        parse_disarm(&out),
        Disarmed::AlreadyReverted("put back shop".into())
    );
}

#[test]
fn still_switched_reads_the_dropins_with_builtins_only() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let dropin = |base: &str, unit: &str, first: &str| {
        let d = root.join(base).join(format!("{unit}.d"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("20-portable.conf"), format!("{first}\n[Service]\n")).unwrap();
    };
    let header = |img: &str| format!("# Drop-in created for image '{img}', do not edit.");
    let new = "/var/lib/portables/demo_2.0.raw";
    dropin("etc", "demo.service", &header(new));
    dropin("etc", "demo-tick.timer", &header(new));
    // A runtime attach, and a template's drop-in.
    dropin(
        "run",
        "echo@.service",
        &header("/var/lib/portables/echo_1.raw"),
    );
    // Not a portable drop-in: not what attache reads.
    dropin("etc", "other.service", "[Service]");
    std::fs::create_dir_all(root.join("run")).unwrap();
    let units = |u: &[&str]| u.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    // No PATH: any command that is not a builtin fails.
    let run = |services: &[(&str, &str, Vec<String>)]| {
        run_under(root, "/nonexistent", &still_switched(services).text)
    };

    let ok = [
        (
            "demo",
            new,
            units(&["demo.service", "demo-tick.timer", "demo-gone.service"]),
        ),
        (
            "echo",
            "/var/lib/portables/echo_1.raw",
            units(&["echo@.service", "echo.socket"]),
        ),
    ];
    let (code, out, err) = run(&ok);
    assert_eq!((code, out.as_str(), err.as_str()), (0, "", ""));

    // The host's revert went first: the old image is back.
    let (code, out, err) = run(&[(
        "demo",
        "/var/lib/portables/demo_3.0.raw",
        units(&["demo.service"]),
    )]);
    assert_eq!((code, err.as_str()), (1, ""));
    assert_eq!(parse_moved(&out), Some(("demo".into(), new.into())));

    // Nothing attached at all (a detach by hand).
    let (code, out, err) = run(&[("demo", new, units(&["demo-gone.service", "other.service"]))]);
    assert_eq!((code, err.as_str()), (1, ""));
    assert_eq!(parse_moved(&out), Some(("demo".into(), String::new())));
    assert_eq!(parse_moved("DISARMED\n"), None);
}

#[test]
fn pruning_keeps_newest_attached_and_previous() {
    let imgs = ["/p/demo_3.raw", "/p/demo_2.raw", "/p/demo_1.raw"];
    assert_eq!(
        prune_candidates(&imgs, 1, Some("/p/demo_3.raw"), Some("/p/demo_1.raw")),
        ["/p/demo_2.raw"]
    );
    assert_eq!(
        prune_candidates(&imgs, 2, Some("/p/demo_3.raw"), None),
        ["/p/demo_1.raw"]
    );
    assert!(prune(&["/p/demo_1.raw".into()])
        .text
        .contains("/var/lib/attache/prefixes/demo_1.raw"));
    assert!(prune(&["/p/demo_1.raw".into()])
        .text
        .contains("/var/lib/attache/signatures/demo_1.raw.sig"));
}

#[test]
fn checks_pass_url_parts_as_arguments() {
    let c = Check::Http {
        url: "http://127.0.0.1:8080/a%20b'c".into(),
        timeout: None,
        retries: Some(2),
    };
    let s = check(&c).text;
    assert!(s.contains(r#""/dev/tcp/$1/$2""#), "{s}");
    assert!(
        s.contains(r"'127.0.0.1' '8080' '/a%20b'\''c' '127.0.0.1:8080'"),
        "{s}"
    );
    assert!(
        s.contains(r"curl -gfsS -o /dev/null --max-time 10 'http://127.0.0.1:8080/a%20b'\''c'"),
        "{s}"
    );
    // HTTPS is curl's or nothing: never plain HTTP on port 80.
    let https = Check::Http {
        url: "https://example.org/".into(),
        timeout: None,
        retries: None,
    };
    let s = check(&https).text;
    assert!(!s.contains("/dev/tcp"), "{s}");
    assert!(s.contains("curl is missing"), "{s}");
    assert_eq!(check_retries(&c), 2);
    assert_eq!(check_budget(&c), Duration::from_secs(24));
    assert!(lock_then("me; rm -rf /", None)
        .text
        .contains("'me; rm -rf /'"));
    assert_eq!(quote("it's"), r"'it'\''s'");
}

#[test]
fn lock_holder_parsing() {
    let out = "BUSY\nholder\talice@laptop pid 42\nfrom\t10.0.0.2\npid\t4567\nsince\t1000\nnow\t11920\nholder_pid\t4567\n";
    let h = parse_lock_holder(out);
    assert_eq!(h.pids, [4567]);
    assert_eq!(h.age(), Some(Duration::from_secs(10920)));
    assert_eq!(
        h.to_string(),
        "alice@laptop pid 42 from 10.0.0.2; host process 4567, held for 3 h 2 min"
    );
    // A record written before the fields existed, and a holder that is gone.
    let h = parse_lock_holder("BUSY\nbob@desk pid 7 since 5\nnow\t65\n");
    assert_eq!(h.to_string(), "bob@desk pid 7 since 5");
    assert!(h.pids.is_empty());
    // Nobody ever took it.
    assert_eq!(parse_lock_holder("now\t5\n").to_string(), "holder unknown");
}

/// flock is looked for before anything is written on the host.
#[test]
fn lock_needs_flock_before_it_writes() {
    let s = lock_then("me", None).text;
    let flock = s.find("command -v flock").unwrap();
    assert!(flock < s.find("mkdir").unwrap(), "{s}");
}

#[test]
fn show_parsing() {
    let out = "@unit=demo.service\nActiveState=active\nSubState=running\nRootImage=/x.raw\n@unit=echo.socket\nActiveState=active\n";
    let s = parse_show(out);
    assert_eq!(s["demo.service"].root_image, "/x.raw");
    assert_eq!(s["echo.socket"].active, "active");
}

/// Every script passes shellcheck where it is installed (CI installs it).
#[test]
fn scripts_pass_shellcheck() {
    let revert = Revert {
        settings: true,
        restart: vec!["shop-web.service".into()],
        service: "shop".into(),
        previous: Some("/var/lib/portables/shop_1.0.raw".into()),
        new: "/var/lib/portables/shop_2.0.raw".into(),
        calls: vec![],
    };
    let c = PortableCall {
        verb: Verb::Attach,
        image: "/x.raw".into(),
        prefixes: vec!["x".into()],
        profile: Some("default".into()),
    };
    let scripts = [
        lock_then("me", None),
        lock_holder(),
        unlock(42),
        facts(&["/a.raw".into()], true),
        clear_partials(),
        clear_then(&facts(&[], false)),
        push(
            &Body::Whole { size: 10 },
            "/a",
            "/b.raw",
            "ab",
            &["b".into()],
            3,
            4,
            PushFaults::default(),
        ),
        push(
            &Body::Whole { size: 10 },
            "/a",
            "/b.raw",
            "ab",
            &[],
            0,
            0,
            PushFaults {
                corrupt: true,
                stall: true,
                pause: Some(1),
            },
        ),
        push(
            &Body::Delta {
                file: "/d",
                size: 10,
                basis: "/c.raw",
                check: Some("cd"),
            },
            "/a",
            "/b.raw",
            "ab",
            &[],
            3,
            4,
            PushFaults {
                pause: Some(1),
                ..PushFaults::default()
            },
        ),
        batch(&[
            Part::from(disarm()),
            Part {
                script: facts(&[], false),
                needs: Some(0),
            },
        ]),
        receive("/a"),
        prune(&["/b.raw".into()]),
        read_manifests(&["/b.raw".into()]),
        place_manifest("/m", "/b.raw"),
        journal(&JournalQuery {
            units: vec!["a.service".into(), "b@*.service".into()],
            since: Some("1 hour ago".into()),
            lines: Some(5),
            follow: true,
        }),
        delta::signatures(Some("/b.raw")),
        delta::signatures(None),
        portablectl("x-1", &c),
        portablectl(
            "x-2",
            &PortableCall {
                verb: Verb::Unlink,
                ..c.clone()
            },
        ),
        arm(std::slice::from_ref(&revert), Duration::from_secs(60)),
        disarm(),
        still_switched(&[
            ("x", "/x.raw", vec!["x.service".into(), "x@.service".into()]),
            ("y", "/y.raw", Vec::new()),
        ]),
        batch(&[
            Part::from(disarm()),
            Part {
                script: still_switched(&[("x", "/x.raw", vec!["x.service".into()])]),
                needs: Some(0),
            },
            Part {
                script: record_settings("x", false),
                needs: Some(1),
            },
            Part {
                script: record_previous("x", Some("/w.raw")),
                needs: Some(1),
            },
            Part {
                script: prune(&["/v.raw".into()]),
                needs: Some(3),
            },
        ]),
        postpone(Duration::from_secs(60)),
        run_pending_revert(),
        sample(&["a.service".into()]),
        settle_until(100, Duration::from_secs(3)),
        record_previous("x", Some("/x.raw")),
        record_previous("x", None),
        stage(
            "x",
            &BTreeMap::from([("x.service".into(), "[Service]\nA=b\n".into())]),
            &["db".into()],
        ),
        stage_secret("x", "db", true),
        stage_secret("x", "db", false),
        apply("x", &["x.service".into()]),
        restore("x", &[]),
        record_settings("x", true),
        record_settings("x", false),
        swap_settings("x", &["x.service".into()]),
        forget_settings("x"),
        show(&["a.service".into()]),
        check(&Check::Http {
            url: "http://h/x".into(),
            timeout: None,
            retries: None,
        }),
        check(&Check::Http {
            url: "https://h/x".into(),
            timeout: None,
            retries: None,
        }),
    ];
    for s in scripts.iter() {
        let extra = ["-S", "warning", "-e", "SC2016,SC3025,SC2012,SC2041"];
        if let Some(f) = crate::shellcheck::findings(&s.text, &extra) {
            panic!("{}:\n{}\n{f}", s.doing, s.text);
        }
    }
    let body = revert_body(&[revert]);
    let out = std::process::Command::new("sh")
        .args(["-n", "-c", &body])
        .output()
        .unwrap();
    assert!(out.status.success());
}

#[test]
fn a_revert_attaches_the_old_image_when_the_switch_stopped_half_way() {
    let r = Revert {
        settings: false,
        restart: Vec::new(),
        service: "shop".into(),
        previous: Some("/var/lib/portables/shop_1.0.raw".into()),
        new: "/var/lib/portables/shop_2.0.raw".into(),
        calls: vec![PortableCall::new(
            Verb::Reattach,
            "/var/lib/portables/shop_1.0.raw",
            &["shop-web".into()],
            "default",
        )],
    };
    let body = revert_body(&[r]);
    assert!(
        body.contains("  if attached '/var/lib/portables/shop_2.0.raw'; then"),
        "{body}"
    );
    assert!(
        body.contains("  else\n    'portablectl' 'attach' '--enable' '--now' '--profile' 'default' '/var/lib/portables/shop_1.0.raw' 'shop-web' || rc=1"),
        "{body}"
    );
    let out = std::process::Command::new("sh")
        .args(["-n", "-c", &body])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(postpone(Duration::from_secs(60))
        .text
        .contains("--on-active=60"));
}

#[test]
fn manifests_are_read_per_image_and_missing_ones_said() {
    let out = "@manifest\t/var/lib/portables/a_1.raw\n{\n  \"x\": 1\n}\n\n@missing\t/var/lib/portables/b_1.raw\n@manifest\t/var/lib/portables/c_1.raw\n{}\n";
    let m = parse_manifests(out);
    assert_eq!(
        m["/var/lib/portables/a_1.raw"].as_deref(),
        Some("{\n  \"x\": 1\n}\n\n")
    );
    assert_eq!(m["/var/lib/portables/b_1.raw"], None);
    assert_eq!(m["/var/lib/portables/c_1.raw"].as_deref(), Some("{}\n"));
    let facts = parse_facts("manifest\ta_1.raw\n");
    assert!(facts.has_manifest("/var/lib/portables/a_1.raw"));
    assert!(!facts.has_manifest("/var/lib/portables/b_1.raw"));
    assert!(prune(&["/var/lib/portables/a_1.raw".into()])
        .text
        .contains("/var/lib/attache/manifests/a_1.raw.json"));
}

#[test]
fn the_journal_of_a_service_includes_its_template_instances() {
    let facts = parse_facts(
        "attached\techo.socket\t/var/lib/portables/echo_1.0.raw\n\
         attached\techo@.service\t/var/lib/portables/echo_1.0.raw\n\
         attached\tshop-web.service\t/var/lib/portables/shop_1.0.raw\n",
    );
    assert_eq!(
        journal_units(&facts, Some("echo")),
        ["echo.socket", "echo@*.service"]
    );
    assert_eq!(journal_units(&facts, None).len(), 3);
    let q = JournalQuery {
        units: journal_units(&facts, Some("shop")),
        ..JournalQuery::default()
    };
    assert_eq!(
        journal(&q).text,
        "'journalctl' '--no-pager' '-o' 'json' '--lines=100' '--unit=shop-web.service'"
    );
}

/// A settings-only change goes back by restoring the settings and
/// restarting; an image change restores them before the portablectl calls.
#[test]
fn revert_puts_settings_back_first() {
    let only = Revert {
        service: "conf".into(),
        previous: Some("/var/lib/portables/conf_1.0.raw".into()),
        new: "/var/lib/portables/conf_1.0.raw".into(),
        calls: vec![],
        settings: true,
        restart: vec!["conf.service".into()],
    };
    let body = revert_body(std::slice::from_ref(&only));
    assert!(body.contains(
        "if restore 'conf'; then systemctl daemon-reload || rc=1; systemctl restart 'conf.service' || rc=1; fi\n"
    ));
    assert!(!body.contains("portablectl"));
    let with_image = Revert {
        new: "/var/lib/portables/conf_2.0.raw".into(),
        calls: vec![PortableCall::new(
            Verb::Reattach,
            "/var/lib/portables/conf_1.0.raw",
            &["conf".into()],
            "default",
        )],
        restart: vec![],
        ..only
    };
    let body = revert_body(&[with_image]);
    let restore = body.find("if restore 'conf'").unwrap();
    assert!(restore < body.find("portablectl").unwrap(), "{body}");
}

/// An admin's own drop-in (`systemctl edit`) next to ours keeps the unit's
/// `.d` directory: switching settings must go on, and putting them back
/// must bring ours back.
#[test]
fn settings_switch_beside_an_admins_own_drop_in() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_str().unwrap().to_owned();
    let s = format!("{root}/settings");
    let etc = format!("{root}/etc/");
    std::fs::create_dir_all(format!("{s}/live/svc/units")).unwrap();
    std::fs::create_dir_all(format!("{s}/next/svc/units")).unwrap();
    std::fs::create_dir_all(format!("{etc}u.service.d")).unwrap();
    std::fs::write(format!("{s}/live/svc/units/u.service.conf"), "old\n").unwrap();
    std::fs::write(format!("{s}/next/svc/units/u.service.conf"), "new\n").unwrap();
    std::fs::write(format!("{etc}u.service.d/attache.conf"), "old\n").unwrap();
    std::fs::write(format!("{etc}u.service.d/override.conf"), "admin\n").unwrap();
    let run = |text: String| {
        let text = text
            .replace("/var/lib/attache/settings", &s)
            .replace("/etc/systemd/system/", &etc);
        std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("systemctl() {{ :; }}\n{text}"))
            .output()
            .unwrap()
    };
    let ours = format!("{etc}u.service.d/attache.conf");
    let out = run(apply("svc", &[]).text);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read_to_string(&ours).unwrap(), "new\n");
    let out = run(restore("svc", &[]).text);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read_to_string(&ours).unwrap(), "old\n");
    assert_eq!(
        std::fs::read_to_string(format!("{etc}u.service.d/override.conf")).unwrap(),
        "admin\n"
    );
}

#[test]
fn a_batch_runs_each_part_on_its_own_and_skips_what_needed_a_failure() {
    let s = |t: &str| Script::new("x", t);
    let parts = [
        Part::from(s("echo one; printf 'no newline'")),
        Part::from(s("echo two >&2; exit 3")),
        Part {
            script: s("echo never"),
            needs: Some(1),
        },
        Part {
            script: s("echo four"),
            needs: Some(0),
        },
    ];
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(batch(&parts).text)
        .output()
        .unwrap();
    assert!(out.status.success());
    let got = parse_batch(&String::from_utf8_lossy(&out.stdout), parts.len());
    let want = |code: Option<i32>, output: &str| PartOutput {
        code,
        output: output.into(),
    };
    assert_eq!(
        got,
        [
            want(Some(0), "one\nno newline"),
            want(Some(3), "two\n"),
            want(None, ""),
            want(Some(0), "four\n"),
        ]
    );
    // Cut short: what did not report did not run.
    assert_eq!(parse_batch("@@attache-part\t0\nhalf", 2)[0].code, None);
}

/// The settle time runs on the host's clock from the first sample: the
/// wait ends that long after the sample, however late it starts.
#[test]
fn the_settle_time_counts_from_the_sample() {
    let sh = |text: &str| {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(text)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let at = parse_uptime(&sh(&sample(&[]).text)).unwrap();
    let started = std::time::Instant::now();
    sh(&settle_until(at, Duration::from_millis(600)).text);
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(450), "{waited:?}");
    // Already past: no wait.
    let started = std::time::Instant::now();
    sh(&settle_until(at, Duration::ZERO).text);
    assert!(started.elapsed() < Duration::from_millis(400));
    assert_eq!(parse_uptime("@uptime=1058.34\n@unit=a"), Some(105_834));
    assert_eq!(parse_uptime("@unit=a"), None);
}

/// One `systemctl show` for every unit: its blocks, a blank line between
/// two, are named in the order the units were given; a failing `systemctl`
/// fails the script; no unit, no `systemctl` (it would show the manager).
#[test]
fn one_show_names_each_block_by_order() {
    let run = |fake: &str, units: &[&str]| {
        let units: Vec<String> = units.iter().map(|u| (*u).to_owned()).collect();
        std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("systemctl() {{ {fake}; }}\n{}", show(&units).text))
            .output()
            .unwrap()
    };
    let out = run(
        r"printf 'ActiveState=active\nRootImage=/x.raw\n\nActiveState=inactive\n\nActiveState=failed\nResult=exit-code\n'",
        &["a.service", "b b.timer", "c.socket"],
    );
    assert!(out.status.success(), "{out:?}");
    let s = parse_show(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(s.len(), 3, "{s:?}");
    assert_eq!(s["a.service"].root_image, "/x.raw");
    assert_eq!(s["b b.timer"].active, "inactive");
    assert_eq!(s["c.socket"].result, "exit-code");
    assert!(!run("return 4", &["a.service"]).status.success());
    // A main process that is still systemd's (PID 1's program) has not
    // started the unit's program; MainPID=0 (none) is not pending.
    let out = run(
        r"printf 'ActiveState=active\nMainPID=1\n\nActiveState=active\nMainPID=0\n'",
        &["a.service", "b.service"],
    );
    let s = parse_show(&String::from_utf8(out.stdout).unwrap());
    let readable = std::fs::metadata("/proc/1/exe").is_ok();
    assert_eq!(s["a.service"].pending, readable, "{s:?}");
    assert!(!s["b.service"].pending, "{s:?}");
    let out = run("echo called", &[]);
    assert!(out.status.success() && out.stdout.is_empty(), "{out:?}");
}

/// Runs `text` with sh, the host's paths moved under `root` and fake
/// `systemctl`, `systemd-run` and `df` first on the PATH (they log their
/// arguments to `root/calls`), `input` on stdin.
fn run_rooted(root: &std::path::Path, text: &str, input: &[u8]) -> std::process::Output {
    use std::io::Write;
    let r = root.display().to_string();
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for (name, out) in [
        (
            "systemctl",
            r"printf 'systemd 252 (252.36-1~deb12u1)\n+PAM +AUDIT\n'",
        ),
        ("systemd-run", ":"),
        (
            "df",
            r"printf 'Filesystem 1024-blocks Used Available Capacity Mounted on\n/dev/vda1 4000 1000 3000 25%% /\n'",
        ),
    ] {
        let f = bin.join(name);
        std::fs::write(
            &f,
            format!("#!/bin/sh\necho {name} \"$@\" >> {r}/calls\n{out}\n"),
        )
        .unwrap();
        std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let text = rooted(root, text);
    let mut c = std::process::Command::new("sh")
        .arg("-c")
        .arg(text)
        .env(
            "PATH",
            format!(
                "{}:{}",
                bin.display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = c.stdin.take().unwrap();
    // The script may stop reading early (a refused push).
    let _ = stdin.write_all(input);
    drop(stdin);
    c.wait_with_output().unwrap()
}

/// `text` with the host's paths moved under `root`.
fn rooted(root: &std::path::Path, text: &str) -> String {
    let r = root.display();
    text.replace("/var/lib/portables", &format!("{r}/portables"))
        .replace("/var/lib/attache", &format!("{r}/attache"))
        .replace("/etc/systemd/system", &format!("{r}/etc"))
        .replace("/run/systemd/system.attached", &format!("{r}/run.attached"))
        .replace("/run/systemd/transient", &format!("{r}/transient"))
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

/// The facts script, all builtins but a process per tool, prints what the
/// parser reads: drop-ins read for their image, images with their mtimes,
/// records, and each file asked for hashed once.
#[test]
fn facts_script_reads_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let r = root.display().to_string();
    let write = |p: &str, text: &[u8]| {
        let p = root.join(p);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    };
    // Nothing there: every loop ends quietly.
    let out = run_rooted(
        root,
        &facts(&[format!("{r}/portables/x_1.raw")], true).text,
        b"",
    );
    assert!(out.status.success() && out.stderr.is_empty(), "{out:?}");
    let f = parse_facts(&String::from_utf8(out.stdout).unwrap());
    assert_eq!((f.systemd, f.free_kb), (252, 3000));
    assert!(
        f.images.is_empty() && f.attached.is_empty() && f.sha256.is_empty(),
        "{f:?}"
    );

    let shop1 = format!("{r}/portables/shop_1.0.raw");
    let shop0 = format!("{r}/portables/shop_0.9.raw");
    write("portables/shop_1.0.raw", b"one");
    write("portables/shop_0.9.raw", b"zero");
    write("attache/prefixes/shop_1.0.raw", b"shop-web shop-api\n");
    write("attache/shop.previous", format!("{shop0}\n").as_bytes());
    write("attache/manifests/shop_1.0.raw.json", b"{}");
    write(
        "etc.attached/shop-web.service.d/20-portable.conf",
        format!("# Drop-in created for image '{shop1}', do not edit.\n[Service]\n").as_bytes(),
    );
    write("etc.attached/own.service.d/20-portable.conf", b"# mine\n");
    write(
        "run.attached/shop-api.service.d/20-portable.conf",
        format!("# Drop-in created for image '{shop1}', do not edit.").as_bytes(),
    );
    let asked = [
        shop0.clone(),
        format!("{r}/portables/gone.raw"),
        shop1.clone(),
    ];
    let out = run_rooted(root, &facts(&asked, true).text, b"");
    assert!(out.status.success() && out.stderr.is_empty(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.matches("sha256\t").count(), 2, "{text}");
    let f = parse_facts(&text);
    let mut units: Vec<_> = f
        .attached
        .iter()
        .map(|a| (a.unit.as_str(), a.image.as_str()))
        .collect();
    units.sort();
    assert_eq!(
        units,
        [
            ("shop-api.service", shop1.as_str()),
            ("shop-web.service", shop1.as_str())
        ]
    );
    let mtime = |p: &str| {
        std::fs::metadata(p)
            .unwrap()
            .modified()
            .unwrap()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    assert_eq!(
        f.images,
        BTreeMap::from([
            (shop0.clone(), mtime(&shop0)),
            (shop1.clone(), mtime(&shop1))
        ])
    );
    assert_eq!(f.prefixes["shop_1.0.raw"], ["shop-web", "shop-api"]);
    assert_eq!(f.previous["shop"], shop0);
    assert!(f.has_manifest(&shop1));
    assert_eq!(
        f.sha256,
        BTreeMap::from([(shop0, sha256_hex(b"zero")), (shop1, sha256_hex(b"one"))])
    );
}

/// What a push leaves on the host, run by sh with the body (image or
/// delta), manifest and signature on stdin, whole or cut short.
#[test]
fn push_places_only_a_whole_checked_image() {
    let image = b"image bytes ".repeat(1000);
    let (manifest, sig) = (b"{\"m\":1}".to_vec(), b"signature\n".to_vec());
    let target = "/var/lib/portables/b_1.raw";
    let tmp = partial_path(target);
    let whole = |faults: PushFaults| {
        push(
            &Body::Whole {
                size: image.len() as u64,
            },
            &tmp,
            target,
            &sha256_hex(&image),
            &["b".into()],
            manifest.len() as u64,
            sig.len() as u64,
            faults,
        )
        .text
    };
    let all = [image.clone(), manifest.clone(), sig.clone()].concat();
    let run = |text: &str, input: &[u8]| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("portables")).unwrap();
        let out = run_rooted(dir.path(), text, input);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (dir, out.status.code(), stderr)
    };
    let ls = |dir: &tempfile::TempDir, sub: &str| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir.path().join(sub))
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    let mode = |p: std::path::PathBuf| {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions())
            & 0o777
    };

    let (dir, code, err) = run(&whole(PushFaults::default()), &all);
    assert_eq!(code, Some(0), "{err}");
    let p = dir.path();
    assert_eq!(std::fs::read(p.join("portables/b_1.raw")).unwrap(), image);
    assert_eq!(
        std::fs::read(p.join("attache/manifests/b_1.raw.json")).unwrap(),
        manifest
    );
    assert_eq!(
        std::fs::read(p.join("attache/signatures/b_1.raw.sig")).unwrap(),
        sig
    );
    assert_eq!(
        std::fs::read_to_string(p.join("attache/prefixes/b_1.raw")).unwrap(),
        "b\n"
    );
    for f in [
        "portables/b_1.raw",
        "attache/manifests/b_1.raw.json",
        "attache/signatures/b_1.raw.sig",
        "attache/prefixes/b_1.raw",
    ] {
        assert_eq!(mode(p.join(f)), 0o644, "{f}");
    }
    assert_eq!(ls(&dir, "portables"), ["b_1.raw"]);
    assert_eq!(ls(&dir, "attache/signatures"), ["b_1.raw.sig"]);

    // Cut in the image, the manifest, the signature.
    let (dir, code, err) = run(&whole(PushFaults::default()), &all[..100]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("the connection ended before the image had arrived"),
        "{err}"
    );
    assert!(ls(&dir, "portables").is_empty() && ls(&dir, "attache/prefixes").is_empty());
    let (dir, code, err) = run(&whole(PushFaults::default()), &all[..image.len() + 2]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("the connection ended before the manifest had arrived"),
        "{err}"
    );
    assert!(ls(&dir, "portables").is_empty() && ls(&dir, "attache/signatures").is_empty());
    let (dir, code, err) = run(&whole(PushFaults::default()), &all[..all.len() - 1]);
    assert_eq!(code, Some(66), "{err}");
    assert!(err.contains(PUSH_NO_SIGNATURE), "{err}");
    assert_eq!(ls(&dir, "portables"), ["b_1.raw"]);
    assert!(ls(&dir, "attache/signatures").is_empty());

    // Damaged: refused with the sha256 it had, nothing left.
    let mut bad = all.clone();
    bad[5] ^= 1;
    let (dir, code, err) = run(&whole(PushFaults::default()), &bad);
    assert_eq!(code, Some(65), "{err}");
    assert!(err.contains(PUSH_CORRUPT), "{err}");
    assert!(ls(&dir, "portables").is_empty());
    let (_, code, err) = run(
        &whole(PushFaults {
            corrupt: true,
            ..PushFaults::default()
        }),
        &all,
    );
    assert_eq!(code, Some(65), "{err}");

    // A delta: a script that rebuilds the image from its basis.
    for (check, want) in [
        (None, 0),
        (Some(sha256_hex(&image)), 0),
        (Some("0".repeat(64)), 67),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path().display().to_string();
        std::fs::create_dir_all(dir.path().join("portables")).unwrap();
        std::fs::write(dir.path().join("portables/b_0.raw"), &image).unwrap();
        let input = format!("cp {r}/portables/b_0.raw {r}/portables/.b_1.raw.attache-partial\n");
        let text = push(
            &Body::Delta {
                file: &delta::delta_path(target),
                size: input.len() as u64,
                basis: "/var/lib/portables/b_0.raw",
                check: check.as_deref(),
            },
            &tmp,
            target,
            &sha256_hex(&image),
            &[],
            0,
            0,
            PushFaults::default(),
        )
        .text;
        let out = run_rooted(dir.path(), &text, input.as_bytes());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(want), "{err}");
        let placed = if want == 0 {
            vec!["b_0.raw", "b_1.raw"]
        } else {
            assert!(err.contains(PUSH_NO_DELTA), "{err}");
            vec!["b_0.raw"]
        };
        assert_eq!(ls(&dir, "portables"), placed, "{err}");
    }
}

/// Arming writes what the revert needs at boot, then leaves the files that
/// do not change alone (no process for them), and rewrites one that is
/// not ours or not whole.
#[test]
fn arm_writes_the_static_files_once() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let r = Revert {
        settings: false,
        restart: vec![],
        service: "shop".into(),
        previous: None,
        new: "/var/lib/portables/shop_1.raw".into(),
        calls: vec![PortableCall::new(
            Verb::Unlink,
            "/var/lib/portables/shop_1.raw",
            &["shop".into()],
            "default",
        )],
    };
    let text = arm(std::slice::from_ref(&r), Duration::from_secs(60)).text;
    std::fs::create_dir_all(root.join("attache")).unwrap();
    std::fs::write(root.join("attache/revert.disarmed"), "old").unwrap();
    let out = run_rooted(root, &text, b"");
    assert!(out.status.success(), "{out:?}");
    let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
    let body = |p: &str| read(p).split_once('\n').unwrap().1.to_owned();
    assert_eq!(body("attache/run-revert"), rooted(root, revert::RUN_REVERT));
    assert_eq!(
        body("etc/attache-revert.service").trim_end(),
        rooted(root, revert::REVERT_UNIT).trim_end()
    );
    assert!(read("attache/unlink").contains("daemon-reload"));
    assert_eq!(read("attache/revert.sh"), rooted(root, &revert_body(&[r])));
    assert!(!root.join("attache/revert.disarmed").exists());
    let link = root.join("etc/multi-user.target.wants/attache-revert.service");
    assert_eq!(
        std::fs::read_link(&link).unwrap(),
        root.join("etc/attache-revert.service")
    );
    assert!(read("calls").contains("systemd-run --quiet --unit=attache-revert-now --on-active=60"));

    use std::os::unix::fs::MetadataExt;
    let ino = |p: &str| std::fs::metadata(root.join(p)).unwrap().ino();
    let before = [
        ino("attache/run-revert"),
        ino("attache/unlink"),
        ino("etc/attache-revert.service"),
    ];
    std::fs::rename(
        root.join("attache/revert.sh"),
        root.join("attache/revert.disarmed"),
    )
    .unwrap();
    std::fs::write(root.join("attache/unlink"), "not ours\n").unwrap();
    let unlink = ino("attache/unlink");
    let out = run_rooted(root, &text, b"");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        [ino("attache/run-revert"), ino("etc/attache-revert.service")],
        [before[0], before[2]]
    );
    assert_ne!(ino("attache/unlink"), unlink);
    assert!(read("attache/unlink").contains("daemon-reload"));
    assert!(
        root.join("attache/revert.sh").exists() && !root.join("attache/revert.disarmed").exists()
    );
}
