# attache's Nix library, usable without flakes:
#   attache = import ./nix/lib.nix { inherit pkgs; };
#   attache.portableService { pname = "demo"; version = "1.0"; units = [ … ]; }
#   attache.hosts { web1 = { services = [ demo ]; }; }
# `attache` is the package that packs images under `nix build` (the overlay's
# pkgs.attache by default); without one, `nix build` of a portableService
# fails and says how to pass it, while `attache build` packs the spec itself.
{ pkgs, attache ? pkgs.attache or null }:
{
  portableService = import ./portable-service.nix { inherit pkgs attache; };
  hosts = import ./hosts.nix;
}
