# attache's Nix library, usable without flakes:
#   attache = import ./nix/lib.nix { inherit pkgs; };
#   attache.portableService { pname = "demo"; version = "1.0"; units = [ … ]; }
#   attache.hosts { web1 = { services = [ demo ]; }; }
{ pkgs }:
{
  portableService = import ./portable-service.nix { inherit pkgs; };
  hosts = import ./hosts.nix;
}
