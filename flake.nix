{
  description = "attache: turn a Nix derivation into a systemd portable service image and deploy it";

  # Never fetched on the offline build machines: tests override it with
  #   --override-input nixpkgs path:$PWD/examples/stub-nixpkgs
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: builtins.listToAttrs (map (system: { name = system; value = f system; }) systems);

      # Pure: no package set needed.
      hosts = import ./nix/hosts.nix;
      # { portableService, hosts } for a package set; images that `nix build`
      # gives are packed by this flake's attache, built with the same set.
      mkLib = pkgs: import ./nix/lib.nix { inherit pkgs; attache = mkPackage pkgs; };

      cargoToml = builtins.fromTOML (builtins.readFile ./cli/Cargo.toml);

      # Only what cargo needs, so editing examples/ or nix/ does not rebuild the CLI.
      src = builtins.path {
        name = "attache-source";
        path = ./.;
        filter = path: type:
          let rel = builtins.substring (builtins.stringLength (toString ./.) + 1) (-1) (toString path);
          in builtins.any (keep: rel == keep || builtins.substring 0 (builtins.stringLength keep + 1) rel == keep + "/")
            [ "Cargo.toml" "Cargo.lock" "cli" "tests" ];
      };

      mkPackage = pkgs:
        let
          inherit (pkgs) lib stdenv;
          # The package packs the images of its own portableService.
          attacheLib = import ./nix/lib.nix { inherit pkgs; attache = package; };
          package = pkgs.rustPlatform.buildRustPackage {
            pname = "attache";
            version = cargoToml.package.version;
            inherit src;
            cargoLock.lockFile = ./Cargo.lock;
            cargoBuildFlags = [ "-p" "attache" ];
            nativeBuildInputs = [ pkgs.pkg-config pkgs.installShellFiles ];
            buildInputs = [ pkgs.xz pkgs.zstd ];
            env.ZSTD_SYS_USE_PKG_CONFIG = true;
            # The test suite boots VMs; it does not run in the Nix sandbox.
            doCheck = false;
            postInstall = lib.optionalString (stdenv.buildPlatform.canExecute stdenv.hostPlatform) ''
              installShellCompletion --cmd attache \
                --bash <($out/bin/attache completions bash) \
                --zsh <($out/bin/attache completions zsh) \
                --fish <($out/bin/attache completions fish)
              $out/bin/attache man > attache.1
              installManPage attache.1
            '';
            passthru = {
              inherit (attacheLib) portableService;
              lib = attacheLib;
            };
            meta = {
              description = cargoToml.package.description;
              license = with lib.licenses; [ mit asl20 ];
              mainProgram = "attache";
              platforms = lib.platforms.linux;
            };
          };
        in
        package;
    in
    {
      lib = {
        inherit hosts mkLib;
      };

      # pkgs.attache (the CLI) with pkgs.attache.portableService and pkgs.attache.lib.
      overlays.default = final: prev: {
        attache = mkPackage final;
      };

      packages = forAllSystems (system:
        let attache = mkPackage nixpkgs.legacyPackages.${system}; in
        { inherit attache; default = attache; });

      apps = forAllSystems (system: {
        default = {
          type = "app";
          program = "${self.packages.${system}.attache}/bin/attache";
        };
      });
    };
}
