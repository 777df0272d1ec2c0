# `import nixpkgs { system; overlays; }` for the stub, as with real nixpkgs.
# The busybox seed is read by content hash (seed.nix), so this works in pure
# evaluation, e.g. from a flake that overrides its `nixpkgs` input with this
# directory.
{ system ? builtins.currentSystem, overlays ? [ ], config ? { }, ... }:
import ./pkgs.nix {
  inherit system overlays config;
  seed = builtins.fetchTree (import ./seed.nix);
}
