# A tiny stand-in for nixpkgs' package set, built entirely from the busybox
# seed (see seed.nix). It offers the attributes attache's flake and the
# examples use, with nixpkgs' names and calling conventions, so a flake written
# for real nixpkgs evaluates and builds offline with
#   --override-input nixpkgs path:/…/examples/stub-nixpkgs
# It is a test fixture: nothing here compiles software.
{ system, seed, overlays ? [ ], config ? { } }:
let
  lib = import ./lib.nix;
  inherit (lib) concatStringsSep filterAttrs makeBinPath optionalString;

  base = self: let
    inherit (self) busybox;
    sh = "${busybox}/bin/sh";

    # The one builder everything below uses: a busybox shell script.
    mkDrv = { name, script, env ? { }, passthru ? { }, meta ? { }, paths ? [ ] }:
      let
        drv = derivation (env // {
          inherit name system;
          builder = sh;
          args = [ "-e" "-c" script ];
          PATH = makeBinPath ([ busybox ] ++ paths);
        });
      in
      drv // passthru // { inherit meta passthru; };

    # Attributes that can go into a derivation's environment.
    envOf = attrs: filterAttrs
      (n: v: !(builtins.elem n [ "passthru" "meta" "name" ])
        && !builtins.isFunction v
        && !(builtins.isAttrs v && !(v ? outPath)))
      attrs;

    # prebuilt/PNAME of a path: copy, or with --impure of the directory
    # $ATTACHE_STUB_PREBUILT (pure evaluation reads it as empty); else null.
    prebuiltDir = let dir = builtins.getEnv "ATTACHE_STUB_PREBUILT"; in
      if dir != "" then /. + dir else ./prebuilt;
    prebuilt = pname: if builtins.pathExists (prebuiltDir + "/${pname}") then prebuiltDir + "/${pname}" else null;
    prebuiltInstall = pname: if prebuilt pname == null then null else ''
      mkdir -p $out/bin
      cp ${prebuilt pname} $out/bin/${pname}
      chmod 0555 $out/bin/${pname}
    '';

    placeholderPkg = pname: version: mkDrv {
      name = "${pname}-${version}";
      script = "mkdir -p $out";
      passthru = { inherit pname version; };
    };

    writeTextFile =
      { name, text, executable ? false, destination ? "", checkPhase ? ""
      , meta ? { }, passthru ? { }, allowSubstitutes ? false, preferLocalBuild ? true
      , derivationArgs ? { } }:
      mkDrv {
        inherit name meta passthru;
        env = envOf derivationArgs // {
          inherit text;
          passAsFile = [ "text" ];
        };
        script = ''
          target=$out${destination}
          mkdir -p "$(dirname "$target")"
          cp "$textPath" "$target"
          ${optionalString executable ''chmod +x "$target"''}
          ${checkPhase}
        '';
      };

    mkDerivation = attrs:
      let
        name = attrs.name or "${attrs.pname}-${attrs.version}";
        hasSrc = attrs ? src && !(attrs.dontUnpack or false);
        phase = n: attrs.${n} or "";
        script =
          if attrs ? buildCommand then attrs.buildCommand
          else ''
            cd "$TMPDIR"
            ${optionalString hasSrc ''cp -r "$src"/. . && chmod -R u+w .''}
            ${phase "preBuild"}
            ${phase "buildPhase"}
            ${phase "postBuild"}
            ${phase "preInstall"}
            ${if attrs ? installPhase then attrs.installPhase else "mkdir -p $out"}
            ${phase "postInstall"}
          '';
        drv = mkDrv {
          inherit name script;
          env = envOf attrs;
          paths = (attrs.nativeBuildInputs or [ ]) ++ (attrs.buildInputs or [ ]);
          passthru = (attrs.passthru or { })
            // lib.optionalAttrs (attrs ? pname) { inherit (attrs) pname; }
            // lib.optionalAttrs (attrs ? version) { inherit (attrs) version; }
            // {
              overrideAttrs = f:
                let r = f attrs; in
                mkDerivation (attrs // (if builtins.isFunction r then r attrs else r));
            };
          meta = attrs.meta or { };
        };
      in
      drv;
  in
  {
    inherit lib system config;
    pkgs = self;
    stdenv = {
      inherit mkDerivation system;
      shell = sh;
      isLinux = true;
      hostPlatform = { inherit system; isLinux = true; isx86_64 = system == "x86_64-linux"; isAarch64 = system == "aarch64-linux"; };
      buildPlatform = { inherit system; canExecute = p: p.system == system; };
    };
    stdenvNoCC = self.stdenv;
    callPackage = fn: args:
      let f = if builtins.isFunction fn then fn else import fn;
      in f (builtins.intersectAttrs (builtins.functionArgs f) self // args);

    # Debian's static busybox with an applet link for every applet, so
    # "${busybox}/bin/httpd" and lib.getExe work as with nixpkgs' busybox.
    busybox = derivation {
      name = "busybox-1.35.0";
      inherit system;
      builder = "${seed}/bin/sh";
      args = [ "-e" "-c" ''
        bb=${seed}/bin/busybox
        $bb mkdir -p $out/bin
        $bb cp $bb $out/bin/busybox
        for a in $($out/bin/busybox --list); do
          [ "$a" = busybox ] || $bb ln -s busybox "$out/bin/$a"
        done
      '' ];
    } // { pname = "busybox"; version = "1.35.0"; meta.mainProgram = "busybox"; };
    coreutils = self.busybox;
    bashInteractive = self.busybox;
    runtimeShell = sh;
    runtimeShellPackage = self.busybox;

    inherit writeTextFile;
    writeText = name: text: writeTextFile { inherit name text; };
    writeTextDir = path: text: writeTextFile {
      inherit text;
      name = builtins.baseNameOf path;
      destination = "/${path}";
    };
    writeScript = name: text: writeTextFile { inherit name text; executable = true; };
    writeScriptBin = name: text: writeTextFile {
      inherit name text;
      executable = true;
      destination = "/bin/${name}";
      meta.mainProgram = name;
    };
    writeShellScript = name: text: writeTextFile {
      inherit name;
      executable = true;
      text = "#!${sh}\n${text}\n";
      checkPhase = ''${sh} -n "$target"'';
    };
    writeShellScriptBin = name: text: writeTextFile {
      inherit name;
      executable = true;
      destination = "/bin/${name}";
      text = "#!${sh}\n${text}\n";
      checkPhase = ''${sh} -n "$target"'';
      meta.mainProgram = name;
    };
    writeShellApplication = { name, text, runtimeInputs ? [ ], meta ? { }, passthru ? { }, ... }:
      writeTextFile {
        inherit name passthru;
        executable = true;
        destination = "/bin/${name}";
        text = ''
          #!${sh}
          set -o errexit
          set -o nounset
          set -o pipefail
        '' + optionalString (runtimeInputs != [ ]) ''
          export PATH="${makeBinPath runtimeInputs}:$PATH"
        '' + "\n${text}\n";
        checkPhase = ''${sh} -n "$target"'';
        meta = meta // { mainProgram = name; };
      };

    runCommand = name: env: buildCommand: mkDrv {
      inherit name;
      script = buildCommand;
      env = envOf env;
      paths = (env.nativeBuildInputs or [ ]) ++ (env.buildInputs or [ ]);
      passthru = env.passthru or { };
      meta = env.meta or { };
    };
    runCommandLocal = self.runCommand;
    runCommandNoCC = self.runCommand;
    runCommandCC = self.runCommand;

    symlinkJoin = { name, paths, postBuild ? "", passthru ? { }, meta ? { }, ... }@args: mkDrv {
      inherit name passthru meta;
      env = { paths = map toString paths; };
      script = ''
        mkdir -p $out
        for p in $paths; do
          cd "$p"
          find . -mindepth 1 | while read -r f; do
            f=''${f#./}
            if [ -d "$f" ] && [ ! -L "$f" ]; then mkdir -p "$out/$f"
            elif [ ! -e "$out/$f" ]; then ln -s "$p/$f" "$out/$f"
            fi
          done
        done
        cd $out
        ${postBuild}
      '';
    };

    # nixpkgs' rustPlatform cannot run here (no toolchain offline). This keeps
    # buildRustPackage's calling convention and builds a placeholder whose
    # program says so, so that flakes packaging Rust evaluate and build.
    # A copy of this stub used as path:DIR may carry a static build of the
    # program in prebuilt/PNAME (or $ATTACHE_STUB_PREBUILT/PNAME under
    # --impure): then that is installed instead. A git flake sees only
    # tracked files, so the repository's stub has none of its own.
    rustPlatform.buildRustPackage = args: mkDerivation {
      inherit (args) pname version;
      dontUnpack = true;
      passthru = args.passthru or { };
      meta = args.meta or { };
      installPhase = let installed = prebuiltInstall args.pname; in
        if installed != null then installed else ''
        mkdir -p $out/bin
        printf '#!%s\necho "%s: placeholder built by the stub nixpkgs (no Rust toolchain offline); a path: copy of the stub installs prebuilt/%s instead" >&2\nexit 1\n' \
          ${sh} ${args.pname} ${args.pname} > $out/bin/${args.pname}
        chmod +x $out/bin/${args.pname}
      '';
    };

    # Placeholders for build inputs attache's package names; empty outputs.
    pkg-config = placeholderPkg "pkg-config" "stub";
    xz = placeholderPkg "xz" "stub";
    zstd = placeholderPkg "zstd" "stub";
    installShellFiles = placeholderPkg "install-shell-files" "stub";
    squashfsTools = placeholderPkg "squashfs-tools" "stub";
    # A CA bundle placeholder (an empty bundle), for symlinks like /etc/ssl.
    cacert = mkDrv {
      name = "nss-cacert-stub";
      script = ''
        mkdir -p $out/etc/ssl/certs
        echo "# stub nixpkgs: no certificates" > $out/etc/ssl/certs/ca-bundle.crt
        ln -s ca-bundle.crt $out/etc/ssl/certs/ca-certificates.crt
      '';
      passthru = { pname = "nss-cacert"; version = "stub"; };
    };

    # As if nixpkgs packaged attache, when there is a prebuilt attache (and
    # attache.version beside it): what examples/demo packs with.
    ${if prebuilt "attache" != null then "attache" else null} = self.rustPlatform.buildRustPackage {
      pname = "attache";
      version = lib.removeSuffix "\n" (builtins.readFile (prebuiltDir + "/attache.version"));
      meta.mainProgram = "attache";
    };

    portableService = _: throw "the stub nixpkgs has no pkgs.portableService (it needs squashfs-tools); use attache's: pkgs.attache.portableService or attache.lib.mkLib pkgs";

    appendOverlays = extra: import ./pkgs.nix { inherit system seed config; overlays = overlays ++ extra; };
    extend = f: self.appendOverlays [ f ];
  };
in
lib.fix (builtins.foldl' (acc: overlay: lib.extends overlay acc) base overlays)
