{
  description = "Offline stand-in for nixpkgs (busybox only), for attache's examples and tests";

  # No inputs: the busybox seed is pinned by content in seed.nix and read with
  # builtins.fetchTree, so no flake.lock is written.
  outputs = { self }:
    let
      lib = import ./lib.nix;
      systems = [ "x86_64-linux" "aarch64-linux" ];
    in
    {
      inherit lib;
      legacyPackages = lib.genAttrs systems (system: import ./default.nix { inherit system; });
    };
}
