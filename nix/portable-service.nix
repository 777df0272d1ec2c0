# attache's portableService: the same arguments as nixpkgs' pkgs.portableService,
# and, like it, a derivation whose output is $out/PNAME_VERSION.raw. The image
# is packed by the `attache` package given here (`attache pack-spec`, the packer
# and checks of `attache build`) from a small JSON spec, reachable on its own
# as the `spec` attribute: the attache CLI builds and packs only that, outside
# the store. The spec file's runtime closure is exactly what goes into the
# image: the units, the symlink objects, `contents`, and their closures
# (builtins.toJSON keeps the store references of the strings it serialises).
{ pkgs
, attache ? null # the attache package that packs the image under `nix build`
}:

{ pname ? null
, name ? null # older callers passed `name` instead of `pname`
, version
, units
, description ? null
, homepage ? null
, symlinks ? [ ]
, contents ? [ ]
, squashfs-tools ? null # accepted for compatibility; attache packs the image itself
, squash-compression ? "xz -Xdict-size 100%"
, squash-block-size ? "1M"
  # attache extras
, osRelease ? { } # extra or overriding os-release fields
, portablePrefixes ? null # list of unit prefixes (PORTABLE_PREFIXES)
, id ? null # os-release ID
}:
let
  imageName =
    if pname != null then pname
    else if name != null then name
    else throw "attache.portableService: missing argument 'pname' (the image name, e.g. pname = \"demo\";)";

  storeDir = builtins.storeDir;
  isStorePathString = s: builtins.substring 0 (builtins.stringLength storeDir + 1) s == storeDir + "/";
  isDrv = x: builtins.isAttrs x && (x.type or null) == "derivation";

  # A unit's file name in the image: `name` of a derivation, the base name of
  # a path (./files/app.socket) or of a string ("${units}/echo@.service"; for
  # a whole store path, its name without the hash), or `name` of an explicit
  # { name = "echo@.service"; path = …; }. Nothing else is stripped. Store
  # names cannot contain '@', so template units come as a file inside a
  # derivation's output or as { name; path; }.
  unitName = u:
    if isDrv u then u.name
    else if builtins.isPath u then baseNameOf u
    else if builtins.isAttrs u && u ? path then u.name or (unitName u.path)
    else if builtins.isAttrs u then u.name or (baseNameOf (toString u))
    else
      let b = baseNameOf u; in
      if isStorePathString u && builtins.match "[0-9a-df-np-sv-z]{32}-.+" b != null
      then builtins.substring 33 (-1) b
      else b;

  # "${x}" copies paths to the store and keeps string context.
  str = x: "${x}";

  spec = {
    attacheSpec = 1;
    pname = imageName;
    inherit version description homepage;
    units = map (u: { name = unitName u; path = str (if builtins.isAttrs u && !(u ? outPath) && u ? path then u.path else u); }) units;
    symlinks = map (s: { object = str s.object; symlink = s.symlink; }) symlinks;
    contents = map str contents;
    squashCompression = squash-compression;
    squashBlockSize = squash-block-size;
    inherit osRelease portablePrefixes id;
  };

  # A valid store name even for names Rust will reject (it explains why).
  sanitize = s:
    let chars = builtins.genList (i: builtins.substring i 1 s) (builtins.stringLength s);
    in builtins.concatStringsSep "" (map (c: if builtins.match "[A-Za-z0-9+._?=-]" c != null then c else "-") chars);
  safeName = sanitize "${toString imageName}-${toString version}";

  specFile = pkgs.writeText "attache-spec-${safeName}.json" (builtins.toJSON spec) // {
    pname = imageName;
    inherit version;
    attacheSpec = true;
    value = spec;
  };

  # What `nix build` gives, named like nixpkgs' image derivation. The builder
  # is attache itself: no shell, and the closure comes from Nix (the same
  # `nix-store -qR` of the spec file that `attache build` packs).
  image = derivation {
    name = sanitize "${toString imageName}-img-${toString version}";
    system = pkgs.stdenv.hostPlatform.system;
    builder = "${attache}/bin/attache";
    args = [ "pack-spec" "--closure" "closure" "--out-dir" (builtins.placeholder "out") "${specFile}" ];
    exportReferencesGraph = [ "closure" specFile ];
  };

  noPacker = pkgs.runCommand (sanitize "${toString imageName}-img-${toString version}") { } ''
    echo "attache.portableService: no attache package to pack ${safeName} with under nix build: use attache's overlay (pkgs.attache.portableService), or pass it: import ATTACHE/nix/lib.nix { inherit pkgs; attache = ATTACHE.packages.${pkgs.stdenv.hostPlatform.system}.attache; }. attache build packs the spec without one." >&2
    exit 1
  '';
in
(if attache == null then noPacker else image) // {
  pname = imageName;
  inherit version;
  # `attache build` and `deploy` build and pack this, never the image.
  attacheSpec = true;
  spec = specFile;
  packer = attache;
}
