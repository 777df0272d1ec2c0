{
  description = "A user's flake: a small web service packaged as a portable service with attache";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";
    # Replace OWNER with where attache is published.
    attache.url = "github:OWNER/attache";
    attache.inputs.nixpkgs.follows = "nixpkgs";
  };

  outputs = { self, nixpkgs, attache }:
    let
      system = "x86_64-linux";
      pkgs = import nixpkgs {
        inherit system;
        overlays = [ attache.overlays.default ];
      };
      inherit (pkgs) lib;

      hello-web = pkgs.writeShellScriptBin "hello-web" ''
        dir=$(${pkgs.coreutils}/bin/mktemp -d)
        echo "hello from a portable service" > "$dir/index.html"
        exec ${pkgs.busybox}/bin/busybox httpd -f -p "''${PORT:-8090}" -h "$dir"
      '';

      hello-service = pkgs.writeText "hello-web.service" ''
        [Unit]
        Description=hello-web, a tiny web page

        [Service]
        Environment=PORT=8090
        ExecStart=${lib.getExe hello-web}

        [Install]
        WantedBy=multi-user.target
      '';
    in
    {
      packages.${system} = {
        hello-web = hello-web;

        # With nixpkgs alone this would be `pkgs.portableService { … }`:
        # the same arguments, one word more.
        hello-web-image = pkgs.attache.portableService {
          pname = "hello-web";
          version = "0.1";
          description = "hello-web, a tiny web page";
          units = [ hello-service ];
          symlinks = [
            { object = "${pkgs.cacert}/etc/ssl"; symlink = "/etc/ssl"; }
          ];
        };

        default = self.packages.${system}.hello-web-image;
      };

      # `attache deploy` reads the inventory from here.
      attache.hosts = attache.lib.hosts {
        web1 = {
          host = "192.0.2.10";
          tags = [ "web" ];
          services = [ self.packages.${system}.hello-web-image ];
          checks.hello-web = [ { type = "http"; url = "http://127.0.0.1:8090/"; } ];
        };
      };
    };
}
