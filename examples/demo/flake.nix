{
  description = "attache demo services: build offline from the busybox stub";

  # No inputs, so no flake.lock: the package set is the stub nixpkgs
  # (./stub-nixpkgs -> ../stub-nixpkgs, busybox pinned by content) and the
  # library is attache's own (./attache -> ../../nix). Both are symlinks inside
  # this git repository; to use a copy as path:/DIR, copy with `cp -rL` so the
  # links are followed (a path: flake keeps symlinks, and these would dangle).
  outputs = { self }:
    let
      system = "x86_64-linux";
      # Used as path:DIR without following the links, they point outside the
      # flake and would dangle: say so instead of "getting status of '/nix/nix'".
      dangling = toString ./. == self.outPath
        && builtins.elem "symlink" [ ((builtins.readDir ./.).attache or null) ((builtins.readDir ./.).stub-nixpkgs or null) ];
      danglingError = throw "attache demo: ./attache and ./stub-nixpkgs are symlinks into the attache repository (../../nix and ../stub-nixpkgs), which a path: flake cannot follow. Use ./examples/demo#demo from the repository, or copy the demo with `cp -rL` and use path:COPY#demo.";
      pkgs = if dangling then danglingError else import ./stub-nixpkgs { inherit system; };
      attache = if dangling then danglingError else import ./attache/lib.nix { inherit pkgs; };
      inherit (pkgs) busybox writeText writeTextDir writeShellScript;
      bb = "${busybox}/bin/busybox";

      webroot = version: writeTextDir "index.html" ''
        <!doctype html>
        <title>attache demo ${version}</title>
        <h1>attache demo ${version}</h1>
        <p>Served by busybox httpd from a systemd portable service.</p>
      '';

      demoService = { version, execStart ? "${bb} httpd -f -p 8080 -h ${webroot version}" }:
        writeText "demo.service" ''
          [Unit]
          Description=attache demo web server ${version} (busybox httpd on :8080)

          [Service]
          ExecStart=${execStart}

          [Install]
          WantedBy=multi-user.target
        '';

      tickTimer = writeText "demo-tick.timer" ''
        [Unit]
        Description=attache demo: tick every 30 seconds

        [Timer]
        OnActiveSec=5s
        OnUnitActiveSec=30s

        [Install]
        WantedBy=timers.target
      '';
      tickService = version: writeText "demo-tick.service" ''
        [Unit]
        Description=attache demo: log a tick

        [Service]
        Type=oneshot
        ExecStart=${bb} echo "demo-tick: demo ${version} is alive"
      '';

      mkDemo = { version, service }: attache.portableService {
        pname = "demo";
        inherit version;
        description = "attache demo: a static web page and a timer";
        homepage = "https://example.invalid/attache-demo";
        units = [ service tickTimer (tickService version) ];
      };

      simple = pname: unitName: attache.portableService {
        inherit pname;
        version = "1.0";
        units = [
          (writeText unitName ''
            [Service]
            ExecStart=${bb} sleep 3600
          '')
        ];
      };

      echoTemplate = pkgs.writeTextFile {
        name = "echo-template-unit";
        destination = "/echo@.service";
        text = ''
          [Unit]
          Description=attache demo: echo one line back

          [Service]
          ExecStart=${echoRespond}
          StandardInput=socket
          StandardOutput=socket
        '';
      };

      echoRespond = writeShellScript "echo-respond" ''
        read -r line
        echo "echo: $line"
      '';
    in
    {
      packages.${system} = rec {
        default = demo;

        demo = mkDemo { version = "1.0"; service = demoService { version = "1.0"; }; };
        demo-v2 = mkDemo { version = "2.0"; service = demoService { version = "2.0"; }; };
        # Version 1.0 again, with other content: a rebuild without a version
        # bump, which deploy must not write over the attached 1.0 (tests).
        demo-rebuilt = mkDemo { version = "1.0"; service = demoService { version = "1.0-rebuilt"; }; };
        # demo.service exits 1 at once (for failed-deploy and rollback tests).
        demo-broken = mkDemo {
          version = "2.1";
          service = demoService {
            version = "2.1";
            execStart = "${bb} sh -c 'echo demo 2.1 is broken >&2; exit 1'";
          };
        };

        # Socket-activated: one unit given as a plain path, as people do.
        echo = attache.portableService {
          pname = "echo";
          version = "1.0";
          description = "attache demo: line echo on TCP 7777";
          # '@' is not allowed in store path names, so the template unit is a
          # file inside a derivation's output ({ name; path; } works too).
          units = [
            ./files/echo.socket
            "${echoTemplate}/echo@.service"
          ];
          symlinks = [ { object = "${busybox}/bin/sh"; symlink = "/bin/sh"; } ];
        };

        # 40 MB of incompressible data: an upload long enough to cut the
        # connection in the middle of it (tests).
        big = attache.portableService {
          pname = "big";
          version = "1.0";
          units = [
            (writeText "big.service" ''
              [Service]
              ExecStart=${bb} sleep infinity

              [Install]
              WantedBy=multi-user.target
            '')
          ];
          contents = [
            (derivation {
              name = "big-blob";
              inherit system;
              builder = "${busybox}/bin/sh";
              args = [ "-c" "${bb} head -c 41943040 /dev/urandom > $out" ];
            })
          ];
          squash-compression = "gzip";
        };

        # Meant to be refused by `attache build`, each with a clear message.
        bad-name = simple "bad_name" "bad_name.service";
        bad-unit = simple "badunit" "other.service";
        nounits = attache.portableService { pname = "nounits"; version = "1.0"; units = [ ]; };

        # Not a portableService: a plain package shipping its own unit.
        plainpkg = pkgs.stdenv.mkDerivation {
          pname = "plainpkg";
          version = "0.3";
          dontUnpack = true;
          installPhase = ''
            mkdir -p $out/bin $out/share/plainpkg $out/lib/systemd/system
            echo "plainpkg 0.3" > $out/share/plainpkg/index.html
            printf '#!%s\nexec %s httpd -f -p 8081 -h %s\n' \
              ${pkgs.runtimeShell} ${bb} $out/share/plainpkg > $out/bin/plainpkg
            chmod +x $out/bin/plainpkg
            printf '[Unit]\nDescription=plainpkg 0.3\n\n[Service]\nExecStart=%s\n\n[Install]\nWantedBy=multi-user.target\n' \
              $out/bin/plainpkg > $out/lib/systemd/system/plainpkg.service
          '';
        };
      };

      # Not a derivation at all (kept out of `packages` so `nix flake show`
      # stays clean; `nix build .#notadrv` still finds it here).
      legacyPackages.${system}.notadrv = "this is a string, not a derivation";

      # The inventory, through the hosts helper. The CLI reads it with
      #   nix eval --json .#attache.hosts --apply '…'
      # A copy of this flake used as path:DIR may bring its own inventory in
      # ./hosts.nix (`packages: { NAME = { … }; }`): the test suite and
      # scripts/demo write one for their throwaway lab hosts.
      attache.hosts = attache.hosts (if builtins.pathExists ./hosts.nix
        then import ./hosts.nix self.packages.${system}
        else {
        h1 = {
          tags = [ "web" ];
          services = [ self.packages.${system}.demo ];
          checks.demo = [ { type = "http"; url = "http://127.0.0.1:8080/"; } ];
        };
        h2 = {
          host = "h2.example.invalid";
          user = "deploy";
          port = 2222;
          tags = [ "web" "canary" ];
          services = {
            inherit (self.packages.${system}) demo echo;
          };
          checks = {
            demo = { type = "http"; url = "http://127.0.0.1:8080/"; timeout = 5; retries = 10; };
            echo = [ { type = "command"; command = "echo hi | busybox nc 127.0.0.1 7777"; } ];
          };
        };
      });
    };
}
